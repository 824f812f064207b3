"""Reports: mean ± std over seeds of a sweep's (or loose) run directories, grouped.

``load_runs`` reads run directories (``spec.json``, ``caches.json``, ``results.json``,
``metrics.jsonl``, ``failed.json``): a sweep directory (its ``sweep.json``), a folder of runs, or
single runs. ``build_report`` groups them by the keys in ``by`` (default: every key that varies
except ``seed``); runs of different caches never share a row (the cache joins the group key), and
failed (non-finite loss) or incomplete runs are counted and named, never averaged.

With ``select_on`` (e.g. ``val_accuracy``), within each group the hyper-parameter settings (the
varying keys other than ``by`` and ``seed``) are ranked by the mean of that validation metric over
their seeds, and the group reports the test ``metric`` of the best setting. Only settings whose runs
all finished compete (unless none did); ties go to the first setting in sorted order.

Statistics: mean and sample standard deviation (0 for a single run) over the finished runs; "last"
is the metric at the last epoch, "best" the best epoch's (chosen on the same split, so optimistic).
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from customkd_cache.errors import SpecError, first_line
from customkd_cache.files import ensure_dir, write_atomic
from customkd_cache.lab.sweep import FAILED_FILE, SWEEP_FILE, read_sweep

RunStatus = Literal["done", "failed", "incomplete"]


@dataclass(frozen=True)
class RunRecord:
    """One run directory as read from disk."""

    run_dir: Path
    name: str
    status: RunStatus
    overrides: dict[str, Any]  # the sweep's grid values for this run; {} for a loose run
    spec: dict[str, Any]  # spec.json flattened to dotted keys
    results: dict[str, Any]  # results.json ({} unless done)
    metrics: list[dict[str, Any]]  # metrics.jsonl, one dict per epoch
    fingerprints: tuple[str, ...]  # the caches the run read (caches.json)
    error: str = ""

    def value(self, key: str) -> Any:
        """A grid key, a dotted spec field, or a results.json key (in that order); None if absent."""
        if key in self.overrides:
            return self.overrides[key]
        first = key.split("+")[0]
        if first in self.spec:
            return self.spec[first]
        return self.results.get(key)

    def metric(self, name: str) -> float | None:
        """``name`` at the last epoch: results.json, else the last metrics line that has it.

        Raises SpecError when the recorded value is not a finite number (a boolean is not one).
        """
        if self.results.get(name) is not None:
            return _number(self.results[name], self.run_dir / "results.json", name)
        for i, line in reversed(list(enumerate(self.metrics))):
            if line.get(name) is not None:
                return _number(line[name], self.run_dir / "metrics.jsonl", name, line=i + 1)
        return None

    def best(self, name: str) -> float | None:
        """The best epoch's ``name`` (results.json's ``best_<name>``, else the max over epochs)."""
        key = f"best_{name}"
        if self.results.get(key) is not None:
            return _number(self.results[key], self.run_dir / "results.json", key)
        path = self.run_dir / "metrics.jsonl"
        values = [
            _number(m[name], path, name, line=i + 1)
            for i, m in enumerate(self.metrics)
            if m.get(name) is not None
        ]
        return max(values) if values else None


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over ``n`` values (None when n = 0)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        vals = [v for v in values if v is not None]
        if not vals:
            return cls(None, None, 0)
        return cls(statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


@dataclass(frozen=True)
class Group:
    """One row of a report."""

    key: dict[str, Any]  # the group's values of the ``by`` keys (plus "cache" when caches differ)
    n: int  # finished runs averaged
    last: Stat  # the metric at the last epoch
    best: Stat  # the metric at the best epoch
    teacher: Stat  # the teacher probe (teacher_accuracy)
    fingerprints: list[str]
    runs: list[str]  # names of the runs averaged
    failed: list[dict[str, str]]  # {"run", "error"} of failed runs (of the chosen setting)
    incomplete: list[str]  # runs without results (killed, running, or never started)
    chosen: dict[str, Any] | None = None  # the setting picked by select_on
    candidates: list[dict[str, Any]] = field(default_factory=list)  # each setting's validation score
    mixed: list[str] = field(default_factory=list)  # hyper-parameter keys averaged over (no select_on)
    curve: list[list[float]] = field(default_factory=list)  # [epoch, mean metric] over the runs


@dataclass(frozen=True)
class Report:
    metric: str
    by: list[str]
    select_on: str | None
    groups: list[Group]

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "by": self.by,
            "select_on": self.select_on,
            "groups": [asdict(g) for g in self.groups],
        }

    def to_markdown(self) -> str:
        pct = _is_fraction(self.metric)
        unit = " (%)" if pct else ""
        head = [*self.by]
        if self.select_on:
            head.append(f"chosen on {self.select_on}")
        head += [
            "n",
            f"{self.metric}{unit}, last epoch",
            "best epoch",
            f"teacher probe{unit}",
            "cache",
            "notes",
        ]
        lines = [
            f"{self.metric}{unit}: mean ± std over seeds (n = finished runs)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for g in self.groups:
            cells = [str(g.key.get(k, "")) for k in self.by]
            if self.select_on:
                cells.append(_chosen_cell(g, _is_fraction(self.select_on)))
            cells += [
                str(g.n),
                _fmt(g.last, pct),
                _fmt(g.best, pct),
                _fmt(g.teacher, True),
                ", ".join(fp[:12] for fp in g.fingerprints) or "-",
                _notes(g),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


# --- loading -----------------------------------------------------------------------------------


def load_runs(dirs: Sequence[Path]) -> list[RunRecord]:
    """The runs under ``dirs``: each a sweep directory, a run directory, or a folder of runs.

    Raises:
        SpecError: a path does not exist or holds no run.
    """
    runs: list[RunRecord] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise SpecError(f"{d}: no such directory; give a sweep directory or run directories")
        if (d / SWEEP_FILE).exists():
            points = read_sweep(d)["points"]
            runs += [
                read_run(d / p.get("run_dir", name), overrides=p.get("overrides", {}), name=name)
                for name, p in sorted(points.items())
            ]
        elif _is_run(d):
            runs.append(read_run(d))
        else:
            children = sorted(c for c in d.iterdir() if c.is_dir() and _is_run(c))
            if not children:
                raise SpecError(
                    f"{d}: not a sweep ({SWEEP_FILE}), a run directory (spec.json) or a folder of runs"
                )
            runs += [read_run(c) for c in children]
    return runs


def read_run(run_dir: Path, *, overrides: dict[str, Any] | None = None, name: str = "") -> RunRecord:
    """One run directory; a missing directory is an incomplete (never started) run."""
    results = _read_json(run_dir / "results.json")
    failed = _read_json(run_dir / FAILED_FILE)
    status: RunStatus = "done" if results else "failed" if failed else "incomplete"
    caches = _read_json(run_dir / "caches.json")
    fps = [str(v["fingerprint"]) for v in caches.values() if isinstance(v, dict) and v.get("fingerprint")]
    if not fps and results.get("cache_fingerprint"):
        fps = [str(results["cache_fingerprint"])]
    return RunRecord(
        run_dir=run_dir,
        name=name or run_dir.name,
        status=status,
        overrides=dict(overrides or {}),
        spec=_flatten(_read_json(run_dir / "spec.json")),
        results=results,
        metrics=_read_jsonl(run_dir / "metrics.jsonl"),
        fingerprints=tuple(sorted(set(fps))),
        error=str(failed.get("error", "")),
    )


# --- building ----------------------------------------------------------------------------------


def build_report(
    runs: Sequence[RunRecord],
    *,
    by: Sequence[str] | None = None,
    metric: str = "student_accuracy",
    select_on: str | None = None,
) -> Report:
    """Group ``runs`` and summarise ``metric`` per group (see the module docstring).

    Raises:
        SpecError: no runs, a ``by`` key no run has, or ``select_on`` missing from every finished run
            of a group.
    """
    if not runs:
        raise SpecError("report: no runs found; give a sweep directory or run directories")
    varying = varying_keys(runs)
    if by is None:
        by_keys = [k for k in varying if k != "seed"]
    else:
        by_keys = list(by)
        for key in by_keys:
            if all(r.value(key) is None for r in runs):
                raise SpecError(
                    f"--by {key}: no run has this field; keys that vary here: {', '.join(varying) or 'none'}"
                )
    hp_keys = [k for k in varying if k not in by_keys and k != "seed"]
    groups = _partition(runs, by_keys)
    out = [
        _summarise(key, members, hp_keys=hp_keys, metric=metric, select_on=select_on)
        for key, members in groups
    ]
    return Report(metric=metric, by=by_keys, select_on=select_on, groups=out)


def varying_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Keys whose value differs between runs: the sweeps' grid keys first, then every other spec
    field that differs between runs that have a spec (e.g. a ``--set`` that changed between two
    phases of one sweep). A field that only follows the seed (each seed its own labeled list)
    counts as part of the seed."""
    grid = list(dict.fromkeys(k for r in runs for k in r.overrides))
    covered = {part for k in grid for part in k.split("+")}
    started = [r for r in runs if r.spec]
    fields = sorted({k for r in started for k in r.spec} - covered)
    varying = [k for k in grid if _varies(runs, k)] + [k for k in fields if _varies(started, k)]
    return [k for k in varying if k == "seed" or not _follows_seed(runs, k)]


def _varies(runs: Sequence[RunRecord], key: str) -> bool:
    return len({_hashable(r.value(key)) for r in runs}) > 1


def _follows_seed(runs: Sequence[RunRecord], key: str) -> bool:
    by_seed: dict[Any, set[Any]] = {}
    for r in runs:
        if r.value("seed") is not None:  # a run that never started has no spec to tell
            by_seed.setdefault(_hashable(r.value("seed")), set()).add(_hashable(r.value(key)))
    values = {v for vs in by_seed.values() for v in vs}
    return len(by_seed) > 1 and all(len(v) == 1 for v in by_seed.values()) and len(values) == len(by_seed)


def _partition(runs: Sequence[RunRecord], by_keys: list[str]) -> list[tuple[dict[str, Any], list[RunRecord]]]:
    """Runs by their ``by`` values, then by cache when one such group read different caches."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(_key_json({k: r.value(k) for k in by_keys}), []).append(r)
    out: list[tuple[dict[str, Any], list[RunRecord]]] = []
    for key_text, members in groups.items():
        key = json.loads(key_text)
        caches = {r.fingerprints for r in members if r.fingerprints}
        if len(caches) <= 1:
            out.append((key, members))
            continue
        first = min(caches)  # runs that never started (no cache recorded) are listed once, here
        for fps in sorted(caches):
            same = [r for r in members if r.fingerprints == fps or (fps == first and not r.fingerprints)]
            out.append(({**key, "cache": ",".join(fp[:12] for fp in fps)}, same))
    return out


def _summarise(
    key: dict[str, Any],
    members: list[RunRecord],
    *,
    hp_keys: list[str],
    metric: str,
    select_on: str | None,
) -> Group:
    chosen: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] = []
    used = members
    if select_on:
        chosen, candidates, used = _select(key, members, hp_keys=hp_keys, select_on=select_on)
    done = [r for r in used if r.status == "done"]
    mixed = [] if select_on else [k for k in hp_keys if len({_hashable(r.value(k)) for r in used}) > 1]
    return Group(
        key=key,
        n=len(done),
        last=Stat.of([r.metric(metric) for r in done]),
        best=Stat.of([r.best(metric) for r in done]),
        teacher=Stat.of([r.metric("teacher_accuracy") for r in done]),
        fingerprints=sorted({fp for r in used for fp in r.fingerprints}),
        runs=[r.name for r in done],
        failed=[{"run": r.name, "error": r.error} for r in used if r.status == "failed"],
        incomplete=[r.name for r in used if r.status == "incomplete"],
        chosen=chosen,
        candidates=candidates,
        mixed=mixed,
        curve=_curve(done, metric),
    )


def _select(
    key: dict[str, Any], members: list[RunRecord], *, hp_keys: list[str], select_on: str
) -> tuple[dict[str, Any], list[dict[str, Any]], list[RunRecord]]:
    """The best setting of ``hp_keys`` on the mean of ``select_on``, every candidate, its runs."""
    settings: dict[str, list[RunRecord]] = {}
    for r in members:
        settings.setdefault(_key_json({k: r.value(k) for k in hp_keys}), []).append(r)
    candidates = []
    for text, rs in sorted(settings.items()):
        done = [r for r in rs if r.status == "done"]
        score = Stat.of([r.metric(select_on) for r in done])
        if done and score.n == 0:
            raise SpecError(
                f"--select-on {select_on}: {done[0].run_dir / 'results.json'} has no '{select_on}' "
                "(nor metrics.jsonl); choose a metric the runs record, e.g. student_accuracy"
            )
        candidates.append(
            {
                "setting": json.loads(text),
                "mean": score.mean,
                "std": score.std,
                "n": score.n,
                "all_finished": len(done) == len(rs),
            }
        )
    pool = [c for c in candidates if c["all_finished"] and c["n"]] or [c for c in candidates if c["n"]]
    if not pool:
        return {}, candidates, members
    best = max(pool, key=lambda c: c["mean"])  # max keeps the first of equals: sorted order
    return best["setting"], candidates, settings[_key_json(best["setting"])]


def _curve(runs: list[RunRecord], metric: str) -> list[list[float]]:
    per_epoch: dict[int, list[float]] = {}
    for r in runs:
        path = r.run_dir / "metrics.jsonl"
        for i, m in enumerate(r.metrics):
            if m.get(metric) is not None and "epoch" in m:
                value = _number(m[metric], path, metric, line=i + 1)
                per_epoch.setdefault(_epoch(m["epoch"], path, i + 1), []).append(value)
    return [[e, statistics.mean(v)] for e, v in sorted(per_epoch.items())]


# --- writing -----------------------------------------------------------------------------------


def write_report(report: Report, prefix: Path) -> list[Path]:
    """Write ``PREFIX.md``, ``PREFIX.json`` and ``PREFIX.png``; return their paths.

    Each file is replaced atomically (``files.write_atomic``: a link at its path is replaced, never
    written through).

    Raises:
        SpecError: ``prefix`` names no file (``''``, ``/``, ``dir/``).
        OutputError: its directory cannot be created or written (a file in the way, read-only).
    """
    prefix = Path(prefix)
    if prefix.name in ("", ".", "..") or str(prefix).endswith("/"):
        raise SpecError(
            f"--out {str(prefix)!r}: give a file prefix, e.g. --out results/table "
            "(writes table.md, table.json and table.png)"
        )
    ensure_dir(prefix.parent, what="--out")
    md, js, png = (prefix.with_name(prefix.name + ext) for ext in (".md", ".json", ".png"))
    write_atomic(md, report.to_markdown())
    write_atomic(js, json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    write_atomic(png, plot_report(report))
    return [md, js, png]


def plot_report(report: Report) -> bytes:
    """PNG bytes: bars (last epoch, mean ± std per group) and the per-epoch mean curves of each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100.0 if _is_fraction(report.metric) else 1.0
    labels = [_label(g) for g in report.groups]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4))
    means = [(g.last.mean or 0.0) * scale for g in report.groups]
    stds = [(g.last.std or 0.0) * scale for g in report.groups]
    bars.bar(range(len(labels)), means, yerr=stds, capsize=4)
    bars.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    bars.set_ylabel(f"{report.metric}, last epoch" + (" (%)" if scale != 1.0 else ""))
    for g, label in zip(report.groups, labels, strict=True):
        if g.curve:
            curves.plot([e + 1 for e, _ in g.curve], [v * scale for _, v in g.curve], marker="o", label=label)
    curves.set_xlabel("epoch")
    curves.set_ylabel(f"{report.metric}, mean over runs" + (" (%)" if scale != 1.0 else ""))
    if any(g.curve for g in report.groups):
        curves.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# --- helpers -----------------------------------------------------------------------------------


def _is_run(d: Path) -> bool:
    return (d / "spec.json").exists() or (d / "results.json").exists() or (d / FAILED_FILE).exists()


_FIX = "remove the run directory or rerun that run"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise SpecError(f"{path}: not valid JSON ({first_line(e, 120)}); {_FIX}") from None
    return data if isinstance(data, dict) else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: not UTF-8 JSON lines ({first_line(e, 120)}); {_FIX}") from None
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line cut by a kill: the run is resumed or incomplete anyway
            continue
    return [m for m in lines if isinstance(m, dict)]


def _number(value: Any, path: Path, key: str, *, line: int = 0) -> float:
    """A recorded metric as a float; a boolean, a string, a list or a NaN is refused, never averaged."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        where = f"{path} line {line}" if line else str(path)
        raise SpecError(f"{where}: {key} = {json.dumps(value)[:40]} is not a finite number; {_FIX}")
    return float(value)


def _epoch(value: Any, path: Path, line: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(
            f"{path} line {line}: epoch = {json.dumps(value)[:40]} is not an epoch number; {_FIX}"
        )
    return value


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _hashable(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _key_json(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def _is_fraction(metric: str) -> bool:
    return "accuracy" in metric


def _fmt(s: Stat, pct: bool) -> str:
    if s.mean is None or s.std is None:
        return "-"
    k = 100.0 if pct else 1.0
    return f"{k * s.mean:.2f} ± {k * s.std:.2f}"


def _notes(g: Group) -> str:
    notes = []
    if g.failed:
        notes.append(
            f"{len(g.failed)} failed: " + "; ".join(f"{f['run']}: {f['error'][:80]}" for f in g.failed)
        )
    if g.incomplete:
        notes.append(f"{len(g.incomplete)} incomplete: {', '.join(g.incomplete)}")
    if g.mixed:
        notes.append(f"averages over several {', '.join(g.mixed)} (use --select-on or --by)")
    if len(g.fingerprints) > 1:
        notes.append("runs read several caches")
    return "; ".join(notes).replace("|", "/") or "-"


def _chosen_cell(g: Group, pct: bool) -> str:
    """The chosen setting and its validation score, e.g. ``optim.lr=0.1 (val 61.20 ± 1.10)``."""
    setting = ", ".join(f"{k}={v}" for k, v in (g.chosen or {}).items())
    score = next((c for c in g.candidates if c["setting"] == g.chosen), None)
    if score is None or score["mean"] is None:
        return setting or "-"
    shown = _fmt(Stat(score["mean"], score["std"], score["n"]), pct)
    return f"{setting} (val {shown})" if setting else f"val {shown}"


def _label(g: Group) -> str:
    return ",".join(f"{v}" for v in g.key.values()) or "all"


# --- the paper's table -------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperTable:
    """The paper's table: one row per method, one column per task, then the average over tasks.

    A cell is the mean ± std over seeds of the method's finished runs on the task. The average is
    taken per seed over the tasks (a seed counts only when every task has it finished), then mean ±
    std over those seeds; ``missing`` names the runs not finished (failed, incomplete or absent).
    """

    metric: str
    tasks: list[str]
    methods: list[str]
    cells: dict[str, dict[str, Stat]]
    average: dict[str, Stat]
    missing: dict[str, list[str]]

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "tasks": self.tasks,
            "methods": self.methods,
            "cells": {m: {t: asdict(s) for t, s in row.items()} for m, row in self.cells.items()},
            "average": {m: asdict(s) for m, s in self.average.items()},
            "missing": self.missing,
        }

    def to_markdown(self) -> str:
        pct = _is_fraction(self.metric)
        head = ["method", *(task_label(t) for t in self.tasks), "avg"]
        lines = [
            f"{self.metric}{' (%)' if pct else ''}: mean ± std over seeds; avg: over tasks per seed, then "
            "mean ± std over the seeds every task finished",
            "",
            "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * (len(head) - 1),
        ]
        for m in self.methods:
            cells = [_fmt(self.cells[m][t], pct) for t in self.tasks]
            lines.append("| " + " | ".join([m, *cells, _fmt(self.average[m], pct)]) + " |")
        notes = [f"- {m}: {', '.join(runs)}" for m, runs in self.missing.items() if runs]
        if notes:
            lines += ["", "Not finished (not averaged):", *notes]
        return "\n".join(lines) + "\n"


def task_label(task: str) -> str:
    """``A_to_C`` -> ``A→C`` (a pipeline's stem as a column name)."""
    return task.replace("_to_", "→")


def paper_table(
    runs_by_task: Mapping[str, Sequence[RunRecord]],
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    metric: str = "student_accuracy",
) -> PaperTable:
    """The table of ``runs_by_task`` (task -> its sweep's runs, grid keys ``method`` and ``seed``).

    Raises SpecError when a finished run's metric is not a finite number (``RunRecord.metric``).
    """
    values: dict[tuple[str, str, int], float] = {}
    for task, runs in runs_by_task.items():
        for r in runs:
            value = r.metric(metric) if r.status == "done" else None
            if value is not None:
                values[(task, str(r.value("method")), int(r.value("seed")))] = value
    tasks = list(runs_by_task)
    cells: dict[str, dict[str, Stat]] = {}
    average: dict[str, Stat] = {}
    missing: dict[str, list[str]] = {}
    for m in methods:
        cells[m] = {t: Stat.of([values.get((t, m, s)) for s in seeds]) for t in tasks}
        per_seed = [
            statistics.mean(values[(t, m, s)] for t in tasks)
            for s in seeds
            if tasks and all((t, m, s) in values for t in tasks)
        ]
        average[m] = Stat.of(per_seed)
        missing[m] = [f"{t} seed={s}" for t in tasks for s in seeds if (t, m, s) not in values]
    return PaperTable(metric, tasks, list(methods), cells, average, missing)


def write_paper_table(table: PaperTable, prefix: Path) -> list[Path]:
    """Write ``PREFIX.md`` and ``PREFIX.json`` (atomically, as ``write_report``); return their paths."""
    ensure_dir(prefix.parent, what="--out")
    md, js = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".json")
    write_atomic(md, table.to_markdown())
    write_atomic(js, json.dumps(table.to_json(), indent=2, sort_keys=True) + "\n")
    return [md, js]
