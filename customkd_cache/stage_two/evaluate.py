"""Evaluation: student and teacher accuracies, the final metrics (CKA, customized teacher) and
results.json's summary."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from customkd_cache import library_versions
from customkd_cache.stage_two.build import to_feature_space
from customkd_cache.stage_two.losses import linear_cka
from customkd_cache.stage_two.precision import run_autocast, run_precision
from customkd_cache.stage_two.probe import probe_accuracy
from customkd_cache.stage_two.replay import Row, make_loader
from customkd_cache.stage_two.stage_b import to_device
from customkd_cache.stage_two.state import Run, TrainState


@torch.no_grad()
def evaluate(run: Run, *, final: bool = False) -> dict[str, Any]:
    """Student accuracy on each evaluation split (view 0, the stored evaluation view), and on the
    validation rows when the protocol has them (``val_accuracy``).

    ``final``: also the linear CKA on the evaluation images between ``f_s`` and the cached teacher
    feature ``f_t`` (every method) and between ``f_s`` and ``P_t(f_t)`` (methods with a customizer),
    and the customized teacher's accuracy: the student's head on ``P_t(f_t)`` (on rank 0 only).

    Every rank must call it (the images are shared between the ranks); the accuracies are the same
    on every rank.
    """
    eval_rows = {s: run.protocol.eval_indices(s, run.store.num_samples(s)) for s in run.protocol.eval_splits}
    acc, per_split, f_s = _student_accuracy(run, eval_rows, keep_features=final)
    out: dict[str, Any] = {"student_accuracy": acc, "student_accuracy_per_split": per_split}
    if run.protocol.val_rows:
        val_acc, val_split, _ = _student_accuracy(run, run.protocol.val_rows, keep_features=False)
        out.update(val_accuracy=val_acc, val_accuracy_per_split=val_split)
    if final and f_s is not None and run.dist.is_main:
        out.update(_final_metrics(run, eval_rows, f_s))
    return out


def _student_accuracy(
    run: Run, rows_by_split: dict[str, list[int]], *, keep_features: bool
) -> tuple[float, dict[str, float], torch.Tensor | None]:
    """Accuracy over all rows, per split, and (``keep_features``) the (N, d_s) features ``f_s`` in
    the order of ``rows_by_split``.

    Under several ranks each rank scores a contiguous share of each split (``shard``), the correct
    counts are summed over the ranks and the features gathered in order, so every rank returns what
    one process would.
    """
    models, dist = run.models, run.dist
    models.student.eval()
    per_split: dict[str, float] = {}
    feats: list[torch.Tensor] = []
    corrects: list[int] = []
    for split, rows in rows_by_split.items():
        run.replay.set_items([(Row(split, r, False), 0) for r in shard(rows, dist.rank, dist.world)], 0)
        loader = make_loader(
            run.replay,
            batch_size=run.spec.optim.batch_size,
            batches=None,
            num_workers=run.spec.run.num_workers,
            seed=run.spec.seed,
            pin_memory=run.device.type == "cuda",
        )
        correct = torch.zeros((), dtype=torch.int64, device=run.device)  # read once per split
        split_feats: list[torch.Tensor] = []
        for batch in loader:
            with run_autocast(run):
                logits, f_s = models.student(
                    to_device(run.replay.to_device(batch, run.device, non_blocking=True), run.device)[
                        "pixels"
                    ]
                )
            correct += (logits.argmax(1) == batch["label"].to(run.device, non_blocking=True)).sum()
            if keep_features:
                split_feats.append(f_s.float())
        corrects.append(int(correct))
        if keep_features:
            d = run.models.student.feature_dim
            mine = torch.cat(split_feats) if split_feats else torch.zeros((0, d), device=run.device)
            feats.append(dist.gather_rows(mine))
    summed = dist.sum_over_ranks(corrects)
    for (split, rows), n_correct in zip(rows_by_split.items(), summed, strict=True):
        per_split[split] = n_correct / max(len(rows), 1)
    total_all = sum(len(rows) for rows in rows_by_split.values())
    f_s_all = torch.cat(feats) if keep_features and feats else None
    return sum(summed) / max(total_all, 1), per_split, f_s_all


def shard(rows: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``rows`` (shares differ in size by at most one row)."""
    n = len(rows)
    return rows[rank * n // world : (rank + 1) * n // world]


def _final_metrics(run: Run, rows_by_split: dict[str, list[int]], f_s: torch.Tensor) -> dict[str, float]:
    """Linear CKA of ``f_s`` with ``f_t`` and with ``P_t(f_t)`` (view 0 of the same images), and the
    customized teacher's accuracy: the student's head on ``P_t(f_t)``."""
    f_t = torch.cat(
        [
            torch.from_numpy(run.features.get_many(s, np.asarray(r, np.int64), np.zeros(len(r), np.int64)))
            for s, r in rows_by_split.items()
        ]
    ).float()
    out = {"cka_student_teacher": linear_cka(f_s, f_t)}
    if run.models.customizer is not None:
        run.models.customizer.eval()
        with run_autocast(run):
            customized = run.models.customizer(f_t.to(run.device))
            activate = to_feature_space(run.models)
            customized = customized if activate is None else activate(customized)
        out["cka_student_customized"] = linear_cka(f_s, customized.float().cpu())
        labels = np.concatenate(
            [run.store.labels(s)[np.asarray(r, np.int64)] for s, r in rows_by_split.items()]
        )
        head = run.models.student.head()
        with run_autocast(run):
            predicted = head(customized.to(next(head.parameters()).dtype)).argmax(1).cpu().numpy()
        out["customized_teacher_accuracy"] = float((predicted == labels).mean()) if len(labels) else 0.0
    return out


def teacher_accuracy(run: Run) -> tuple[float, dict[str, float]]:
    """The probe's accuracy on each evaluation split's view-0 features."""
    per_split: dict[str, float] = {}
    correct, total = 0.0, 0
    for split in run.protocol.eval_splits:
        rows = np.asarray(run.protocol.eval_indices(split, run.store.num_samples(split)), np.int64)
        n = len(rows)
        f = torch.from_numpy(run.features.get_many(split, rows, np.zeros(n, np.int64))).to(run.device)
        y = torch.from_numpy(run.store.labels(split)[rows].astype(np.int64)).to(run.device)
        with run_autocast(run):
            acc = probe_accuracy(run.probe, f, y)
        per_split[split] = acc
        correct += acc * n
        total += n
    return correct / max(total, 1), per_split


def summarize(run: Run, state: TrainState) -> dict[str, Any]:
    last: dict[str, Any] = next((m for m in reversed(state.history) if "student_accuracy" in m), {})
    t_acc, t_split = teacher_accuracy(run)
    return {
        "method": run.spec.method,
        "protocol": run.spec.protocol,
        "seed": run.spec.seed,
        "teacher_mode": run.spec.teacher_mode,
        "student": run.spec.student.name,
        "precision": run_precision(run),
        "student_accuracy": last.get("student_accuracy"),
        "student_accuracy_per_split": last.get("student_accuracy_per_split"),
        "teacher_accuracy": t_acc,
        "teacher_accuracy_per_split": t_split,
        "val_accuracy": last.get("val_accuracy"),
        "cka_student_teacher": last.get("cka_student_teacher"),
        "cka_student_customized": last.get("cka_student_customized"),
        "customized_teacher_accuracy": last.get("customized_teacher_accuracy"),
        "best_student_accuracy": state.best_accuracy,
        "best_epoch": state.best_epoch,
        "last_epoch": state.epoch - 1,
        "epochs": run.spec.optim.epochs,
        "num_labeled": len(run.protocol.labeled),
        "num_unlabeled": len(run.protocol.unlabeled),
        "num_val": sum(len(r) for r in run.protocol.val_rows.values()),
        "cache_fingerprint": run.store.fingerprint,
        "versions": library_versions(),
    }
