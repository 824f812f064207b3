"""Stage B: knowledge distillation over labeled + unlabeled rows."""

from __future__ import annotations

import torch

from customkd_cache.distributed import Dist
from customkd_cache.errors import NonFiniteLossError
from customkd_cache.specs import TrainSpec
from customkd_cache.stage_two.build import lr_at, to_feature_space
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

    Under several ranks each rank trains on whole batches of the plan (``optim.batch_size`` is per
    GPU: ``rank_batches``), so a step's global batch is ``world`` batches.
    The losses stay on the device; the host reads them every ``run.log_every`` steps (``_Window``).
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
    index_batches = rank_batches(part_of(index_batches, *part), dist.rank, dist.world)
    run.replay.set_items(items, epoch)
    loader = make_loader(
        run.replay,
        batch_size=None,
        batches=index_batches,
        num_workers=spec.run.num_workers,
        seed=spec.seed + epoch,
        pin_memory=run.device.type == "cuda",  # page-locked batches: asynchronous copies to the GPU
    )
    models.student.train()
    if models.student_projector is not None:
        models.student_projector.train()
    params = [p for g in models.opt_b.param_groups for p in g["params"]]
    dkd_ramp = min(1.0, (epoch + 1) / max(spec.dkd.warmup_epochs, 1))
    window = _Window(run.device)
    n = 0
    autocast = run_autocast(run)
    for batch in loader:
        for g in models.opt_b.param_groups:
            g["lr"] = lr_at(spec, state.step, total_steps)
        with autocast:  # forward passes and losses; backward runs outside, as PyTorch recommends
            terms, f_s_norm = _stage_b_step(
                run,
                to_device(run.replay.to_device(batch, run.device, non_blocking=True), run.device),
                dkd_ramp,
            )
        window.add(terms, f_s_norm, state.step)
        models.opt_b.zero_grad(set_to_none=False)
        terms.total.backward()
        dist.average_gradients(params)
        models.opt_b.step()
        state.step += 1
        n += 1
        if n % spec.run.log_every == 0:
            window.check(epoch, spec.method, dist)
    if n % spec.run.log_every:  # the steps since the last check (every rank runs the same number)
        window.check(epoch, spec.method, dist)
    return window.sums(), n


def part_of(batches: list[list[int]], i: int, k: int) -> list[list[int]]:
    """Part ``i`` of ``k`` contiguous parts of an epoch's batch plan."""
    return batches[i * len(batches) // k : (i + 1) * len(batches) // k]


def rank_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Rank ``rank``'s batches of a plan that every rank holds: batch ``s * world + rank`` at step
    ``s``, the plan wrapped around to fill the last step (as ``DistributedSampler`` pads), so every
    rank runs ``ceil(len / world)`` steps and every batch is trained on each epoch."""
    if world == 1 or not batches:
        return batches
    steps = -(-len(batches) // world)
    return [batches[(s * world + rank) % len(batches)] for s in range(steps)]


def rank_steps(num_batches: int, parts: int, world: int) -> int:
    """Steps one rank runs in an epoch of ``num_batches`` batches cut into ``parts`` parts."""
    sizes = [(i + 1) * num_batches // parts - i * num_batches // parts for i in range(parts)]
    return sum(-(-n // world) for n in sizes)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A loader batch on ``device``: non-blocking copies (the loader pins its batches on CUDA) and, on
    CUDA, the student's ``pixels`` in channels_last, the memory format of the student's weights there
    (``Models.to``)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if device.type == "cuda" and "pixels" in out and out["pixels"].ndim == 4:
        out["pixels"] = out["pixels"].contiguous(memory_format=torch.channels_last)
    return out


class _Window:
    """Stage B's running sums kept on the run's device, so a step never waits for the device.

    The host reads them every ``run.log_every`` steps and at the end of the epoch: there the
    non-finite check is decided on every rank together (one all-reduce), so a NaN/Inf loss stops the
    run at most ``log_every`` steps after it appears, with the exact step it appeared at.
    """

    NONE = 2**62  # no non-finite loss seen

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64, device=device)
        self.bad_step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.bad_terms = torch.zeros(len(LOSS_TERMS), dtype=torch.float32, device=device)

    def add(self, terms: StageBTerms, f_s_norm: torch.Tensor, step: int) -> None:
        values = torch.stack([getattr(terms, k).detach().float() for k in LOSS_TERMS])
        first = (self.bad_step == self.NONE) & ~torch.isfinite(values[0])  # values[0]: total
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_terms = torch.where(first, values, self.bad_terms)
        self.total += torch.cat([values, f_s_norm.detach().float().reshape(1)]).double()

    def check(self, epoch: int, method: str, dist: Dist) -> None:
        """Raise NonFiniteLossError on every rank when a loss was not finite on any rank.

        Every rank must call it at the same points (it is one collective under several ranks).
        """
        first = dist.min_over_ranks(self.bad_step)
        if first == self.NONE:
            return
        fix = "lower optim.lr or the loss weights in the train spec"
        own = int(self.bad_step)
        if own != first:
            raise NonFiniteLossError(
                f"{method}: loss is not finite on another rank at epoch {epoch}, step {first}; {fix}"
            )
        values = self.bad_terms.tolist()
        parts = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_TERMS, values, strict=True))
        where = f" on rank {dist.rank}" if dist.world > 1 else ""
        raise NonFiniteLossError(
            f"{method}: loss is not finite{where} at epoch {epoch}, step {own} ({parts}); {fix}"
        )

    def sums(self) -> dict[str, float]:
        """The sums of each loss term (``loss_<term>``) and of ``f_s_norm`` (one read of the device)."""
        values = self.total.tolist()
        keys = [f"loss_{k}" for k in LOSS_TERMS] + ["f_s_norm"]
        return dict(zip(keys, values, strict=True))


def _stage_b_step(
    run: Run, batch: dict[str, torch.Tensor], dkd_ramp: float
) -> tuple[StageBTerms, torch.Tensor]:
    """The loss terms of one batch and the batch's mean L2 norm of ``f_s`` (0-dim, on the device)."""
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
        head=models.stage_a_head if models.stage_a_head is not None else models.student.head(),
        activation=to_feature_space(models),
    )
    return terms, f_s.detach().float().norm(dim=1).mean()


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
