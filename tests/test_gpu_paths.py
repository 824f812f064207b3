"""Stage two's GPU paths, checked on the CPU: precision (bf16 autocast), channels_last and pinned
memory on CUDA, host reads bounded per epoch, stage A and evaluation under several (gloo) ranks.

No GPU is needed: CUDA is monkeypatched where a test needs a CUDA device's choices, and several
ranks are gloo processes on this machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from customkd_cache.distributed import Dist
from customkd_cache.errors import NonFiniteLossError, SpecError
from customkd_cache.specs import load_train_spec
from customkd_cache.stage_two import evaluate as evaluate_module
from customkd_cache.stage_two import probe as probe_module
from customkd_cache.stage_two import stage_b
from customkd_cache.stage_two.precision import resolve_precision
from customkd_cache.stage_two.state import TrainState
from customkd_cache.stage_two.train import prepare_run, run_train
from customkd_cache.testing import fakedata, run_gloo_ranks
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
        # the library versions a rerun needs to repeat these numbers exactly
        assert res["versions"]["torch"] == torch.__version__ and res["versions"]["numpy"] == np.__version__

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
        functional = probe_module.F

        class RecordedF:  # the probe's torch.nn.functional: its loss records the autocast state
            def __getattr__(self, name: str) -> Any:
                return getattr(functional, name)

            @staticmethod
            def cross_entropy(*a: Any, **k: Any) -> Any:
                record("probe")
                return functional.cross_entropy(*a, **k)

        monkeypatch.setattr(probe_module, "F", RecordedF())


# --- channels_last, pinned memory, non-blocking copies -----------------------------------------


class _Stop(Exception):
    pass


@pytest.fixture
def fake_cuda_moves(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``Module.to`` and ``Tensor.to`` accept a CUDA device on this CPU machine: the move is dropped,
    everything else (memory format, dtype) happens; each tensor move's keywords are recorded."""
    moves: list[dict[str, Any]] = []

    def drop_cuda(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        def is_cuda(a: Any) -> bool:
            return (isinstance(a, torch.device) and a.type == "cuda") or (
                isinstance(a, str) and a.startswith("cuda")
            )

        kwargs = {k: v for k, v in kwargs.items() if not (k == "device" and is_cuda(v))}
        return tuple(a for a in args if not is_cuda(a)), kwargs

    module_to, tensor_to = torch.nn.Module.to, torch.Tensor.to

    def fake_module_to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = drop_cuda(args, kwargs)
        return module_to(self, *args, **kwargs)

    def fake_tensor_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        moves.append(dict(kwargs))
        args, kwargs = drop_cuda(args, kwargs)
        kwargs.pop("non_blocking", None)
        return tensor_to(self, *args, **kwargs) if args or kwargs else self

    monkeypatch.setattr(torch.nn.Module, "to", fake_module_to)
    monkeypatch.setattr(torch.Tensor, "to", fake_tensor_to)
    return moves


def _prepared(spec: Any, out: Path) -> Any:
    return prepare_run(spec, spec_path=TRAIN_SPEC, out=out, resume=False, dist=Dist(0, 1, 0, CPU))


class TestCudaPaths:
    def test_the_student_is_channels_last_on_cuda_only(
        self, spec_for: Any, tmp_path: Path, fake_cuda_moves: list[dict[str, Any]]
    ) -> None:
        run = _prepared(spec_for(), tmp_path / "r")
        convs = [p for p in run.models.student.parameters() if p.ndim == 4]
        assert convs and not all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        run.models.to(torch.device("cuda", 0))
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)

    def test_batches_move_non_blocking_and_channels_last_on_cuda(
        self, fake_cuda_moves: list[dict[str, Any]]
    ) -> None:
        batch = {"pixels": torch.rand(2, 3, 8, 8), "label": torch.tensor([1, 2])}
        out = stage_b.to_device(batch, torch.device("cuda", 0))
        assert fake_cuda_moves == [{"non_blocking": True}, {"non_blocking": True}]
        assert out["pixels"].is_contiguous(memory_format=torch.channels_last)
        assert stage_b.to_device(batch, CPU)["pixels"].is_contiguous()  # the CPU keeps NCHW

    @pytest.mark.parametrize(("device", "pinned"), [("cpu", False), ("cuda", True)])
    def test_loaders_pin_memory_on_cuda_only(
        self, spec_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, pinned: bool
    ) -> None:
        run = _prepared(spec_for(), tmp_path / "r")
        run.device = torch.device(device)
        asked: list[bool] = []

        def make_loader(*a: Any, pin_memory: bool = False, **k: Any) -> Any:
            asked.append(pin_memory)
            raise _Stop

        monkeypatch.setattr(stage_b, "make_loader", make_loader)
        monkeypatch.setattr(evaluate_module, "make_loader", make_loader)
        with pytest.raises(_Stop):
            stage_b.train_stage_b(run, 0, TrainState(), 10)
        with pytest.raises(_Stop):
            evaluate_module.evaluate(run)
        assert asked == [pinned, pinned]


# --- host reads per epoch ----------------------------------------------------------------------


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each read of a tensor's value by the host (a device sync on a GPU) made from this
    package's code (not from torch's own, e.g. the optimizers' CPU step counters)."""
    package = str(REPO / "customkd_cache")
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self: torch.Tensor, *a: Any, _o: Any = original, _n: str = name, **k: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                reads.append(f"{_n} {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return reads


@pytest.mark.parametrize("method", ["customkd", "dkd"])
def test_stage_b_reads_the_device_every_log_every_steps(
    spec_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A stage-B epoch reads the device at most steps / log_every + 2 times, and its sums are the
    per-step losses added up."""
    run = _prepared(spec_for(f"method={method}", "optim.batch_size=8", "run.log_every=4"), tmp_path / "r")
    step = stage_b._stage_b_step
    totals: list[torch.Tensor] = []

    def recorded(*a: Any) -> Any:
        terms, norm = step(*a)
        totals.append(terms.total.detach().clone())
        return terms, norm

    monkeypatch.setattr(stage_b, "_stage_b_step", recorded)
    reads = _count_host_reads(monkeypatch)
    sums, n = stage_b.train_stage_b(run, 0, TrainState(), 100)
    monkeypatch.undo()
    assert n >= 12, n  # enough steps for the bound to mean something
    assert len(reads) <= n // 4 + 2, reads
    assert sums["loss_total"] == pytest.approx(float(sum(float(t) for t in totals)), rel=1e-6)


def test_a_nan_is_caught_within_log_every_steps_naming_its_step(
    spec_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    run = _prepared(spec_for("optim.batch_size=8", "run.log_every=5"), tmp_path / "r")
    step, calls = stage_b._stage_b_step, []

    def poisoned(*a: Any) -> Any:
        terms, norm = step(*a)
        calls.append(1)
        if len(calls) == 3:  # step 2
            terms = dataclasses.replace(terms, total=terms.total * float("nan"))
        return terms, norm

    monkeypatch.setattr(stage_b, "_stage_b_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss is not finite at epoch 0, step 2 \(total=nan"):
        stage_b.train_stage_b(run, 0, TrainState(), 100)
    assert len(calls) == 5  # stopped at the first check after the NaN


# --- the probe and stage A on the run's device -------------------------------------------------


META = torch.device("meta")  # a device that is not the CPU, available everywhere (no data)


def test_the_probe_and_stage_a_run_on_the_runs_device(
    spec_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from customkd_cache.stage_two import stage_a
    from customkd_cache.stage_two import train as train_module

    monkeypatch.setattr(train_module, "resolve_device", lambda name: META)
    fitted_on: list[Any] = []
    train_probe = stage_a.train_probe

    def recorded_probe(*a: Any, device: Any = "cpu", **k: Any) -> Any:
        fitted_on.append(torch.device(device))
        return train_probe(*a, **k)  # fitted on the CPU (a probe fitted on meta has no weights)

    monkeypatch.setattr(stage_a, "train_probe", recorded_probe)
    run = _prepared(spec_for("customkd.stage_a_ce_target=0"), tmp_path / "r")
    assert fitted_on == [META] and run.probe.linear.weight.device == META
    stage_a_on: set[torch.device] = set()
    loss = stage_a.customization_loss

    def recorded_loss(head: Any, customizer: Any, f_t: torch.Tensor, *a: Any, **k: Any) -> Any:
        stage_a_on.update({f_t.device, next(customizer.parameters()).device, next(head.parameters()).device})
        return loss(head, customizer, f_t, *a, **k)

    monkeypatch.setattr(stage_a, "customization_loss", recorded_loss)
    monkeypatch.setattr(stage_a, "set_target_bound", lambda run: {})
    monkeypatch.setattr(stage_a, "stage_a_report", lambda *a: {})
    assert stage_a.train_stage_a(run, 0, 0)["stage_a_steps"] > 0
    assert stage_a_on == {META}


# --- several ranks (gloo on this machine) ------------------------------------------------------


_TWO_RANKS = """
import json, sys
from pathlib import Path

import torch

from customkd_cache.distributed import Dist
from customkd_cache.specs import load_train_spec
from customkd_cache.stage_two.evaluate import evaluate
from customkd_cache.stage_two.stage_a import train_stage_a
from customkd_cache.stage_two.train import prepare_run

spec_path, root, out, result = sys.argv[1:5]
spec = load_train_spec(Path(spec_path), [f"dataset.root={root}", "optim.epochs=1"])
with Dist.from_env("cpu", timeout_s=120) as dist:
    run = prepare_run(spec, spec_path=Path(spec_path), out=Path(out), resume=False, dist=dist)
    p_t = run.models.customizer
    if dist.rank == 1:  # as ranks drift apart on GPUs (non-deterministic sums)
        with torch.no_grad():
            for p in p_t.parameters():
                p.add_(1.0)
    report = train_stage_a(run, 0, 0)
    flat = torch.cat([t.detach().reshape(-1) for t in [*p_t.parameters(), *p_t.buffers()]])
    both = dist.gather_rows(flat.reshape(1, -1))
    scores = evaluate(run, final=True)
    if dist.is_main:
        same = bool(torch.equal(both[0], both[1]))
        Path(result).write_text(json.dumps({"same_p_t": same, "report": report, "eval": scores}))
"""


def _two_ranks(script: str, args: list[str], env: dict[str, str]) -> None:
    for r, (code, _, err) in enumerate(run_gloo_ranks(script, args, env)):
        assert code == 0, (r, err[-3000:])


def test_two_ranks_share_p_t_and_score_as_one_process(
    cached: dict[str, Path], spec_for: Any, tmp_path: Path
) -> None:
    """Two gloo ranks: after stage A both hold rank 0's P_t (rank 1's was perturbed first), and the
    evaluation shared between them gives exactly one process's accuracies."""
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    result = tmp_path / "result.json"
    args = [str(TRAIN_SPEC), str(cached["root"]), str(tmp_path / "two"), str(result)]
    _two_ranks(str(script), args, _env(cached["caches"]) | {"PYTHONPATH": str(REPO)})
    two = json.loads(result.read_text())
    assert two["same_p_t"] and two["report"]["stage_a_steps"] > 0
    from customkd_cache.stage_two.evaluate import evaluate

    run = _prepared(spec_for(), tmp_path / "one")
    one = evaluate(run, final=True)
    assert two["eval"]["student_accuracy"] == one["student_accuracy"]
    assert two["eval"]["student_accuracy_per_split"] == one["student_accuracy_per_split"]
    assert two["eval"]["cka_student_teacher"] == pytest.approx(one["cka_student_teacher"], rel=1e-5)


def test_each_rank_trains_whole_batches() -> None:
    """optim.batch_size is per GPU: each rank takes whole batches of the plan, padded by wrapping."""
    plan = [[0, 1], [2, 3], [4, 5]]
    assert stage_b.rank_batches(plan, 0, 1) == plan
    assert stage_b.rank_batches(plan, 0, 2) == [[0, 1], [4, 5]]
    assert stage_b.rank_batches(plan, 1, 2) == [[2, 3], [0, 1]]
    assert stage_b.rank_steps(3, 1, 2) == 2 and stage_b.rank_steps(7, 2, 2) == 2 + 2
    assert stage_b.rank_steps(7, 3, 1) == 7


class _RecordingDist(Dist):
    """One process that records its barriers, as rank 0 of a larger job would meet them."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__(0, 1, 0, CPU)
        self.calls = calls

    def barrier(self) -> None:
        self.calls.append("barrier")


def test_every_rank_checks_out_before_rank_0_writes_it(
    spec_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a barrier between them, a slow rank checked --out after rank 0 had written spec.json
    there and refused it as 'not empty'."""
    from customkd_cache.stage_two import train as train_module

    calls: list[str] = []
    check_out, prepare_out = train_module.check_out, train_module.prepare_out

    def checking(*args: Any, **kwargs: Any) -> None:
        calls.append("check_out")
        check_out(*args, **kwargs)

    def writing(*args: Any, **kwargs: Any) -> None:
        calls.append("prepare_out")
        prepare_out(*args, **kwargs)

    monkeypatch.setattr(train_module, "check_out", checking)
    monkeypatch.setattr(train_module, "prepare_out", writing)
    prepare_run(
        spec_for(), spec_path=TRAIN_SPEC, out=tmp_path / "r", resume=False, dist=_RecordingDist(calls)
    )
    assert calls[0] == "check_out" and "prepare_out" in calls
    assert "barrier" in calls[1 : calls.index("prepare_out")]
