"""customkd-cache: CustomKD distillation from vision foundation models through an offline feature cache.

Stage one (``cache``) runs the teacher once per image view and writes fingerprinted Zarr v3 stores;
stage two (``train``) trains the customizer, projectors and student from those stores.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 2

# Libraries whose versions decide what the two stages compute (key -> distribution name): a store's
# provenance and a run's results.json record them, since the same spec and seed repeat the numbers
# exactly only with the same versions.
VERSIONED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "zarr": "zarr",
    "numcodecs": "numcodecs",
    "numpy": "numpy",
    "pillow": "pillow",
    "open_clip": "open_clip_torch",
}


def library_versions() -> dict[str, str]:
    """This package's, Python's and each installed ``VERSIONED`` library's version (a library that is
    not installed, e.g. open_clip for timm-only work, is left out). Read from the installed metadata,
    importing none of them; torch's is its ``__version__`` when it is already imported, which keeps the
    build tag (e.g. ``+cu130``) the metadata leaves out."""
    import importlib.metadata
    import platform
    import sys

    versions = {"customkd_cache": __version__, "python": platform.python_version()}
    for key, dist in VERSIONED.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None and "torch" in versions:
        versions["torch"] = str(torch.__version__)
    return versions
