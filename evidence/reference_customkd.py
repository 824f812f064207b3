"""A minimal, independent reference of CustomKD (METHOD.md) to check the pipeline against.

Same store, same rows and the same student as the study, but none of stage two's code: the cached
view-0 features are read straight from the store, the images straight from the idx files (view 0 is
the whole 28 px image, resized to the student's 32 px), and both stages are written out below in
plain torch. Single view, no loaders, no replay.

    python -m evidence.reference_customkd --store STORE --lists DIR --seed 0 --method customkd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from customkd_cache.store import open_store
from evidence.fmnist import ensure_fashion_mnist, read_idx


def ids(path: Path) -> np.ndarray:
    return np.array([int(line.split("/")[1]) for line in path.read_text().split()], np.int64)


def pixels(images: np.ndarray, model: nn.Module) -> torch.Tensor:
    cfg = timm.data.resolve_model_data_config(model)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    store = open_store(args.store)
    f_train = np.asarray(store.read_split("train")[:, 0], np.float32)  # (N, D) view 0
    f_test = np.asarray(store.read_split("test")[:, 0], np.float32)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    ft_tr, ft_te = torch.from_numpy((f_train - mean) / std), torch.from_numpy((f_test - mean) / std)
    folder = ensure_fashion_mnist()
    (xtr, ytr), (xte, yte) = read_idx(folder, "train"), read_idx(folder, "t10k")
    lab = ids(args.lists / f"labeled_4pc_seed{args.seed}.txt")
    pool = ids(next(args.lists.glob(f"pool_*_seed{args.seed}.txt")))
    student = timm.create_model("mobilenetv3_small_050", num_classes=10)
    x_tr, x_te = pixels(xtr[: len(f_train)], student), pixels(xte[: len(f_test)], student)
    y_tr, y_te = torch.from_numpy(ytr[: len(f_train)]), torch.from_numpy(yte[: len(f_test)])
    d_t = ft_tr.shape[1]
    d_s = student.forward_head(student.forward_features(x_tr[:2]), pre_logits=True).shape[1]
    p_s, p_t = nn.Linear(d_s, d_t), nn.Linear(d_t, d_s)
    probe = nn.Linear(d_t, 10)
    opt_p = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(300):  # full-batch teacher probe on the labeled rows
        loss = F.cross_entropy(probe(ft_tr[lab]), y_tr[lab])
        opt_p.zero_grad()
        loss.backward()
        opt_p.step()
    opt_b = torch.optim.AdamW([*student.parameters(), *p_s.parameters()], lr=2e-3, weight_decay=0.05)
    opt_a = torch.optim.AdamW(p_t.parameters(), lr=2e-3, weight_decay=0.0)
    steps_per_epoch = len(pool) // 96
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, args.epochs * steps_per_epoch)
    rng = np.random.default_rng(args.seed)
    head = student.get_classifier()
    for _epoch in range(args.epochs):
        if args.method == "customkd":  # stage A: CE(H_s(P_t(f_t)), y), H_s fixed
            for _ in range(100):
                b = rng.choice(lab, 64)
                z = p_t(ft_tr[b])
                if args.bound:  # scale each row down to the student's mean feature RMS
                    with torch.no_grad():
                        f_s = student.forward_head(student.forward_features(x_tr[lab]), pre_logits=True)
                    cap = f_s.pow(2).mean(1).sqrt().mean()
                    z = z * torch.clamp(cap / z.pow(2).mean(1, keepdim=True).sqrt(), max=1.0)
                loss = F.cross_entropy(F.linear(z, head.weight.detach(), head.bias.detach()), y_tr[b])
                opt_a.zero_grad()
                loss.backward()
                opt_a.step()
            cap_now = cap.detach() if args.bound else None
        student.train()
        order = rng.permutation(pool)
        for i in range(steps_per_epoch):
            b = np.concatenate([rng.choice(lab, 32), order[i * 96 : (i + 1) * 96]])
            f_s = student.forward_head(student.forward_features(x_tr[b]), pre_logits=True)
            logits = head(f_s)
            loss = F.cross_entropy(logits[:32], y_tr[b[:32]])
            if args.method == "kd":
                with torch.no_grad():
                    t = F.softmax(probe(ft_tr[b]) / 4, 1)
                loss = loss + F.kl_div(F.log_softmax(logits / 4, 1), t, reduction="batchmean") * 16
            if args.method == "customkd":
                with torch.no_grad():
                    target = p_t(ft_tr[b])
                    if cap_now is not None:
                        rms = target.pow(2).mean(1, keepdim=True).sqrt()
                        target = target * torch.clamp(cap_now / rms, max=1.0)
                loss = loss + F.mse_loss(p_s(f_s), ft_tr[b]) + F.mse_loss(f_s, target)
            opt_b.zero_grad()
            loss.backward()
            opt_b.step()
            sched.step()
    student.eval()
    with torch.no_grad():
        acc = float((student(x_te).argmax(1) == y_te).float().mean())
        probe_acc = float((probe(ft_te).argmax(1) == y_te).float().mean())
    return {"student_accuracy": acc, "teacher_accuracy": probe_acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--lists", type=Path, required=True, help="folder of the study's list files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--method", choices=("student_only", "kd", "customkd"), default="customkd")
    ap.add_argument("--bound", action="store_true", help="bound P_t(f_t) at the student's feature RMS")
    args = ap.parse_args()
    print(json.dumps({"method": args.method, "seed": args.seed, "bound": args.bound, **run(args)}))


if __name__ == "__main__":
    main()
