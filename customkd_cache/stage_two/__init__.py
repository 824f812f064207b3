"""Stage two: the customizer, projectors and student trained from a feature store.

Stage two never runs a teacher, except in ``online.py`` (the online-teacher reference).
"""
