"""Sweeps: one train spec, a cartesian grid of overrides, one run directory per point.

``run_sweep`` expands the grid, validates every point's spec before anything runs, and trains each
point that is not finished yet into ``OUT/<name>/``, where ``<name>`` is the point's grid values plus
a short hash of its full override set (``--set`` overrides and grid values together, grid last), e.g.
``method=kd,seed=1-3fa2c1``. ``OUT/sweep.json`` lists the union of the points of every call that used
``OUT``: a second phase of a study adds points, and a point whose override set equals an existing one
*is* that point.

Concurrency: a point is trained only under a claim (``OUT/.claims/<hash>.claim``, the claim files of
stage one, kept alive by a heartbeat thread), so several processes, a Slurm array (``shard=(I, N)``)
or ``torchrun`` ranks (each rank an independent worker) never train a point twice. A killed point
resumes from its last checkpoint (``train --resume``). A point refused at run time (a non-finite
loss, a damaged run directory, a planted link) is recorded as failed with its message (``failed.json``
in its run directory) and the sweep goes on; ``--retry-failed`` trains failed points again.

A run directory is finished when it holds a readable ``results.json`` (a damaged one makes the point
failed, with the file named). Point directories, ``sweep.json`` and the claims are created with
``customkd_cache.files``: a link another user planted in a shared sweep directory is refused (never
written through).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from customkd_cache import specs
from customkd_cache.errors import CustomKDError, OutputError, SpecError
from customkd_cache.files import check_no_links, ensure_dir, write_atomic
from customkd_cache.store.claims import Claim, try_claim

Status = Literal["done", "ran", "failed", "skipped"]
SWEEP_FILE = "sweep.json"
FAILED_FILE = "failed.json"
LEASE_S = 600.0
NAME_MAX = 200  # bytes of a point directory name (file systems allow 255; claims add a suffix)


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep and what this call did with it."""

    name: str  # readable grid values + short hash of the full override set
    overrides: dict[str, Any]  # grid key -> value for this point (dotted keys)
    run_dir: Path
    status: str  # "done" (finished before), "ran", "failed" (message kept), "skipped" (another process)
    error: str = ""


@dataclass(frozen=True)
class PlannedPoint:
    """A point before it runs: its full override set (``--set`` then grid) and its validated spec."""

    point: SweepPoint
    full: dict[str, Any]
    spec: specs.TrainSpec


def expand_grid(grid: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid`` in its order (last key fastest): a list of {key: value}.

    A key may link several spec fields to one value with ``+`` (``customkd.lambda_gen+customkd.
    lambda_spec``); it stays one key here and is split by ``point_overrides``.

    Raises:
        SpecError: a key appears twice, or has no values.
    """
    keys = [k for k, _ in grid]
    for key, values in grid:
        if keys.count(key) > 1:
            raise SpecError(f"--grid {key}: given twice; list all its values in one --grid {key}=V1,V2")
        if not list(values):
            raise SpecError(f"--grid {key}: no values; give --grid {key}=V1,V2,...")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in grid))]


def parse_grid(item: str) -> tuple[str, list[Any]]:
    """``"KEY=V1,V2"`` -> ("KEY", [v1, v2]); each value parses as TOML (bare words are strings).

    Commas inside brackets, braces or quotes do not split (``--grid x=[1,2],[3]``).
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise SpecError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid method=kd,customkd")
    values = [specs.parse_override(f"v={part}")[1] for part in _split_top_level(raw)]
    return key.strip(), values


def point_overrides(overrides: Sequence[str], point: dict[str, Any]) -> dict[str, Any]:
    """The full override set of a point, dotted key -> value: ``overrides`` first, then the grid."""
    merged: dict[str, Any] = {}
    for item in overrides:
        keys, value = specs.parse_override(item)
        merged[".".join(keys)] = value
    for key, value in point.items():
        for part in key.split("+"):
            merged[part.strip()] = value
    return merged


def point_hash(full: dict[str, Any]) -> str:
    """Six hex digits of the sha256 of the canonical JSON of a point's full override set."""
    return hashlib.sha256(_canonical(full).encode()).hexdigest()[:6]


def point_name(point: dict[str, Any], full: dict[str, Any]) -> str:
    """``key=value,...-hash``: readable, a plain directory name, unique through the hash.

    Names longer than ``NAME_MAX`` bytes (many linked keys) keep their start, then ``~`` and the hash.
    """
    shown = ",".join(f"{k}={_short(v)}" for k, v in point.items())
    shown = re.sub(r"[^A-Za-z0-9._+=,-]", "_", shown)
    if len(shown) + 7 > NAME_MAX:
        shown = shown[: NAME_MAX - 8] + "~"
    return f"{shown}-{point_hash(full)}" if shown else point_hash(full)


def load_point_spec(spec_path: Path, full: dict[str, Any]) -> specs.TrainSpec:
    """The train spec of a point: the file with its full override set applied, validated.

    Raises:
        SpecError: the spec or an override is invalid (the spec validation's one-line message).
    """
    data = specs.read_toml(spec_path)
    for key, value in full.items():
        _set_dotted(data, key, value, spec_path)
    return specs.validate(specs.TrainSpec, data, str(spec_path))


def run_sweep(
    *,
    spec_path: Path,
    out: Path,
    grid: Sequence[tuple[str, Sequence[Any]]],
    overrides: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
    retry_failed: bool = False,
    lease_s: float = LEASE_S,
) -> list[SweepPoint]:
    """Train every point of ``grid`` that is not finished; return what happened to each of this
    call's points (in grid order; other shards' points are not listed).

    ``shard=(I, N)`` takes the points whose index in this call's grid is I mod N; ``None`` takes the
    ``torchrun`` rank's share (``RANK``/``WORLD_SIZE``), or every point. Failed points are kept as
    failed unless ``retry_failed``.

    Raises:
        SpecError: a bad grid, override or shard, or ``out`` already holds a point of the same name
            trained from a different spec; raised before any point runs.
    """
    spec_path = Path(spec_path)
    out = Path(out)
    index, count = _shard(shard)
    planned = plan_points(spec_path=spec_path, out=out, grid=grid, overrides=overrides)
    record_points(out, spec_path, planned)
    results: list[SweepPoint] = []
    for i, p in enumerate(planned):
        if i % count == index:
            done = _run_point(
                p.point, p.spec, spec_path=spec_path, retry_failed=retry_failed, lease_s=lease_s
            )
            update_status(out, done)
            results.append(done)
    return results


def plan_points(
    *, spec_path: Path, out: Path, grid: Sequence[tuple[str, Sequence[Any]]], overrides: Sequence[str]
) -> list[PlannedPoint]:
    """Every point of the grid with its full override set and validated spec; nothing is written.

    Raises:
        SpecError: as ``run_sweep``.
    """
    planned = []
    for point in expand_grid(grid):
        full = point_overrides(overrides, point)
        spec = load_point_spec(spec_path, full)
        _check_files(spec, spec_path, point)
        name = point_name(point, full)
        _check_same_spec(out / name, spec)
        planned.append(PlannedPoint(SweepPoint(name, dict(point), out / name, "pending"), full, spec))
    return planned


def read_sweep(out: Path) -> dict[str, Any]:
    """``OUT/sweep.json`` ({"points": {name: {...}}}), or an empty sweep if there is none.

    Raises:
        SpecError: the file exists but is not a sweep file.
    """
    path = Path(out) / SWEEP_FILE
    if not os.path.lexists(path):
        return {"points": {}}
    fix = "restore it, or remove it (the next sweep call lists its points again)"
    if path.is_symlink():
        raise SpecError(
            f"{path}: is a symbolic link (to {os.readlink(path)}), which a sweep never makes; another user "
            "may have planted it to redirect the sweep's writes: remove it"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a sweep file; {fix}") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise SpecError(f"{path}: not valid JSON ({_first(e)}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), dict):
        raise SpecError(f"{path}: not a sweep file (no 'points' table); use another --out directory")
    for name, entry in data["points"].items():
        problem = _entry_problem(name, entry)
        if problem:
            raise SpecError(f"{path}: point {name[:80]!r} {problem}; {fix}")
    return data


def record_points(out: Path, spec_path: Path, planned: Sequence[PlannedPoint]) -> None:
    """Add the planned points to ``sweep.json`` (the union with what is there)."""
    with _locked_sweep(out) as data:
        for p in planned:
            entry = data["points"].setdefault(p.point.name, {"status": "pending"})
            entry.update(
                overrides=p.point.overrides, full=p.full, run_dir=p.point.run_dir.name, spec=str(spec_path)
            )


def update_status(out: Path, point: SweepPoint) -> None:
    """Record a point's state in ``sweep.json``: "done", or "failed" with its error; skips are not kept."""
    if point.status == "skipped":
        return
    with _locked_sweep(out) as data:
        entry = data["points"].setdefault(
            point.name, {"overrides": point.overrides, "run_dir": point.run_dir.name}
        )
        entry["status"] = "failed" if point.status == "failed" else "done"
        entry["error"] = point.error


# --- one point ---------------------------------------------------------------------------------


def _run_point(
    point: SweepPoint, spec: specs.TrainSpec, *, spec_path: Path, retry_failed: bool, lease_s: float
) -> SweepPoint:
    run_dir = point.run_dir
    if os.path.islink(run_dir):
        return _with(point, "failed", _planted_dir(run_dir))
    finished, damage = finished_run(run_dir)
    if finished:
        return _with(point, "done")
    if (damage or os.path.lexists(run_dir / FAILED_FILE)) and not retry_failed:
        return _with(point, "failed", damage or _failed_message(run_dir))
    try:
        claims = ensure_dir(run_dir.parent / ".claims", within=run_dir.parent)
    except OutputError as e:
        return _with(point, "failed", str(e))
    claim = try_claim(claims, point.name.rsplit("-", 1)[-1], lease_s=lease_s)
    if claim is None:
        return _with(point, "skipped")
    with claim, _heartbeat(claim, lease_s / 4):
        if finished_run(run_dir)[0]:  # finished by the previous holder meanwhile
            return _with(point, "done")
        return _train_point(point, spec, spec_path=spec_path)


def finished_run(run_dir: Path) -> tuple[bool, str]:
    """Whether ``run_dir`` holds a readable ``results.json`` (a JSON table whose
    ``student_accuracy`` is a finite number or null); else "" or what is wrong with the file."""
    path = run_dir / "results.json"
    if not os.path.lexists(path):
        return False, ""
    fix = "rerun with --retry-failed to train the point again, or remove its run directory"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return False, f"{path}: damaged ({_first(e)}); {fix}"
    acc = data.get("student_accuracy", "missing") if isinstance(data, dict) else "missing"
    if not isinstance(data, dict) or not (acc is None or _is_number(acc)):
        return False, f"{path}: damaged (no finite student_accuracy); {fix}"
    return True, ""


def _train_point(point: SweepPoint, spec: specs.TrainSpec, *, spec_path: Path) -> SweepPoint:
    from customkd_cache.stage_two.train import run_train

    run_dir = point.run_dir
    try:
        ensure_dir(run_dir, within=run_dir.parent)
        check_no_links(run_dir)
        resume = (run_dir / "checkpoints" / "last.pt").exists()
        if not resume:  # killed before its first checkpoint: start it afresh
            shutil.rmtree(run_dir)
            ensure_dir(run_dir, within=run_dir.parent)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
        with _single_process():
            run_train(spec, spec_path=spec_path, out=run_dir, resume=resume)
    except CustomKDError as e:  # refused or failed at run time: recorded, and the sweep goes on
        message = str(e).strip().replace("\n", " ")
        with contextlib.suppress(CustomKDError, OSError):
            ensure_dir(run_dir, within=run_dir.parent)
            write_atomic(run_dir / FAILED_FILE, json.dumps({"error": message, "time": time.time()}) + "\n")
        return _with(point, "failed", message)
    return _with(point, "ran")


@contextlib.contextmanager
def _heartbeat(claim: Claim, every_s: float) -> Iterator[None]:
    """Refresh ``claim`` every ``every_s`` seconds while the body runs (its lease never runs out)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            claim.refresh()

    thread = threading.Thread(target=beat, name="sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Under ``torchrun`` each rank trains its own points alone: hide the world from ``run_train``
    (``LOCAL_RANK`` stays, so each rank keeps its own GPU)."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- helpers -----------------------------------------------------------------------------------


def _with(point: SweepPoint, status: Status, error: str = "") -> SweepPoint:
    return SweepPoint(point.name, point.overrides, point.run_dir, status, error)


def _failed_message(run_dir: Path) -> str:
    path = run_dir / FAILED_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{path}: unreadable ({_first(e)}); rerun with --retry-failed"
    if not isinstance(data, dict) or not isinstance(data.get("error", ""), str):
        return f"{path}: not a failure record; rerun with --retry-failed"
    return str(data.get("error", ""))


def _shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        from customkd_cache.stage_one.extract import Shard

        env = Shard.from_env()
        return env.index, env.count
    index, count = shard
    if not 0 <= index < count:
        raise SpecError(f"--shard {index}/{count}: need 0 <= I < N, e.g. --shard 0/4")
    return index, count


def _check_same_spec(run_dir: Path, spec: specs.TrainSpec) -> None:
    """Refuse to treat a run directory trained from another spec as this point."""
    path = run_dir / "spec.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # written when killed, or damaged: the point fails or is retrained at run time
    diff = specs.differing_keys(old, specs.to_dict(spec))
    if diff:
        raise SpecError(
            f"{path}: this point was trained from a different spec ({diff[0]} differs); "
            "use a new --out directory, or remove that run directory to retrain it"
        )


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: Path) -> None:
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise SpecError(f"{source}: override key {key!r} is not a dotted field name (e.g. optim.lr)")
    specs.set_dotted(data, parts, value, where=f"{source}: override {key!r}")


@contextlib.contextmanager
def _locked_sweep(out: Path) -> Iterator[dict[str, Any]]:
    """``sweep.json`` read, handed to the body and written back atomically, under a claim so that
    concurrent sweeps never lose each other's points."""
    ensure_dir(out, what="--out")
    claims = ensure_dir(out / ".claims", within=out, what="--out")
    deadline = time.monotonic() + 60.0
    while (claim := try_claim(claims, "sweep.json", lease_s=60.0)) is None:
        if time.monotonic() > deadline:
            raise SpecError(
                f"{out / '.claims'}: sweep.json stays locked; remove sweep.json.claim if no sweep runs"
            )
        time.sleep(0.05)
    with claim:
        data = read_sweep(out)
        yield data
        write_atomic(out / SWEEP_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _entry_problem(name: str, entry: Any) -> str:
    """What is wrong with one ``points`` entry of sweep.json ("" when nothing)."""
    if not isinstance(entry, dict):
        return f"is {_first(entry)}, not a table"
    run_dir = entry.get("run_dir", name)
    if not isinstance(run_dir, str) or not _plain_name(run_dir):
        return f"has run_dir {_first(run_dir)}, not a directory name inside the sweep"
    if not isinstance(entry.get("overrides", {}), dict):
        return "has overrides that are not a table"
    return ""


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _check_files(spec: specs.TrainSpec, spec_path: Path, point: dict[str, Any]) -> None:
    """Refuse, while planning, a point whose spec names a file that does not exist (a grid value
    such as ``student.weights=...`` would otherwise stop the sweep at that point)."""
    from customkd_cache.errors import WeightsError
    from customkd_cache.models.weights import resolve_weights_file

    where = f"grid point {', '.join(f'{k}={v}' for k, v in point.items())}" if point else "the spec"
    try:
        if spec.student.weights:
            resolve_weights_file(spec.student.weights, spec_path.parent, field="student.weights")
    except WeightsError as e:
        raise SpecError(f"{where}: {e}") from None
    ssl = spec.ssl
    lists = (ssl.labeled_list, ssl.unlabeled_list, ssl.eval_list, ssl.val_list) if ssl else ()
    for listed in lists:
        if listed and not specs.data_path(listed).is_file():
            raise SpecError(
                f"{where}: list file {specs.data_path(listed)} does not exist (relative paths resolve "
                "against CUSTOMKD_DATA_ROOT); fix the value"
            )


def _planted_dir(run_dir: Path) -> str:
    return (
        f"{run_dir}: is a symbolic link (to {os.readlink(run_dir)}), which a sweep never makes; another "
        "user may have planted it to redirect the point's writes: remove it, then rerun the sweep"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _first(value: Any) -> str:
    """A short one-line rendering of an exception or a value for messages."""
    from customkd_cache.errors import first_line

    if isinstance(value, BaseException):
        return first_line(value, 120)
    return repr(value)[:60]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _short(value: Any) -> str:
    """A value as a short, plain directory-name fragment (paths keep their last component)."""
    text = value if isinstance(value, str) else _canonical(value)
    if isinstance(value, str) and "/" in text:
        text = text.rstrip("/").rsplit("/", 1)[-1]
    text = re.sub(r"[^A-Za-z0-9._+-]", "_", text)
    return text[:24]


def _split_top_level(raw: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]
