"""`customkd-cache report` contracts, on run directories written here (no training).

Each test writes the files a run leaves (spec.json, caches.json, results.json, metrics.jsonl, and
failed.json for a non-finite loss) with chosen numbers, then checks the grouping, the statistics,
the selection on a validation metric, and that failed, incomplete or other-cache runs are never
averaged in.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from customkd_cache.errors import SpecError
from customkd_cache.lab.report import build_report, load_runs, write_report

FP_A, FP_B = "a" * 64, "b" * 64


def write_run(
    run_dir: Path,
    *,
    method: str,
    seed: int,
    acc: list[float] | None,
    val: list[float] | None = None,
    lr: float = 0.1,
    teacher: float = 0.7,
    fingerprint: str = FP_A,
    extra_spec: dict[str, Any] | None = None,
    failed: str = "",
) -> Path:
    """A run directory; ``acc`` is the test accuracy per epoch (None: killed before any epoch)."""
    run_dir.mkdir(parents=True)
    spec = {"method": method, "seed": seed, "optim": {"lr": lr, "epochs": 3}, **(extra_spec or {})}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    (run_dir / "caches.json").write_text(json.dumps({"/c/store.zarr": {"fingerprint": fingerprint}}))
    if failed:
        (run_dir / "failed.json").write_text(json.dumps({"error": failed}))
        return run_dir
    lines = []
    for epoch, a in enumerate(acc or []):
        line: dict[str, Any] = {"epoch": epoch, "student_accuracy": a}
        if val is not None:
            line["val_accuracy"] = val[epoch]
        lines.append(json.dumps(line))
    (run_dir / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
    if acc and len(acc) == spec["optim"]["epochs"]:
        results = {
            "method": method,
            "seed": seed,
            "student_accuracy": acc[-1],
            "best_student_accuracy": max(acc),
            "teacher_accuracy": teacher,
            "cache_fingerprint": fingerprint,
        }
        if val is not None:
            results["val_accuracy"] = val[-1]
        (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def group(report: Any, **key: Any) -> Any:
    matches = [g for g in report.groups if all(g.key.get(k) == v for k, v in key.items())]
    assert len(matches) == 1, [g.key for g in report.groups]
    return matches[0]


def test_groups_by_what_varies_with_mean_std_of_last_best_and_teacher(tmp_path: Path) -> None:
    accs = {("kd", 0): [0.2, 0.6, 0.5], ("kd", 1): [0.3, 0.4, 0.7], ("so", 0): [0.1, 0.2, 0.3]}
    for (m, s), acc in accs.items():
        write_run(tmp_path / f"{m}_{s}", method=m, seed=s, acc=acc, teacher=0.7 + s / 10)
    report = build_report(load_runs([tmp_path]))
    assert report.by == ["method"]
    kd = group(report, method="kd")
    assert (
        kd.n == 2
        and kd.last.mean == pytest.approx(0.6)
        and kd.last.std == pytest.approx(statistics.stdev([0.5, 0.7]))
    )
    assert kd.best.mean == pytest.approx(0.65) and kd.teacher.mean == pytest.approx(0.75)
    assert kd.fingerprints == [FP_A] and sorted(kd.runs) == ["kd_0", "kd_1"]
    assert kd.curve == [[0, pytest.approx(0.25)], [1, pytest.approx(0.5)], [2, pytest.approx(0.6)]]
    so = group(report, method="so")
    assert so.n == 1 and so.last.std == 0.0
    md = report.to_markdown()
    assert "| kd | 2 | 60.00 ± 14.14 | 65.00 ± 7.07 | 75.00 ± 7.07 | aaaaaaaaaaaa | - |" in md


def test_failed_and_incomplete_runs_are_shown_never_averaged(tmp_path: Path) -> None:
    write_run(tmp_path / "kd_0", method="kd", seed=0, acc=[0.1, 0.2, 0.4])
    write_run(tmp_path / "kd_1", method="kd", seed=1, acc=None, failed="epoch 1, step 3: loss_kd is nan")
    write_run(tmp_path / "kd_2", method="kd", seed=2, acc=[0.9])  # killed after one epoch
    kd = group(build_report(load_runs([tmp_path]), by=["method"]), method="kd")
    assert kd.n == 1 and kd.last.mean == pytest.approx(0.4) and kd.runs == ["kd_0"]
    assert kd.failed == [{"run": "kd_1", "error": "epoch 1, step 3: loss_kd is nan"}]
    assert kd.incomplete == ["kd_2"]
    md = build_report(load_runs([tmp_path]), by=["method"]).to_markdown()
    assert "1 failed: kd_1: epoch 1, step 3: loss_kd is nan" in md and "1 incomplete: kd_2" in md


def test_runs_of_different_caches_get_their_own_rows(tmp_path: Path) -> None:
    write_run(tmp_path / "a0", method="kd", seed=0, acc=[0.1, 0.1, 0.2], fingerprint=FP_A)
    write_run(tmp_path / "a1", method="kd", seed=1, acc=[0.1, 0.1, 0.4], fingerprint=FP_A)
    write_run(tmp_path / "b0", method="kd", seed=0, acc=[0.1, 0.1, 0.9], fingerprint=FP_B)
    report = build_report(load_runs([tmp_path]), by=["method"])
    assert len(report.groups) == 2
    assert group(report, cache=FP_A[:12]).last.mean == pytest.approx(0.3)
    assert group(report, cache=FP_B[:12]).n == 1


def test_select_on_picks_the_setting_on_validation_and_reports_its_test(tmp_path: Path) -> None:
    # lr 0.1 is best on validation, lr 1.0 would be best on test: the report must take lr 0.1
    for seed in (0, 1):
        for lr, val, test in ((0.1, 0.8, 0.4), (1.0, 0.5, 0.9)):
            write_run(
                tmp_path / f"kd_lr{lr}_s{seed}",
                method="kd",
                seed=seed,
                lr=lr,
                acc=[0.0, 0.0, test + seed / 10],
                val=[0.0, 0.0, val + seed / 10],
            )
    write_run(tmp_path / "so_s0", method="so", seed=0, lr=0.1, acc=[0.0, 0.0, 0.3], val=[0.0, 0.0, 0.3])
    report = build_report(load_runs([tmp_path]), by=["method"], select_on="val_accuracy")
    kd = group(report, method="kd")
    assert kd.chosen == {"optim.lr": 0.1}
    assert kd.n == 2 and kd.last.mean == pytest.approx(0.45)
    assert [c["mean"] for c in kd.candidates] == [pytest.approx(0.85), pytest.approx(0.55)]
    assert "| kd | optim.lr=0.1 (val 85.00 ± 7.07) | 2 | 45.00 ± 7.07 |" in report.to_markdown()
    without = group(build_report(load_runs([tmp_path]), by=["method"]), method="kd")
    assert without.n == 4 and without.mixed == ["optim.lr"]  # averaged over settings: said so


def test_select_on_skips_settings_with_failed_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "a_s0", method="kd", seed=0, lr=0.1, acc=[0, 0, 0.5], val=[0, 0, 0.5])
    write_run(tmp_path / "a_s1", method="kd", seed=1, lr=0.1, acc=[0, 0, 0.5], val=[0, 0, 0.5])
    write_run(tmp_path / "b_s0", method="kd", seed=0, lr=1.0, acc=[0, 0, 0.9], val=[0, 0, 0.9])
    write_run(tmp_path / "b_s1", method="kd", seed=1, lr=1.0, acc=None, failed="loss is nan")
    kd = build_report(load_runs([tmp_path]), by=["method"], select_on="val_accuracy").groups[0]
    assert kd.chosen == {"optim.lr": 0.1} and kd.failed == []


def test_a_field_that_follows_the_seed_is_not_a_hyperparameter(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(
            tmp_path / f"kd_{seed}",
            method="kd",
            seed=seed,
            acc=[0, 0, 0.5],
            extra_spec={"ssl": {"labeled_list": f"/lists/labeled_s{seed}.txt"}},
        )
    report = build_report(load_runs([tmp_path]))
    assert report.by == [] and report.groups[0].n == 2 and report.groups[0].mixed == []


def test_sweep_dirs_list_their_points_even_unstarted(tmp_path: Path) -> None:
    write_run(tmp_path / "sw" / "method=kd-aaaaaa", method="kd", seed=0, acc=[0.1, 0.2, 0.3])
    points = {
        "method=kd-aaaaaa": {"overrides": {"method": "kd"}, "run_dir": "method=kd-aaaaaa"},
        "method=dkd-bbbbbb": {"overrides": {"method": "dkd"}, "run_dir": "method=dkd-bbbbbb"},
    }
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"points": points}))
    report = build_report(load_runs([tmp_path / "sw"]))
    assert group(report, method="dkd").incomplete == ["method=dkd-bbbbbb"]
    assert group(report, method="kd").n == 1


def test_refusals_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such directory"):
        load_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="empty: not a sweep"):
        load_runs([tmp_path / "empty"])
    write_run(tmp_path / "r" / "kd_0", method="kd", seed=0, acc=[0, 0, 0.5])
    write_run(tmp_path / "r" / "kd_1", method="kd", seed=1, acc=[0, 0, 0.5])
    runs = load_runs([tmp_path / "r"])
    with pytest.raises(SpecError, match="--by optim.lrr: no run has this field"):
        build_report(runs, by=["optim.lrr"])
    with pytest.raises(SpecError, match="results.json has no 'val_accuracy'"):
        build_report(runs, select_on="val_accuracy")
    (tmp_path / "r" / "kd_0" / "results.json").write_text("{not json")
    with pytest.raises(SpecError, match=r"kd_0/results.json: not valid JSON"):
        load_runs([tmp_path / "r"])


def test_write_report_and_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from customkd_cache.cli import main

    for m, s, a in (("kd", 0, 0.5), ("kd", 1, 0.7), ("so", 0, 0.2), ("so", 1, 0.4)):
        write_run(tmp_path / "runs" / f"{m}_{s}", method=m, seed=s, acc=[0.1, 0.2, a])
    paths = write_report(build_report(load_runs([tmp_path / "runs"])), tmp_path / "out" / "rep")
    assert [p.name for p in paths] == ["rep.md", "rep.json", "rep.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths[1].read_text())["groups"][0]["key"] == {"method": "kd"}

    def run_cli(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["customkd-cache", "report", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        out = capsys.readouterr()
        return int(exit_.value.code or 0), out.out, out.err

    code, out, _ = run_cli(str(tmp_path / "runs"), "--json")
    assert code == 0 and [g["n"] for g in json.loads(out)["groups"]] == [2, 2]
    code, out, _ = run_cli(str(tmp_path / "runs"), "--by", "seed")
    assert code == 0 and "averages over several method" in out
    code, _, err = run_cli(str(tmp_path / "nope"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope: no such directory" in err


def test_a_setting_that_differs_outside_the_grid_is_not_merged(tmp_path: Path) -> None:
    sw = tmp_path / "sw"
    points = {}
    for name, lr in (("method=kd-aaaaaa", 0.1), ("method=kd-bbbbbb", 1.0)):
        write_run(sw / name, method="kd", seed=0, lr=lr, acc=[0, 0, lr / 2])
        points[name] = {"overrides": {"method": "kd"}, "run_dir": name}
    (sw / "sweep.json").write_text(json.dumps({"points": points}))
    report = build_report(load_runs([sw]))
    assert report.by == ["optim.lr"] and [g.n for g in report.groups] == [1, 1]
    assert group(build_report(load_runs([sw]), by=["method"]), method="kd").mixed == ["optim.lr"]
