"""The paper's table in one command: tasks x methods x seeds from one cache, then the table.

Trained on generated OfficeHome data with the tiny models (``testing.specs``) on a reduced grid
(two tasks, two methods, one seed); the table's arithmetic is checked on recorded runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from customkd_cache.cli import app
from customkd_cache.errors import SpecError
from customkd_cache.lab.paper import PAPER_METHODS, estimate, paper_report, plan_paper, run_images, run_paper
from customkd_cache.lab.report import RunRecord, paper_table
from customkd_cache.specs import METHODS, load_cache_spec, load_train_spec
from customkd_cache.stage_one.extract import Shard, run_cache
from customkd_cache.testing import fakedata
from customkd_cache.testing.specs import TINY_TRAIN, tiny_cache_spec

REPO = Path(__file__).resolve().parents[1]
OFFICEHOME = REPO / "pipelines" / "officehome"


def test_the_paper_methods_are_methods() -> None:
    assert set(PAPER_METHODS) <= set(METHODS) and "logits" in PAPER_METHODS


def record(method: str, seed: int, acc: float | None) -> RunRecord:
    done = acc is not None
    return RunRecord(
        run_dir=Path(f"{method}-{seed}"),
        name=f"method={method},seed={seed}",
        status="done" if done else "failed",
        overrides={"method": method, "seed": seed},
        spec={},
        results={"student_accuracy": acc} if done else {},
        metrics=[],
        fingerprints=(),
    )


def test_table_cells_are_over_seeds_and_the_average_over_tasks_per_seed() -> None:
    runs = {
        "A_to_C": [record("kd", 0, 0.5), record("kd", 1, 0.7)],
        "C_to_A": [record("kd", 0, 0.3), record("kd", 1, None)],
    }
    table = paper_table(runs, methods=["kd"], seeds=[0, 1])
    assert table.cells["kd"]["A_to_C"].mean == pytest.approx(0.6)
    assert table.cells["kd"]["A_to_C"].std == pytest.approx(0.1414213, rel=1e-5)
    assert table.cells["kd"]["C_to_A"].n == 1
    assert table.average["kd"].mean == pytest.approx(0.4) and table.average["kd"].n == 1  # seed 1 incomplete
    assert table.missing["kd"] == ["C_to_A seed=1"]
    md = table.to_markdown()
    assert (
        "| method | A→C | C→A | avg |" in md and "| kd | 60.00 ± 14.14 | 30.00 ± 0.00 | 40.00 ± 0.00 |" in md
    )
    assert "- kd: C_to_A seed=1" in md


def test_plan_refuses_unknown_tasks_and_methods() -> None:
    with pytest.raises(SpecError, match=r"--task A_to_X: no .*A_to_X.toml \(did you mean"):
        plan_paper("officehome", pipelines=OFFICEHOME, tasks=["A_to_X"])
    with pytest.raises(SpecError, match="--method logit: unknown"):
        plan_paper("officehome", pipelines=OFFICEHOME, methods=["logit"])
    with pytest.raises(SpecError, match="no pipelines"):
        plan_paper("nothing_here", pipelines=REPO / "nothing_here")


def test_dry_run_counts_runs_and_gpu_hours(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUSTOMKD_DATA_ROOT", str(tmp_path))  # no data: the published split sizes
    plan = plan_paper("officehome", pipelines=OFFICEHOME)
    assert plan.runs == 12 * 7 * 3
    spec = load_train_spec(OFFICEHOME / "A_to_C.toml")
    # Clipart 4365 unlabeled rows, 32 per batch of 64 -> 137 steps x 64 images + 4365 evaluated, 30 epochs
    assert run_images(spec, {"Art": 2427, "Clipart": 4365}) == 30 * (137 * 64 + 4365)
    est = estimate(plan, images_per_s=1000.0)
    assert est.seconds_per_run["A_to_C"] == pytest.approx(30 * (137 * 64 + 4365) / 1000.0)
    result = CliRunner().invoke(
        app, ["paper", "--dataset", "officehome", "--dry-run"], catch_exceptions=False
    )
    assert result.exit_code == 0
    assert result.output.startswith(
        f"252 runs (12 tasks x 21 method-seed points); about {est.gpu_hours:.1f} GPU"
    )


@pytest.mark.slow  # four tiny trainings, about 3 minutes on 2 loaded cores
def test_paper_trains_a_reduced_grid_from_one_cache_and_writes_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUSTOMKD_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path / "caches"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    fakedata.write_officehome(tmp_path / "data" / "officehome")
    cspec = tiny_cache_spec(REPO / "cache_specs" / "officehome" / "dinov2_vitl14.toml", tmp_path / "c.toml")
    assert run_cache(load_cache_spec(cspec), spec_path=cspec, shard=Shard(), progress=False).complete
    plan = plan_paper(
        "officehome",
        pipelines=OFFICEHOME,
        tasks=["A_to_C", "C_to_A"],
        methods=["student_only", "logits"],
        seeds=[0],
        overrides=[f"cache.spec={cspec}", *TINY_TRAIN],
    )
    out = tmp_path / "paper"
    points = run_paper(plan, out)
    assert sorted(p.status for p in points) == ["ran"] * 4
    table, written = paper_report(out)
    assert [p.name for p in written] == ["table.md", "table.json"]
    assert all(table.cells[m][t].n == 1 for m in ("student_only", "logits") for t in ("A_to_C", "C_to_A"))
    assert table.average["logits"].n == 1 and not any(table.missing.values())
    assert json.loads((out / "table.json").read_text())["tasks"] == ["A_to_C", "C_to_A"]
    again = CliRunner().invoke(app, ["paper", "--dataset", "officehome", "--out", str(out), "--report-only"])
    assert again.exit_code == 0 and "| logits |" in again.output
