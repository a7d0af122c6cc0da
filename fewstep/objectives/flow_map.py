"""Data-free flow-map distillation (Tong, Ma, Xie & Jaakkola 2025, arXiv 2511.19428, "FreeFlow").

Student: a flow map ``f(x_t, t, d) = x_t - d * V(x_t, t, d)`` that jumps from time ``t`` (flow sigma) to
``t - d``: a copy of the teacher's velocity network with one extra, zero-initialised input, the jump
length ``d`` (``cond.jump``), so that ``V`` starts as the teacher's velocity.  ``f(z, 1, 1)`` is a
one-jump sample; K jumps walk the grid ``1, 1 - 1/K, ..., 1/K, 0``.

Only the prior is sampled (no data source is opened).  Each batch is split:

* predictor (``1 - corrector_fraction`` of it): the student's own path from noise must move with the
  teacher's velocity.  ``d/d(d) f = -(V + d dV/dd)`` must equal ``-u_T(f, t - d)``, so
  ``loss = w * ||V - sg(u_T(f(z, d), t - d) - d dV/dd)||^2`` with ``dV/dd`` from a forward-mode JVP
  (``torch.func.jvp``) and ``d ~ U(0, t]``; ``w = sg(1 / (err + c)^p)`` per sample (adaptive weight).
* corrector (``corrector_fraction``): the student's samples ``x = f(x_t, t, t)`` get the DMD
  distribution-matching gradient ``(D_F - D_T)(x_r, r) / mean|x - D_T|`` at ``x_r = (1 - r) x + r eps``,
  against an online flow-matching critic (``D_F``, a copy of the teacher) that regresses the velocity
  ``eps - x`` of the same re-noised student samples.

Multi-jump students start from the grid time ``t_k`` reached by their own jumps from noise (no grad),
as DMD2's backward simulation does.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import losses
from ..conditions import Condition
from ..schedules import _bcast, student_times
from .base import Batch, LossOutput, Objective, ObjectiveConfig, register, sampler_for
from .dmd import Critic, _plain, fake_score

PIPELINES = {"sd3": ("FlowMapStableDiffusion3Pipeline", "flow_map_sd3"), "flux": ("FlowMapFluxPipeline", "flow_map_flux")}


@dataclass
class FlowMapConfig(ObjectiveConfig):
    name: str = "flow_map"
    corrector_fraction: float = 0.25  # share of each batch for the corrector (paper: 75% predictor, 25% corrector)
    predictor_weight: float = 1.0
    corrector_weight: float = 1.0
    adaptive_p: float = 1.0  # predictor weight sg(1 / (err + c)^p), err the per-sample mean square; 0: plain MSE
    adaptive_c: float = 1.0e-3
    critic_steps: int = 1  # student updates once every this many critic updates
    critic_lr_scale: float = 1.0  # critic lr = train.lr * this
    min_t: float = 0.02  # corrector re-noising time range
    max_t: float = 0.98
    critic_t_min: float = 0.001  # critic flow-matching time range [critic_t_min, 1]
    guidance_scale: Optional[float] = None  # teacher guidance for both terms; None -> teacher.guidance_scale
    dm_fp32: bool = True  # the critic's prediction for the corrector's DM gradient in float32, autocast off


def with_jump(cond: Condition, d: Tensor) -> Condition:
    """``cond`` with the jump length ``d`` (B,) set."""
    return dataclasses.replace(cond, jump=d)


def jump(student, x: Tensor, t: Tensor, d: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
    """``(f, V)``: the flow map ``f = x - d V(x, t, d)`` from ``t`` to ``t - d`` and its average velocity ``V``."""
    _, v = student(x, t, with_jump(cond, d), return_native=True)
    return x - _bcast(d, x) * v.to(x.dtype), v


@torch.no_grad()
def flow_map_sample(student, noise: Tensor, cond: Condition, times: Sequence[float]) -> Tensor:
    """K jumps ``t_0 = 1 > t_1 > ... > t_{K-1} > 0``; each is the Euler step of FlowMatchEulerDiscreteScheduler."""
    x = noise
    for i, ti in enumerate(times):
        t_next = float(times[i + 1]) if i + 1 < len(times) else 0.0
        t = torch.full((x.shape[0],), float(ti), device=x.device)
        x, _ = jump(student, x, t, t - t_next, cond)
    return x


@contextlib.contextmanager
def _jvp_attention():
    """Fused attention kernels have no forward-mode derivative: use the math kernel inside a JVP."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


@register
class FlowMap(Objective):
    name = "flow_map"
    Config = FlowMapConfig
    data_free = True
    schedules = ("flow",)

    def __init__(self, config, teacher, student_steps):
        super().__init__(config, teacher, student_steps)
        c = config
        if not 0.0 <= c.corrector_fraction <= 1.0:
            raise ValueError(f"objective.corrector_fraction must be in [0, 1], got {c.corrector_fraction}")
        if c.predictor_weight < 0 or c.corrector_weight < 0:
            raise ValueError("objective.predictor_weight and objective.corrector_weight must be >= 0")
        if c.adaptive_p < 0 or c.adaptive_c <= 0:
            raise ValueError(f"objective.adaptive_p must be >= 0 and adaptive_c > 0, got {c.adaptive_p}, {c.adaptive_c}")
        if c.critic_steps < 1:
            raise ValueError(f"objective.critic_steps must be >= 1, got {c.critic_steps}")
        if not 0.0 <= c.min_t < c.max_t <= 1.0:
            raise ValueError(f"objective.min_t/max_t must satisfy 0 <= min_t < max_t <= 1, got {c.min_t}, {c.max_t}")
        if not getattr(teacher, "supports_jump", False):
            raise ValueError(f"teacher family {teacher.family!r} cannot build a flow-map student (no jump input)")
        self.student = teacher.new_network("student", jump=True)
        self.critic = Critic(teacher.new_network("critic")) if c.corrector_fraction > 0 else None
        self.guidance = teacher.guidance_scale if c.guidance_scale is None else float(c.guidance_scale)

    # ---- contract -------------------------------------------------------------------------------
    def networks(self):
        nets = {"student": self.student}
        if self.critic is not None:
            nets["critic"] = self.critic
        return nets

    def plan(self, step):
        if self.critic is None:
            return ["student"]
        if step % self.config.critic_steps == 0:
            return ["student", "critic"]
        return ["critic"]

    def lr_scale(self, group):
        return self.config.critic_lr_scale if group == "critic" else 1.0

    def wants_conditions(self, group, step):
        # after a student update in the same step the critic trains on the student's samples and their conditions
        return group != "critic" or "student" not in self.plan(step)

    def loss(self, group, batch, step, nets):
        if group == "student":
            return self._student_loss(batch, nets)
        if group == "critic":
            return self._critic_loss(batch, nets)
        raise KeyError(group)

    # ---- the student's own states (data-free) ---------------------------------------------------
    def _start(self, student_plain, batch: Batch, cond: Condition):
        """Noise, or for a K-jump student the state at a random grid time reached by its own jumps (no grad)."""
        x = batch.randn((batch.size, *self.teacher.sample_shape))
        k = batch.randint(self.steps) if self.steps > 1 else 0
        if k:
            with torch.no_grad():
                x = self._rollout(student_plain, x, cond, k)
        return x, torch.full((batch.size,), float(self.times[k]), device=batch.device)

    def _rollout(self, student_plain, x: Tensor, cond: Condition, k: int) -> Tensor:
        for i in range(k):
            t = torch.full((x.shape[0],), float(self.times[i]), device=x.device)
            x, _ = jump(student_plain, x, t, t - float(self.times[i + 1]), cond)
        return x

    def _split(self, n: int) -> int:
        """Number of corrector samples in a batch of ``n`` (at least one of each term when both are on)."""
        f = self.config.corrector_fraction
        n_c = int(round(n * f))
        if 0 < f < 1 and n >= 2:
            n_c = min(max(n_c, 1), n - 1)
        return n_c

    # ---- losses ---------------------------------------------------------------------------------
    def _student_loss(self, batch: Batch, nets) -> LossOutput:
        c = self.config
        student = nets["student"]
        x, t0 = self._start(_plain(student), batch, batch.cond)
        n_c = self._split(batch.size)
        n_p = batch.size - n_c
        total = torch.zeros((), device=batch.device)
        logs = {}
        if n_p:
            loss_p, lp = self._predictor(student, x[:n_p], t0[:n_p], batch.cond[:n_p], batch)
            total = total + c.predictor_weight * loss_p
            logs.update(lp)
        x0_c = None
        if n_c:
            loss_c, lc, x0_c = self._corrector(student, nets["critic"], x[n_p:], t0[n_p:], batch.cond[n_p:], batch)
            total = total + c.corrector_weight * loss_c
            logs.update(lc)
        if self.critic is not None and batch.shared is not None:
            # the critic update of this step trains on these samples: the corrector's, and the predictor part's
            # jump to 0 (no gradient), instead of a second rollout from new noise
            with torch.no_grad():
                parts = [jump(_plain(student), x[:n_p], t0[:n_p], t0[:n_p], batch.cond[:n_p])[0]] if n_p else []
            parts += [x0_c.detach()] if n_c else []
            batch.shared["flow_map_fake"] = (torch.cat(parts), batch.cond)
        return LossOutput(total, logs)

    def _predictor(self, student, x: Tensor, t: Tensor, cond: Condition, batch: Batch):
        c = self.config
        d = t * (1 - batch.rand(x.shape[0]))  # (0, t]: land anywhere in [0, t)

        def velocity(dd):
            return student(x, t, with_jump(cond, dd), return_native=True)[1]

        with _jvp_attention():
            v, dv = torch.func.jvp(velocity, (d,), (torch.ones_like(d),))
        f = x - _bcast(d, x) * v.to(x.dtype)
        with torch.no_grad():
            _, u = self.teacher(f.detach(), t - d, cond, guidance_scale=self.guidance, return_native=True)
            target = u.float() - _bcast(d, x).float() * dv.detach().float()
        err = losses.per_sample_mean((v.float() - target) ** 2)
        w = (err.detach() + c.adaptive_c).pow(-c.adaptive_p) if c.adaptive_p > 0 else torch.ones_like(err)
        loss = (w * err).mean()
        return loss, {"loss_pred": loss.detach(), "pred_mse": err.detach().mean(),
                      "pred_dvdd_norm": dv.detach().flatten(1).norm(dim=1).mean()}

    def _corrector(self, student, critic, x: Tensor, t: Tensor, cond: Condition, batch: Batch):
        c = self.config
        x0, _ = jump(student, x, t, t, cond)  # the student's sample: a jump to 0
        r = c.min_t + (c.max_t - c.min_t) * batch.rand(x0.shape[0])
        xr = self.teacher.schedule.add_noise(x0.detach(), batch.randn(x0.shape), r)
        with torch.no_grad():
            real = self.teacher(xr, r, cond, guidance_scale=self.guidance)
            fake = fake_score(critic, xr, r, cond, c.dm_fp32)
        loss, grad = losses.dm_loss(x0, real, fake)
        return loss, {"loss_corr": loss.detach(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean(),
                      "x0_gap_teacher_critic": (real - fake).abs().mean()}, x0

    def _critic_loss(self, batch: Batch, nets) -> LossOutput:
        """Flow matching on the student's re-noised samples (the "fake" velocity field)."""
        c = self.config
        student, critic = _plain(nets["student"]), nets["critic"]
        def rollout(cond):
            x, t0 = self._start(student, batch, cond)
            return jump(student, x, t0, t0, cond)[0], cond

        fake, cond = batch.handed_or_rollout("flow_map_fake", rollout, "flow_map")
        r = c.critic_t_min + (1.0 - c.critic_t_min) * batch.rand(fake.shape[0])
        eps = batch.randn(fake.shape)
        xr = self.teacher.schedule.add_noise(fake, eps, r)
        _, native = critic(xr, r, cond, return_native=True)
        target = self.teacher.schedule.target(_plain(critic).denoiser.prediction, fake, eps, r)
        loss = losses.dsm_loss(native, target)
        return LossOutput(loss, {"loss_critic_fm": loss.detach()})

    # ---- sampling and export --------------------------------------------------------------------
    def sample(self, student, noise: Tensor, cond: Condition, num_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """1 to 4 jumps on the uniform grid (deterministic; ``generator`` is unused)."""
        times = self.times if num_steps in (None, self.steps) else student_times(num_steps, self.teacher.schedule)
        return flow_map_sample(student, noise, cond, times)

    def export_spec(self) -> dict:
        spec = {**sampler_for(self.teacher.schedule, self.steps, renoise=False), "num_inference_steps": self.steps,
                "guidance_scale": getattr(self.teacher, "export_guidance_scale", 0.0)}
        family = getattr(self.teacher, "family", "")
        if self.steps > 1 and family in PIPELINES:  # the jump length must reach the network: fewstep's own class
            spec["pipeline_class"], spec["pipeline_module"] = PIPELINES[family]
        return spec

    def export_modules(self, student) -> dict:
        """1 jump: the stock transformer with the ``d = 1`` embedding folded into a bias; else + ``jump_embedder``."""
        import copy

        from pipelines.flow_map import fold_jump

        net, emb = student.net, student.jump_embedder
        if self.steps == 1:
            return {"transformer": fold_jump(copy.deepcopy(net), emb, 1.0)}
        return {"transformer": net, "jump_embedder": emb}

    # ---- known answers (GMM) --------------------------------------------------------------------
    @torch.no_grad()
    def jump_from_noise(self, student, noise: Tensor, cond: Condition, d) -> Tensor:
        """``f(z, 1, d)``: the student's jump from noise (t = 1) to ``t = 1 - d``, for ``d`` in (0, 1]."""
        d = torch.as_tensor(d, dtype=torch.float32, device=noise.device)
        if not bool(torch.all((d > 0) & (d <= 1))):
            bad = d.flatten()[~((d.flatten() > 0) & (d.flatten() <= 1))][0].item()
            raise ValueError(f"jump length d must be in (0, 1] (from noise at t = 1 to t = 1 - d), got {bad:g}")
        t = torch.ones(noise.shape[0], device=noise.device)
        return jump(student, noise, t, d.expand(noise.shape[0]) if d.ndim == 0 else d, cond)[0]

    @torch.no_grad()
    def tracking_errors(self, student, noise: Tensor, cond: Condition, ds=(0.25, 0.5, 1.0),
                        ode_steps: int = 200) -> dict:
        """Mean ``|f(z, 1, d) - Phi_T(z, 1 -> 1 - d)|`` against the teacher's ODE (``ode_steps`` Euler steps)."""
        from ..sampling import ode_sample

        for d in ds:
            if not 0 < d <= 1 or abs(round(d * ode_steps) - d * ode_steps) > 1e-6:
                raise ValueError(f"jump length d must be in (0, 1] and on the {ode_steps}-step reference grid, got {d}")
        _, path, ts = ode_sample(self.teacher, noise, cond, ode_steps, guidance_scale=self.guidance, return_path=True)
        out = {}
        for d in ds:
            f = self.jump_from_noise(student, noise, cond, float(d))
            out[f"{d:g}"] = float((f - path[int(round(d * ode_steps))]).flatten(1).norm(dim=1).mean())
        return out
