"""Stage two's GPU paths, checked on the CPU: precision (bf16 autocast), channels_last and pinned
memory on CUDA, host reads bounded per epoch, stage A and evaluation under several (gloo) ranks.

No GPU is needed: CUDA is monkeypatched where a test needs a CUDA device's choices, and several
ranks are gloo processes on this machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from customkd_cache.errors import SpecError
from customkd_cache.specs import load_train_spec
from customkd_cache.stage_two import probe as probe_module
from customkd_cache.stage_two.precision import resolve_precision
from customkd_cache.stage_two.train import run_train
from customkd_cache.testing import fakedata
from customkd_cache.testing import run_cli as cli

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "smoke" / "officehome.toml"
TRAIN_SPEC = REPO / "pipelines" / "smoke" / "officehome.toml"
CPU = torch.device("cpu")


def _env(caches: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUSTOMKD_CACHE_ROOT=str(caches), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A generated OfficeHome-layout dataset and its smoke cache."""
    base = tmp_path_factory.mktemp("gpu_paths")
    root = fakedata.write_officehome(base / "OfficeHome", per_class=1)
    caches = base / "caches"
    cli("cache", "--spec", str(CACHE_SPEC), "--set", f"dataset.root={root}", "-q", env=_env(caches))
    return {"root": root, "caches": caches}


@pytest.fixture
def spec_for(cached: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(cached["caches"]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)

    def make(*extra: str) -> Any:
        return load_train_spec(TRAIN_SPEC, [f"dataset.root={cached['root']}", "optim.epochs=1", *extra])

    return make


# --- precision ---------------------------------------------------------------------------------


class TestPrecision:
    def test_auto_is_fp32_on_the_cpu(self) -> None:
        assert resolve_precision("auto", CPU) == "fp32"
        assert resolve_precision("bf16", CPU) == "bf16"
        assert resolve_precision("fp32", CPU) == "fp32"

    @pytest.mark.parametrize(("supported", "auto"), [(True, "bf16"), (False, "fp32")])
    def test_auto_on_cuda_is_bf16_where_supported(
        self, monkeypatch: pytest.MonkeyPatch, supported: bool, auto: str
    ) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        cuda = torch.device("cuda", 0)
        assert resolve_precision("auto", cuda) == auto
        assert resolve_precision("fp32", cuda) == "fp32"
        if supported:
            assert resolve_precision("bf16", cuda) == "bf16"
        else:
            with pytest.raises(SpecError, match=r"run.precision = 'bf16'.*does not support bfloat16"):
                resolve_precision("bf16", cuda)

    def test_a_bad_value_names_the_field(self, spec_for: Any) -> None:
        with pytest.raises(SpecError, match="run.precision"):
            spec_for("run.precision=fp16")

    def test_bf16_runs_every_forward_under_autocast(
        self, spec_for: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Stage B, stage A, the probe and evaluation all compute under bf16 autocast; the recorded
        spec and results.json say so."""
        seen: dict[str, set[bool]] = {}
        self._record_autocast(monkeypatch, seen)
        spec = spec_for("run.precision=bf16")
        res = run_train(spec, spec_path=TRAIN_SPEC, out=tmp_path / "bf16")
        assert seen == {k: {True} for k in ("student", "student_parts", "customizer", "probe")}, seen
        assert res["precision"] == "bf16" and res["student_accuracy"] is not None
        assert json.loads((tmp_path / "bf16" / "spec.json").read_text())["run"]["precision"] == "bf16"

    def test_fp32_runs_nothing_under_autocast(
        self, spec_for: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        seen: dict[str, set[bool]] = {}
        self._record_autocast(monkeypatch, seen)
        res = run_train(spec_for(), spec_path=TRAIN_SPEC, out=tmp_path / "fp32")
        assert seen == {k: {False} for k in ("student", "student_parts", "customizer", "probe")}, seen
        assert res["precision"] == "fp32"

    @staticmethod
    def _record_autocast(monkeypatch: pytest.MonkeyPatch, seen: dict[str, set[bool]]) -> None:
        from customkd_cache.models.customizer import Customizer
        from customkd_cache.models.students import Student

        def record(name: str) -> None:
            seen.setdefault(name, set()).add(torch.is_autocast_enabled("cpu"))

        patched = ((Student, "__call__", "student"), (Student, "forward_parts", "student_parts"))
        for cls, attr, name in (*patched, (Customizer, "__call__", "customizer")):
            original = getattr(cls, attr)

            def wrapped(self: Any, *a: Any, _o: Any = original, _n: str = name, **k: Any) -> Any:
                record(_n)
                return _o(self, *a, **k)

            monkeypatch.setattr(cls, attr, wrapped)
        epoch = probe_module.train_probe_epoch

        def probe_epoch(*a: Any, **k: Any) -> None:
            record("probe")
            epoch(*a, **k)

        monkeypatch.setattr(probe_module, "train_probe_epoch", probe_epoch)
