"""BOOT: data-free distillation with bootstrapping (Gu et al. 2023, arXiv 2306.05544).

The student ``g(eps, t)`` sees only the starting noise ``eps`` (and the condition) and predicts the
*signal* ``y_t = (x_t - s_t eps) / a_t`` of the teacher's deterministic DDIM trajectory ``x_t`` that
starts from ``x_1 = eps``; ``g(eps, 0) = x_0`` is the one-step sample.  Along that trajectory ``eps``
cancels and the signal obeys BOOT's Signal-ODE ``dy/dlambda = y - D_T(x_t, t)`` with ``lambda = log(s/a)``,
so one exact DDIM step of the teacher from ``t`` to ``s < t`` reads (``tests/test_boot.py`` checks it)

    y_s = y_t + delta (D_T(x_t, t) - y_t),   delta = 1 - exp(lambda_s - lambda_t) = 1 - (s_s a_t) / (a_s s_t),

with ``x_t = a_t y_t + s_t eps``.  Bootstrapping replaces the unknown ``y_t`` by the student's own
``sg g(eps, t)`` and trains ``g(eps, s)`` on the result, by default scaled by ``1 / delta^2``, the
derivative-matching form ``||(g(eps,s) - sg g(eps,t)) / delta - (D_T - sg g(eps,t))||^2`` as METHODS.md
reconstructs BOOT's objective (``weighting=uniform``: plain MSE, which converges faster on the toys):

    loss = ||g(eps, s) - sg[g(eps, t) + delta (D_T(a_t g(eps,t) + s_t eps, t) - g(eps, t))]||^2 / delta^2,

``t = j k / N``, ``s = t - k / N`` (``k = objective.skip``), teacher with CFG.  The boundary at
``t = 1`` is exact, not learned: ``x_1 = eps`` gives ``y_1 = (1 - s_1) eps / a_1`` (0 when ``a_1 = 0``).
No data source is opened: only noise and the teacher's conditions (prompts are conditions, not data).

Network: a copy of the teacher queried at the *reversed* time ``1 - t`` on the input ``eps``, its
native output read as an x0-prediction at ``t = 1``: ``g(eps, t) = x0(native(eps, 1 - t), x_t=eps, t=1)``.
So ``g(eps, 0)`` is the network at its noisiest step, exactly what a stock one-step pipeline
(``LCMScheduler``, timestep 999) computes, and the student starts as the teacher's own one-step
estimate ``E[x0 | x_1 = eps]``; the read-out at ``t = 1`` keeps ``g`` well-conditioned for every ``t``.
Analytic (GMM) teachers use a residual MLP alone, since their exact posterior mean at the small
times that ``1 - t`` reaches is singular.  BOOT defines a one-step generator only: ``student.steps = 1``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..conditions import Condition
from ..schedules import _bcast
from .base import Batch, LossOutput, Objective, ObjectiveConfig, register
from .consistency import grid_size, lcm_scalings


@dataclass
class BOOTConfig(ObjectiveConfig):
    name: str = "boot"
    skip: int = 20  # bootstrapping step t - s in teacher timesteps (k / N; 20 of 1000: a 50-step DDIM path)
    guidance_scale: Optional[float] = None  # teacher CFG distilled into the student (diffusers form); None: teacher's
    weighting: str = "delta"  # "delta": 1 / delta^2 (BOOT's derivative-matching form); "uniform": plain MSE


@register
class BOOT(Objective):
    """BOOT (Gu et al. 2023): signal prediction from noise, trained by bootstrapping teacher DDIM steps."""

    name = "boot"
    Config = BOOTConfig
    data_free = True

    def __init__(self, config, teacher, student_steps):
        if int(student_steps) != 1:
            raise ValueError(f"objective boot distils a one-step generator (BOOT defines no few-step sampler): set "
                             f"student.steps=1, got {student_steps}")
        super().__init__(config, teacher, student_steps)
        n = grid_size(teacher.schedule)
        if config.skip < 1 or n % config.skip:
            raise ValueError(f"objective.skip={config.skip} must divide the teacher's {n} timesteps "
                             f"(BOOT's DDIM path uses 20: {n // 20} steps)")
        self.grid = n // config.skip
        if config.weighting not in ("delta", "uniform"):
            raise ValueError(f"objective.weighting must be 'delta' or 'uniform', got {config.weighting!r}")
        self.guidance = float(teacher.guidance_scale if config.guidance_scale is None else config.guidance_scale)
        params = inspect.signature(teacher.new_network).parameters
        kw = {"analytic": False} if "analytic" in params else {}
        self.student = teacher.new_network("student", **kw)

    # ---- contract -------------------------------------------------------------------------------
    def networks(self):
        return {"student": self.student}

    def plan(self, step):
        return ["student"]

    def wants_real(self, step):
        return False

    # ---- the signal predictor -----------------------------------------------------------------------
    def signal(self, net, eps: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """``g(eps, t)``: the network at time ``1 - t`` on ``eps``, read as x0 at ``t = 1``."""
        t = torch.as_tensor(t, device=eps.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(eps.shape[0])
        _, native = net(eps, 1.0 - t, cond, return_native=True)
        sched = self.teacher.schedule
        return sched.to_x0(native.float(), self.prediction(net), eps.float(), torch.ones_like(t)).to(eps.dtype)

    @staticmethod
    def prediction(net) -> str:
        return getattr(net, "module", net).prediction

    def boundary(self, eps: Tensor) -> Tensor:
        """The exact signal at ``t = 1`` of the trajectory from ``x_1 = eps``: ``(1 - s_1) eps / a_1``."""
        one = torch.ones(eps.shape[0], device=eps.device)
        a, s = self.teacher.schedule.alpha(one), self.teacher.schedule.sigma(one)
        return _bcast((1 - s) / a.clamp_min(1e-12), eps) * eps

    def _teacher_x0(self, x, t, cond):
        g = None if self.guidance == 1.0 else self.guidance
        return self.teacher(x, t, cond, guidance_scale=g)

    def loss(self, group, batch: Batch, step, nets):
        if group != "student":
            raise KeyError(group)
        sched = self.teacher.schedule
        n, cond = batch.size, batch.cond
        eps = batch.randn((n, *self.teacher.sample_shape))
        j = torch.randint(1, self.grid + 1, (n,), generator=batch.generator).to(batch.device)
        t = j.float() / self.grid
        s = (j - 1).float() / self.grid
        student = nets["student"]
        with torch.no_grad():  # bootstrapped target: one teacher DDIM step along the student's own signal path
            y_t = self.signal(_plain(student), eps, t, cond)
            y_t = torch.where(_bcast(j, eps) == self.grid, self.boundary(eps), y_t)
            a_t, s_t, a_s, s_s = sched.alpha(t), sched.sigma(t), sched.alpha(s), sched.sigma(s)
            x_t = _bcast(a_t, eps) * y_t + _bcast(s_t, eps) * eps
            x0 = self._teacher_x0(x_t, t, cond).float()
            delta = 1.0 - (s_s * a_t) / (a_s * s_t)  # = 1 at s = 0 (and at t = 1 when a_1 = 0)
            target = y_t.float() + _bcast(delta, x0) * (x0 - y_t.float())
        pred = self.signal(student, eps, s, cond)
        err = (pred.float() - target).pow(2).flatten(1).mean(1)
        loss = (err / delta.pow(2)).mean() if self.config.weighting == "delta" else err.mean()
        return LossOutput(loss, {"loss_boot": loss.detach(), "signal_step_mse": err.detach().mean()})

    # ---- sampling and export ------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, student, noise, cond, num_steps=None, generator=None):
        """One step: ``g(eps, 0)``, with LCMScheduler's (negligible, ~1e-9) boundary scalings at its timestep 999."""
        if num_steps not in (None, 1):
            raise ValueError(f"a BOOT student samples in one step, got num_steps={num_steps}")
        t0 = torch.zeros(noise.shape[0], device=noise.device)
        y = self.signal(student, noise, t0, cond)
        if getattr(self.teacher.schedule, "num_train_timesteps", None):  # exported with LCMScheduler
            c_skip, c_out = lcm_scalings(torch.ones_like(t0), self.teacher.schedule)
            y = _bcast(c_skip.to(y.device), y) * noise + _bcast(c_out.to(y.device), y) * y
        return y

    def export_spec(self):
        spec = super().export_spec()
        spec["guidance_note"] = (f"The teacher's guidance (s = {self.guidance:g}) is distilled in: keep "
                                 f"`guidance_scale` at {spec['guidance_scale']:g} (a value > 1 would run CFG on the "
                                 f"student). BOOT students generate in one step.")
        return spec


def _plain(module):
    return getattr(module, "module", module)
