"""The run directory: spec.json and caches.json, the resume check, the checkpoint, metrics.jsonl."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from customkd_cache.errors import RunDirError, SpecError, first_line
from customkd_cache.files import append_line, check_no_links, ensure_dir, save_torch, write_atomic
from customkd_cache.specs import TrainSpec, differing_keys, to_dict
from customkd_cache.stage_two.build import Models
from customkd_cache.stage_two.protocols import Protocol
from customkd_cache.stage_two.state import Run, TrainState, check_metrics_lines, state_from_checkpoint
from customkd_cache.store import FeatureStore

# Spec sections that may change on --resume: how the run is executed, not what it computes.
RESUMABLE_SECTIONS = ("run",)
# ... except these keys: they change what is computed (features_in_ram picks the stage-B batch plan,
# precision the arithmetic, decode the pixels: the device path renders a view up to a few levels off
# Pillow's), so a run resumed with another value would end at numbers its spec.json cannot reproduce.
NOT_RESUMABLE_KEYS = ("run.features_in_ram", "run.precision", "run.decode")


def check_out(out: Path, spec: TrainSpec, *, resume: bool) -> None:
    """Refuse an ``--out`` that cannot take this run, before anything is computed: a file in the way,
    a directory that is not empty (without ``--resume``), or a resume that ``check_resume`` refuses."""
    if resume:
        check_resume(out, spec)
        return
    _check_out_dir(out)
    if out.is_dir() and any(out.iterdir()):
        raise SpecError(
            f"--out {out}: directory is not empty; pass --resume to continue that run or choose a new one"
        )


def check_resume(out: Path, spec: TrainSpec) -> None:
    """Refuse to resume a run in ``out`` with a spec that differs from its ``spec.json`` in anything
    but ``RESUMABLE_SECTIONS``; checked before anything in ``out`` is written.

    Raises RunDirError naming the differing keys (dotted), or when a checkpoint has no spec.json.
    """
    _check_out_dir(out)
    check_no_links(out)  # a shared run directory with a planted link: refused before any write
    path = out / "spec.json"
    if not path.exists():
        if (out / "checkpoints" / "last.pt").exists():
            raise RunDirError(
                f"{path}: missing beside a checkpoint; cannot check the resume, start a new --out"
            )
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{path}: unreadable ({e}); cannot check the resume, start a new --out") from None
    new = json.loads(json.dumps(to_dict(spec)))
    differ = [
        k
        for k in differing_keys(old, new)
        if k.split(".")[0] not in RESUMABLE_SECTIONS or k in NOT_RESUMABLE_KEYS
    ]
    if differ:
        shown = ", ".join(differ[:10]) + (f" ... ({len(differ)} keys)" if len(differ) > 10 else "")
        raise RunDirError(
            f"--resume {out}: the spec differs from the run's spec.json in {shown}; resume with the same "
            f"spec (only [{', '.join(RESUMABLE_SECTIONS)}] may change, but {', '.join(NOT_RESUMABLE_KEYS)}) "
            "or start a new --out"
        )


def _check_out_dir(out: Path) -> None:
    blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocker == out:
        raise SpecError(f"--out {out}: is a file, not a directory; give a directory for the run")
    if blocker is not None:
        raise SpecError(f"--out {out}: {blocker} is a file, not a directory; give a directory for the run")


def prepare_out(out: Path, spec: TrainSpec, store: FeatureStore, protocol: Protocol, *, resume: bool) -> None:
    _check_out_dir(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise SpecError(
            f"--out {out}: directory is not empty; pass --resume to continue that run or choose a new one"
        )
    ensure_dir(out, what="--out")
    write_json(out / "spec.json", to_dict(spec))
    caches = {
        str(store.path): {"fingerprint": store.fingerprint, "request_key": store.attrs.get("request_key")}
    }
    if protocol.labeled_list_sha256:
        caches["labeled_list"] = {"sha256": protocol.labeled_list_sha256}
    write_json(out / "caches.json", caches)


def save_checkpoint(run: Run, state: TrainState) -> None:
    """All state needed to resume after the epoch just finished, written atomically."""
    path = run.out / "checkpoints" / "last.pt"
    ensure_dir(path.parent, within=run.out)
    blob = {"models": run.models.state_dict(), "state": state.__dict__, "fingerprint": run.store.fingerprint}
    # disk full, quota: the last good checkpoint stays, no partial file is left (save_torch)
    fix = f"free space, then rerun with --resume (it continues from epoch {max(state.epoch - 1, 0)})"
    save_torch(path, blob, fix=fix)


def load_checkpoint(run: Run) -> TrainState:
    """The state saved after the last finished epoch (a fresh state when there is none).

    The checkpoint is loaded with ``weights_only=True``: it holds tensors and plain containers only,
    and a run directory may be shared, so nothing in it may run code. Everything in it is checked
    before use (``state_from_checkpoint``, ``check_models``, and ``metrics.jsonl`` against its history),
    so a damaged or forged checkpoint neither empties ``metrics.jsonl`` nor "finishes" a run. Lines of
    ``metrics.jsonl`` beyond the checkpointed epochs (logged, then killed before the checkpoint) are
    dropped.

    Raises RunDirError for a checkpoint that is unreadable, holds anything else, does not fit this
    run (epoch, history, tensors), disagrees with ``metrics.jsonl``, or was trained on another cache.
    """
    path = run.out / "checkpoints" / "last.pt"
    state = _read_checkpoint(run, path) if path.exists() else TrainState()
    metrics = run.out / "metrics.jsonl"
    if os.path.islink(metrics):  # never read through a link (what it points at is not the run's)
        lines = [json.dumps(m, sort_keys=True) for m in state.history]
    elif not os.path.lexists(metrics):
        return state
    else:
        lines = _metrics_lines(metrics)
        try:
            check_metrics_lines(lines, state.history)
        except ValueError as e:
            raise RunDirError(
                f"{metrics}: {e}; the run directory was changed since its checkpoint: remove {path} to "
                "restart the run from epoch 0, or start a new --out directory"
            ) from None
    if run.dist.is_main:
        write_atomic(metrics, "".join(line + "\n" for line in lines[: state.epoch]))  # never in place
    return state


def _metrics_lines(path: Path) -> list[str]:
    try:
        return path.read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(
            f"{path}: unreadable ({first_line(e, 120)}); remove it to resume without the earlier epochs' "
            "metrics, or start a new --out directory"
        ) from None


def _read_checkpoint(run: Run, path: Path) -> TrainState:
    fix = f"remove {path} to restart the run from epoch 0, or start a new --out directory"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RunDirError(
            f"{path}: holds objects other than tensors and plain containers, refused unloaded (loading "
            f"them could run code); {fix}"
        ) from None
    except Exception as e:  # truncated or foreign file: several types
        reason = first_line(e, 160)
        raise RunDirError(f"{path}: not a loadable checkpoint of this tool ({reason}); {fix}") from None
    if not isinstance(blob, dict) or sorted(blob) != ["fingerprint", "models", "state"]:
        shown = sorted(map(str, blob))[:5] if isinstance(blob, dict) else type(blob).__name__
        raise RunDirError(f"{path}: not a checkpoint of this tool (holds {shown}); {fix}")
    if blob["fingerprint"] != run.store.fingerprint:
        raise RunDirError(f"{path}: checkpoint was trained on another cache; start a new --out directory")
    try:
        state = state_from_checkpoint(blob["state"], epochs=run.spec.optim.epochs)
        check_models(run.models, blob["models"])
        run.models.load_state_dict(blob["models"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise RunDirError(f"{path}: does not fit this run ({first_line(e, 200)}); {fix}") from None
    return state


def check_models(models: Models, saved: Any) -> None:
    """Raise ValueError unless ``saved`` holds exactly the parts of ``models``, each module's tensors
    under its own keys and shapes, each optimizer's groups and state shaped like its parameters (a
    module's ``load_state_dict`` checks keys and shapes in a many-line message; an optimizer's would
    only fail at its first step, or not at all)."""
    own = models.state_dict()
    if not isinstance(saved, dict) or sorted(map(str, saved)) != sorted(own):
        shown = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"models holds {shown}, this run's method has {sorted(own)}")
    for name, mine in own.items():
        part = getattr(models, name)
        if isinstance(part, torch.optim.Optimizer):
            _check_optimizer(f"models.{name}", part, saved[name])
        else:
            _check_tensors(f"models.{name}", mine, saved[name])


def _check_tensors(where: str, mine: dict[str, torch.Tensor], saved: Any) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"{where} is a {type(saved).__name__}, not a state dict")
    missing = [k for k in mine if k not in saved]
    unexpected = sorted(str(k) for k in saved if k not in mine)
    if missing or unexpected:
        raise ValueError(
            f"{where}: {len(missing)} key(s) missing (first: {missing[:1]}), {len(unexpected)} unexpected "
            f"(first: {unexpected[:1]})"
        )
    for key, t in mine.items():
        v = saved[key]
        if not isinstance(v, torch.Tensor) or v.shape != t.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{where}.{key} is {got}, expected {tuple(t.shape)}")


def _check_optimizer(where: str, opt: torch.optim.Optimizer, saved: Any) -> None:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    states = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(states, dict) or len(groups) != len(opt.param_groups):
        raise ValueError(f"{where}: not an optimizer state with {len(opt.param_groups)} parameter group(s)")
    for g, (theirs, mine) in enumerate(zip(groups, opt.param_groups, strict=True)):
        ids = theirs.get("params") if isinstance(theirs, dict) else None
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            raise ValueError(f"{where}: parameter group {g} does not hold {len(mine['params'])} parameters")
        for key in sorted(set(theirs) & set(mine) - {"params", "lr", "initial_lr"}):
            if not _same_setting(theirs[key], mine[key]):
                raise ValueError(
                    f"{where}: group {g} has {key} = {theirs[key]!r}, the spec gives {mine[key]!r}"
                )
        for i, p in zip(ids, mine["params"], strict=True):
            entry = states.get(i, {})
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: the state of parameter {i} is not a mapping")
            for key, v in entry.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(
                        f"{where}: {key} of parameter {i} is {tuple(v.shape)}, expected {tuple(p.shape)}"
                    )


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.as_tensor(a).double().eq(torch.as_tensor(b).double()).all())
    return bool(a == b)


def log_epoch(m: dict[str, Any], epochs: int, *, run: str) -> None:
    """One line per epoch on stderr, prefixed with the run (its --out directory), so that the lines of
    runs going side by side (a sweep's processes, shards) say which run they belong to."""
    acc = m.get("student_accuracy")
    shown = f", student acc {100 * acc:.2f}%" if acc is not None else ""
    if "val_accuracy" in m:
        shown += f", val {100 * m['val_accuracy']:.2f}%"
    if "stage_a_ce" in m:
        shown = f", stage A CE {m['stage_a_ce']:.3f} acc {100 * m['stage_a_accuracy']:.1f}%" + shown
    print(
        f"{run}: epoch {m['epoch'] + 1}/{epochs}: loss {m['loss_total']:.4f}{shown} ({m['seconds']:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    append_line(path, json.dumps(obj, sort_keys=True))
