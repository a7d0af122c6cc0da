"""Consistency distillation, LCM style (Luo et al. 2023, arXiv 2310.04378), and SLAM (Xu et al. 2024, arXiv 2404.13903).

Student: the consistency function ``f(x, t, w) = c_skip(t) x + c_out(t) D(x, t, w)``, where ``D`` is the
student network's x0-prediction (a copy of the teacher, so it keeps the teacher's native prediction)
and ``c_skip``/``c_out`` are LCM's boundary scalings on the discrete timestep ``tau`` (x 10):
``c_skip = 0.25 / ((10 tau)^2 + 0.25)``, ``c_out = 10 tau / sqrt((10 tau)^2 + 0.25)``.  fewstep's ``t = 0``
(data) maps to ``tau = 0``, so ``f(x, 0) = x`` exactly; a discrete teacher's timestep ``k`` (``t = (k+1)/N``)
maps to ``tau = k``, which is what diffusers' ``LCMScheduler.step`` applies to the exported UNet's x0.
Flow teachers need no scalings: their x0 ``x - t v`` already equals ``x`` at ``t = 0``.

One training step (LCM's Algorithm, consistency distillation with a skipping-step DDIM solver):

1. real ``x0`` (``data.images`` latents, or mixture samples), ``t_{n+k} = j k / N`` on the grid of the
   ``N / k``-step DDIM solver (``k = objective.skip``), ``x_{n+k} = a x0 + s eps``;
2. ``w ~ U[w_min, w_max]`` (LCM's form: guidance ``(1 + w) cond - w uncond``, i.e. diffusers' scale ``1 + w``);
3. one teacher DDIM step with that guidance from ``t_{n+k}`` to ``t_n = t_{n+k} - k / N``: ``x_hat_n``;
4. loss ``d(f_theta(x_{n+k}, t_{n+k}, w), sg f_target(x_hat_n, t_n, w))``, ``d`` pseudo-Huber (LCM's
   element-wise ``sqrt(diff^2 + c^2) - c``) or L2; the target network is an EMA of the student (decay
   ``target_ema``, 0.95 in LCM), updated after every student step and saved with checkpoints.

``w`` enters the student through a guidance embedding, diffusers' ``time_cond_proj_dim`` (added to the
copied teacher UNet, zero-initialised), so one student serves every scale in the trained range: the
exported pipeline's ``guidance_scale`` ``s`` means what it means in diffusers, and the stock pipelines
feed ``w = s - 1`` to that embedding with no CFG pass.  Without an embedding
(``objective.guidance_embedding=false``, e.g. LoRA students) the student is trained at the fixed
``objective.guidance_scale`` and exported with ``guidance_scale=1`` (guidance distilled in).

SLAM (``objective.name=slam``) is the sub-path variant: the student's input is a point on the straight
line between ``x_{n+k}`` and the rescaled solver estimate, ``z = gamma x_{n+k} + (1 - gamma) (a_{n+k}/a_n)
x_hat_n`` with ``gamma ~ U[gamma_min, gamma_max]``, and ``gamma`` takes the embedding slot (as
``gamma - 1``, so that a stock pipeline's ``guidance_scale=1`` selects ``gamma = 1``); the target stays
``f_target(x_hat_n, t_n, gamma = 1)``.  ``gamma = 1`` is exactly LCM.  That ``z`` carries less noise than the
time ``t_{n+k}`` it is fed at; ``objective.subpath_time=interp`` instead feeds the point at its own time
``t_gamma = t_n + gamma (t_{n+k} - t_n)``: ``z`` is then the DDIM point ``a_gamma x0' + s_gamma eps'`` of the two
solver states' common ``(x0', eps')`` (still on the straight line between ``x_{n+k} / a_{n+k}`` and ``x_hat_n / a_n``).
``objective.gamma_power=p`` draws ``gamma`` with density ``~ gamma^(p - 1)`` (concentrated near 1 for ``p > 1``) and
``objective.loss_weight=gamma`` weights each sample's loss by ``gamma``.  Defaults: ``interp``, ``gamma`` and
``gamma_power=6`` (1-step energy distance on three toy mixtures about half that of ``start``/``none``, below uniform
gamma and ``gamma_power=3`` on all three, and no worse than consistency on any; README "SLAM vs consistency").  ``objective.subpath_x0=paper`` with ``start`` is SLAM's
official code: the student's eps is read at the point's own noise level ``sigma_gamma`` (it divides by ``a_{n+k}``,
0 at ``t = 1`` on a zero-terminal-SNR schedule, where it diverges); ``objective.gamma_embedding=false`` (``interp``
only) keeps gamma from the student.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditions import Condition
from ..sampling import few_step_sample
from ..schedules import _bcast, student_times
from .base import Batch, LossOutput, Objective, ObjectiveConfig, register, sampler_for

SIGMA_DATA = 0.5  # LCM's c_skip/c_out use sigma_data = 0.5


def grid_size(schedule) -> int:
    """Number of steps ``N`` of the teacher's training grid (1000 for continuous-time teachers)."""
    return int(getattr(schedule, "num_train_timesteps", None) or 1000)


def lcm_tau(t: Tensor, schedule) -> Tensor:
    """LCM's boundary-condition time: the discrete timestep ``t N - 1`` (0 at and below the first step), ``1000 t`` for
    continuous VP teachers; 0 exactly at ``t = 0``."""
    n = getattr(schedule, "num_train_timesteps", None)
    t = torch.as_tensor(t, dtype=torch.float64)
    if n:
        return (t * n - 1).clamp_min(0)
    return t * 1000.0


def lcm_scalings(t: Tensor, schedule, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` of LCM at fewstep time ``t``: ``c_skip(0) = 1``, ``c_out(0) = 0`` (flow teachers: 0, 1)."""
    t = torch.as_tensor(t)
    if schedule.kind == "flow":
        return torch.zeros_like(t, dtype=torch.float32), torch.ones_like(t, dtype=torch.float32)
    s = lcm_tau(t, schedule) * timestep_scaling
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2).sqrt()
    return c_skip.float(), c_out.float()


def lcm_grid_times(steps: int, grid: int) -> list[float]:
    """The ``steps`` sampling times that ``LCMScheduler(original_inference_steps=grid)`` picks, as fewstep ``t``.

    The solver grid is ``t_j = j / grid`` (timesteps ``j N / grid - 1``); the scheduler takes ``floor(i grid /
    steps)``-th entries from the top: 999/759/499/259 for 4 of 50.
    """
    if not 1 <= steps <= grid:
        raise ValueError(f"a consistency student on a {grid}-step solver grid samples with 1 to {grid} steps, got {steps}")
    return [(grid - (i * grid) // steps) / grid for i in range(steps)]


@dataclass
class ConsistencyConfig(ObjectiveConfig):
    name: str = "consistency"
    skip: int = 20  # skipping-step DDIM solver: k teacher timesteps per step (LCM: 20 of 1000, a 50-step grid)
    w_min: float = 3.0  # guidance range, LCM's form w = guidance_scale - 1 (LCM-SDXL: 3..15)
    w_max: float = 15.0
    guidance_scale: Optional[float] = None  # diffusers scale used for samples/eval and recommended at export;
    #                                         None: teacher.guidance_scale (must lie in [1 + w_min, 1 + w_max])
    guidance_embedding: bool = True  # w through time_cond_proj_dim; false: distil the fixed guidance_scale above
    embedding_dim: int = 256  # time_cond_proj_dim added to the student (LCM: 256; GMM toys: 16 Fourier features)
    loss: str = "huber"  # "huber" (pseudo-Huber, LCM's) or "l2"
    huber_c: float = 1.0e-3  # pseudo-Huber c (LCM: 0.001)
    target_ema: float = 0.95  # EMA decay of the target network (LCM: 0.95); 0: the online student, no grad
    timestep_scaling: float = 10.0  # LCM boundary scalings on timestep x this (LCMScheduler's timestep_scaling)


@dataclass
class SLAMConfig(ConsistencyConfig):
    name: str = "slam"
    gamma_min: float = 0.0  # sub-path position gamma ~ U[gamma_min, gamma_max]; gamma = 1 is LCM
    gamma_max: float = 1.0
    subpath_time: str = "interp"  # time fed with the sub-path point: "start" (SLAM's t_{n+k}, z on the straight line)
    #                              or "interp" (t_gamma = t_n + gamma (t_{n+k} - t_n), z the DDIM point at t_gamma)
    gamma_power: float = 6.0  # gamma = gamma_min + (gamma_max - gamma_min) u^(1/p), u ~ U[0, 1]: density ~ g^(p-1)
    loss_weight: str = "gamma"  # "none" or "gamma" (per-sample loss weighted by gamma, normalised by its batch mean)
    subpath_x0: str = "net"  # "net": the network's x0 at the fed time; "paper" (with subpath_time=start): SLAM's
    #                          official code, the network's eps taken at the sub-path point's own noise level sigma_gamma
    gamma_embedding: bool = True  # false (subpath_time=interp only): the student does not see gamma, t_gamma alone
    guidance_embedding: bool = False  # the embedding slot carries gamma; guidance is the fixed guidance_scale


class _ConsistencyFunction:
    """``f(x, t) = c_skip x + c_out D(x, t)`` as a denoiser for :func:`few_step_sample`."""

    def __init__(self, obj: "Consistency", net):
        self.obj, self.net = obj, net
        self.schedule = obj.teacher.schedule

    def __call__(self, x, t, cond, guidance_scale=None):
        return self.obj.consistency(self.net, x, t, cond)


@register
class Consistency(Objective):
    """LCM-style consistency distillation (Luo et al. 2023, Algorithm 1 with a skipping-step DDIM solver)."""

    name = "consistency"
    Config = ConsistencyConfig
    needs_real_data = True

    def __init__(self, config, teacher, student_steps):
        super().__init__(config, teacher, student_steps)
        c = config
        n = grid_size(teacher.schedule)
        if c.skip < 1 or n % c.skip:
            raise ValueError(f"objective.skip={c.skip} must divide the teacher's {n} timesteps "
                             f"(LCM uses 20: a {n // 20}-step DDIM solver grid)")
        self.grid = n // c.skip  # solver steps from t = 1 to t = 0
        if c.w_min > c.w_max:
            raise ValueError(f"objective.w_min={c.w_min} > objective.w_max={c.w_max}: the guidance range is empty")
        if c.loss not in ("huber", "l2"):
            raise ValueError(f"objective.loss must be 'huber' or 'l2', got {c.loss!r}")
        if c.huber_c <= 0:
            raise ValueError(f"objective.huber_c must be > 0, got {c.huber_c}")
        if not 0.0 <= c.target_ema < 1.0:
            raise ValueError(f"objective.target_ema must be in [0, 1), got {c.target_ema}")
        if c.timestep_scaling <= 0:
            raise ValueError(f"objective.timestep_scaling must be > 0, got {c.timestep_scaling}")
        if c.embedding_dim < 2 or c.embedding_dim % 2:
            raise ValueError(f"objective.embedding_dim must be an even number >= 2, got {c.embedding_dim}")
        self.guidance = float(teacher.guidance_scale if c.guidance_scale is None else c.guidance_scale)
        self._check_guidance()
        self.times = self.grid_times(self.steps)
        self.student = self._new_student()
        self.target = None
        if c.target_ema > 0:
            self.target = copy.deepcopy(self.student)
            self.target.requires_grad_(False)
            self.target.eval()

    # ---- configuration --------------------------------------------------------------------------
    @property
    def embeds(self) -> bool:
        """Whether the student's embedding slot carries a value (w for consistency, gamma for SLAM)."""
        return bool(self.config.guidance_embedding)

    def _check_guidance(self):
        c = self.config
        if c.guidance_embedding and not c.w_min <= self.guidance - 1 <= c.w_max:
            where = "objective.guidance_scale" if c.guidance_scale is not None else "teacher.guidance_scale"
            raise ValueError(f"{where}={self.guidance:g} (w = {self.guidance - 1:g}) lies outside the trained guidance "
                             f"range objective.w_min..w_max = {c.w_min:g}..{c.w_max:g}; set objective.guidance_scale "
                             f"inside [{1 + c.w_min:g}, {1 + c.w_max:g}] or widen the range")

    slot_request = "objective.guidance_embedding=true"  # the setting that asks for the embedding slot
    slot_off = "objective.guidance_embedding=false to distil the fixed objective.guidance_scale"

    def _new_student(self):
        """A copy of the teacher, with a zero-initialised guidance embedding when the slot is used."""
        if not self.embeds:
            return self.teacher.new_network("student")
        params = inspect.signature(self.teacher.new_network).parameters
        if "guidance_dim" not in params:
            raise ValueError(f"{self.slot_request} needs a guidance embedding, which {self.teacher.family} teachers "
                             f"cannot take; set {self.slot_off}")
        try:
            return self.teacher.new_network("student", guidance_dim=self.config.embedding_dim)
        except ValueError as e:
            raise ValueError(f"{self.slot_request} needs a guidance embedding (time_cond_proj_dim), which the teacher "
                             f"UNet lacks and fewstep adds only to a full copy of a UNet2DConditionModel ({e}); set "
                             f"student.lora_rank=0 to enable it, or {self.slot_off}") from None

    def grid_times(self, steps: int) -> list[float]:
        if self.teacher.schedule.kind == "flow":
            return student_times(steps, self.teacher.schedule)
        return lcm_grid_times(steps, self.grid)

    # ---- contract -------------------------------------------------------------------------------
    def networks(self):
        return {"student": self.student}

    def plan(self, step):
        return ["student"]

    def wants_conditions(self, group, step):
        return False  # trains on real samples and their own conditions (batch.real_cond) only

    def state_modules(self):
        return {"consistency_target": self.target} if self.target is not None else {}

    @torch.no_grad()
    def after_step(self, group, step):
        """EMA update of the target network after each student step (LCM: decay 0.95)."""
        if group != "student" or self.target is None:
            return
        d = self.config.target_ema
        tgt, src = list(self.target.parameters()), [p.detach() for p in self.student.parameters()]
        if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(tgt, src)):
            torch._foreach_lerp_(tgt, src, 1.0 - d)  # one multi-tensor kernel: the same lerp as below
            return
        for pt, ps in zip(tgt, src):
            pt.lerp_(ps.to(pt.dtype), 1.0 - d)

    # ---- the consistency function -----------------------------------------------------------------
    def consistency(self, net, x: Tensor, t: Tensor, cond: Condition, noise_ratio: Optional[Tensor] = None) -> Tensor:
        """``f(x, t) = c_skip(t) x + c_out(t) D(x, t)``; ``f(x, 0) = x`` exactly.  ``noise_ratio`` ``rho`` (per sample):
        ``D``'s implied eps ``(x - a_t D) / s_t`` is taken at noise level ``rho s_t``, i.e. ``D -> (1 - rho) x / a_t +
        rho D`` (SLAM's ``subpath_x0=paper``)."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c_skip, c_out = lcm_scalings(t, self.teacher.schedule, self.config.timestep_scaling)
        c_skip, c_out = c_skip.to(x.device), c_out.to(x.device)
        x0 = net(x, t, cond)
        if noise_ratio is not None:
            rho = _bcast(noise_ratio.to(x0.dtype), x0)
            x0 = (1 - rho) * x / _bcast(self.teacher.schedule.alpha(t).to(x0.dtype), x0) + rho * x0
        out = _bcast(c_skip, x) * x + _bcast(c_out, x) * x0
        return torch.where(_bcast(c_out, x) == 0, x, out)  # exact boundary, whatever D returns at t = 0

    def with_slot(self, cond: Condition, value: Optional[Tensor]) -> Condition:
        """``cond`` with the embedding slot set (or left empty for students without one)."""
        if not self.embeds:
            return cond
        return dataclasses.replace(cond, guidance_w=value)

    def slot_for_sampling(self, n: int, device, guidance_scale: Optional[float] = None) -> Optional[Tensor]:
        s = self.guidance if guidance_scale is None else float(guidance_scale)
        return torch.full((n,), s - 1.0, device=device)  # the stock pipelines feed guidance_scale - 1

    @torch.no_grad()
    def sample(self, student, noise, cond, num_steps=None, generator=None, guidance_scale=None):
        """LCM multistep sampling: ``f`` at the scheduler's grid times, fresh noise in between (as LCMScheduler)."""
        times = self.times if num_steps in (None, self.steps) else self.grid_times(num_steps)
        cond = self.with_slot(cond, self.slot_for_sampling(len(noise), noise.device, guidance_scale))
        return few_step_sample(_ConsistencyFunction(self, student), noise, cond, times, generator=generator)

    # ---- training -------------------------------------------------------------------------------
    def _teacher_x0(self, x: Tensor, t: Tensor, cond: Condition, s: Tensor) -> Tensor:
        """Teacher x0 with per-sample CFG ``uncond + s (cond - uncond)`` (x0 is affine in the native prediction,
        so this equals CFG in the teacher's native space)."""
        if bool((s == 1).all()):
            return self.teacher(x, t, cond)
        both = self.teacher(torch.cat([x, x]), torch.cat([t, t]), Condition.cat([cond, cond.null()]))
        xc, xu = both.chunk(2)
        return xu + _bcast(s.to(xc.dtype), xc) * (xc - xu)

    def _draw_w(self, batch: Batch, n: int) -> Tensor:
        c = self.config
        if not c.guidance_embedding:
            return torch.full((n,), self.guidance - 1.0, device=batch.device)
        return c.w_min + (c.w_max - c.w_min) * batch.rand(n)

    def student_input(self, x_hi, x_lo, t_hi, t_lo, cond, w, batch):
        """(input, time, condition) of the online student, condition of the target, per-sample loss weights
        (None: unweighted) and the online prediction's noise ratio (see :meth:`consistency`); SLAM overrides this."""
        cw = self.with_slot(cond, w)
        return x_hi, t_hi, cw, cw, None, None

    def distance(self, a: Tensor, b: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        a, b = a.float(), b.float()
        if self.config.loss == "l2":
            if weight is None:
                return F.mse_loss(a, b)
            d = (a - b) ** 2
        else:
            c = self.config.huber_c  # LCM's pseudo-Huber, element-wise
            d = torch.sqrt((a - b) ** 2 + c * c) - c
        if weight is None:
            return d.mean()
        return (d.flatten(1).mean(1) * weight.float()).mean()

    def loss(self, group, batch, step, nets):
        if group != "student":
            raise KeyError(group)
        if batch.real is None:
            raise ValueError(f"objective {self.name} needs real samples (set data.images to a folder of images)")
        sched = self.teacher.schedule
        x0, cond = batch.real[: batch.size], batch.real_cond[: batch.size]
        n = x0.shape[0]
        j = torch.randint(1, self.grid + 1, (n,), generator=batch.generator).to(batch.device)
        t_hi = j.float() / self.grid
        t_lo = (j - 1).float() / self.grid
        eps = batch.randn(x0.shape)
        x_hi = sched.add_noise(x0, eps, t_hi)
        w = self._draw_w(batch, n)
        with torch.no_grad():  # one guided teacher DDIM step t_{n+k} -> t_n
            x0_teacher = self._teacher_x0(x_hi, t_hi, cond, 1.0 + w)
            x_lo = sched.ddim_step(x0_teacher, x_hi, t_hi, t_lo)
        z, t_z, cond_student, cond_target, weight, rho = self.student_input(x_hi, x_lo, t_hi, t_lo, cond, w, batch)
        pred = self.consistency(nets["student"], z, t_z, cond_student, rho)
        with torch.no_grad():
            target_net = self.target if self.target is not None else _plain(nets["student"])
            target = self.consistency(target_net, x_lo, t_lo, cond_target)
        loss = self.distance(pred, target, weight)
        logs = {f"loss_{self.name}": loss.detach(), "target_gap": (pred.detach() - target).abs().mean()}
        return LossOutput(loss, logs)

    # ---- export ---------------------------------------------------------------------------------
    def export_spec(self):
        c = self.config
        sched = self.teacher.schedule
        if sched.kind == "flow":
            spec = sampler_for(sched, self.steps, renoise=True)
        else:  # LCMScheduler on the solver grid, with the boundary scalings used in training
            spec = {"scheduler": "LCMScheduler",
                    "scheduler_config": {"original_inference_steps": self.grid, "timestep_scaling": c.timestep_scaling,
                                         "clip_sample": False, "thresholding": False}}
        spec.update(num_inference_steps=self.steps, **self._export_guidance())
        return spec

    def _export_guidance(self) -> dict:
        c = self.config
        if c.guidance_embedding:
            return {"guidance_scale": self.guidance,
                    "guidance_note": f"`guidance_scale` is diffusers' scale s: the student embeds w = s - 1 "
                                     f"(`time_cond_proj_dim`) and was trained for s in [{1 + c.w_min:g}, "
                                     f"{1 + c.w_max:g}]; any s in that range works, with one UNet call per step "
                                     f"(no CFG pass)."}
        return {"guidance_scale": 1.0,
                "guidance_note": f"The teacher's guidance (s = {self.guidance:g}) is distilled in: keep "
                                 f"`guidance_scale=1` (a value > 1 would run CFG on the student)."}


@register
class SLAM(Consistency):
    """SLAM (Xu et al. 2024): consistency on sub-path linear points, ``gamma`` in the embedding slot."""

    name = "slam"
    Config = SLAMConfig
    slot_request = "objective slam with gamma_min < gamma_max"
    slot_off = "objective.gamma_min=objective.gamma_max=1 (plain LCM, no gamma embedding)"

    def __init__(self, config, teacher, student_steps):
        if config.guidance_embedding:
            raise ValueError("objective slam uses the embedding slot for gamma: its guidance is the fixed "
                             "objective.guidance_scale; leave objective.guidance_embedding=false")
        if config.subpath_time not in ("start", "interp"):
            raise ValueError(f"objective.subpath_time must be 'start' or 'interp', got {config.subpath_time!r}")
        if config.loss_weight not in ("none", "gamma"):
            raise ValueError(f"objective.loss_weight must be 'none' or 'gamma', got {config.loss_weight!r}")
        if not config.gamma_power > 0:
            raise ValueError(f"objective.gamma_power must be > 0, got {config.gamma_power}")
        if config.subpath_x0 not in ("net", "paper"):
            raise ValueError(f"objective.subpath_x0 must be 'net' or 'paper', got {config.subpath_x0!r}")
        if config.subpath_x0 == "paper" and config.subpath_time != "start":
            raise ValueError("objective.subpath_x0=paper rescales the noise of a point fed at t_{n+k}: it needs "
                             "objective.subpath_time=start (interp points already carry their time's noise)")
        if not config.gamma_embedding and config.subpath_time != "interp":
            raise ValueError("objective.gamma_embedding=false needs objective.subpath_time=interp (at t_{n+k} only "
                             "the embedding tells the student where on the sub-path its input lies)")
        if not 0.0 <= config.gamma_min <= config.gamma_max <= 1.0:
            raise ValueError(f"objective.gamma_min/gamma_max must satisfy 0 <= gamma_min <= gamma_max <= 1, "
                             f"got {config.gamma_min}, {config.gamma_max}")
        super().__init__(config, teacher, student_steps)

    @property
    def embeds(self) -> bool:
        c = self.config
        return c.gamma_min < c.gamma_max and c.gamma_embedding  # a constant gamma needs no embedding

    def slot_for_sampling(self, n, device, guidance_scale=None):
        return torch.zeros((n,), device=device)  # gamma = 1 (stock pipelines: guidance_scale = 1)

    def draw_gamma(self, u: Tensor) -> Tensor:
        """``gamma = gamma_min + (gamma_max - gamma_min) u^(1 / gamma_power)`` from ``u ~ U[0, 1]``."""
        c = self.config
        if c.gamma_power != 1.0:
            u = u.pow(1.0 / c.gamma_power)
        return c.gamma_min + (c.gamma_max - c.gamma_min) * u

    def student_input(self, x_hi, x_lo, t_hi, t_lo, cond, w, batch):
        """Sub-path point ``z`` (see :meth:`sub_path_point`) at time ``t_{n+k}`` (``subpath_time=start``) or
        ``t_gamma`` (``interp``); target at ``(x_hat_n, t_n, gamma = 1)``."""
        c = self.config
        gamma = self.draw_gamma(batch.rand(x_hi.shape[0]))  # drawn last: gamma = 1 is LCM
        z, t_z = self.sub_path_point(x_hi, x_lo, t_hi, t_lo, gamma)
        weight = None  # a constant gamma weights every sample alike: unweighted, so gamma = 1 stays LCM bit for bit
        if c.loss_weight == "gamma" and c.gamma_min < c.gamma_max:
            weight = gamma / gamma.mean().clamp_min(1e-12)
        rho = self.noise_ratio(t_hi, t_lo, gamma) if c.subpath_x0 == "paper" else None
        return z, t_z, self.with_slot(cond, gamma - 1.0), self.with_slot(cond, torch.zeros_like(gamma)), weight, rho

    def noise_ratio(self, t_hi, t_lo, gamma) -> Tensor:
        """``sigma_gamma / s_{n+k}`` of ``subpath_x0=paper`` (SLAM's code): with ``r = a_{n+k} / a_n``, ``sigma_gamma^2 =
        (r s_n)^2 + gamma^2 (s_{n+k}^2 - (r s_n)^2)``, the noise of ``z`` if ``x_{n+k}`` were ``x_hat_n`` forward-noised
        (the VP form ``(r s_n)^2 + gamma^2 (1 - r^2)`` there); exactly 1 at ``gamma = 1``."""
        sched = self.teacher.schedule
        t_hi64, t_lo64, g = t_hi.to(torch.float64), t_lo.to(torch.float64), gamma.to(torch.float64)
        s_h = sched.sigma(t_hi64).double()
        rs = sched.alpha(t_hi64).double() / sched.alpha(t_lo64).double() * sched.sigma(t_lo64).double()
        rho = (rs**2 + g**2 * (s_h**2 - rs**2)).clamp_min(0).sqrt() / s_h
        return torch.where(g == 1, torch.ones_like(rho), rho).to(t_hi.dtype)

    def sub_path_point(self, x_hi, x_lo, t_hi, t_lo, gamma) -> tuple[Tensor, Tensor]:
        """``(z, t_z)``.  ``start`` (SLAM): ``z = gamma x_{n+k} + (1 - gamma) (a_{n+k} / a_n) x_hat_n`` at
        ``t_z = t_{n+k}``.  ``interp``: ``t_z = t_n + gamma (t_{n+k} - t_n)`` and ``z = a_z x0' + s_z eps'``, where
        ``(x0', eps')`` solve ``x_{n+k} = a_{n+k} x0' + s_{n+k} eps'``, ``x_hat_n = a_n x0' + s_n eps'`` (the teacher
        DDIM step's own x0 and eps): the DDIM point at ``t_z``, on the straight line between ``x_{n+k} / a_{n+k}``
        and ``x_hat_n / a_n`` (``z / a`` is affine in ``s / a``), so ``z`` carries exactly the noise of ``t_z``.
        Both give ``(x_{n+k}, t_{n+k})`` at ``gamma = 1``."""
        sched = self.teacher.schedule
        if self.config.subpath_time == "start":
            ratio = sched.alpha(t_hi) / sched.alpha(t_lo)
            g = _bcast(gamma.to(x_hi.dtype), x_hi)
            return g * x_hi + (1 - g) * _bcast(ratio.to(x_hi.dtype), x_hi) * x_lo, t_hi
        else:
            g = gamma.to(torch.float64)
            t_hi64, t_lo64 = t_hi.to(torch.float64), t_lo.to(torch.float64)
            t_z64 = t_lo64 + g * (t_hi64 - t_lo64)
            a_h, s_h = sched.alpha(t_hi64).double(), sched.sigma(t_hi64).double()
            a_l, s_l = sched.alpha(t_lo64).double(), sched.sigma(t_lo64).double()
            a_z, s_z = sched.alpha(t_z64).double(), sched.sigma(t_z64).double()
            det = a_h * s_l - a_l * s_h
            a, b = (a_z * s_l - s_z * a_l) / det, (s_z * a_h - a_z * s_h) / det
            a = torch.where(g == 1, torch.ones_like(a), a)  # exact at gamma = 1: (x_{n+k}, t_{n+k})
            b = torch.where(g == 1, torch.zeros_like(b), b)
            t_z = torch.where(g == 1, t_hi64, t_z64).to(t_hi.dtype)
        z = _bcast(a.to(x_hi.dtype), x_hi) * x_hi + _bcast(b.to(x_hi.dtype), x_hi) * x_lo
        return z, t_z

    def _export_guidance(self):
        note = (f"The teacher's guidance (s = {self.guidance:g}) is distilled in. Keep `guidance_scale=1`: "
                f"{'the embedding slot carries SLAM gamma - 1 and 1 selects gamma = 1' if self.embeds else 'a value > 1 would run CFG on the student'}.")
        return {"guidance_scale": 1.0, "guidance_note": note}


def _plain(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)
