"""CustomKD's own contracts (docs/method.md), on the smoke cache.

Stage A is a converged optimization with its own budget in optimizer steps and its own optimizer;
the customized target is bounded as the spec says; each ablation switch changes exactly what it
names; the per-epoch log carries stage A's figures; validation rows are held out and scored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from customkd_cache.distributed import Dist
from customkd_cache.errors import SpecError
from customkd_cache.models.customizer import bound_rms
from customkd_cache.specs import load_cache_spec, load_train_spec
from customkd_cache.stage_one import extract
from customkd_cache.stage_two.evaluate import evaluate
from customkd_cache.stage_two.losses import linear_cka
from customkd_cache.stage_two.stage_a import stage_a_cycles, stage_a_report, train_stage_a
from customkd_cache.stage_two.state import Run
from customkd_cache.stage_two.train import prepare_run, run_train
from customkd_cache.testing import fakedata

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "smoke" / "officehome.toml"
TRAIN_SPEC = REPO / "pipelines" / "smoke" / "officehome.toml"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("customkd")
    root = fakedata.write_officehome(base / "OfficeHome", per_class=1)
    caches = base / "caches"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUSTOMKD_CACHE_ROOT", str(caches))
        spec = load_cache_spec(CACHE_SPEC, [f"dataset.root={root}"])
        extract.run_cache(spec, spec_path=CACHE_SPEC, shard=extract.Shard(), progress=False)
    return {"root": root, "caches": caches}


def make_run(smoke: dict[str, Path], out: Path, mp: pytest.MonkeyPatch, *extra: str) -> Run:
    mp.setenv("CUSTOMKD_CACHE_ROOT", str(smoke["caches"]))
    spec = load_train_spec(TRAIN_SPEC, [f"dataset.root={smoke['root']}", *extra])
    return prepare_run(spec, spec_path=TRAIN_SPEC, out=out, resume=False, dist=Dist.from_env("cpu"))


def labeled(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(run.labeled[0]), torch.from_numpy(run.labeled[1])


def head_state(run: Run) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.models.student.head().parameters()]


class TestStageA:
    @pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
    def test_budget_is_optimizer_steps_with_its_own_optimizer(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str
    ) -> None:
        run = make_run(
            smoke,
            tmp_path / "r",
            monkeypatch,
            "customkd.stage_a_steps=7",
            f"customkd.stage_a_optimizer={optimizer}",
            "customkd.stage_a_lr=0.02",
            "customkd.stage_a_weight_decay=0.001",
        )
        opt = run.models.opt_a
        assert type(opt) is {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
        assert opt is not None and opt.param_groups[0]["lr"] == 0.02
        assert opt.param_groups[0]["weight_decay"] == 0.001
        assert train_stage_a(run, 0, 0)["stage_a_steps"] == 7
        if optimizer == "adamw":  # AdamW counts its steps per parameter
            assert all(int(s["step"]) == 7 for s in opt.state.values())
        assert len(run.labeled[1]) < 7 * run.spec.customkd.stage_a_batch_size  # more than one pass

    def test_stage_a_converges_and_only_the_customizer_learns(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = make_run(smoke, tmp_path / "r", monkeypatch, "customkd.stage_a_steps=300")
        head = run.models.student.head()
        before = stage_a_report(run, head, *labeled(run))
        heads = head_state(run)
        report = train_stage_a(run, 0, 0)
        assert report["stage_a_ce"] < 0.5 * before["stage_a_ce"], (before, report)
        assert report["stage_a_accuracy"] > before["stage_a_accuracy"]
        assert all(torch.equal(a, b) for a, b in zip(heads, head_state(run), strict=True))
        assert all(p.requires_grad for p in head.parameters())  # flags restored for stage B

    def test_ce_target_ends_a_cycle_early(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = make_run(smoke, tmp_path / "r", monkeypatch, "customkd.stage_a_ce_target=1000.0")
        assert train_stage_a(run, 0, 0)["stage_a_steps"] == 1

    def test_separate_head_learns_and_the_students_head_does_not(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = make_run(smoke, tmp_path / "r", monkeypatch, 'customkd.stage_a_head="separate"')
        separate = run.models.stage_a_head
        assert separate is not None
        sep_before = [p.detach().clone() for p in separate.parameters()]
        heads = head_state(run)
        train_stage_a(run, 0, 0)
        assert all(torch.equal(a, b) for a, b in zip(heads, head_state(run), strict=True))
        assert not all(torch.equal(a, p) for a, p in zip(sep_before, separate.parameters(), strict=True))

    def test_same_seed_same_customizer(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        runs = [make_run(smoke, tmp_path / f"r{i}", monkeypatch, "customkd.stage_a_steps=20") for i in (0, 1)]
        for run in runs:
            train_stage_a(run, 3, 1)
        a, b = (r.models.customizer.state_dict() for r in runs if r.models.customizer is not None)
        assert all(torch.equal(a[k], b[k]) for k in a)


class TestBoundedTarget:
    def test_bound_rms_scales_only_rows_outside(self) -> None:
        z = torch.tensor([[3.0, 4.0], [0.1, 0.1]])  # RMS 3.54 and 0.1
        out = bound_rms(z, torch.tensor(1.0))
        rms = out.pow(2).mean(1).sqrt()
        assert rms[0].item() == pytest.approx(1.0, rel=1e-6)
        assert torch.equal(out[1], z[1])
        assert torch.allclose(out[0] / out[0].norm(), z[0] / z[0].norm())  # direction kept
        assert torch.equal(bound_rms(z, torch.tensor(float("inf"))), z)

    def test_bound_rms_gradient_is_finite_on_a_zero_row(self) -> None:
        z = torch.zeros(2, 3, requires_grad=True)  # e.g. a zero-initialized P_t before stage A
        bound_rms(z, torch.tensor(1.0)).sum().backward()
        assert z.grad is not None and bool(torch.isfinite(z.grad).all())

    @pytest.mark.parametrize("bound", ["fixed_rms", "none"])
    def test_customized_target_stays_within_its_bound(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str
    ) -> None:
        run = make_run(
            smoke,
            tmp_path / "r",
            monkeypatch,
            f'customkd.target_bound="{bound}"',
            "customkd.target_bound_scale=0.05",
            "customkd.stage_a_steps=100",
            "customkd.stage_a_lr=0.05",
        )
        report = train_stage_a(run, 0, 0)
        assert run.models.customizer is not None
        with torch.no_grad():
            rms = run.models.customizer(labeled(run)[0]).pow(2).mean(1).sqrt()
        if bound == "fixed_rms":
            assert report["target_bound_rms"] == 0.05 and rms.max().item() <= 0.05 * (1 + 1e-5)
        else:  # the same training without the bound leaves it far behind
            assert report["target_bound_rms"] is None and bool(torch.isfinite(rms).all())
            assert rms.min().item() > 0.05

    def test_student_rms_bound_follows_the_students_features(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = make_run(
            smoke,
            tmp_path / "r",
            monkeypatch,
            'customkd.target_bound="student_rms"',
            "customkd.target_bound_scale=2.0",
        )
        report = train_stage_a(run, 0, 0)
        assert report["student_feature_rms"] > 0
        assert report["target_bound_rms"] == pytest.approx(2.0 * report["student_feature_rms"])
        assert run.models.customizer is not None
        assert float(run.models.customizer.max_rms) == pytest.approx(report["target_bound_rms"])

    def test_measuring_the_student_leaves_batchnorm_statistics_alone(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = make_run(smoke, tmp_path / "r", monkeypatch, "customkd.stage_a_steps=1")
        before = {k: v.clone() for k, v in run.models.student.state_dict().items()}
        train_stage_a(run, 0, 0)
        after = run.models.student.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


class TestAlternation:
    @pytest.mark.parametrize(
        ("every", "per_epoch", "expected"),
        [(1, 1, [1, 1, 1, 1]), (2, 1, [1, 0, 1, 0]), (1, 2, [2, 2, 2, 2]), (0, 1, [1, 0, 0, 0])],
    )
    def test_stage_a_schedule(
        self,
        smoke: dict[str, Path],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        every: int,
        per_epoch: int,
        expected: list[int],
    ) -> None:
        run = make_run(
            smoke,
            tmp_path / "r",
            monkeypatch,
            f"customkd.stage_a_every={every}",
            f"customkd.stage_a_per_epoch={per_epoch}",
        )
        assert [stage_a_cycles(run, e) for e in range(4)] == expected

    def test_methods_without_a_customizer_have_no_stage_a(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = make_run(smoke, tmp_path / "r", monkeypatch, "method=kd")
        assert run.models.customizer is None and run.models.student_projector is None
        assert stage_a_cycles(run, 0) == 0


def test_metrics_log_stage_a_and_validation(
    smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(smoke["caches"]))
    spec = load_train_spec(
        TRAIN_SPEC,
        [
            f"dataset.root={smoke['root']}",
            "optim.epochs=2",
            'uda.val=["Product"]',
            "customkd.stage_a_per_epoch=2",
            "customkd.stage_a_steps=5",
        ],
    )
    res = run_train(spec, spec_path=TRAIN_SPEC, out=tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert m["stage_a_steps"] == 10  # two cycles of 5
        for key in ("stage_a_ce", "stage_a_accuracy", "target_norm", "student_feature_norm", "f_s_norm"):
            assert np.isfinite(m[key]), key
        assert 0.0 <= m["val_accuracy"] <= 1.0
    assert res["num_val"] == 65 and res["val_accuracy"] == lines[-1]["val_accuracy"]
    assert -1e-6 <= res["cka_student_customized"] <= 1 + 1e-6


def test_customized_teacher_accuracy_is_the_students_head_on_the_customized_features(
    smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(smoke, tmp_path / "r", monkeypatch, "customkd.stage_a_steps=30")
    train_stage_a(run, 0, 0)
    got = evaluate(run, final=True)["customized_teacher_accuracy"]
    correct = total = 0
    assert run.models.customizer is not None
    for split in run.protocol.eval_splits:  # independently: every eval row's view-0 feature
        rows = np.asarray(run.protocol.eval_indices(split, run.store.num_samples(split)), np.int64)
        f_t = torch.from_numpy(run.features.get_many(split, rows, np.zeros(len(rows), np.int64)))
        with torch.no_grad():
            z = run.models.customizer(f_t)
            if run.models.pre_activation:  # the target is a pre-activation: the head sees act(z)
                z = run.models.student.activation(z.clone())
            pred = run.models.student.head()(z).argmax(1).numpy()
        correct += int((pred == run.store.labels(split)[rows]).sum())
        total += len(rows)
    assert total > 0 and got == pytest.approx(correct / total)


def test_a_validation_split_that_is_trained_on_is_refused(
    smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SpecError, match="uda.val"):
        make_run(smoke, tmp_path / "r", monkeypatch, 'uda.val=["Art"]')


class TestSpec:
    @pytest.mark.parametrize(
        ("old", "new"),
        [
            ("lambda_spec", "lambda_task"),
            ("stage_a_epochs", "stage_a_steps"),
            ("stage_b_epochs", "stage_a_every"),
        ],
    )
    def test_renamed_keys_are_refused_with_the_new_name(self, old: str, new: str) -> None:
        with pytest.raises(SpecError, match=f"customkd.{old}: renamed to customkd.{new}"):
            load_train_spec(TRAIN_SPEC, [f"customkd.{old}=1"])

    def test_learning_rate_and_decay_default_per_optimizer(self) -> None:
        adamw = load_train_spec(TRAIN_SPEC, ["optim.optimizer=adamw"]).optim
        sgd = load_train_spec(TRAIN_SPEC, ["optim.optimizer=sgd"]).optim
        given = load_train_spec(TRAIN_SPEC, ["optim.optimizer=sgd", "optim.lr=0.2"]).optim
        assert (adamw.lr, adamw.weight_decay) == (3e-3, 0.05)
        assert (sgd.lr, sgd.weight_decay) == (0.05, 5e-4)
        assert given.lr == 0.2

    def test_infinite_learning_rate_is_refused(self) -> None:
        with pytest.raises(SpecError, match="optim.lr"):
            load_train_spec(TRAIN_SPEC, ["optim.lr=inf"])


def test_linear_cka_golden_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    assert linear_cka(x, torch.randn(500, 16, generator=g)) < 0.1
    half = torch.cat([x[:, :8], torch.zeros(500, 8)], 1)
    assert 0.5 < linear_cka(x, half) < 0.9


class TestTargetSpace:
    def test_auto_regresses_the_pre_activation_of_a_mobilenetv3(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = make_run(smoke, tmp_path / "r", monkeypatch)
        assert run.models.pre_activation  # the smoke student is a MobileNetV3
        feats = make_run(smoke, tmp_path / "f", monkeypatch, "customkd.target_space=features")
        assert not feats.models.pre_activation

    def test_stage_a_classifies_the_activated_target(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = make_run(smoke, tmp_path / "r", monkeypatch, "customkd.stage_a_steps=20")
        report = train_stage_a(run, 0, 0)
        f_t, y = labeled(run)
        assert run.models.customizer is not None
        with torch.no_grad():
            z = run.models.customizer.eval()(f_t)
            logits = run.models.student.head()(torch.nn.functional.hardswish(z))
        assert report["stage_a_accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))

    def test_pre_activation_on_a_student_without_one_is_a_spec_error(
        self, smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with pytest.raises(SpecError, match="target_space"):
            make_run(
                smoke,
                tmp_path / "r",
                monkeypatch,
                "student.name=test_efficientnet",
                "customkd.target_space=pre_activation",
            )


@pytest.mark.filterwarnings("ignore:for (weight|bias). copying from a non-meta:UserWarning")
@pytest.mark.parametrize("head", ["student", "separate"])
def test_every_module_of_the_run_is_on_the_run_device(
    smoke: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: str
) -> None:
    """What trains on the GPU is on it: the run is built here on the ``meta`` device, which every
    parameter and buffer must reach (a module left on the CPU meets GPU features in stage A)."""
    from customkd_cache.stage_two import train as train_module

    meta = torch.device("meta")
    monkeypatch.setattr(train_module, "resolve_device", lambda name: meta)
    run = make_run(smoke, tmp_path / "r", monkeypatch, f"customkd.stage_a_head={head}")
    assert run.device == meta and (run.models.stage_a_head is not None) == (head == "separate")
    modules = [run.probe.linear, *run.models.modules()]
    assert run.models.customizer in modules and run.models.student in modules
    assert run.models.stage_a_head is None or run.models.stage_a_head in modules
    elsewhere = [
        name for m in modules for name, t in [*m.named_parameters(), *m.named_buffers()] if t.device != meta
    ]
    assert elsewhere == [] and run.probe.mean.device == run.probe.std.device == meta
