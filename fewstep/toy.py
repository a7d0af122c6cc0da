"""Known-answer metrics for low-dimensional (Gaussian-mixture) problems, and their scatter plots."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def energy_distance(x: Tensor, y: Tensor, max_n: int = 5000) -> float:
    """Energy distance ``2 E|x-y| - E|x-x'| - E|y-y'|`` (Szekely & Rizzo), V-statistic form.

    Always >= 0; for two independent samples of one law it is ~``E|x-x'| / n`` (the sampling floor), so
    compare values computed with the same ``n``.
    """
    x, y = x[:max_n].double(), y[:max_n].double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_stats(x: Tensor, mixture, radius_stds: float = 3.0, min_frac: float = 0.1) -> dict:
    """Modes covered (>= ``min_frac`` of their expected share within ``radius_stds`` std) and the in-mode fraction."""
    means, stds, w = mixture.means.to(x), mixture.stds.to(x), mixture.weights.to(x)
    d = torch.cdist(x.to(means.dtype), means)  # (N, K)
    near = d.argmin(1)
    inside = d.gather(1, near[:, None])[:, 0] <= radius_stds * stds[near]
    counts = torch.bincount(near[inside], minlength=len(means)).to(x.dtype)
    expected = w * len(x)
    covered = int((counts >= min_frac * expected).sum())
    return {"modes_covered": covered, "num_modes": len(means), "in_mode_frac": float(inside.float().mean()),
            "spread": spread_ratio(x, mixture)}


def spread_ratio(x: Tensor, mixture, min_count: int = 20) -> float:
    """Within-mode spread of samples relative to the truth: 1.0 = right, < 1 = collapsed, > 1 = too wide.

    Each sample goes to its most probable component under the true mixture; per component the ratio is
    ``sqrt(mean squared distance to the mean / D) / std``.  Components with fewer than ``min_count``
    samples are skipped; the result is the weight-averaged ratio of the rest (NaN if none).
    """
    means, stds, w = mixture.means.double(), mixture.stds.double(), mixture.weights.double()
    x = x.double().cpu()
    d2 = torch.cdist(x, means) ** 2  # (N, K)
    dim = means.shape[1]
    logp = -0.5 * d2 / stds**2 - dim * stds.log() + w.log()
    k = logp.argmax(1)
    num = den = 0.0
    for j in range(len(means)):
        sel = d2[k == j, j]
        if len(sel) < min_count:
            continue
        ratio = float((sel.mean() / dim).sqrt() / stds[j])
        num += float(w[j]) * ratio
        den += float(w[j])
    return num / den if den else float("nan")


def scatter_panels(panels: dict, path: str, title: Optional[str] = None, lim: Optional[float] = None) -> str:
    """Side-by-side scatter plots (name -> (N, 2) or (N, 1) samples) written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    if lim is None:
        allx = torch.cat([torch.as_tensor(v).float() for v in panels.values()])
        lim = float(allx.abs().quantile(0.995)) * 1.15
    for ax, (name, pts) in zip(axes[0], panels.items()):
        pts = torch.as_tensor(pts).float().cpu()
        if pts.shape[1] == 1:
            ax.hist(pts[:, 0].numpy(), bins=120, range=(-lim, lim), color="C0")
            ax.set_xlim(-lim, lim)
        else:
            ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.5)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
