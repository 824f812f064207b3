"""Stage A alone, from the cache: how good and how large is the customized target, per stage-A variant?

Features only (no student training; seconds on a CPU). For each store and seed: the teacher probe
(the pipeline's: zero init, 50 AdamW epochs at lr 1e-3 over every view of the labeled rows) and
P_t (linear, d_t -> 1024) trained as stage A trains it (20 cycles of 50 AdamW steps at lr 1e-2,
batches of 64, each output row bounded to RMS 10) through the head of a freshly created student
(MobileNetV3-Small-0.5, hardswish on the target: the pipeline's pre-activation space), with:
- ``labels``: CE on the labeled rows (the method), P_t randomly initialized;
- ``labels,zero``: the same with P_t's weights starting at zero;
- ``probe``: KL to the probe's soft predictions (T = 4) on labeled and unlabeled rows.
Reported on the test split (view 0): accuracy of the probe and of each customized teacher, the mean
RMS of the target, and the share of its energy (after centering) that lies in the span of the head's
rows, the only part stage A shapes; the rest is what L_task asks the student to copy besides.

    python -m evidence.customized_teacher --stores STORE_LITE0 STORE_VIT --names lite0 vit_s14 \
        --lists runs/customkd_defaults/lists --seeds 1 2
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

OUT = Path(__file__).resolve().parent / "results"


def ids(path: Path) -> np.ndarray:
    return np.array([int(line.split("/")[1]) for line in path.read_text().split()], np.int64)


def kd(student: torch.Tensor, teacher: torch.Tensor, t: float = 4.0) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def bound(z: torch.Tensor, cap: float = 10.0) -> torch.Tensor:
    rms = z.pow(2).mean(1, keepdim=True).clamp(min=1e-24).sqrt()
    return z * torch.clamp(cap / rms, max=1.0)


def one(store_path: Path, lists: Path, seed: int, per_class: int) -> dict[str, float]:
    torch.manual_seed(seed)
    store = open_store(store_path)
    tr = np.asarray(store.read_split("train"), np.float32)  # (N, V, D)
    te = np.asarray(store.read_split("test")[:, 0], np.float32)
    y_tr = torch.from_numpy(np.asarray(store.labels("train"), np.int64))
    y_te = torch.from_numpy(np.asarray(store.labels("test"), np.int64))
    v = min(3, tr.shape[1])
    mean, std = tr[:, :v].reshape(-1, tr.shape[2]).mean(0), tr[:, :v].reshape(-1, tr.shape[2]).std(0) + 1e-6
    lab = ids(lists / f"labeled_{per_class}pc_seed{seed}.txt")
    pool = ids(lists / f"pool_2000_{per_class}pc_seed{seed}.txt")
    f_lab = torch.from_numpy((tr[lab, :v] - mean) / std).reshape(-1, tr.shape[2])
    y_lab = y_tr[lab].repeat_interleave(v)
    f_pool = torch.from_numpy((tr[np.concatenate([lab, pool]), :v] - mean) / std).reshape(-1, tr.shape[2])
    f_te = torch.from_numpy((te - mean) / std)
    probe = nn.Linear(f_lab.shape[1], 10)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        for b in torch.randperm(len(y_lab), generator=g).split(256):
            loss = F.cross_entropy(probe(f_lab[b]), y_lab[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = {"probe": float((probe(f_te).argmax(1) == y_te).float().mean())}
        soft_pool = probe(f_pool)
    head = timm.create_model("mobilenetv3_small_050", num_classes=10).get_classifier()
    w = head.weight.detach()
    q, _ = torch.linalg.qr(w.T)  # (1024, 10) orthonormal basis of the head's row space
    for variant in ("labels", "labels,zero", "probe"):
        torch.manual_seed(seed)
        p_t = nn.Linear(f_lab.shape[1], w.shape[1])
        if variant.endswith("zero"):
            nn.init.zeros_(p_t.weight)
            nn.init.zeros_(p_t.bias)
        opt_a = torch.optim.AdamW(p_t.parameters(), lr=1e-2, weight_decay=0.0)
        rng = np.random.default_rng(seed)
        for _ in range(20 * 50):
            if variant == "probe":
                b = torch.from_numpy(rng.integers(0, len(f_pool), 64))
                loss = kd(head(F.hardswish(bound(p_t(f_pool[b])))), soft_pool[b])
            else:
                b = torch.from_numpy(rng.integers(0, len(y_lab), 64))
                loss = F.cross_entropy(head(F.hardswish(bound(p_t(f_lab[b])))), y_lab[b])
            opt_a.zero_grad()
            loss.backward()
            opt_a.step()
        with torch.no_grad():
            z = bound(p_t(f_te))
            zc = z - z.mean(0)
            out[f"{variant}:acc"] = float((head(F.hardswish(z)).argmax(1) == y_te).float().mean())
            out[f"{variant}:rms"] = float(z.pow(2).mean(1).sqrt().mean())
            out[f"{variant}:head_share"] = float((zc @ q).pow(2).sum() / zc.pow(2).sum())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", type=Path, nargs="+", required=True)
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--lists", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {
        n: {str(s): one(p, args.lists, s, args.per_class) for s in args.seeds}
        for n, p in zip(args.names, args.stores, strict=True)
    }
    keys = list(next(iter(next(iter(res.values())).values())))
    lines = [
        f"# Customized teacher from the cache alone ({args.per_class} labels/class, test split, view 0)",
        "",
        "Command: `python -m evidence.customized_teacher --stores ... --names "
        + " ".join(args.names)
        + f" --seeds {' '.join(map(str, args.seeds))}` (2-core CPU). Accuracy in %, mean over seeds.",
        "",
        "| measure | " + " | ".join(args.names) + " |",
        "|---|" + "---|" * len(args.names),
    ]
    for k in keys:
        cells = []
        for n in args.names:
            vals = [res[n][str(s)][k] for s in args.seeds]
            scale = 100 if (k == "probe" or k.endswith(":acc") or k.endswith("share")) else 1
            cells.append(f"{scale * np.mean(vals):.1f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "customized_teacher.md").write_text("\n".join(lines) + "\n")
    (args.out / "customized_teacher.json").write_text(json.dumps(res, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
