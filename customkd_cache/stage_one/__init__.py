"""Stage one: views of a dataset through a teacher, written into a feature store."""
