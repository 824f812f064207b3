"""Dataset adapters, one module per on-disk layout; each adapter is named in ``data/registry.py``."""
