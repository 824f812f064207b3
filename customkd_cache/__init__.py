"""customkd-cache: CustomKD distillation from vision foundation models through an offline feature cache.

Stage one (``cache``) runs the teacher once per image view and writes fingerprinted Zarr v3 stores;
stage two (``train``) trains the customizer, projectors and student from those stores.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 2
