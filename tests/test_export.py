"""`customkd-cache export` contracts, on a run trained here from the smoke specs.

The exported ONNX model must agree with torch on the run's evaluation images (and torch on those
images must reproduce the run's own best accuracy, so they are rendered as training renders them);
the report holds parameters, MACs, size and latency; int8 adds a smaller model with its accuracy;
TorchScript works the same; runs that cannot be exported are refused with exit 2 and one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from customkd_cache.lab.export import ExportError, export_student
from customkd_cache.specs import load_cache_spec, load_train_spec
from customkd_cache.stage_one import extract
from customkd_cache.stage_two.train import run_train
from customkd_cache.testing import fakedata

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "smoke" / "officehome.toml"
TRAIN_SPEC = REPO / "pipelines" / "smoke" / "officehome.toml"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[Path]:
    """A finished smoke run (one epoch), its dataset and cache; CUSTOMKD_CACHE_ROOT points at them."""
    base = tmp_path_factory.mktemp("export")
    root = fakedata.write_officehome(base / "OfficeHome", per_class=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("CUSTOMKD_CACHE_ROOT", str(base / "caches"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    sets = [f"dataset.root={root}"]
    extract.run_cache(
        load_cache_spec(CACHE_SPEC, sets), spec_path=CACHE_SPEC, shard=extract.Shard(), progress=False
    )
    spec = load_train_spec(TRAIN_SPEC, [*sets, "optim.epochs=1", "probe.epochs=5", "method=kd"])
    run_train(spec, spec_path=TRAIN_SPEC, out=base / "run")
    yield base / "run"
    mp.undo()


def test_onnx_agrees_with_torch_and_is_measured(run: Path, tmp_path: Path) -> None:
    rep = export_student(run, out=tmp_path / "m.onnx", quantize="int8", latency_runs=100)
    results = json.loads((run / "results.json").read_text())
    assert rep["checkpoint"] == "student_best.pth"
    assert rep["num_images"] == 65 and rep["eval_splits"] == ["Clipart"]  # the whole evaluation split
    assert rep["torch_accuracy"] == pytest.approx(results["best_student_accuracy"])
    onnx = rep["formats"]["onnx"]
    assert onnx["top1_agreement"] >= 0.999 and onnx["max_abs_logit_diff"] < 1e-3
    assert onnx["accuracy"] == pytest.approx(rep["torch_accuracy"])
    assert onnx["file_bytes"] == (tmp_path / "m.onnx").stat().st_size
    for threads in ("1", "all"):
        lat = onnx["latency_ms"][threads]
        assert 0 < lat["p50"] <= lat["p90"]
    import timm

    model = timm.create_model("mobilenetv3_small_050", num_classes=65)
    assert rep["params"] == sum(p.numel() for p in model.parameters())
    assert 0 < rep["macs"] < rep["params"] * 32 * 32  # a conv net: fewer MACs than params x pixels
    int8 = rep["formats"]["onnx_int8"]
    assert (tmp_path / "m.int8.onnx").exists() and int8["file_bytes"] < onnx["file_bytes"] / 2
    assert int8["accuracy"] is not None and 0 <= int8["top1_agreement"] <= 1
    assert json.loads((tmp_path / "export.json").read_text()) == json.loads(json.dumps(rep))


def test_onnx_model_runs_on_its_own_with_any_batch(run: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    export_student(
        run, out=tmp_path / "m.onnx", checkpoint="last", max_images=8, latency_runs=1, warmup_runs=0
    )
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        (logits,) = session.run(["logits"], {"pixels": torch.zeros(batch, 3, 32, 32).numpy()})
        assert logits.shape == (batch, 65)


def test_torchscript(run: Path, tmp_path: Path) -> None:
    rep = export_student(run, fmt="torchscript", out=tmp_path / "m.pt", latency_runs=10, max_images=16)
    ts = rep["formats"]["torchscript"]
    assert rep["num_images"] == 16 and ts["top1_agreement"] == 1.0 and ts["max_abs_logit_diff"] < 1e-4
    assert torch.jit.load(str(tmp_path / "m.pt"))(torch.zeros(2, 3, 32, 32)).shape == (2, 65)


def test_cli_prints_a_table_and_refuses_what_it_cannot_export(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from customkd_cache.cli import main

    def cli(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["customkd-cache", "export", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        out = capsys.readouterr()
        return int(exit_.value.code or 0), out.out, out.err

    code, out, _ = cli(str(run), "--out", str(tmp_path / "ok.onnx"), "--images", "8", "--runs", "5")
    assert code == 0 and "p50/p90 ms, 1 thread" in out and "\nonnx " in out and "export.json" in out
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "results.json").unlink()
    no_best = tmp_path / "no_best"
    shutil.copytree(run, no_best)
    (no_best / "student_best.pth").unlink()
    cases: list[tuple[list[str], str]] = [
        ([str(tmp_path / "missing")], "no such run directory"),
        ([str(unfinished)], "no finished student (results.json missing)"),
        ([str(no_best)], "pass --checkpoint last"),
        ([str(run), "--format", "tflite"], "--format tflite: unknown"),
        ([str(run), "--format", "torchscript", "--quantize", "int8"], "only with --format onnx"),
        ([str(run), "--checkpoint", "first"], "choose best or last"),
    ]
    for args, needle in cases:
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (args, err)


def test_a_student_that_cannot_be_traced_is_refused(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def untraceable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.onnx, "export", untraceable)
    with pytest.raises(ExportError, match="cannot be traced to ONNX.*data-dependent control flow"):
        export_student(run, out=tmp_path / "m.onnx", max_images=4, latency_runs=1)
    assert not (tmp_path / "export.json").exists()
