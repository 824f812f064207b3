"""Losses of CustomKD and of the baselines it is compared with (docs/method.md).

Pure functions on tensors: no module state is changed except where a docstring says so. Every loss
returns a 0-dim float32 tensor and computes in float32 whatever dtype its inputs arrive in (float16
cached features, bfloat16 activations under autocast), because softmax, log and squared differences
lose too much in half precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from customkd_cache.errors import SpecError, closest
from customkd_cache.specs import METHODS, CustomKDSpec, DkdSpec, KdSpec

_T = TypeVar("_T")


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean softmax cross-entropy: ``logits`` (B, C) any float dtype, ``target`` (B,) int64 class ids."""
    return F.cross_entropy(logits.float(), target)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float) -> Tensor:
    """Soft-target KD, Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network").

    ``T^2 * KL(softmax(t / T) || softmax(s / T))``, summed over classes and averaged over the batch
    (as mdistiller's ``kd_loss``). The ``T^2`` factor keeps gradient magnitudes comparable across
    temperatures. Both logits (B, C); no gradient flows into ``teacher_logits``.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t**2


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
) -> Tensor:
    """Decoupled KD, Zhao et al., CVPR 2022, as in the official mdistiller ``dkd_loss``.

    TCKD: KL between the teacher's and student's binary distributions (target mass, non-target
    mass) of ``softmax(logits / T)``. NCKD: KL between the distributions over the non-target
    classes, obtained by subtracting 1000 from the target logit before the softmax (so the target
    class gets zero mass). Each is multiplied by ``T^2`` and averaged over the batch; returns
    ``alpha * TCKD + beta * NCKD``. Logits (B, C), ``target`` (B,) int64; no gradient flows into
    ``teacher_logits``. The ramp-up over the first epochs (mdistiller's ``warmup``) is the caller's
    factor, see ``stage_b_loss(dkd_ramp=...)``.
    """
    t = temperature
    s = student_logits.float() / t
    te = teacher_logits.detach().float() / t
    gt = F.one_hot(target.reshape(-1), s.shape[1]).to(s.dtype)
    batch = s.shape[0]

    p_t = F.softmax(te, dim=1)
    # The non-target mass is summed (not 1 - p_target) as the reference does. The student's binary
    # log-masses are log-sum-exps of log_softmax (the reference's log(sum(p)) is the same value, but
    # gives -inf, then NaN gradients, once a mass underflows to 0 in float32).
    log_p_s = F.log_softmax(s, dim=1)
    log_b_s = torch.stack(
        [
            torch.logsumexp(log_p_s.masked_fill(gt == 0, float("-inf")), dim=1),
            torch.logsumexp(log_p_s.masked_fill(gt == 1, float("-inf")), dim=1),
        ],
        dim=1,
    )
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    tckd = F.kl_div(log_b_s, b_t, reduction="sum") * t**2 / batch

    log_q_s = F.log_softmax(s - 1000.0 * gt, dim=1)
    q_t = F.softmax(te - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * t**2 / batch
    return alpha * tckd + beta * nckd


def logit_l2(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The ``logits`` baseline, Ba & Caruana 2014 ("Do Deep Nets Really Need to be Deep?"): the mean
    over the batch and the classes of ``(s - t)^2`` between the student's and the teacher's logits
    (B, C); no temperature, no softmax, no gradient into ``teacher_logits``."""
    return F.mse_loss(student_logits.float(), teacher_logits.detach().float())


def feature_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error averaged over the batch and every feature dimension; shapes must match."""
    return F.mse_loss(pred.float(), target.float())


def normalized_mse(pred: Tensor, target: Tensor, eps: float = 1e-12) -> Tensor:
    """MSE between ``pred`` and ``target`` (B, D) after scaling each row to unit RMS: ``2 - 2 cos``
    per row, averaged over the batch. Scale-free: the pull on ``pred`` does not grow with the
    target's norm. A zero row counts as the zero vector (its RMS is clamped at ``eps``)."""
    p, t = pred.float(), target.float()
    p = p / p.pow(2).mean(dim=1, keepdim=True).clamp(min=eps).sqrt()
    t = t / t.pow(2).mean(dim=1, keepdim=True).clamp(min=eps).sqrt()
    return F.mse_loss(p, t)


def similarity_preserving(pred: Tensor, target: Tensor, eps: float = 1e-12) -> Tensor:
    """Similarity-preserving loss (Tung & Mori, ICCV 2019) between two representations of one batch.

    ``pred`` (B, D1), ``target`` (B, D2): each batch Gram matrix ``G = X X^T`` (B, B) has its rows
    scaled to unit L2 norm, and the loss is ``||G_p - G_t||_F^2 / B``, the mean over rows of the
    squared distance between the two rows (in [0, 4]). That is B times the paper's
    ``/ B^2`` form, so its scale is that of an MSE whatever the batch size and a weight of 1 is
    comparable to ``feature_mse``'s. It compares how the B images relate to each other, so the two
    dimensions may differ and no coordinate system of the target is copied. A zero row of ``G``
    stays zero (its norm is clamped at ``eps``).
    """
    p, t = pred.float(), target.float()
    g_p = F.normalize(p @ p.T, dim=1, eps=eps)
    g_t = F.normalize(t @ t.T, dim=1, eps=eps)
    return (g_p - g_t).pow(2).sum() / p.shape[0]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) between two representations of the same N inputs.

    ``x`` (N, D1), ``y`` (N, D2); both are centred over N, then
    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` in float64. 1 means the same representation up to
    rotation and isotropic scale; the paper's Table 6 reports it between f_s and P_t(f_t).
    """
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"linear_cka needs the same N >= 2 rows, got {x.shape[0]} and {y.shape[0]}")
    xc = x.double() - x.double().mean(0, keepdim=True)
    yc = y.double() - y.double().mean(0, keepdim=True)
    cross = (yc.T @ xc).pow(2).sum()
    norm = (xc.T @ xc).pow(2).sum().sqrt() * (yc.T @ yc).pow(2).sum().sqrt()
    return float(cross / norm.clamp(min=1e-300))


def standardize(f: Tensor, mean: Tensor, std: Tensor, eps: float = 1e-6) -> Tensor:
    """``(f - mean) / (std + eps)`` in float32: ``f`` (..., D) any float dtype, ``mean``/``std`` (D,).

    ``eps`` keeps constant feature dimensions (std 0) finite.
    """
    return (f.float() - mean.float()) / (std.float() + eps)


def customization_loss(
    head: nn.Module,
    customizer: nn.Module,
    f_t: Tensor,
    target: Tensor,
    *,
    freeze_head: bool = False,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Stage A of CustomKD (docs/method.md): ``CE(H_s(P_t(f_t)), y)`` over labeled rows.

    ``f_t`` (B, d_t) teacher features (standardized by the caller when the spec says so), ``target``
    (B,) int64. ``head`` is the student's classifier ``H_s`` (d_s -> C), ``customizer`` is ``P_t``
    (d_t -> d_s). Gradients reach the head's parameters only if their ``requires_grad`` is set; the
    paper's setting keeps the head fixed (``customkd.head_learns_in_stage_a = false``): either clear
    those flags or pass ``freeze_head=True``, which runs the head on detached parameters so only the
    customizer receives gradients without touching the head's flags. ``activation`` maps the
    customizer's output to the head's input space when the target lives in the student's
    pre-activation space (``customkd.target_space``); ``None`` = identity.
    """
    z = customizer(f_t.float())
    if activation is not None:
        z = activation(z)
    if freeze_head:
        frozen = {name: p.detach() for name, p in head.named_parameters()}
        logits = torch.func.functional_call(head, frozen, (z,), strict=False)
    else:
        logits = head(z)
    return cross_entropy(logits, target)


@dataclass
class StageBTerms:
    """The stage-B loss of one batch.

    ``total`` (0-dim float32) carries the graph: call ``backward`` on it. The other fields are the
    *unweighted* terms, detached 0-dim float32 tensors (kept as tensors so logging them does not force
    a device sync every step), 0 where the method does not use them:
    ``total = ce + w_gen * gen + lambda_task * task + kd.weight * kd + dkd.weight * dkd_ramp * dkd
    + kd.weight * logit``,
    with ``w_gen = customkd.lambda_gen`` for the CustomKD methods and ``customkd.fitnet_weight`` for
    ``fitnet``.
    """

    total: Tensor
    ce: Tensor
    gen: Tensor
    task: Tensor
    kd: Tensor
    dkd: Tensor
    logit: Tensor


# Which distillation terms each method adds to the labeled CE.
_METHOD_TERMS: dict[str, frozenset[str]] = {
    "student_only": frozenset(),
    "kd": frozenset({"kd"}),
    "fitnet": frozenset({"gen"}),
    "dkd": frozenset({"dkd"}),
    "logits": frozenset({"logit"}),
    "customkd": frozenset({"gen", "task"}),
    "customkd+kd": frozenset({"gen", "task", "kd"}),
    "customkd+dkd": frozenset({"gen", "task", "dkd"}),
}
assert set(_METHOD_TERMS) == set(METHODS), "every method in specs.METHODS needs its terms here"


# The terms that read the teacher probe's logits.
TEACHER_LOGIT_TERMS = frozenset({"kd", "dkd", "logit"})


def method_terms(method: str) -> frozenset[str]:
    """The distillation terms ``method`` adds to the labeled CE: a subset of gen, task, kd, dkd, logit.

    What a method needs follows from them: ``gen`` the student projector ``P_s``, ``task`` the
    customizer ``P_t`` (and so stage A), ``kd``/``dkd``/``logit`` the teacher probe's logits
    (``TEACHER_LOGIT_TERMS``).
    """
    if method not in _METHOD_TERMS:
        raise SpecError(f"method: unknown '{method}'{closest(method, METHODS)}; valid: {', '.join(METHODS)}")
    return _METHOD_TERMS[method]


def stage_b_loss(
    *,
    method: str,
    logits: Tensor,
    f_s: Tensor,
    f_t: Tensor,
    labeled_mask: Tensor,
    target: Tensor,
    student_projector: nn.Module | None,
    customizer: nn.Module | None,
    teacher_logits: Tensor | None,
    kd: KdSpec,
    dkd: DkdSpec,
    ck: CustomKDSpec,
    dkd_ramp: float = 1.0,
    h_s: Tensor | None = None,
    head: nn.Module | None = None,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> StageBTerms:
    """Stage B of CustomKD and the baselines (docs/method.md), on a batch mixing labeled and unlabeled rows.

    Inputs: ``logits`` (B, C) = ``H_s(f_s)``; ``f_s`` (B, d_s) the student's pre-logits feature;
    ``f_t`` (B, d_t) the cached teacher feature of the same view (standardized by the caller when
    ``ck.standardize``); ``labeled_mask`` (B,) bool; ``target`` (B,) int64, read on labeled rows only
    (unlabeled rows may hold anything, e.g. -1); ``teacher_logits`` (B, C) from the teacher probe.

    Terms (see ``StageBTerms`` for how they add up):
    - ``ce``: cross-entropy on the labeled rows; 0 (still attached to the graph) when there are none.
    - ``gen`` (customkd*, fitnet): ``MSE(P_s(f_s), f_t)`` over all rows; for customkd* with
      ``ck.gen_loss = relational``, ``similarity_preserving(P_s(f_s), f_t)`` over the batch instead.
    - ``task`` (customkd*): ``MSE(f_s, stopgrad(P_t(f_t)))`` over all rows, the customized
      task-specific term (the paper's L_spec); with ``h_s`` (B, d_s) given, the student's
      pre-activation ``h_s`` takes the place of ``f_s`` (``customkd.target_space``). ``P_t`` runs under
      ``no_grad`` and in eval mode (its previous mode is restored), so stage B never changes the
      customizer, not even BatchNorm running statistics. ``ck.task_loss = normalized``: the same
      rows each scaled to unit RMS first (``normalized_mse``); ``logit_kl``: ``kd_loss`` from
      ``head(activation(P_t(f_t)))`` (no gradient) to ``logits``, which needs ``head`` (the student's
      ``H_s``; ``activation`` maps a pre-activation target to the head's input, ``None`` = identity).
    - ``kd`` (kd, customkd+kd): ``kd_loss`` against ``teacher_logits`` on all rows.
    - ``dkd`` (dkd, customkd+dkd): ``dkd_loss`` on all rows. DKD needs a target class per row: the
      label on labeled rows and the teacher probe's argmax on unlabeled rows (its pseudo-label), so
      unlabeled rows get the same decoupling the teacher itself would imply. ``dkd_ramp`` in [0, 1]
      is mdistiller's warm-up factor ``min(epoch / warmup, 1)``, applied by the caller's schedule.
    - ``logit`` (logits): ``logit_l2`` against ``teacher_logits`` on all rows, weighted by
      ``kd.weight`` (the logit-matching weight; no temperature).

    Raises ``SpecError`` for an unknown method and ``ValueError`` when a module or the teacher logits
    the method needs are missing (a caller bug, not a user input).
    """
    terms = method_terms(method)
    zero = logits.new_zeros((), dtype=torch.float32)
    ce = _labeled_ce(logits, target, labeled_mask)
    total = ce
    gen = task = kd_term = dkd_term = logit_term = zero

    if "gen" in terms:
        projected = _required(student_projector, "student_projector", method)(f_s)
        relational = ck.gen_loss == "relational" and method != "fitnet"
        gen_form = similarity_preserving if relational else feature_mse
        gen = gen_form(projected, f_t)
        total = total + (ck.fitnet_weight if method == "fitnet" else ck.lambda_gen) * gen
    if "task" in terms:
        p_t = _required(customizer, "customizer", method)
        with _eval_mode(p_t), torch.no_grad():
            customized = p_t(f_t.float())
        if ck.task_loss == "logit_kl":
            h = _required(head, "head", method)
            with torch.no_grad():
                custom_logits = h(customized if activation is None else activation(customized))
            task = kd_loss(logits, custom_logits, temperature=kd.temperature)
        elif ck.task_loss == "normalized":
            task = normalized_mse(f_s if h_s is None else h_s, customized)
        else:
            task = feature_mse(f_s if h_s is None else h_s, customized)
        total = total + ck.lambda_task * task
    if "kd" in terms:
        t_logits = _required(teacher_logits, "teacher_logits", method)
        kd_term = kd_loss(logits, t_logits, temperature=kd.temperature)
        total = total + kd.weight * kd_term
    if "dkd" in terms:
        t_logits = _required(teacher_logits, "teacher_logits", method)
        dkd_target = torch.where(labeled_mask, target, t_logits.argmax(dim=1))
        dkd_term = dkd_loss(
            logits, t_logits, dkd_target, alpha=dkd.alpha, beta=dkd.beta, temperature=dkd.temperature
        )
        total = total + dkd.weight * dkd_ramp * dkd_term
    if "logit" in terms:
        logit_term = logit_l2(logits, _required(teacher_logits, "teacher_logits", method))
        total = total + kd.weight * logit_term

    return StageBTerms(
        total=total,
        ce=ce.detach(),
        gen=gen.detach(),
        task=task.detach(),
        kd=kd_term.detach(),
        dkd=dkd_term.detach(),
        logit=logit_term.detach(),
    )


def _labeled_ce(logits: Tensor, target: Tensor, labeled_mask: Tensor) -> Tensor:
    """Mean CE over the rows where ``labeled_mask`` is True; an attached zero when none is labeled.

    Unlabeled rows are dropped through ``ignore_index`` rather than boolean indexing, so no
    host-device sync is needed; with no labeled row the sum is an attached 0, so ``backward`` still
    works (``student_only`` on an all-unlabeled batch) and every student parameter still gets a
    (zero) gradient, which DDP requires.
    """
    ignored = torch.full_like(target, -100)
    summed = F.cross_entropy(logits.float(), torch.where(labeled_mask, target, ignored), reduction="sum")
    return summed / labeled_mask.sum().clamp(min=1)


def _required(value: _T | None, name: str, method: str) -> _T:
    if value is None:
        raise ValueError(f"stage_b_loss(method='{method}') needs {name}, got None")
    return value


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode and restore each submodule's previous mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
