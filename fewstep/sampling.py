"""Samplers sharing one signature: ``sampler(denoiser, noise, cond, ...) -> x0``.

``denoiser(x_t, t, cond, guidance_scale=None) -> x0`` is any fewstep denoiser (teacher, student, critic).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .conditions import Condition


@torch.no_grad()
def ode_sample(denoiser, noise: Tensor, cond: Condition, steps: int, guidance_scale: Optional[float] = None,
               t_max: float = 1.0, return_path: bool = False):
    """Deterministic DDIM (first-order probability-flow ODE) from ``t_max`` to 0 in ``steps`` uniform steps.

    Song et al. 2021 (DDIM, eta = 0): ``x_s = a_s x0_hat + s_s (x_t - a_t x0_hat) / s_t``.
    ``return_path`` also returns the states at every grid time (a list, noisiest first) and the grid.
    """
    sched = denoiser.schedule
    ts = torch.linspace(t_max, 0.0, steps + 1).tolist()
    x = noise
    path = [x]
    x0 = x
    for i in range(steps):
        t = torch.full((x.shape[0],), ts[i], device=x.device)
        x0 = denoiser(x, t, cond, guidance_scale=guidance_scale)
        x = x0 if ts[i + 1] == 0.0 else sched.ddim_step(x0, x, t, torch.full_like(t, ts[i + 1]))
        path.append(x)
    return (x, path, ts) if return_path else x


def ode_trajectory(denoiser, noise: Tensor, cond: Condition, times: Sequence[float], steps: int,
                   guidance_scale: Optional[float] = None) -> list:
    """The probability-flow ODE (DDIM, as :func:`ode_sample`) from ``noise`` at ``times[0]`` to 0 through every time
    of ``times`` (noisiest first): ``[x_{times[0]} = noise, x_{times[1]}, ..., x_0]``.

    ``steps`` DDIM steps in all, spread over the segments in proportion to their length (at least one each), so
    that the states land exactly on a few-step student's grid (which a uniform 50-step grid does not contain).
    """
    grid = [float(v) for v in times] + [0.0]
    if any(a <= b for a, b in zip(grid[:-1], grid[1:])):
        raise ValueError(f"ode_trajectory needs decreasing times above 0, got {list(times)}")
    x = noise
    states = [x]
    for hi, lo in zip(grid[:-1], grid[1:]):
        x = ode_segment(denoiser, x, cond, hi, lo, max(1, round(steps * (hi - lo) / grid[0])), guidance_scale)
        states.append(x)
    return states


def ode_segment(denoiser, x: Tensor, cond: Condition, hi: float, lo: float, steps: int,
                guidance_scale: Optional[float] = None) -> Tensor:
    """The probability-flow ODE (DDIM) from ``x`` at time ``hi`` to ``lo`` (0: the sample) in ``steps`` uniform steps."""
    sched = denoiser.schedule
    ts = torch.linspace(hi, lo, steps + 1).tolist()
    for a, b in zip(ts[:-1], ts[1:]):
        t = torch.full((x.shape[0],), a, device=x.device)
        x0 = denoiser(x, t, cond, guidance_scale=guidance_scale)
        x = x0 if b == 0.0 else sched.ddim_step(x0, x, t, torch.full_like(t, b))
    return x


def few_step_sample(denoiser, noise: Tensor, cond: Condition, times: Sequence[float],
                    generator: Optional[torch.Generator] = None, guidance_scale: Optional[float] = None) -> Tensor:
    """Multi-step student sampler (DMD2 / LCM): denoise at ``times[i]``, re-noise with fresh noise to ``times[i+1]``.

    Fresh noise is drawn from ``generator`` in the same order as diffusers' LCMScheduler draws it, so a
    stock pipeline with the same generator reproduces this sampler.
    """
    sched = denoiser.schedule
    x = noise
    x0 = noise
    for i, ti in enumerate(times):
        t = torch.full((x.shape[0],), float(ti), device=x.device)
        x0 = denoiser(x, t, cond, guidance_scale=guidance_scale)
        if i + 1 < len(times):
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                              device=generator.device if generator is not None else x0.device).to(x0.device)
            x = sched.add_noise(x0, eps, torch.full_like(t, float(times[i + 1])))
    return x0
