"""Fréchet distance (FID) between an image set and a reference folder or saved statistics.

Features come from one :class:`~fewstep.eval.features.FeatureExtractor` (the standard Inception by
default, or a local network).  The distance between the two Gaussians ``(mu, sigma)`` is computed by
clean-fid (``cleanfid.fid.frechet_distance``, scipy ``sqrtm``) or by torchmetrics
(``FrechetInceptionDistance`` fed the same features, float64 running sums, eigenvalue trace); both give
``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017).

Reference statistics are saved as ``.npz`` (``mu``, ``sigma``, ``num_images``, ``feature_extractor``;
clean-fid's own ``.npz`` files, which hold only ``mu`` and ``sigma``, load too) and refused when they
were made with a different feature network.  They may also hold the reference's ``features`` (float32),
which precision / recall / density / coverage (:mod:`fewstep.eval.diversity`) need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..data import DataError, list_images, load_images_uint8
from .features import FeatureExtractor

BACKENDS = ("clean-fid", "torchmetrics")


@dataclass
class FeatureStats:
    """Mean and covariance of features of ``num_images`` images (``feature_extractor`` names the network)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D), unbiased (N - 1) covariance
    num_images: int
    feature_extractor: str = ""  # "" = unknown (e.g. a clean-fid statistics file)

    @classmethod
    def from_features(cls, feats: np.ndarray, feature_extractor: str = "") -> "FeatureStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise DataError(f"FID needs at least 2 images, got {len(feats)}")
        return cls(feats.mean(0), np.cov(feats, rowvar=False), len(feats), feature_extractor)

    def save(self, path, features: Optional[np.ndarray] = None) -> Path:
        """Write ``.npz`` statistics; ``features`` ``(N, D)`` are stored too (float32) when given."""
        p = Path(path)
        if p.suffix != ".npz":
            raise DataError(f"statistics files end in .npz, got {path}")
        p.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if features is None else {"features": np.asarray(features, dtype=np.float32)}
        np.savez(p, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images),
                 feature_extractor=np.str_(self.feature_extractor), **extra)
        return p

    @classmethod
    def load(cls, path) -> "FeatureStats":
        p = Path(path)
        if not p.is_file():
            raise DataError(f"statistics file not found: {path}")
        try:
            with np.load(p, allow_pickle=False) as d:
                mu, sigma = np.asarray(d["mu"], np.float64), np.asarray(d["sigma"], np.float64)
                n = int(d["num_images"]) if "num_images" in d else 0
                name = str(d["feature_extractor"]) if "feature_extractor" in d else ""
        except KeyError:
            raise DataError(f"statistics file {path} needs arrays 'mu' and 'sigma'") from None
        except Exception as e:
            raise DataError(f"cannot read statistics file {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise DataError(f"statistics file {path}: mu {mu.shape} and sigma {sigma.shape} do not match")
        return cls(mu, sigma, n, name)

    def check_compatible(self, extractor_name: str, what: str) -> None:
        if self.feature_extractor and extractor_name and self.feature_extractor != extractor_name:
            raise DataError(f"{what} were computed with feature network '{self.feature_extractor}', not "
                            f"'{extractor_name}'; recompute them or pass the same --feature-extractor")


from .diversity import load_stats_features  # noqa: E402,F401  (lives with the features it reads)


# ---- the distance --------------------------------------------------------------------------------
class _Identity(nn.Module):
    """Feature "network" for torchmetrics that returns its input: the features are computed once, by fewstep."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _torchmetrics_fid(a: Union[np.ndarray, FeatureStats], b: Union[np.ndarray, FeatureStats]) -> float:
    """torchmetrics' FrechetInceptionDistance on precomputed features (rows) or statistics (state filled in)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    dim = (a.mu if isinstance(a, FeatureStats) else a).shape[-1]
    metric = FrechetInceptionDistance(feature=_Identity(dim), reset_real_features=False)
    for x, real in ((a, False), (b, True)):
        if isinstance(x, FeatureStats):
            n = x.num_images
            if n < 2:
                raise DataError("statistics without num_images cannot be used by the torchmetrics backend; "
                                "use --backend clean-fid")
            prefix = "real" if real else "fake"
            mu = torch.from_numpy(x.mu).double()
            setattr(metric, f"{prefix}_features_sum", mu * n)
            setattr(metric, f"{prefix}_features_cov_sum", torch.from_numpy(x.sigma).double() * (n - 1) + n * torch.outer(mu, mu))
            setattr(metric, f"{prefix}_features_num_samples", torch.tensor(n, dtype=torch.long))
        else:
            feats = torch.from_numpy(np.asarray(x, dtype=np.float64))
            for i in range(0, len(feats), 4096):
                metric.update(feats[i:i + 4096], real=real)
    metric.orig_dtype = torch.float64
    return float(metric.compute())


def frechet_distance(a: Union[np.ndarray, FeatureStats], b: Union[np.ndarray, FeatureStats],
                     backend: str = "clean-fid") -> float:
    """FID between two feature sets (``(N, D)`` arrays) or their statistics."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown FID backend {backend!r}; choose {' or '.join(BACKENDS)}")
    da = (a.mu if isinstance(a, FeatureStats) else np.asarray(a)).shape[-1]
    db = (b.mu if isinstance(b, FeatureStats) else np.asarray(b)).shape[-1]
    if da != db:
        raise DataError(f"feature dimensions differ ({da} vs {db}): the two sets were made with different networks")
    if backend == "torchmetrics":
        return _torchmetrics_fid(a, b)
    from cleanfid.fid import frechet_distance as cleanfid_fd

    sa = a if isinstance(a, FeatureStats) else FeatureStats.from_features(a)
    sb = b if isinstance(b, FeatureStats) else FeatureStats.from_features(b)
    return float(cleanfid_fd(sa.mu, sa.sigma, sb.mu, sb.sigma))


# ---- images -> features --------------------------------------------------------------------------
def folder_batches(folder: str, batch_size: int = 64, limit: Optional[int] = None,
                   resize: Optional[int] = None) -> tuple[int, Iterator[Tensor]]:
    """``(count, iterator of uint8 batches)`` over the images of ``folder`` (sorted; first ``limit``)."""
    files = list_images(folder)
    if limit is not None:
        if limit < 1:
            raise DataError(f"--num-images must be >= 1, got {limit}")
        files = files[:limit]

    def it():
        for i in range(0, len(files), batch_size):
            yield load_images_uint8(files[i:i + batch_size], resize)

    return len(files), it()


def features_of(images, extractor: FeatureExtractor, batch_size: int = 64, limit: Optional[int] = None,
                resize: Optional[int] = None, progress: bool = True, desc: str = "features") -> np.ndarray:
    """Features of a uint8 tensor ``(N, 3, H, W)`` or of an image folder."""
    from tqdm.auto import tqdm

    if isinstance(images, Tensor):
        images = images[:limit] if limit else images
        n, batches = len(images), (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        n, batches = folder_batches(str(images), batch_size, limit, resize)
    out = []
    with tqdm(total=n, desc=desc, unit="img", disable=None if progress else True, leave=False) as bar:
        for b in batches:
            out.append(extractor(b))
            bar.update(len(b))
    return np.concatenate(out) if out else np.zeros((0, 0))


def reference(ref: str, extractor: FeatureExtractor, batch_size: int = 64, resize: Optional[int] = None,
              save_stats: Optional[str] = None, progress: bool = True, save_features: bool = False):
    """``(features or None, stats)`` of ``ref``: a folder of images or a ``.npz`` statistics file.

    ``save_features``: also store the features in ``save_stats`` (for precision / recall / density / coverage).
    """
    if not ref:
        raise DataError("--ref is required: a folder of reference images or a .npz statistics file")
    p = Path(ref)
    if p.suffix == ".npz":
        stats = FeatureStats.load(p)
        stats.check_compatible(extractor.name, f"reference statistics {ref}")
        return None, stats
    if not p.exists():
        raise DataError(f"reference not found: {ref} (expected a folder of images or a .npz statistics file)")
    if p.is_file():
        raise DataError(f"reference {ref} is neither a folder of images nor a .npz statistics file")
    feats = features_of(str(p), extractor, batch_size, resize=resize, progress=progress, desc="reference features")
    stats = FeatureStats.from_features(feats, extractor.name)
    if save_stats:
        stats.save(save_stats, feats if save_features else None)
    return feats, stats


def fid(images, ref, extractor: FeatureExtractor, backend: str = "clean-fid", batch_size: int = 64,
        limit: Optional[int] = None, ref_resize: Optional[int] = None, save_ref_stats: Optional[str] = None,
        save_stats: Optional[str] = None, progress: bool = True, ref_cache: Optional[dict] = None,
        diversity: Optional[dict] = None) -> dict:
    """FID of ``images`` (uint8 tensor or folder) against ``ref`` (folder or ``.npz``); a JSON-ready dict.

    ``ref_cache``: a dict reused across calls so a reference folder is featurised once.
    ``diversity``: also precision, recall, density and coverage in the same features, with these keyword
    arguments of :func:`fewstep.eval.diversity.diversity_vs_reference` (``{}`` for the defaults: k = 3 and 5).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown FID backend {backend!r}; choose {' or '.join(BACKENDS)}")
    key = (str(ref), extractor.name, ref_resize)
    if ref_cache is not None and key in ref_cache:
        ref_feats, ref_stats = ref_cache[key]
    else:
        ref_feats, ref_stats = reference(str(ref), extractor, batch_size, ref_resize, save_ref_stats, progress,
                                         save_features=diversity is not None)
        if ref_cache is not None:
            ref_cache[key] = (ref_feats, ref_stats)
    feats = features_of(images, extractor, batch_size, limit, progress=progress, desc="image features")
    stats = FeatureStats.from_features(feats, extractor.name)
    if save_stats:
        stats.save(save_stats)
    value = frechet_distance(feats, ref_feats if ref_feats is not None else ref_stats, backend)
    out = {"fid": value, "num_images": int(len(feats)), "num_ref_images": int(ref_stats.num_images),
           "ref": str(ref), "feature_extractor": extractor.name, "feature_dim": int(feats.shape[1]), "backend": backend}
    if len(feats) <= feats.shape[1]:
        out["note"] = (f"only {len(feats)} images for {feats.shape[1]}-d features: the covariance is singular and "
                       "FID is strongly biased; use more images")
    if diversity is not None:
        from .diversity import diversity_vs_reference, reference_features

        fkey = (*key, "features")
        if ref_cache is not None and fkey in ref_cache:
            real = ref_cache[fkey]
        else:
            real = reference_features(str(ref), ref_feats)
            if ref_cache is not None:
                ref_cache[fkey] = real
        out.update(diversity_vs_reference(feats, real, **diversity))
    return out


def write_json(result: dict, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2, default=str))
    return p
