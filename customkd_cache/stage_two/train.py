"""Stage two: train CustomKD (or a baseline) from a feature store.

One training epoch is one pass of stage B (knowledge distillation over labeled + unlabeled rows),
preceded, for the ``customkd`` methods, by stage A (customizer training from cached features and
labels only: ``customkd.stage_a_steps`` optimizer steps) every ``customkd.stage_a_every`` epochs, or
interleaved ``customkd.stage_a_per_epoch`` times within the epoch. Every random choice is derived from
``(seed, epoch)``, so ``--resume`` after a kill reaches the numbers of an uninterrupted run on CPU.

The run directory holds ``spec.json`` (the resolved spec), ``caches.json`` (the fingerprint of every
store read), ``metrics.jsonl`` (one line per epoch), ``results.json``, ``checkpoints/last.pt`` (all
state, for ``--resume``) and ``student_last.pth`` / ``student_best.pth`` (the student alone, loadable
with ``timm.create_model(name, num_classes=C, checkpoint_path=...)``).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from customkd_cache.catalog import check_store, find_store
from customkd_cache.data import Dataset, open_dataset
from customkd_cache.distributed import Dist, describe_device, resolve_device
from customkd_cache.errors import SpecError
from customkd_cache.models.students import Student, data_config, save_student_checkpoint
from customkd_cache.specs import TrainSpec
from customkd_cache.stage_two import tensorboard
from customkd_cache.stage_two.build import build_models
from customkd_cache.stage_two.evaluate import evaluate, summarize
from customkd_cache.stage_two.online import create_online_teacher
from customkd_cache.stage_two.precision import resolve_precision, run_precision
from customkd_cache.stage_two.protocols import build_protocol
from customkd_cache.stage_two.replay import FeatureSource, ReplayDataset, combined_stats
from customkd_cache.stage_two.run_dir import (
    append_jsonl,
    check_out,
    load_checkpoint,
    log_epoch,
    prepare_out,
    save_checkpoint,
    write_json,
)
from customkd_cache.stage_two.stage_a import fit_probe, labeled_features, stage_a_cycles, train_stage_a
from customkd_cache.stage_two.stage_b import epoch_batches, rank_steps, train_stage_b, train_view_count
from customkd_cache.stage_two.state import Run, TrainState
from customkd_cache.store import FeatureStore, open_store, std_divisor


def run_train(spec: TrainSpec, *, spec_path: Path | None, out: Path, resume: bool = False) -> dict[str, Any]:
    """Train one method from the cache and write the run directory; return results.json's content.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank trains on its own batches of
    ``optim.batch_size`` (the batch is per GPU) and gradients are averaged across ranks before each
    step; evaluation is shared between the ranks; rank 0 trains stage A and writes.
    """
    if spec.run.threads:
        torch.set_num_threads(spec.run.threads)
    with Dist.from_env(spec.run.device, timeout_s=spec.run.dist_timeout_s) as dist:
        run = prepare_run(spec, spec_path=spec_path, out=out, resume=resume, dist=dist)
        state = load_checkpoint(run) if resume else TrainState()
        if dist.is_main:
            shown = f"{describe_device(run.device)}, precision {run_precision(run)}"
            print(f"device: {shown}", file=sys.stderr, flush=True)
        per_epoch = len(epoch_batches(run, 0))  # the same every epoch
        parts = [max(stage_a_cycles(run, e), 1) for e in range(spec.optim.epochs)]
        total_steps = sum(rank_steps(per_epoch, k, dist.world) for k in parts)
        for epoch in range(state.epoch, spec.optim.epochs):
            train_one_epoch(run, epoch, state, total_steps)
        results = summarize(run, state) if dist.is_main else {}
        if dist.is_main:
            save_student_checkpoint(run.models.student, out / "student_last.pth")
            write_json(out / "results.json", results)
            tensorboard.close(out)
        dist.barrier()
    return results


def train_one_epoch(run: Run, epoch: int, state: TrainState, total_steps: int) -> None:
    """Stage A (when due), stage B, evaluation, metrics line and checkpoint for one epoch.

    With ``customkd.stage_a_per_epoch`` = k > 1 the epoch's stage-B batches are cut into k parts
    and a stage-A cycle runs before each part.
    """
    spec, out = run.spec, run.out
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed * 100_003 + epoch)
    metrics: dict[str, Any] = {"epoch": epoch}
    cycles = stage_a_cycles(run, epoch)
    sums: dict[str, float] = defaultdict(float)
    count, a_steps, a_seconds, t_b = 0, 0, 0.0, 0.0
    for part in range(max(cycles, 1)):
        if cycles:
            t_a = time.perf_counter()
            report = train_stage_a(run, epoch, part)
            a_steps += report.pop("stage_a_steps")
            metrics.update(report)  # the last cycle's state is what stage B uses
            a_seconds += time.perf_counter() - t_a
        t = time.perf_counter()
        part_sums, n = train_stage_b(run, epoch, state, total_steps, part=(part, max(cycles, 1)))
        t_b += time.perf_counter() - t
        for key, value in part_sums.items():
            sums[key] += value
        count += n
    if cycles:
        metrics["stage_a_steps"] = a_steps
        metrics["stage_a_seconds"] = round(a_seconds, 3)
    metrics.update(run.dist.mean_over_ranks(dict(sums), count))
    metrics["stage_b_seconds"] = round(t_b, 3)
    run.dist.sync_buffers(run.models.student)
    final = epoch + 1 == spec.optim.epochs
    if (epoch + 1) % spec.run.eval_every == 0 or final:  # every rank scores its share
        metrics.update(evaluate(run, final=final))
        acc = metrics["student_accuracy"]
        if acc > state.best_accuracy:
            state.best_accuracy, state.best_epoch = acc, epoch
            if run.dist.is_main:
                save_student_checkpoint(run.models.student, out / "student_best.pth")
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    state.epoch = epoch + 1
    state.history.append(metrics)
    if run.dist.is_main:
        append_jsonl(out / "metrics.jsonl", metrics)
        tensorboard.log_metrics(out, metrics)
        save_checkpoint(run, state)
        log_epoch(metrics, spec.optim.epochs, run=str(out))
    run.dist.barrier()


def prepare_run(spec: TrainSpec, *, spec_path: Path | None, out: Path, resume: bool, dist: Dist) -> Run:
    """Resolve data, cache, probe and models; write spec.json and caches.json (rank 0).

    ``--out`` is checked first and written last, so a run refused on the way (a damaged store) leaves
    no spec.json behind that would make the same command need ``--resume``.
    """
    check_out(out, spec, resume=resume)
    dist.barrier()  # every rank has checked --out before rank 0 writes in it (below)
    device = dist.device if dist.world > 1 else resolve_device(spec.run.device)
    precision = resolve_precision(spec.run.precision, device)  # refused here, before any work
    dataset = open_dataset(spec.dataset)
    store_path = find_store(spec, spec_path=spec_path, manifest=dataset.manifest)
    store = open_store(store_path)
    check_store(store, spec=spec, spec_path=spec_path, manifest=dataset.manifest)
    protocol = build_protocol(spec, dataset)
    if not protocol.labeled:
        raise SpecError("the protocol gives no labeled rows: check uda.source or ssl.labeled_list")
    mean, std = combined_stats(store, protocol.train_splits)
    train_stats = (mean, std_divisor(std))  # as FeatureSource does
    stats = train_stats if spec.customkd.standardize else None
    features = FeatureSource(store.path, in_ram=spec.run.features_in_ram, standardize=stats)
    num_classes = len(dataset.manifest.classes)
    teacher = create_online_teacher(spec, spec_path, store, device) if spec.teacher_mode == "online" else None
    views = train_view_count(spec, store.num_views)
    labeled = labeled_features(features, store, protocol.labeled, views)  # probe and every stage A
    raw_stats = None if stats else train_stats
    probe = fit_probe(spec, labeled, num_classes, raw_stats, device=device, precision=precision)
    models = build_models(spec, spec_path=spec_path, num_classes=num_classes, teacher_dim=store.feature_dim)
    replay = _replay_dataset(spec, dataset, store, features, models.student, teacher)
    features.preload([*protocol.train_splits, *protocol.eval_splits])
    replay.preload([*protocol.train_splits, *protocol.eval_splits])
    models.to(device)
    probe = probe.to(device)
    if dist.is_main:
        prepare_out(out, spec, store, protocol, resume=resume)
    dist.barrier()
    return Run(
        spec=spec,
        out=out,
        dataset=dataset,
        store=store,
        protocol=protocol,
        features=features,
        probe=probe,
        models=models,
        replay=replay,
        num_classes=num_classes,
        stats=stats,
        labeled=labeled,
        dist=dist,
        device=device,
        teacher=teacher,
    )


def _replay_dataset(
    spec: TrainSpec,
    dataset: Dataset,
    store: FeatureStore,
    features: FeatureSource,
    student: Student,
    teacher: Any,
) -> ReplayDataset:
    cfg = data_config(student.timm_model())
    kwargs: dict[str, Any] = {}
    if teacher is not None:
        pre = teacher.preprocess
        kwargs = dict(
            teacher_size=pre.input_size,
            teacher_mean=pre.mean,
            teacher_std=pre.std,
            teacher_interpolation=pre.interpolation,
        )
    return ReplayDataset(
        dataset=dataset,
        store_path=store.path,
        features=None if teacher is not None else features,
        student_size=spec.student.input_size,
        student_mean=cfg["mean"],
        student_std=cfg["std"],
        interpolation=cfg.get("interpolation", "bilinear"),
        photometric=spec.optim.photometric,
        seed=spec.seed,
        decode=spec.run.decode,
        **kwargs,
    )
