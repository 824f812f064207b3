"""Datasets: one registry of dataset kinds, adapters by on-disk layout, decoding and views."""
