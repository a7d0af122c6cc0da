"""Fidelity and diversity of a generated set in a feature space: precision / recall and density / coverage.

FID folds quality and variety into one number; these four separate them.  Both pairs estimate each
distribution's support by k-nearest-neighbour balls: around every sample ``x`` of a set, the ball whose
radius ``NND_k(x)`` is the distance to the k-th nearest *other* sample of the same set.

* **Improved precision / recall** (Kynkäänniemi et al. 2019, k = 3): precision is the fraction of
  generated samples inside the union of the real samples' balls (fidelity); recall the fraction of real
  samples inside the union of the generated samples' balls (diversity: a generator collapsed onto a few
  modes leaves the other modes' real samples outside).  Closed balls (``<=``), as in the authors' code.
* **Density / coverage** (Naeem et al. 2020, k = 5): only real balls are used, which makes both robust to
  outlying generated samples.  Density ``= 1/(k M) sum_j #{i : fake_j in B(real_i)}`` (about 1 when the
  two distributions match, > 1 when samples crowd the real modes); coverage is the fraction of real
  samples whose ball holds at least one generated sample.  Open balls (``<``), as in the authors' code.

Everything is computed with ``torch.cdist`` in row chunks (float64 by default), so memory stays at
``chunk x max(N, M)`` distances; one pass over the real-vs-generated distances gives all four numbers.
Use comparable set sizes (Naeem et al. use 10k vs 10k): the values depend on N, M and k.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

DEFAULT_K_PR = 3  # Kynkäänniemi et al. 2019
DEFAULT_K_DC = 5  # Naeem et al. 2020
DIVERSITY_KEYS = ("precision", "recall", "density", "coverage")

Array = Union[np.ndarray, Tensor]


def _as_tensor(x: Array, name: str, device, dtype) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} features must be a 2-d array (num_samples, dim), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} features contain NaN or inf")
    return t.to(device=device, dtype=dtype)


def _chunk_rows(num_cols: int, budget: int = 2 ** 24) -> int:
    """Rows per distance chunk so that one chunk holds at most ``budget`` distances."""
    return max(1, budget // max(num_cols, 1))


def _check_k(k: int, n: int, what: str, set_name: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{what}: k must be a positive integer, got {k!r}")
    if k >= n:
        raise ValueError(f"{what}: k={k} needs more than k {set_name} samples, got {n}")


def knn_radii(x: Tensor, k: int, chunk: Optional[int] = None) -> Tensor:
    """``(N,)`` distance from each row of ``x`` ``(N, D)`` to its k-th nearest other row (``k < N``)."""
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"knn_radii: k={k} needs 1 <= k < N={n}")
    chunk = chunk or _chunk_rows(n)
    out = []
    for i in range(0, n, chunk):
        d = torch.cdist(x[i:i + chunk], x)  # (c, N); the row's own zero distance is among the k + 1 smallest
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


@torch.no_grad()
def prdc(real: Array, fake: Array, k_pr: int = DEFAULT_K_PR, k_dc: int = DEFAULT_K_DC,
         device=None, dtype=torch.float64, chunk: Optional[int] = None) -> dict:
    """Precision, recall (k = ``k_pr``), density and coverage (k = ``k_dc``) of ``fake`` ``(M, D)`` against
    ``real`` ``(N, D)`` features; a JSON-ready dict.  ``k_pr`` or ``k_dc`` = 0 skips that pair."""
    real_t = _as_tensor(real, "real", device or "cpu", dtype)
    fake_t = _as_tensor(fake, "generated", device or "cpu", dtype)
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"feature dimensions differ (real {real_t.shape[1]} vs generated {fake_t.shape[1]}): "
                         "the two sets were made with different networks")
    n, m = len(real_t), len(fake_t)
    if k_pr:
        _check_k(k_pr, n, "precision/recall", "real")
        _check_k(k_pr, m, "precision/recall", "generated")
    if k_dc:
        _check_k(k_dc, n, "density/coverage", "real")
    if not k_pr and not k_dc:
        raise ValueError("prdc: both k_pr and k_dc are 0, nothing to compute")
    k_max = max(k_pr, k_dc)
    # real radii for both k at once: one top-k pass over the real-vs-real distances
    rows = chunk or _chunk_rows(n)
    r_pr, r_dc = [], []
    for i in range(0, n, rows):
        top = torch.cdist(real_t[i:i + rows], real_t).topk(k_max + 1, dim=1, largest=False).values
        r_pr.append(top[:, k_pr] if k_pr else top[:, 0])
        r_dc.append(top[:, k_dc] if k_dc else top[:, 0])
    r_pr, r_dc = torch.cat(r_pr), torch.cat(r_dc)
    f_pr = knn_radii(fake_t, k_pr, chunk) if k_pr else None
    fake_in_real = torch.zeros(m, dtype=torch.bool, device=real_t.device)  # precision
    real_in_fake = torch.zeros(n, dtype=torch.bool, device=real_t.device)  # recall
    balls_per_fake = torch.zeros(m, dtype=dtype, device=real_t.device)  # density
    covered = torch.zeros(n, dtype=torch.bool, device=real_t.device)  # coverage
    rows = chunk or _chunk_rows(m)
    for i in range(0, n, rows):
        d = torch.cdist(real_t[i:i + rows], fake_t)  # (c, M)
        if k_pr:
            fake_in_real |= (d <= r_pr[i:i + rows, None]).any(0)
            real_in_fake[i:i + rows] = (d <= f_pr[None, :]).any(1)
        if k_dc:
            inside = d < r_dc[i:i + rows, None]
            balls_per_fake += inside.sum(0).to(dtype)
            covered[i:i + rows] = inside.any(1)
    out = {}
    if k_pr:
        out.update(precision=float(fake_in_real.double().mean()), recall=float(real_in_fake.double().mean()),
                   k_pr=int(k_pr))
    if k_dc:
        out.update(density=float(balls_per_fake.sum() / (k_dc * m)), coverage=float(covered.double().mean()),
                   k_dc=int(k_dc))
    out.update(num_real=n, num_fake=m)
    return out


def precision_recall(real: Array, fake: Array, k: int = DEFAULT_K_PR, **kw) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real`` features."""
    r = prdc(real, fake, k_pr=k, k_dc=0, **kw)
    return r["precision"], r["recall"]


def density_coverage(real: Array, fake: Array, k: int = DEFAULT_K_DC, **kw) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) of ``fake`` against ``real`` features."""
    r = prdc(real, fake, k_pr=0, k_dc=k, **kw)
    return r["density"], r["coverage"]


def subsample(feats: np.ndarray, limit: Optional[int], seed: int = 0) -> np.ndarray:
    """At most ``limit`` rows of ``feats``: a seeded random subset (sorted order kept), all when ``limit`` is None."""
    if limit is None or len(feats) <= limit:
        return feats
    idx = np.sort(np.random.default_rng(seed).choice(len(feats), size=limit, replace=False))
    return feats[idx]


# ---- against an FID reference ---------------------------------------------------------------------
DEFAULT_MAX_REF = 10000  # reference features used (a seeded random subset of larger references)


def reference_features(ref: str, ref_feats: Optional[np.ndarray] = None) -> np.ndarray:
    """The reference's features: those of a reference folder, or the ``features`` array of a ``.npz``
    statistics file (written by ``fewstep eval fid --diversity --save-ref-stats``)."""
    from ..data import DataError

    if ref_feats is not None:
        return ref_feats
    feats = load_stats_features(ref)
    if feats is None:
        raise DataError(f"reference statistics {ref} hold no features: precision/recall/density/coverage need "
                        "the reference's features; pass the image folder as --ref, or write the statistics with "
                        "--diversity --save-ref-stats FILE.npz")
    return feats


def diversity_vs_reference(feats: np.ndarray, ref_feats: np.ndarray, k_pr: int = DEFAULT_K_PR,
                           k_dc: int = DEFAULT_K_DC, max_ref: Optional[int] = DEFAULT_MAX_REF, seed: int = 0,
                           device=None) -> dict:
    """:func:`prdc` of generated features against (at most ``max_ref`` of) the reference features."""
    r = prdc(subsample(np.asarray(ref_feats), max_ref, seed), feats, k_pr=k_pr, k_dc=k_dc, device=device)
    return {k: r[k] for k in DIVERSITY_KEYS if k in r} | {
        "diversity": {"k_pr": k_pr, "k_dc": k_dc, "num_ref": r["num_real"], "num_images": r["num_fake"],
                      "method": "precision/recall: Kynkaanniemi et al. 2019; density/coverage: Naeem et al. 2020"}}


def load_stats_features(path) -> Optional[np.ndarray]:
    """The ``features`` array of a ``.npz`` statistics file (float64), or None when it holds none."""
    from pathlib import Path
    try:
        with np.load(Path(path), allow_pickle=False) as d:
            return np.asarray(d["features"], np.float64) if "features" in d else None
    except Exception as e:
        from ..data import DataError

        raise DataError(f"cannot read statistics file {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
