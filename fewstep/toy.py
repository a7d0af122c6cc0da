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
    return {"modes_covered": covered, "num_modes": len(means), "in_mode_frac": float(inside.float().mean())}


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
