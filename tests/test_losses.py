"""Golden values for the losses: hand-derived numbers and independent numpy re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from customkd_cache.errors import SpecError
from customkd_cache.specs import METHODS, CustomKDSpec, DkdSpec, KdSpec
from customkd_cache.stage_two.losses import (
    StageBTerms,
    cross_entropy,
    customization_loss,
    dkd_loss,
    feature_mse,
    kd_loss,
    logit_l2,
    method_terms,
    normalized_mse,
    similarity_preserving,
    stage_b_loss,
    standardize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- independent numpy references (float64) -----------------------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row."""
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def np_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    return float(np_kl_rows(np_softmax(t / temp), np_softmax(s / temp)).mean() * temp**2)


def np_ce(logits: np.ndarray, y: np.ndarray) -> float:
    p = np_softmax(logits)
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def np_dkd(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, beta: float, temp: float) -> float:
    """DKD from its definition: binary (target, rest) KL plus KL of the renormalized non-target parts."""
    ps, pt = np_softmax(s / temp), np_softmax(t / temp)
    rows = np.arange(len(y))
    bs = np.stack([ps[rows, y], 1 - ps[rows, y]], axis=1)
    bt = np.stack([pt[rows, y], 1 - pt[rows, y]], axis=1)
    tckd = np_kl_rows(bt, bs).mean() * temp**2
    other = np.ones_like(ps, dtype=bool)
    other[rows, y] = False
    qs = ps[other].reshape(len(y), -1)
    qt = pt[other].reshape(len(y), -1)
    qs, qt = qs / qs.sum(1, keepdims=True), qt / qt.sum(1, keepdims=True)
    nckd = np_kl_rows(qt, qs).mean() * temp**2
    return float(alpha * tckd + beta * nckd)


def np_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.detach().double().numpy() - b.detach().double().numpy()) ** 2).mean())


def t32(x: list[list[float]] | np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# --- the pure losses ----------------------------------------------------------------------------


class TestPureLosses:
    def test_cross_entropy_hand_value(self) -> None:
        # row 0: uniform over 2 -> ln 2; row 1: p(class 1) = 1/4 -> ln 4; mean = 1.5 ln 2
        logits = t32([[0.0, 0.0], [math.log(3.0), 0.0]])
        assert cross_entropy(logits, torch.tensor([0, 1])).item() == pytest.approx(
            1.5 * math.log(2), abs=1e-6
        )

    def test_kd_identical_logits_is_zero(self) -> None:
        z = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
        assert kd_loss(z, z.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-6)

    def test_kd_hand_value_at_t1(self) -> None:
        # teacher (3/4, 1/4), student uniform: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
        s, t = t32([[0.0, 0.0]]), t32([[math.log(3.0), 0.0]])
        expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
        assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)

    @pytest.mark.parametrize("temp", [1.0, 4.0])
    def test_kd_matches_numpy(self, temp: float) -> None:
        rng = np.random.default_rng(1)
        s, t = rng.normal(size=(5, 6)) * 3, rng.normal(size=(5, 6)) * 3
        got = kd_loss(t32(s), t32(t), temperature=temp).item()
        assert got == pytest.approx(np_kd(s, t, temp), rel=1e-5)

    def test_kd_no_gradient_into_teacher(self) -> None:
        s = torch.randn(3, 4, requires_grad=True)
        t = torch.randn(3, 4, requires_grad=True)
        kd_loss(s, t, temperature=2.0).backward()
        assert s.grad is not None and t.grad is None

    @pytest.mark.parametrize(("alpha", "beta", "temp"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
    def test_dkd_matches_numpy(self, alpha: float, beta: float, temp: float) -> None:
        rng = np.random.default_rng(2)
        s, t = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2
        y = rng.integers(0, 5, size=6)
        got = dkd_loss(t32(s), t32(t), torch.from_numpy(y), alpha=alpha, beta=beta, temperature=temp).item()
        assert got == pytest.approx(np_dkd(s, t, y, alpha, beta, temp), rel=1e-4)

    def test_logit_l2_hand_value(self) -> None:
        # (1-0)^2, (2-4)^2, (0-0)^2, (-1-2)^2 -> (1 + 4 + 0 + 9) / 4 = 3.5
        s, t = t32([[1.0, 2.0], [0.0, -1.0]]).requires_grad_(), t32([[0.0, 4.0], [0.0, 2.0]])
        loss = logit_l2(s, t.requires_grad_())
        assert loss.item() == pytest.approx(3.5)
        loss.backward()
        assert t.grad is None and s.grad is not None

    def test_dkd_recovers_kd(self) -> None:
        # DKD paper, Eq. 7: KD = TCKD + (1 - p_t^target) * NCKD, per sample.
        rng = np.random.default_rng(3)
        s, t = rng.normal(size=(1, 6)), rng.normal(size=(1, 6))
        temp, y = 2.0, np.array([4])
        pt_target = float(np_softmax(t / temp)[0, 4])
        dkd = dkd_loss(t32(s), t32(t), torch.from_numpy(y), alpha=1.0, beta=1.0 - pt_target, temperature=temp)
        assert dkd.item() == pytest.approx(np_kd(s, t, temp), rel=1e-4)

    def test_dkd_identical_logits_is_zero(self) -> None:
        z = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
        y = torch.tensor([0, 1, 2, 3])
        assert dkd_loss(z, z.clone(), y, alpha=1.0, beta=8.0, temperature=4.0).item() == pytest.approx(
            0, abs=1e-5
        )

    def test_feature_mse_hand_value(self) -> None:
        pred = t32([[1.0, 2.0], [3.0, 4.0]])
        assert feature_mse(pred, torch.zeros(2, 2, dtype=torch.float16)).item() == pytest.approx(7.5)

    def test_standardize_hand_value(self) -> None:
        f = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float16)
        out = standardize(f, t32([[2.0, 4.0]])[0], t32([[1.0, 2.0]])[0], eps=0.0)
        assert out.dtype == torch.float32
        assert torch.equal(out, t32([[-1.0, -1.0], [1.0, 1.0]]))

    def test_standardize_constant_dimension_stays_finite(self) -> None:
        out = standardize(torch.ones(3, 2), torch.ones(2), torch.zeros(2))
        assert torch.isfinite(out).all()


# --- stage A --------------------------------------------------------------------------------------


class TestCustomizationLoss:
    def _modules(self) -> tuple[nn.Linear, nn.Linear, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        head, customizer = nn.Linear(4, 3), nn.Linear(6, 4)
        return head, customizer, torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0])

    def test_value_is_ce_of_head_of_customized(self) -> None:
        head, customizer, f_t, y = self._modules()
        logits = head(customizer(f_t)).detach().double().numpy()
        assert customization_loss(head, customizer, f_t, y).item() == pytest.approx(
            np_ce(logits, y.numpy()), rel=1e-5
        )

    def test_frozen_head_gets_no_grad(self) -> None:
        head, customizer, f_t, y = self._modules()
        head.requires_grad_(False)
        customization_loss(head, customizer, f_t, y).backward()
        assert head.weight.grad is None and head.bias.grad is None
        assert customizer.weight.grad is not None and customizer.weight.grad.abs().sum() > 0

    def test_freeze_head_detaches_without_touching_flags(self) -> None:
        head, customizer, f_t, y = self._modules()
        customization_loss(head, customizer, f_t, y, freeze_head=True).backward()
        assert head.weight.requires_grad and head.weight.grad is None
        assert customizer.weight.grad is not None

    def test_learning_head_gets_grad(self) -> None:
        head, customizer, f_t, y = self._modules()
        customization_loss(head, customizer, f_t, y).backward()
        assert head.weight.grad is not None and customizer.weight.grad is not None


# --- stage B --------------------------------------------------------------------------------------

B, C, D_S, D_T = 6, 5, 4, 3
KD = KdSpec(temperature=2.0, weight=0.7)
DKD = DkdSpec(alpha=1.5, beta=3.0, temperature=3.0, weight=0.3)
CK = CustomKDSpec(lambda_gen=0.5, lambda_task=2.0, fitnet_weight=3.0, task_loss="mse")
RAMP = 0.5


class Batch:
    """A fixed stage-B batch: 3 labeled rows, 3 unlabeled rows (label -1), linear projectors."""

    def __init__(self, customizer: nn.Module | None = None) -> None:
        torch.manual_seed(0)
        self.f_s = torch.randn(B, D_S, requires_grad=True)
        self.head = nn.Linear(D_S, C)
        self.logits = self.head(self.f_s)
        self.f_t = torch.randn(B, D_T)
        self.mask = torch.tensor([True, True, True, False, False, False])
        self.target = torch.tensor([2, 0, 4, -1, -1, -1])
        self.student_projector = nn.Linear(D_S, D_T)
        self.customizer = customizer if customizer is not None else nn.Linear(D_T, D_S)
        self.teacher_logits = torch.randn(B, C) * 2

    def loss(self, method: str, **overrides: object) -> StageBTerms:
        kwargs: dict[str, object] = dict(
            method=method,
            logits=self.logits,
            f_s=self.f_s,
            f_t=self.f_t,
            labeled_mask=self.mask,
            target=self.target,
            student_projector=self.student_projector,
            customizer=self.customizer,
            teacher_logits=self.teacher_logits,
            kd=KD,
            dkd=DKD,
            ck=CK,
            dkd_ramp=RAMP,
        )
        kwargs.update(overrides)
        return stage_b_loss(**kwargs)  # type: ignore[arg-type]

    def np_logits(self) -> np.ndarray:
        return self.logits.detach().double().numpy()


USED = {
    "student_only": set(),
    "kd": {"kd"},
    "fitnet": {"gen"},
    "dkd": {"dkd"},
    "logits": {"logit"},
    "customkd": {"gen", "task"},
    "customkd+kd": {"gen", "task", "kd"},
    "customkd+dkd": {"gen", "task", "dkd"},
}


class TestStageBLoss:
    def test_every_method_is_covered(self) -> None:
        assert set(USED) == set(METHODS)

    @pytest.mark.parametrize("method", sorted(USED))
    def test_terms_and_weighted_sum(self, method: str) -> None:
        batch = Batch()
        terms = batch.loss(method)
        for name in ("gen", "task", "kd", "dkd", "logit"):
            assert (getattr(terms, name).item() != 0.0) == (name in USED[method]), name
        w_gen = CK.fitnet_weight if method == "fitnet" else CK.lambda_gen
        expected = (
            terms.ce
            + w_gen * terms.gen
            + CK.lambda_task * terms.task
            + KD.weight * terms.kd
            + DKD.weight * RAMP * terms.dkd
            + KD.weight * terms.logit
        )
        assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
        assert terms.total.requires_grad
        assert not any(getattr(terms, n).requires_grad for n in ("ce", "gen", "task", "kd", "dkd", "logit"))

    def test_term_values_match_numpy(self) -> None:
        batch = Batch()
        terms = batch.loss("customkd+kd")
        z = batch.np_logits()
        assert terms.ce.item() == pytest.approx(np_ce(z[:3], batch.target[:3].numpy()), rel=1e-5)
        assert terms.gen.item() == pytest.approx(
            np_mse(batch.student_projector(batch.f_s), batch.f_t), rel=1e-5
        )
        assert terms.task.item() == pytest.approx(np_mse(batch.f_s, batch.customizer(batch.f_t)), rel=1e-5)
        kd_all_rows = np_kd(z, batch.teacher_logits.double().numpy(), KD.temperature)
        assert terms.kd.item() == pytest.approx(kd_all_rows, rel=1e-5)

    def test_logit_term_matches_numpy_on_all_rows(self) -> None:
        batch = Batch()
        t = batch.teacher_logits.double().numpy()
        expected = float(((batch.np_logits() - t) ** 2).mean())
        terms = batch.loss("logits")
        assert terms.logit.item() == pytest.approx(expected, rel=1e-5)
        assert terms.total.item() == pytest.approx(terms.ce.item() + KD.weight * expected, rel=1e-5)
        assert method_terms("logits") == {"logit"}

    def test_dkd_uses_labels_then_teacher_argmax(self) -> None:
        batch = Batch()
        t = batch.teacher_logits.double().numpy()
        y = np.concatenate([batch.target[:3].numpy(), t[3:].argmax(1)])
        expected = np_dkd(batch.np_logits(), t, y, DKD.alpha, DKD.beta, DKD.temperature)
        assert batch.loss("dkd").dkd.item() == pytest.approx(expected, rel=1e-4)

    def test_no_labeled_rows_gives_zero_ce_and_backward_works(self) -> None:
        batch = Batch()
        terms = batch.loss("student_only", labeled_mask=torch.zeros(B, dtype=torch.bool))
        assert terms.ce.item() == 0.0 and terms.total.item() == 0.0
        terms.total.backward()
        assert batch.head.weight.grad is not None and batch.head.weight.grad.abs().sum() == 0

    def test_customizer_is_a_stop_gradient_target(self) -> None:
        customizer = nn.Sequential(nn.Linear(D_T, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, D_S))
        batch = Batch(customizer)
        customizer.train()
        stats = customizer[1].running_mean.clone()  # type: ignore[index]
        terms = batch.loss("customkd+dkd")
        terms.total.backward()
        assert all(p.grad is None for p in customizer.parameters())
        assert batch.f_s.grad is not None and batch.student_projector.weight.grad is not None
        assert torch.equal(customizer[1].running_mean, stats)  # type: ignore[index]
        assert customizer.training and customizer[1].training

    def test_missing_inputs_and_unknown_method(self) -> None:
        batch = Batch()
        with pytest.raises(ValueError, match="student_projector"):
            batch.loss("fitnet", student_projector=None)
        with pytest.raises(ValueError, match="teacher_logits"):
            batch.loss("kd", teacher_logits=None)
        with pytest.raises(ValueError, match="teacher_logits"):
            batch.loss("logits", teacher_logits=None)
        with pytest.raises(SpecError, match="customkd"):
            batch.loss("customdk")

    def test_sgd_steps_reduce_the_loss(self) -> None:
        torch.manual_seed(0)
        encoder = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, D_S))
        head, projector, customizer = nn.Linear(D_S, C), nn.Linear(D_S, D_T), nn.Linear(D_T, D_S)
        x, f_t, teacher_logits = torch.randn(32, 10), torch.randn(32, D_T), torch.randn(32, C)
        mask = torch.arange(32) < 16
        target = torch.where(mask, torch.randint(0, C, (32,)), -1)
        params = [*encoder.parameters(), *head.parameters(), *projector.parameters()]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)

        def step() -> float:
            f_s = encoder(x)
            terms = stage_b_loss(
                method="customkd+dkd",
                logits=head(f_s),
                f_s=f_s,
                f_t=f_t,
                labeled_mask=mask,
                target=target,
                student_projector=projector,
                customizer=customizer,
                teacher_logits=teacher_logits,
                kd=KD,
                dkd=DKD,
                ck=CK,
            )
            opt.zero_grad()
            terms.total.backward()
            opt.step()
            return terms.total.item()

        losses = [step() for _ in range(30)]
        assert losses[-1] < 0.8 * losses[0]


def test_dkd_stays_finite_when_a_binary_mass_underflows() -> None:
    """A confident student (one class mass ~1, the rest ~0 in float32) must not give NaN gradients."""
    student = torch.tensor([[100.0, 0.0, 0.0], [-100.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 50.0, 0.0], [5.0, 0.0, 0.0]])
    loss = dkd_loss(student, teacher, torch.tensor([1, 0]), alpha=1.0, beta=8.0, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad is not None and torch.isfinite(student.grad).all()


class TestTaskLossForms:
    """``customkd.task_loss``: the paper's MSE, its unit-RMS (cosine) form and KD from H_s(P_t(f_t))."""

    def test_normalized_is_two_minus_two_cosine_and_scale_free(self) -> None:
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
        want = float((2 - 2 * cos).mean())  # unit-RMS rows: the mean squared difference is 2 - 2 cos
        assert normalized_mse(a, b).item() == pytest.approx(want, rel=1e-5)
        assert normalized_mse(3 * a, 0.01 * b).item() == pytest.approx(want, rel=1e-5)
        z = torch.zeros(2, 7, requires_grad=True)
        normalized_mse(z, b[:2]).backward()
        assert z.grad is not None and bool(torch.isfinite(z.grad).all())

    def test_stage_b_task_term_per_form(self) -> None:
        batch = Batch()
        with torch.no_grad():
            customized = batch.customizer(batch.f_t)
        mse = batch.loss("customkd").task.item()
        assert mse == pytest.approx(feature_mse(batch.f_s, customized).item(), rel=1e-6)
        norm = batch.loss("customkd", ck=CK.model_copy(update={"task_loss": "normalized"})).task.item()
        assert norm == pytest.approx(normalized_mse(batch.f_s, customized).item(), rel=1e-6)
        ck = CK.model_copy(update={"task_loss": "logit_kl"})
        kl = batch.loss("customkd", ck=ck, head=batch.head).task.item()
        want = kd_loss(batch.logits, batch.head(customized), temperature=KD.temperature).item()
        assert kl == pytest.approx(want, rel=1e-6)
        with pytest.raises(ValueError, match="head"):
            batch.loss("customkd", ck=ck)

    def test_unknown_task_loss_is_a_spec_error(self) -> None:
        with pytest.raises(Exception, match="task_loss"):
            CustomKDSpec(task_loss="cosine")  # type: ignore[arg-type]


def np_similarity_preserving(p: np.ndarray, t: np.ndarray) -> float:
    """Tung & Mori's loss from its definition, times B: row-normalized Gram matrices, squared Frobenius."""
    gp, gt = p @ p.T, t @ t.T
    gp = gp / np.linalg.norm(gp, axis=1, keepdims=True)
    gt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
    return float(((gp - gt) ** 2).sum() / p.shape[0])


class TestGenLossForms:
    """``customkd.gen_loss``: the paper's MSE or the similarity-preserving (relational) form."""

    def test_similarity_preserving_matches_numpy_and_ignores_rotation_and_scale(self) -> None:
        g = torch.Generator().manual_seed(3)
        a, b = torch.randn(5, 4, generator=g), torch.randn(5, 7, generator=g)
        want = np_similarity_preserving(a.double().numpy(), b.double().numpy())
        assert similarity_preserving(a, b).item() == pytest.approx(want, rel=1e-5)
        q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
        assert similarity_preserving(3 * a @ q, a).item() == pytest.approx(0.0, abs=1e-6)

    def test_stage_b_gen_term_per_form_and_fitnet_keeps_mse(self) -> None:
        batch = Batch()
        projected = batch.student_projector(batch.f_s)
        ck = CK.model_copy(update={"gen_loss": "relational"})
        rel = batch.loss("customkd", ck=ck)
        assert rel.gen.item() == pytest.approx(similarity_preserving(projected, batch.f_t).item(), rel=1e-6)
        assert rel.gen.item() != pytest.approx(batch.loss("customkd").gen.item(), rel=1e-3)
        fitnet = batch.loss("fitnet", ck=ck).gen.item()
        assert fitnet == pytest.approx(feature_mse(projected, batch.f_t).item(), rel=1e-6)
        rel.total.backward()
        assert batch.student_projector.weight.grad is not None
