"""Noise schedules under one time convention.

Continuous ``t`` in [0, 1]: ``t = 0`` is data, ``t = 1`` is pure noise (or the noisiest training step),
and ``x_t = alpha(t) * x0 + sigma(t) * eps``.  Every objective speaks through this module; nothing
else re-derives these formulas.

Prediction kinds understood by :meth:`NoiseSchedule.convert`:

* ``"x0"``       the clean sample,
* ``"eps"``      the noise,
* ``"v"``        ``alpha * eps - sigma * x0`` (Salimans & Ho 2022),
* ``"velocity"`` the flow velocity ``d x_t / d t = alpha' x0 + sigma' eps`` (rectified flow: ``eps - x0``).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

PREDICTIONS = ("x0", "eps", "v", "velocity")
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector ``(B,)`` (or scalar) to broadcast against ``like`` ``(B, ...)``."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Base class: subclasses define ``alpha``/``sigma`` and their t-derivatives on tensors of ``t``."""

    kind: str = "base"

    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- derived quantities -------------------------------------------------------------------
    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``."""
        a, s = self.alpha(t), self.sigma(t)
        return 2 * (torch.log(a.clamp_min(1e-20)) - torch.log(s.clamp_min(1e-20)))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` with ``t`` of shape ``(B,)``."""
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps

    def renoise(self, x_s: Tensor, s: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Forward-diffuse a sample at time ``s`` to a later time ``t >= s`` (``x_t | x_s``).

        ``x_t = (a_t / a_s) x_s + sqrt(s_t^2 - (a_t s_s / a_s)^2) eps``.
        """
        ratio, std = self.transition(s, t)
        return _bcast(ratio, x_s) * x_s + _bcast(std, x_s) * eps

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, beta)`` of ``x_t | x_s ~ N(r x_s, beta^2 I)`` for ``t >= s``: ``r = a_t / a_s``,
        ``beta^2 = s_t^2 - r^2 s_s^2``."""
        r = self.alpha(t) / self.alpha(s).clamp_min(1e-20)
        return r, (self.sigma(t) ** 2 - (r * self.sigma(s)) ** 2).clamp_min(0).sqrt()

    def renoise_weight(self, s: Tensor, t: Tensor) -> Tensor:
        """``(beta / s_t)^2``: the loss weight that keeps :meth:`renoise_targets`' variance bounded as ``t -> s``."""
        return (self.transition(s, t)[1] / self.sigma(t).clamp_min(1e-20)) ** 2

    def renoise_targets(self, x_t: Tensor, xi: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Unbiased (x0, eps) regression targets for ``x_t = renoise(x_s, s, t, xi)``, when x0 is unknown.

        ``x_t | x_s ~ N(r x_s, beta^2 I)`` with ``r = a_t / a_s``, ``beta^2 = s_t^2 - r^2 s_s^2``, so
        ``-xi / beta`` is an unbiased target for the score of ``p_t`` (denoising score matching from ``x_s``
        instead of ``x0``).  Tweedie, ``score = (a_t E[x0|x_t] - x_t) / s_t^2``, turns it into
        ``x0* = (x_t - (s_t^2 / beta) xi) / a_t`` and ``eps* = (s_t / beta) xi``; they satisfy
        ``x_t = a_t x0* + s_t eps*``, so ``target(kind, x0*, eps*, t)`` is unbiased for every prediction kind
        (v and flow velocity are linear in (x0, eps)).  With ``s = 0`` they are ``x0`` and ``xi`` exactly.
        The variance grows as ``beta / s_t -> 0`` (t -> s): weight the loss by ``(beta / s_t)^2``.
        """
        a_t, s_t = self.alpha(t), self.sigma(t)
        beta = self.transition(s, t)[1].clamp_min(1e-6)
        k = _bcast(s_t / beta, xi)
        eps = k * xi
        x0 = (x_t - _bcast(s_t, x_t) * eps) / _bcast(a_t, x_t).clamp_min(1e-20)
        return x0, eps

    def target(self, kind: str, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The regression target of prediction ``kind`` for ``x_t = add_noise(x0, eps, t)``."""
        a, s = _bcast(self.alpha(t), x0), _bcast(self.sigma(t), x0)
        if kind == "x0":
            return x0
        if kind == "eps":
            return eps
        if kind == "v":
            return a * eps - s * x0
        if kind == "velocity":
            return _bcast(self.d_alpha(t), x0) * x0 + _bcast(self.d_sigma(t), x0) * eps
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")

    def convert(self, pred: Tensor, kind_from: str, kind_to: str, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert a prediction between ``x0``, ``eps``, ``v`` and flow ``velocity`` given ``x_t`` and ``t``."""
        if kind_from == kind_to:
            return pred
        x0, eps = self._to_x0_eps(pred, kind_from, x_t, t)
        return self.target(kind_to, x0, eps, t)

    def _to_x0_eps(self, pred: Tensor, kind: str, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        if kind == "x0":
            x0 = pred
            eps = (x_t - a * x0) / s.clamp_min(1e-20)
        elif kind == "eps":
            eps = pred
            x0 = (x_t - s * eps) / a.clamp_min(1e-20)
        elif kind == "v":
            # x_t = a x0 + s eps, v = a eps - s x0  =>  x0 = (a x_t - s v)/(a^2+s^2), eps = (s x_t + a v)/(a^2+s^2)
            n = a**2 + s**2
            x0 = (a * x_t - s * pred) / n
            eps = (s * x_t + a * pred) / n
        elif kind == "velocity":
            # [x_t; u] = [[a, s], [a', s']] [x0; eps]
            da, ds = _bcast(self.d_alpha(t), x_t), _bcast(self.d_sigma(t), x_t)
            det = a * ds - s * da
            x0 = (ds * x_t - s * pred) / det
            eps = (a * pred - da * x_t) / det
        else:
            raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")
        return x0, eps

    def to_x0(self, pred: Tensor, kind: str, x_t: Tensor, t: Tensor) -> Tensor:
        """``_to_x0_eps(...)[0]``, without computing the eps it does not need (every network call converts)."""
        if kind == "x0":
            return pred
        if kind in ("eps", "v"):
            a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
            if kind == "eps":
                return (x_t - s * pred) / a.clamp_min(1e-20)
            return (a * x_t - s * pred) / (a**2 + s**2)
        return self._to_x0_eps(pred, kind, x_t, t)[0]

    def ddim_step(self, x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """Deterministic DDIM/Euler move from ``t`` to ``s`` given the x0-prediction at ``t``."""
        a_t, s_t = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        eps = (x_t - a_t * x0) / s_t.clamp_min(1e-20)
        return self.add_noise(x0, eps, s)

    def ddim_x0(self, x_t: Tensor, x_s: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """The x0-prediction at ``(x_t, t)`` whose :meth:`ddim_step` lands on ``x_s`` at ``s < t``: the inverse of the
        DDIM move, ``x_s = (a_s - s_s a_t / s_t) x0 + (s_s / s_t) x_t`` solved for x0 (``s = 0``: ``x_s`` itself)."""
        a_t, s_t = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t).clamp_min(1e-20)
        a_s, s_s = _bcast(self.alpha(s), x_t), _bcast(self.sigma(s), x_t)
        return (x_s - (s_s / s_t) * x_t) / (a_s - s_s * a_t / s_t)

    # discrete-timestep mapping: identity unless the schedule is discrete
    def t_to_timestep(self, t: Tensor) -> Tensor:
        return t

    def timestep_to_t(self, timestep: Tensor) -> Tensor:
        return timestep

    def describe(self) -> dict:
        return {"kind": self.kind}


class VPCosine(NoiseSchedule):
    """Continuous variance-preserving cosine schedule ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``."""

    kind = "vp"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * torch.as_tensor(t))

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * torch.as_tensor(t))

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * torch.as_tensor(t))

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * torch.as_tensor(t))


class RectifiedFlow(NoiseSchedule):
    """Rectified flow / flow matching: ``alpha = 1 - t``, ``sigma = t``, velocity ``eps - x0``.

    ``shift`` > 1 is handled by the teacher adapters (diffusers' shifted sigmas): fewstep's ``t`` *is*
    the flow sigma, so a shifted sampler simply picks a different grid of ``t``.
    """

    kind = "flow"

    def alpha(self, t):
        return 1 - torch.as_tensor(t)

    def sigma(self, t):
        return torch.as_tensor(t) * 1.0

    def d_alpha(self, t):
        t = torch.as_tensor(t)
        return -torch.ones_like(t if t.is_floating_point() else t.float())

    def d_sigma(self, t):
        t = torch.as_tensor(t)
        return torch.ones_like(t if t.is_floating_point() else t.float())

    def t_to_timestep(self, t):
        return torch.as_tensor(t) * 1000.0  # diffusers' flow transformers take sigma * 1000

    def timestep_to_t(self, timestep):
        return torch.as_tensor(timestep) / 1000.0


class VPDiscrete(NoiseSchedule):
    """Variance-preserving schedule of a discrete DDPM teacher (``alphas_cumprod`` of N steps).

    Timestep ``k`` in ``0..N-1`` sits at ``t = (k + 1) / N``; ``t = 0`` is data (``alpha_bar = 1``).
    In between, ``log alpha_bar`` is interpolated linearly in the continuous timestep.  So the
    DMD2/LCM grid 999/749/499/249 of a 1000-step teacher is ``t = 1, 0.75, 0.5, 0.25``.
    """

    kind = "vp_discrete"

    def __init__(self, alphas_cumprod: Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2 or not torch.all((ac >= 0) & (ac <= 1)) or not torch.all(ac[:-1] > 0):
            raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1] (only the last may be 0)")
        # zero terminal SNR (rescale_betas_zero_snr): alpha_bar = 0 at the last timestep; keep a tiny value there,
        # as diffusers' Euler scheduler does, so that log alpha_bar stays finite (alpha(1) = 2^-12, sigma(1) = 1)
        if ac[-1] == 0:
            ac = ac.clone()
            ac[-1] = 2.0 ** -24
        self.num_train_timesteps = len(ac)
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), ac.log()])  # index 0 <-> timestep -1

    @classmethod
    def from_scheduler_config(cls, config: Mapping) -> "VPDiscrete":
        """Build from a diffusers scheduler config (``beta_schedule``, ``beta_start``, ``beta_end`` ...)."""
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        kw = {k: config[k] for k in keys if k in config and config[k] is not None}
        sched = DDPMScheduler(**kw)
        return cls(sched.alphas_cumprod)

    def _interp(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        pos = (t.to(torch.float64) * self.num_train_timesteps).clamp(0, self.num_train_timesteps)
        lo = pos.floor().long().clamp(max=self.num_train_timesteps - 1)
        frac = pos - lo
        table = self._log_ab.to(pos.device)
        log_ab = table[lo] * (1 - frac) + table[lo + 1] * frac
        return log_ab

    def _dlog_ab(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        pos = (t.to(torch.float64) * self.num_train_timesteps).clamp(0, self.num_train_timesteps)
        lo = pos.floor().long().clamp(max=self.num_train_timesteps - 1)
        table = self._log_ab.to(pos.device)
        return (table[lo + 1] - table[lo]) * self.num_train_timesteps

    def alpha(self, t):
        t = torch.as_tensor(t)
        return (0.5 * self._interp(t)).exp().to(t.dtype if t.is_floating_point() else torch.float32)

    def sigma(self, t):
        t = torch.as_tensor(t)
        ab = self._interp(t).exp()
        return (1 - ab).clamp_min(0).sqrt().to(t.dtype if t.is_floating_point() else torch.float32)

    def d_alpha(self, t):
        t = torch.as_tensor(t)
        return (0.5 * self._dlog_ab(t) * (0.5 * self._interp(t)).exp()).to(t.dtype)

    def d_sigma(self, t):
        t = torch.as_tensor(t)
        ab = self._interp(t).exp()
        s = (1 - ab).clamp_min(1e-30).sqrt()
        return (-0.5 * self._dlog_ab(t) * ab / s).to(t.dtype)

    def t_to_timestep(self, t):
        return torch.as_tensor(t) * self.num_train_timesteps - 1

    def timestep_to_t(self, timestep):
        return (torch.as_tensor(timestep) + 1) / self.num_train_timesteps

    def describe(self):
        return {"kind": self.kind, "num_train_timesteps": self.num_train_timesteps}


def diffusers_prediction(prediction_type: str) -> str:
    """Map a diffusers ``prediction_type`` to fewstep's name."""
    try:
        return _DIFFUSERS_PREDICTION[prediction_type]
    except KeyError:
        raise ValueError(
            f"unsupported prediction_type {prediction_type!r}; expected one of {sorted(_DIFFUSERS_PREDICTION)}"
        ) from None


def student_times(steps: int, schedule: NoiseSchedule) -> list[float]:
    """The fixed few-step grid of a ``steps``-step student, noisiest first.

    Continuous schedules: ``t_k = 1 - k / steps``.  A discrete N-step VP teacher uses LCMScheduler's grid
    with ``original_inference_steps=steps`` (timesteps ``c*i - 1``, ``c = N // steps``; 999/749/499/249
    for 4 steps of 1000), which is what lets the export use a stock scheduler with no extra argument.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = getattr(schedule, "num_train_timesteps", None)
    if n:
        c = n // steps
        return [c * i / n for i in range(steps, 0, -1)]
    return [1.0 - k / steps for k in range(steps)]


def make_schedule(name: str) -> NoiseSchedule:
    """Continuous schedules by name (for analytic teachers): ``vp`` (cosine) or ``flow``."""
    if name == "vp":
        return VPCosine()
    if name == "flow":
        return RectifiedFlow()
    raise ValueError(f"unknown schedule {name!r}; expected 'vp' or 'flow'")
