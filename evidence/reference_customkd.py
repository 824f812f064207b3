"""A minimal, independent reference of CustomKD (docs/method.md) to check the pipeline against.

Same store, same rows and the same student as the study, but none of stage two's code: the cached
view-0 features are read straight from the store, the images straight from the idx files (view 0 is
the whole 28 px image, resized to the student's 32 px), and both stages are written out below in
plain torch. Single view, no loaders, no replay.

    python -m evidence.reference_customkd --store STORE --lists DIR --seed 0 --method customkd
    python -m evidence.reference_customkd --store DIGITS_STORE --uda mnist_train digits_train digits_test

``--uda SOURCE TARGET EVAL`` runs the UDA protocol on a list_file store instead (the digit domains
of evidence/digits.py): labeled rows are the source split, unlabeled rows the target split, and the
images are the PNG files the store's ids name under ``--images`` (default ``$CUSTOMKD_DATA_ROOT/digits``),
read as RGB (MNIST-M is in colour; a grey image gives three equal channels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from customkd_cache.specs import data_root
from customkd_cache.store import open_store
from evidence.fmnist import ensure_fashion_mnist, read_idx


def ids(path: Path) -> np.ndarray:
    return np.array([int(line.split("/")[1]) for line in path.read_text().split()], np.int64)


def pixels(images: np.ndarray, model: nn.Module) -> torch.Tensor:
    """(N, 3, 32, 32) student input from uint8 images (N, H, W) grey or (N, H, W, 3) RGB."""
    cfg = timm.data.resolve_model_data_config(model)
    x = torch.from_numpy(images).float().div(255)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def dkd(
    logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, beta: float = 8.0
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022), written from the paper: alpha * TCKD + beta * NCKD, x T^2."""
    t = 4.0
    gt = F.one_hot(y, logits.shape[1]).bool()
    p_s, p_t = F.softmax(logits / t, 1), F.softmax(t_logits / t, 1)
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1).clamp_min(1e-8)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1)
    tckd = (b_t * (b_t.clamp_min(1e-8).log() - b_s.log())).sum(1).mean()
    q_s = F.log_softmax((logits / t).masked_fill(gt, -1e9), 1)
    q_t = F.softmax((t_logits / t).masked_fill(gt, -1e9), 1)
    nckd = (q_t * (q_t.clamp_min(1e-8).log() - q_s)).masked_fill(gt, 0).sum(1).mean()
    return (alpha * tckd + beta * nckd) * t * t


def ssl_data(args: argparse.Namespace, student: nn.Module) -> tuple:
    """Fashion-MNIST SSL rows: train/test features, train/test pixels, train/test labels, and the
    labeled and pool row indices."""
    store = open_store(args.store)
    f_train = np.asarray(store.read_split("train")[:, 0], np.float32)  # (N, D) view 0
    f_test = np.asarray(store.read_split("test")[:, 0], np.float32)
    folder = ensure_fashion_mnist()
    (xtr, ytr), (xte, yte) = read_idx(folder, "train"), read_idx(folder, "t10k")
    lab = ids(args.lists / f"labeled_{args.per_class}pc_seed{args.seed}.txt")
    pool = ids(next(args.lists.glob(f"pool_*_{args.per_class}pc_seed{args.seed}.txt")))
    x_tr, x_te = pixels(xtr[: len(f_train)], student), pixels(xte[: len(f_test)], student)
    y_tr, y_te = torch.from_numpy(ytr[: len(f_train)]), torch.from_numpy(yte[: len(f_test)])
    return f_train, f_test, x_tr, x_te, y_tr, y_te, lab, pool


def uda_data(args: argparse.Namespace, student: nn.Module) -> tuple:
    """UDA rows: training rows are source then target (labeled = source); evaluation = the eval split."""
    store = open_store(args.store)
    source, target, evaluation = args.uda
    root = args.images or data_root() / "digits"

    def split(name: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        feats = np.asarray(store.read_split(name)[:, 0], np.float32)
        # RGB: a grey PNG gives three equal channels, as the grey path does (MNIST-M is in colour)
        imgs = np.stack([np.asarray(Image.open(root / i).convert("RGB")) for i in store.ids(name)])
        return feats, pixels(imgs, student), torch.from_numpy(np.asarray(store.labels(name), np.int64))

    (fs, xs, ys), (ft, xt, yt), (fe, xe, ye) = split(source), split(target), split(evaluation)
    f_train, x_tr, y_tr = np.concatenate([fs, ft]), torch.cat([xs, xt]), torch.cat([ys, yt])
    lab, pool = np.arange(len(fs)), np.arange(len(fs), len(fs) + len(ft))
    return f_train, fe, x_tr, xe, y_tr, ye, lab, pool


def pooled(student: nn.Module, x: torch.Tensor, pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_s, the regressed feature): f_s itself, or with ``pre`` the MobileNetV3 head before act2."""
    if not pre:
        f = student.forward_head(student.forward_features(x), pre_logits=True)
        return f, f
    h = student.flatten(student.conv_head(student.global_pool(student.forward_features(x))))
    return F.hardswish(h), h


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    student = timm.create_model("mobilenetv3_small_050", num_classes=10)
    f_train, f_test, x_tr, x_te, y_tr, y_te, lab, pool = (uda_data if args.uda else ssl_data)(args, student)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    ft_tr, ft_te = torch.from_numpy((f_train - mean) / std), torch.from_numpy((f_test - mean) / std)
    d_t = ft_tr.shape[1]
    pre = args.space == "pre"
    act = F.hardswish if pre else (lambda z: z)
    d_s = pooled(student, x_tr[:2], pre)[0].shape[1]
    p_s, p_t = nn.Linear(d_s, d_t), nn.Linear(d_t, d_s)
    probe = nn.Linear(d_t, 10)
    opt_p = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(300):  # full-batch teacher probe on the labeled rows
        loss = F.cross_entropy(probe(ft_tr[lab]), y_tr[lab])
        opt_p.zero_grad()
        loss.backward()
        opt_p.step()
    params_b = [*student.parameters(), *p_s.parameters()]
    opt_b: torch.optim.Optimizer
    if args.optimizer == "sgd":
        opt_b = torch.optim.SGD(params_b, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt_b = torch.optim.AdamW(params_b, lr=args.lr, weight_decay=0.05)
    opt_a = torch.optim.AdamW(p_t.parameters(), lr=1e-2, weight_decay=args.stage_a_wd)
    n_lab = 32 if not args.uda else 64  # labeled rows per batch (the pipelines' labeled_per_batch)
    n_un = 128 - n_lab
    steps_per_epoch = len(pool) // n_un
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, args.epochs * steps_per_epoch)
    rng = np.random.default_rng(args.seed)
    head = student.get_classifier()
    custom = args.method.startswith("customkd")
    uses_probe = args.method.endswith("kd") and args.method != "customkd"  # kd, dkd and the combinations
    for epoch in range(args.epochs):
        if custom:  # stage A: CE(H_s(P_t(f_t)), y), H_s fixed
            for _ in range(50):
                b = rng.choice(lab, 64)
                z = p_t(ft_tr[b])
                cap = torch.tensor(args.bound_rms)
                if args.bound == "student":  # the student's mean feature RMS on the labeled images
                    with torch.no_grad():
                        f_s = pooled(student, x_tr[lab], pre)[1]
                    cap = f_s.pow(2).mean(1).sqrt().mean()
                if args.bound != "none":  # scale each row down to an RMS of at most cap
                    z = z * torch.clamp(cap / z.pow(2).mean(1, keepdim=True).sqrt(), max=1.0)
                loss = F.cross_entropy(F.linear(act(z), head.weight.detach(), head.bias.detach()), y_tr[b])
                opt_a.zero_grad()
                loss.backward()
                opt_a.step()
            cap_now = cap.detach() if args.bound != "none" else None
        student.train()
        order = rng.permutation(pool)
        for i in range(steps_per_epoch):
            b = np.concatenate([rng.choice(lab, n_lab), order[i * n_un : (i + 1) * n_un]])
            f_s, h_s = pooled(student, x_tr[b], pre)
            logits = head(f_s)
            loss = F.cross_entropy(logits[:n_lab], y_tr[b[:n_lab]])
            if uses_probe:
                with torch.no_grad():
                    t_logits = probe(ft_tr[b])
            if args.method in ("kd", "customkd+kd"):
                t = F.softmax(t_logits / 4, 1)
                loss = loss + F.kl_div(F.log_softmax(logits / 4, 1), t, reduction="batchmean") * 16
            if args.method.endswith("dkd"):  # labels on labeled rows, the teacher's argmax elsewhere
                y = torch.cat([y_tr[b[:n_lab]], t_logits[n_lab:].argmax(1)])
                loss = loss + min(1.0, (epoch + 1) / 5) * dkd(logits, t_logits, y)
            if custom:
                with torch.no_grad():
                    target = p_t(ft_tr[b])
                    if cap_now is not None:
                        rms = target.pow(2).mean(1, keepdim=True).sqrt()
                        target = target * torch.clamp(cap_now / rms, max=1.0)
                if (
                    args.task_loss == "logit_kl"
                ):  # KD (T=4) from the customized teacher's logits H_s(act(target))
                    with torch.no_grad():
                        c = F.softmax(F.linear(act(target), head.weight, head.bias) / 4, 1)
                    task = F.kl_div(F.log_softmax(logits / 4, 1), c, reduction="batchmean") * 16
                else:  # the paper's L_task
                    task = F.mse_loss(h_s, target)
                loss = loss + F.mse_loss(p_s(f_s), ft_tr[b]) + task
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
    ap.add_argument("--lists", type=Path, help="folder of the study's list files (SSL)")
    ap.add_argument("--images", type=Path, help="--uda: the image folder the store's ids are relative to")
    ap.add_argument(
        "--uda", nargs=3, metavar=("SOURCE", "TARGET", "EVAL"), help="UDA splits of a list_file store"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument(
        "--method",
        choices=("student_only", "kd", "dkd", "customkd", "customkd+kd", "customkd+dkd"),
        default="customkd",
    )
    ap.add_argument(
        "--bound", choices=("fixed", "student", "none"), default="fixed", help="bound on P_t(f_t)"
    )
    ap.add_argument("--bound-rms", type=float, default=10.0, help="the fixed bound (RMS per row)")
    ap.add_argument(
        "--space", choices=("features", "pre"), default="features", help="L_task on f_s or its pre-activation"
    )
    ap.add_argument(
        "--task-loss",
        choices=("mse", "logit_kl"),
        default="logit_kl",
        help="L_task: the paper's MSE(h_s, P_t(f_t)), or KD from the logits H_s(P_t(f_t))",
    )
    ap.add_argument("--stage-a-wd", type=float, default=0.5, help="AdamW weight decay of P_t in stage A")
    ap.add_argument("--per-class", type=int, default=4, help="SSL: the labeled list's labels per class")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="stage B optimizer")
    ap.add_argument("--lr", type=float, default=3e-3, help="stage B lr")
    args = ap.parse_args()
    if not args.uda and args.lists is None:
        ap.error("give --lists (SSL) or --uda SOURCE TARGET EVAL")
    keys = (
        "method",
        "seed",
        "epochs",
        "optimizer",
        "lr",
        "bound",
        "space",
        "task_loss",
        "stage_a_wd",
        "per_class",
    )
    print(json.dumps({**{k: getattr(args, k) for k in keys}, **run(args)}))


if __name__ == "__main__":
    main()
