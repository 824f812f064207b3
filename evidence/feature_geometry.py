"""Geometry of cached teacher features: ViT CLS tokens against CNN pooled features.

For each store (Fashion-MNIST train split, view 0, the first ``--rows`` images) it measures:
- anisotropy: the mean cosine between random pairs of raw features, and after centering;
- the share of variance carried by the top 1/4/16/64 principal directions, raw and after the
  per-dimension standardization stage two applies (``customkd.standardize``), and the effective rank
  (participation ratio of the PCA spectrum);
- class structure: the share of the standardized features' variance that the class means explain
  (what L_gen's MSE target holds that is about the classes), overall and within the top-k principal
  directions vs the rest, and the per-direction Fisher ratio of the top directions vs the tail;
- linear separability from a few labels: a ridge classifier fitted on 4 labels per class (5 draws),
  in the standardized space and in the PCA-whitened top-k space.

    python -m evidence.feature_geometry --stores STORE_A STORE_B --names lite0 vit_s14

Results: ``evidence/results/feature_geometry.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from customkd_cache.store import open_store

OUT = Path(__file__).resolve().parent / "results"


def pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of the covariance of ``x`` (N, D)."""
    xc = x - x.mean(0)
    cov = xc.T @ xc / (len(x) - 1)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1]
    return np.clip(val[order], 0, None), vec[:, order]


def mean_pair_cos(x: np.ndarray, rng: np.random.Generator, pairs: int = 20000) -> float:
    i, j = rng.integers(0, len(x), pairs), rng.integers(0, len(x), pairs)
    keep = i != j
    a, b = x[i[keep]], x[j[keep]]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.mean())


def class_share(z: np.ndarray, y: np.ndarray) -> float:
    """Between-class variance / total variance of ``z`` (summed over dimensions)."""
    mu = z.mean(0)
    between = sum((y == c).sum() * ((z[y == c].mean(0) - mu) ** 2).sum() for c in np.unique(y))
    return float(between / ((z - mu) ** 2).sum())


def fisher(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-dimension ratio of between-class to within-class variance."""
    mu = z.mean(0)
    cls = np.unique(y)
    between = sum((y == c).mean() * (z[y == c].mean(0) - mu) ** 2 for c in cls)
    within = sum((y == c).mean() * z[y == c].var(0) for c in cls)
    return between / (within + 1e-12)


def ridge_acc(ztr: np.ndarray, ytr: np.ndarray, zte: np.ndarray, yte: np.ndarray, lam: float = 1.0) -> float:
    onehot = np.eye(10)[ytr]
    a = np.c_[ztr, np.ones(len(ztr))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ onehot)
    return float(((np.c_[zte, np.ones(len(zte))] @ w).argmax(1) == yte).mean())


def measure(store_path: Path, rows: int, seed: int) -> dict[str, object]:
    store = open_store(store_path)
    f = np.asarray(store.read_split("train")[:rows, 0], np.float64)
    y = np.asarray(store.labels("train"), np.int64)[:rows]
    fte = np.asarray(store.read_split("test")[:, 0], np.float64)
    yte = np.asarray(store.labels("test"), np.int64)
    rng = np.random.default_rng(seed)
    mean, std = f.mean(0), f.std(0) + 1e-6
    z, zte = (f - mean) / std, (fte - mean) / std
    out: dict[str, object] = {"dim": f.shape[1], "rows": len(f)}
    out["mean_pair_cos_raw"] = mean_pair_cos(f, rng)
    out["mean_pair_cos_centered"] = mean_pair_cos(f - mean, rng)
    out["norm_of_mean_over_mean_norm"] = float(np.linalg.norm(mean) / np.linalg.norm(f, axis=1).mean())
    out["std_max_over_median"] = float(std.max() / np.median(std))
    for name, x in (("raw", f), ("std", z)):
        val, _ = pca(x)
        share = np.cumsum(val) / val.sum()
        out[f"top_var_{name}"] = {k: float(share[k - 1]) for k in (1, 4, 16, 64)}
        out[f"eff_rank_{name}"] = float(val.sum() ** 2 / (val**2).sum())
    val, vec = pca(z)
    out["class_share_std"] = class_share(z, y)
    proj = (z - z.mean(0)) @ vec
    for k in (16, 64):
        out[f"class_share_top{k}"] = class_share(proj[:, :k], y)
        out[f"class_share_rest{k}"] = class_share(proj[:, k:], y)
        out[f"var_share_rest{k}"] = float(val[k:].sum() / val.sum())
    fr = fisher(proj, y)
    out["fisher_median_top16"] = float(np.median(fr[:16]))
    out["fisher_median_tail"] = float(np.median(fr[64:]))
    # A few labels: ridge in the standardized space and in the PCA-whitened top-k space (PCA of all rows).
    accs: dict[str, list[float]] = {"std": [], "white16": [], "white64": [], "pca64_unwhitened": []}
    for draw in range(5):
        r = np.random.default_rng(seed + draw)
        lab = np.concatenate([r.choice(np.flatnonzero(y == c), 4, replace=False) for c in range(10)])
        accs["std"].append(ridge_acc(z[lab], y[lab], zte, yte))
        for k in (16, 64):
            w = vec[:, :k] / np.sqrt(val[:k])
            accs[f"white{k}"].append(ridge_acc((z[lab] - z.mean(0)) @ w, y[lab], (zte - z.mean(0)) @ w, yte))
        p = vec[:, :64]
        accs["pca64_unwhitened"].append(
            ridge_acc((z[lab] - z.mean(0)) @ p, y[lab], (zte - z.mean(0)) @ p, yte)
        )
    out["ridge_4pc_test"] = {k: float(np.mean(v)) for k, v in accs.items()}
    return out


def write_md(res: dict[str, dict[str, object]], command: str, out: Path) -> None:
    names = list(res)
    rows = [
        ("dimension", lambda r: f"{r['dim']}"),
        ("mean cosine of random pairs, raw", lambda r: f"{r['mean_pair_cos_raw']:.3f}"),
        ("mean cosine of random pairs, centered", lambda r: f"{r['mean_pair_cos_centered']:.3f}"),
        ("‖mean‖ / mean ‖f‖", lambda r: f"{r['norm_of_mean_over_mean_norm']:.3f}"),
        ("per-dim std: max / median", lambda r: f"{r['std_max_over_median']:.1f}"),
    ]
    for k in (1, 4, 16, 64):
        rows.append((f"variance in top {k} PCs, raw", lambda r, k=k: f"{100 * r['top_var_raw'][k]:.1f} %"))
        rows.append(
            (f"variance in top {k} PCs, standardized", lambda r, k=k: f"{100 * r['top_var_std'][k]:.1f} %")
        )
    rows += [
        ("effective rank, raw", lambda r: f"{r['eff_rank_raw']:.1f}"),
        ("effective rank, standardized", lambda r: f"{r['eff_rank_std']:.1f}"),
        ("class share of standardized variance", lambda r: f"{100 * r['class_share_std']:.1f} %"),
        ("class share within top 16 PCs", lambda r: f"{100 * r['class_share_top16']:.1f} %"),
        ("class share beyond 64 PCs", lambda r: f"{100 * r['class_share_rest64']:.1f} %"),
        ("variance beyond 64 PCs (standardized)", lambda r: f"{100 * r['var_share_rest64']:.1f} %"),
        ("median Fisher ratio, top 16 PCs", lambda r: f"{r['fisher_median_top16']:.3f}"),
        ("median Fisher ratio, PCs beyond 64", lambda r: f"{r['fisher_median_tail']:.4f}"),
    ]
    for k in ("std", "white16", "white64", "pca64_unwhitened"):
        rows.append(
            (f"ridge, 4 labels/class, test acc: {k}", lambda r, k=k: f"{100 * r['ridge_4pc_test'][k]:.1f}")
        )
    lines = [
        "# Geometry of cached teacher features (Fashion-MNIST, view 0)",
        "",
        f"Command: `{command}` (2-core CPU, seconds).",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {label} | " + " | ".join(fn(res[n]) for n in names) + " |" for label, fn in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_geometry.md").write_text("\n".join(lines) + "\n")
    (out / "feature_geometry.json").write_text(
        json.dumps({"command": command, "results": res}, indent=2) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", type=Path, nargs="+", required=True)
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    res = {n: measure(p, args.rows, args.seed) for n, p in zip(args.names, args.stores, strict=True)}
    command = (
        "python -m evidence.feature_geometry --stores "
        + " ".join(f"STORE_{n.upper()}" for n in args.names)
        + " --names "
        + " ".join(args.names)
    )
    write_md(res, command, args.out)
    print((args.out / "feature_geometry.md").read_text())


if __name__ == "__main__":
    main()
