"""Stage B: knowledge distillation over labeled + unlabeled rows."""

from __future__ import annotations

from collections import defaultdict

import torch

from customkd_cache.distributed import Dist
from customkd_cache.errors import NonFiniteLossError
from customkd_cache.specs import TrainSpec
from customkd_cache.stage_two.build import lr_at
from customkd_cache.stage_two.losses import TEACHER_LOGIT_TERMS, StageBTerms, method_terms, stage_b_loss
from customkd_cache.stage_two.precision import run_autocast
from customkd_cache.stage_two.replay import Row, draw_views, epoch_items, make_loader, stage_b_batches
from customkd_cache.stage_two.state import Run, TrainState

LOSS_TERMS = ("total", "ce", "gen", "task", "kd", "dkd", "logit")


def epoch_batches(run: Run, epoch: int) -> list[list[Row]]:
    spec = run.spec
    block = None if spec.run.features_in_ram else run.store.unit_rows
    return stage_b_batches(
        labeled=run.protocol.labeled,
        unlabeled=run.protocol.unlabeled,
        batch_size=spec.optim.batch_size,
        labeled_share=spec.optim.labeled_per_batch,
        seed=spec.seed,
        epoch=epoch,
        block_rows=block,
    )


def train_view_count(spec: TrainSpec, num_views: int) -> int:
    """Views stage B (and stage A, the probe) draw from: the cached ones, or only view 0
    (``train_views = "eval"``)."""
    return 1 if spec.train_views == "eval" else num_views


def train_stage_b(
    run: Run, epoch: int, state: TrainState, total_steps: int, part: tuple[int, int] = (0, 1)
) -> tuple[dict[str, float], int]:
    """Part ``i`` of ``k`` of one stage-B epoch over labeled + unlabeled rows (``part = (i, k)``; the
    epoch's batch plan is cut into ``k`` contiguous parts); returns the sums of each loss term (and of
    ``f_s_norm``, the mean L2 norm of ``f_s`` per batch) and the number of steps.

    Under several ranks each batch of the plan is split between them (rank r takes rows r::world).
    """
    spec, models, dist = run.spec, run.models, run.dist
    batches = epoch_batches(run, epoch)
    rows = [r for b in batches for r in b]
    views = draw_views(
        seed=spec.seed,
        epoch=epoch,
        rows=rows,
        num_views=train_view_count(spec, run.store.num_views),
        include_eval=spec.train_views == "all",
    )
    items, index_batches = epoch_items(batches, views)
    i, k = part
    index_batches = index_batches[i * len(index_batches) // k : (i + 1) * len(index_batches) // k]
    if dist.world > 1:  # every rank needs a row of each batch; the plan is the same on all ranks
        index_batches = [b[dist.rank :: dist.world] for b in index_batches if len(b) >= dist.world]
    run.replay.set_items(items, epoch)
    loader = make_loader(
        run.replay,
        batch_size=None,
        batches=index_batches,
        num_workers=spec.run.num_workers,
        seed=spec.seed + epoch,
    )
    models.student.train()
    if models.student_projector is not None:
        models.student_projector.train()
    params = [p for g in models.opt_b.param_groups for p in g["params"]]
    dkd_ramp = min(1.0, (epoch + 1) / max(spec.dkd.warmup_epochs, 1))
    sums: dict[str, float] = defaultdict(float)
    n = 0
    autocast = run_autocast(run)
    for batch in loader:
        for g in models.opt_b.param_groups:
            g["lr"] = lr_at(spec, state.step, total_steps)
        with autocast:  # forward passes and losses; backward runs outside, as PyTorch recommends
            terms, f_s_norm = _stage_b_step(run, {k: v.to(run.device) for k, v in batch.items()}, dkd_ramp)
        _check_finite(terms, epoch, state.step, spec.method, dist)
        models.opt_b.zero_grad(set_to_none=False)
        terms.total.backward()
        dist.average_gradients(params)
        models.opt_b.step()
        state.step += 1
        n += 1
        for key in LOSS_TERMS:
            sums[f"loss_{key}"] += float(getattr(terms, key).detach())
        sums["f_s_norm"] += f_s_norm
    return dict(sums), n


def _check_finite(terms: StageBTerms, epoch: int, step: int, method: str, dist: Dist) -> None:
    """Stop at the first NaN/Inf loss instead of training on garbage (and reporting chance accuracy).

    Decided on every rank together: a rank whose loss is finite stops too when another rank's is not.
    """
    finite = torch.isfinite(terms.total.detach())
    if dist.all_true(finite):
        return
    fix = "lower optim.lr or the loss weights in the train spec"
    if bool(finite):
        raise NonFiniteLossError(
            f"{method}: loss is not finite on another rank at epoch {epoch}, step {step}; {fix}"
        )
    parts = ", ".join(f"{k}={float(getattr(terms, k).detach()):.4g}" for k in LOSS_TERMS)
    where = f" on rank {dist.rank}" if dist.world > 1 else ""
    raise NonFiniteLossError(
        f"{method}: loss is not finite{where} at epoch {epoch}, step {step} ({parts}); {fix}"
    )


def _stage_b_step(run: Run, batch: dict[str, torch.Tensor], dkd_ramp: float) -> tuple[StageBTerms, float]:
    """The loss terms of one batch and the batch's mean L2 norm of ``f_s``."""
    spec, models = run.spec, run.models
    logits, f_s, h_s = models.student.forward_parts(batch["pixels"])
    f_t = _teacher_features(run, batch)
    needs_logits = bool(TEACHER_LOGIT_TERMS & method_terms(spec.method))
    teacher_logits = run.probe.logits(f_t) if needs_logits else None
    terms = stage_b_loss(
        method=spec.method,
        logits=logits,
        f_s=f_s,
        f_t=f_t,
        labeled_mask=batch["labeled"].bool(),
        target=batch["label"],
        student_projector=models.student_projector,
        customizer=models.customizer,
        teacher_logits=teacher_logits,
        kd=spec.kd,
        dkd=spec.dkd,
        ck=spec.customkd,
        dkd_ramp=dkd_ramp,
        h_s=h_s if models.pre_activation else None,
    )
    return terms, float(f_s.detach().float().norm(dim=1).mean())


def _teacher_features(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's teacher features (standardized as the cache's): cached, or computed on the fly."""
    if run.teacher is None:
        return batch["feature"]
    with torch.no_grad(), torch.autocast(device_type=run.device.type, enabled=False):
        # the teacher computes in its own precision (cache spec's teacher.precision), not stage two's;
        # the teacher runs under inference mode; its output cannot be saved for backward (the loss
        # saves f_t when it is not standardized below), so it is copied into a normal tensor
        f = run.teacher.features(batch["teacher_pixels"]).float().clone()
    if run.stats is not None:
        mean, std = (torch.from_numpy(a).to(f.device) for a in run.stats)
        f = (f - mean) / std
    return f
