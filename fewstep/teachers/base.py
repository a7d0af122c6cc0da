"""The one model contract: ``denoiser(x_t, t, cond, guidance_scale=None) -> x0_hat``.

A :class:`Denoiser` wraps a network that makes a *native* prediction (``eps``, ``v``, ``x0`` or flow
``velocity``) and converts it to ``x0`` through the shared :class:`~fewstep.schedules.NoiseSchedule`.
Classifier-free guidance is applied here, once, in the native space, in diffusers' (Ho) form
``uncond + s * (cond - uncond)`` (``s = 1`` or ``None``: no guidance).

Teachers, students and critics are all Denoisers of the same family (students and critics are
trainable copies of the teacher's network), so every objective calls them the same way.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import Condition
from ..schedules import NoiseSchedule, _bcast


class TeacherLoadError(ValueError):
    """One-line, user-facing problem loading a teacher."""


class Denoiser(nn.Module):
    """``forward(x_t, t, cond, guidance_scale=None) -> x0`` around a native-prediction network."""

    feature_module: Optional[str] = None  # dotted name of the bottleneck module (GAN-head features)

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str):
        super().__init__()
        self.net = net  # the trainable/frozen network (a diffusers model, or an MLP)
        self.schedule = schedule
        self.prediction = prediction

    # subclasses implement the family-specific call
    def net_call(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def native(self, x_t: Tensor, t: Tensor, cond: Condition, guidance_scale: Optional[float] = None) -> Tensor:
        """Native prediction, with CFG (one batched forward over [cond, null]) when ``guidance_scale != 1``."""
        t = _as_batch(t, x_t)
        if guidance_scale is None or guidance_scale == 1.0:
            return self.net_call(x_t, t, cond)
        both = self.net_call(torch.cat([x_t, x_t]), torch.cat([t, t]), Condition.cat([cond, cond.null()]))
        pc, pu = both.chunk(2)
        return pu + guidance_scale * (pc - pu)

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition, guidance_scale: Optional[float] = None,
                return_native: bool = False, return_features: bool = False):
        """x0-prediction (float32 conversion); optionally also the native prediction and bottleneck features."""
        t = _as_batch(t, x_t)
        feats: list[Tensor] = []
        handle = None
        if return_features:
            if self.feature_module is None:
                raise ValueError(f"{type(self).__name__} exposes no bottleneck features for a GAN head")
            mod = self.net.get_submodule(self.feature_module)
            handle = mod.register_forward_hook(lambda m, i, o: feats.append(o[0] if isinstance(o, tuple) else o))
        try:
            pred = self.native(x_t, t, cond, guidance_scale)
        finally:
            if handle is not None:
                handle.remove()
        x0 = self.schedule.to_x0(pred.float(), self.prediction, x_t.float(), t.float()).to(x_t.dtype)
        out = [x0]
        if return_native:
            out.append(pred)
        if return_features:
            out.append(feats[-1])
        return out[0] if len(out) == 1 else tuple(out)

    def trainable_copy(self) -> "Denoiser":
        """A float32 deep copy whose parameters require grad (a student or critic initialised from this)."""
        new = copy.deepcopy(self)
        new.net.float()  # float32 master weights; mixed precision is the trainer's autocast
        new.net.requires_grad_(True)
        new.net.train()
        return new


def _as_batch(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


@contextmanager
def frozen(*modules: nn.Module):
    """Temporarily set ``requires_grad=False`` on the given modules' parameters."""
    saved = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, flags in zip(modules, saved):
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)


class Teacher:
    """A frozen denoiser plus what the trainer needs to use it.

    Attributes: ``denoiser`` (frozen), ``schedule``, ``sample_shape`` (per-sample tensor shape),
    ``guidance_scale`` (default CFG scale, diffusers form), ``family`` (``gmm``, ``sd15``, ``sdxl``,
    ``ddpm``), ``feature_channels`` (width of the bottleneck features, for a GAN head).
    """

    family: str = "base"
    sample_shape: tuple = ()
    feature_channels: int = 0

    def __init__(self, denoiser: Denoiser, guidance_scale: float = 1.0):
        self.denoiser = denoiser
        self.denoiser.requires_grad_(False)
        self.denoiser.eval()
        self.schedule = denoiser.schedule
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x_t, t, cond, guidance_scale=None, **kw):
        return self.denoiser(x_t, t, cond, guidance_scale=guidance_scale, **kw)

    def to(self, device, dtype=None):
        self.denoiser.to(device=device, dtype=dtype)
        return self

    @property
    def device(self):
        return next(iter(self.denoiser.parameters()), torch.empty(0)).device

    # ---- what objectives and the trainer need ---------------------------------------------------
    def new_network(self, role: str) -> Denoiser:
        """A trainable denoiser initialised from the teacher (``role``: student, critic, ...)."""
        return self.denoiser.trainable_copy()

    def sample_conditions(self, n: int, generator: torch.Generator, data=None) -> Condition:
        """Training conditions for ``n`` samples (prompts from ``data``, random classes, or empty)."""
        raise NotImplementedError

    def noise(self, n: int, generator: torch.Generator, device="cpu") -> Tensor:
        return torch.randn((n, *self.sample_shape), generator=generator).to(device)

    def real_samples(self, n: int, generator: torch.Generator, data=None):
        """Real (clean) samples and their conditions, for GAN or consistency terms; ``None`` if unavailable."""
        return None

    def to_images(self, x0: Tensor) -> Optional[Tensor]:
        """Decode clean samples to images in [0, 1] (B, 3, H, W) for grids; ``None`` for non-image data."""
        return None

    def describe(self) -> dict:
        return {"family": self.family, "sample_shape": list(self.sample_shape),
                "guidance_scale": self.guidance_scale, "schedule": self.schedule.describe()}
