"""`customkd-cache sweep` contracts.

Grid expansion, names and refusals are checked directly; the bookkeeping (skip finished points,
resume killed ones, keep failed ones, shards, claims, phases sharing one directory) runs against a
stand-in for ``run_train`` that writes what a run writes in milliseconds; the end-to-end tests train
the smoke spec for real through the CLI: a 2 methods x 2 seeds sweep, a second invocation that does
nothing, and two concurrent invocations that train each point exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from customkd_cache import specs
from customkd_cache.errors import NonFiniteLossError, SpecError
from customkd_cache.lab.sweep import (
    expand_grid,
    parse_grid,
    point_hash,
    point_overrides,
    read_sweep,
    run_sweep,
)
from customkd_cache.stage_two import train as train_module
from customkd_cache.store.claims import try_claim
from customkd_cache.testing import fakedata
from customkd_cache.testing import run_cli as cli

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "smoke" / "officehome.toml"
TRAIN_SPEC = REPO / "pipelines" / "smoke" / "officehome.toml"
GRID = [("method", ["student_only", "kd"]), ("seed", [0, 1])]


# --- grid and names ----------------------------------------------------------------------------


def test_expand_grid_is_the_cartesian_product_in_order() -> None:
    points = expand_grid([("a", [1, 2]), ("b", ["x", "y", "z"])])
    assert points == [{"a": a, "b": b} for a in (1, 2) for b in ("x", "y", "z")]
    assert expand_grid([]) == [{}]


@pytest.mark.parametrize("grid", [[("a", [1]), ("a", [2])], [("a", [])]])
def test_expand_grid_refuses_repeated_or_empty_keys(grid: list[tuple[str, list[Any]]]) -> None:
    with pytest.raises(SpecError, match="--grid a"):
        expand_grid(grid)


def test_parse_grid_values_are_toml_and_brackets_do_not_split() -> None:
    assert parse_grid("optim.lr=0.1,1e-2") == ("optim.lr", [0.1, 0.01])
    assert parse_grid("method=kd,customkd+kd") == ("method", ["kd", "customkd+kd"])
    assert parse_grid('x=[1,2],{a = 1, b = "c,d"}') == ("x", [[1, 2], {"a": 1, "b": "c,d"}])
    for bad in ("method", "=a,b", "method="):
        with pytest.raises(SpecError, match="KEY=V1,V2"):
            parse_grid(bad)


def test_the_grid_wins_over_set_and_linked_keys_share_a_value() -> None:
    full = point_overrides(["method=kd", "optim.lr=0.1"], {"method": "dkd", "a.x+a.y": 2})
    assert full == {"method": "dkd", "optim.lr": 0.1, "a.x": 2, "a.y": 2}
    assert point_hash(full) != point_hash({**full, "optim.lr": 0.2})
    assert point_hash(full) == point_hash(dict(reversed(list(full.items()))))


# --- bookkeeping against a stand-in trainer ----------------------------------------------------


class FakeTrain:
    """Stands in for ``run_train``: records its calls and writes spec.json, metrics and results."""

    def __init__(self, fail_on: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, int, bool, str]] = []
        self.fail_on = fail_on

    def __call__(self, spec: specs.TrainSpec, *, spec_path: Path, out: Path, resume: bool = False) -> Any:
        self.calls.append((spec.method, spec.seed, resume, os.environ.get("WORLD_SIZE", "")))
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(json.dumps(specs.to_dict(spec)))
        if spec.method in self.fail_on:
            raise NonFiniteLossError(f"epoch 0, step 0: loss is nan ({spec.method})")
        res = {"method": spec.method, "seed": spec.seed, "student_accuracy": 0.5, "teacher_accuracy": 0.6}
        (out / "results.json").write_text(json.dumps(res))
        return res


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> FakeTrain:
    fake = FakeTrain()
    monkeypatch.setattr(train_module, "run_train", fake)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return fake


def sweep(out: Path, grid: Any = GRID, *extra: str, **kw: Any) -> list[Any]:
    return run_sweep(spec_path=TRAIN_SPEC, out=out, grid=grid, overrides=["dataset.root=/x", *extra], **kw)


def test_finished_points_are_skipped_and_named_readably(tmp_path: Path, fake_train: FakeTrain) -> None:
    first = sweep(tmp_path / "s")
    assert [p.status for p in first] == ["ran"] * 4
    assert len(fake_train.calls) == 4
    assert first[1].name.startswith("method=student_only,seed=1-") and first[1].run_dir.is_dir()
    assert first[1].overrides == {"method": "student_only", "seed": 1}
    again = sweep(tmp_path / "s")
    assert [p.status for p in again] == ["done"] * 4 and len(fake_train.calls) == 4
    points = read_sweep(tmp_path / "s")["points"]
    assert set(points) == {p.name for p in first}
    assert all(p["status"] == "done" for p in points.values())


def test_a_second_phase_adds_points_and_shares_equal_ones(tmp_path: Path, fake_train: FakeTrain) -> None:
    sweep(tmp_path / "s")
    phase2 = sweep(tmp_path / "s", [("method", ["kd", "dkd"]), ("seed", [1])])
    assert [(p.overrides["method"], p.status) for p in phase2] == [("kd", "done"), ("dkd", "ran")]
    assert len(read_sweep(tmp_path / "s")["points"]) == 5
    other_set = sweep(tmp_path / "s", [("method", ["kd"]), ("seed", [1])], "optim.lr=0.01")
    assert other_set[0].status == "ran"  # another override set is another point
    assert other_set[0].name != phase2[0].name


def test_bad_grid_key_fails_before_anything_runs(tmp_path: Path, fake_train: FakeTrain) -> None:
    with pytest.raises(SpecError, match=r"optim\.lrr.*did you mean 'lr'"):
        sweep(tmp_path / "s", [("method", ["kd"]), ("optim.lrr", [0.1])])
    with pytest.raises(SpecError, match="method"):
        sweep(tmp_path / "s", [("method", ["kd", "no_such_method"])])
    assert fake_train.calls == [] and not (tmp_path / "s").exists()


def test_failed_points_are_kept_with_their_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTrain(fail_on=("kd",))
    monkeypatch.setattr(train_module, "run_train", fake)
    points = sweep(tmp_path / "s")
    assert [p.status for p in points] == ["ran", "ran", "failed", "failed"]
    assert "loss is nan (kd)" in points[2].error
    assert read_sweep(tmp_path / "s")["points"][points[2].name]["status"] == "failed"
    again = sweep(tmp_path / "s")
    assert [p.status for p in again] == ["done", "done", "failed", "failed"] and len(fake.calls) == 4
    assert "loss is nan" in again[3].error
    sweep(tmp_path / "s", retry_failed=True)
    assert len(fake.calls) == 6


def test_killed_points_resume_and_unstarted_ones_start_afresh(tmp_path: Path, fake_train: FakeTrain) -> None:
    planned = sweep(tmp_path / "s", [("method", ["kd", "dkd"])])
    for p in planned:
        (p.run_dir / "results.json").unlink()
    (planned[0].run_dir / "checkpoints").mkdir()
    (planned[0].run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    (planned[1].run_dir / "stale-file").write_text("from a run killed before its first checkpoint")
    sweep(tmp_path / "s", [("method", ["kd", "dkd"])])
    assert [c[:3] for c in fake_train.calls[2:]] == [("kd", 0, True), ("dkd", 0, False)]
    assert not (planned[1].run_dir / "stale-file").exists()


def test_a_live_claim_makes_another_process_skip_the_point(tmp_path: Path, fake_train: FakeTrain) -> None:
    out = tmp_path / "s"
    full = point_overrides(["dataset.root=/x"], {"method": "kd"})
    held = try_claim(out / ".claims", point_hash(full))
    assert held is not None
    points = sweep(out, [("method", ["kd", "dkd"])])
    assert [p.status for p in points] == ["skipped", "ran"]
    held.release()
    assert [p.status for p in sweep(out, [("method", ["kd", "dkd"])])] == ["ran", "done"]


def test_shards_split_the_points(tmp_path: Path, fake_train: FakeTrain) -> None:
    a = sweep(tmp_path / "s", shard=(0, 3))
    b = sweep(tmp_path / "s", shard=(1, 3))
    c = sweep(tmp_path / "s", shard=(2, 3))
    names = [p.name for p in a + b + c]
    assert len(names) == 4 == len(set(names)) and len(fake_train.calls) == 4
    assert len(read_sweep(tmp_path / "s")["points"]) == 4
    with pytest.raises(SpecError, match="--shard 3/3"):
        sweep(tmp_path / "s", shard=(3, 3))


def test_torchrun_ranks_share_the_points_and_train_alone(
    tmp_path: Path, fake_train: FakeTrain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    points = sweep(tmp_path / "s")
    assert [p.overrides for p in points] == [
        {"method": "student_only", "seed": 1},
        {"method": "kd", "seed": 1},
    ]
    assert {c[3] for c in fake_train.calls} == {"1"}  # run_train saw a world of one
    assert os.environ["WORLD_SIZE"] == "2"


def test_a_point_trained_from_another_spec_is_refused(tmp_path: Path, fake_train: FakeTrain) -> None:
    sweep(tmp_path / "s", [("method", ["kd"])])
    edited = tmp_path / "edited.toml"
    edited.write_text(TRAIN_SPEC.read_text().replace("epochs = 2", "epochs = 3"))
    with pytest.raises(SpecError, match=r"optim\.epochs differs.*new --out"):
        run_sweep(
            spec_path=edited, out=tmp_path / "s", grid=[("method", ["kd"])], overrides=["dataset.root=/x"]
        )


# --- end to end through the CLI ----------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A generated OfficeHome-layout dataset, its smoke cache, and the environment for the CLI."""
    base = tmp_path_factory.mktemp("sweep")
    root = fakedata.write_officehome(base / "OfficeHome", per_class=1)
    env = dict(os.environ)
    env.update(CUSTOMKD_CACHE_ROOT=str(base / "caches"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cli("cache", "--spec", str(CACHE_SPEC), "--set", f"dataset.root={root}", "-q", env=env)
    return {"base": base, "root": root, "env": env}


def sweep_args(world: dict[str, Any], out: Path) -> list[str]:
    return [
        "sweep",
        "--spec",
        str(TRAIN_SPEC),
        "--out",
        str(out),
        "--set",
        f"dataset.root={world['root']}",
        "--set",
        "optim.epochs=1",
        "--set",
        "probe.epochs=5",
        "--set",
        'uda.val=["Product"]',  # held-out labeled rows: val_accuracy for --select-on
        "--grid",
        "method=student_only,kd",
        "--grid",
        "seed=0,1",
    ]


def test_cli_sweep_then_nothing_to_do_then_report(world: dict[str, Any]) -> None:
    out = world["base"] / "s2x2"
    proc = cli(*sweep_args(world, out), env=world["env"])
    assert "4 points: 4 ran" in proc.stdout
    again = cli(*sweep_args(world, out), env=world["env"])
    assert "4 points: 0 ran, 4 done" in again.stdout
    report = json.loads(cli("report", str(out), "--json", env=world["env"]).stdout)
    assert report["by"] == ["method"] and len(report["groups"]) == 2
    for group in report["groups"]:
        runs = [json.loads((out / name / "results.json").read_text()) for name in group["runs"]]
        assert group["n"] == 2 and {r["method"] for r in runs} == {group["key"]["method"]}
        accs = [r["student_accuracy"] for r in runs]
        assert group["last"]["mean"] == pytest.approx(sum(accs) / 2)
        assert group["last"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    selected = json.loads(
        cli("report", str(out), "--json", "--select-on", "val_accuracy", env=world["env"]).stdout
    )
    for group in selected["groups"]:
        (candidate,) = group["candidates"]  # only the seed varies within a method: one setting
        vals = [json.loads((out / n / "results.json").read_text())["val_accuracy"] for n in group["runs"]]
        assert candidate["n"] == 2 and candidate["mean"] == pytest.approx(sum(vals) / 2)


def test_two_concurrent_sweeps_train_each_point_once(world: dict[str, Any]) -> None:
    out = world["base"] / "concurrent"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "customkd_cache", *sweep_args(world, out)],
            env=world["env"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = [
        line.split()[1] for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("ran ")
    ]
    assert len(ran) == 4 == len(set(ran))
    for run_dir in map(Path, ran):
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # one epoch, trained once


def test_cli_refusals_are_one_line_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from customkd_cache.cli import main

    out = tmp_path / "refused"
    base = ["sweep", "--spec", str(TRAIN_SPEC), "--out", str(out), "--set", "dataset.root=/x"]
    for extra, needle in (
        (["--grid", "optim.lrr=0.1"], "unknown key 'lrr'"),
        (["--grid", "method"], "expected KEY=V1,V2"),
        (["--grid", "method=kd", "--shard", "2/2"], "--shard"),
        (["--grid", "method=kd", "--set", "optim.epochs=0"], "optim.epochs"),
    ):
        monkeypatch.setattr(sys, "argv", ["customkd-cache", *base, *extra])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_torchrun_ranks_split_a_sweep(world: dict[str, Any]) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    out = world["base"] / "torchrun"
    args = sweep_args(world, out)[:-2]  # the method grid only: two points, one per rank
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "customkd_cache", *args],
        env=world["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ran ")]
    assert sorted(Path(r).name.rsplit("-", 1)[0] for r in ran) == ["method=kd", "method=student_only"]
    assert proc.stdout.count("1 points: 1 ran") == 2  # each rank trained its own point


@pytest.mark.parametrize("command", ["sweep", "report", "export", "gc", "ls"])
def test_every_workflow_command_has_help(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from customkd_cache.cli import main

    monkeypatch.setattr(sys, "argv", ["customkd-cache", command, "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0 and "Usage:" in capsys.readouterr().out
