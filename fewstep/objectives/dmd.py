"""DMD (Yin et al. 2023, arXiv 2311.18828) and DMD2 (Yin et al. 2024, arXiv 2405.14867).

Student ``G``: a copy of the teacher, x0-output, on the fixed grid ``times`` (1 to 4 steps).
Critic (fake score) ``D_F``: a copy of the teacher trained by denoising on the student's samples.
Generator gradient (Algorithm 1 of DMD): ``(D_F(x_t) - D_T(x_t)) / mean|x - D_T(x_t)|`` at
``t ~ U(min_t, max_t)``, teacher with CFG, critic without.
DMD adds a regression loss on teacher ODE pairs cached at start-up; DMD2 drops it, updates the critic
every step and the student every ``critic_steps`` (two time-scale rule), optionally adds a GAN head on
the critic's bottleneck features, and trains multi-step students (``objective.backward_simulation``):
by default (``phased``) exit k is trained in phase k of the run, one exit after another, against a critic
restarted from the teacher for each phase, with the DM and critic times inside the exit's own noise range
``(t_{k+1}, t_k]`` (Phased DMD's schedule with one shared network and DMD2's re-noising sampler: this file
delegates to :class:`~fewstep.objectives.phased_dmd.PhasedDMD`); ``per_exit`` keeps one critic per exit,
all exits at once; ``dmd2`` is the published rule (a random exit, one critic for the mixture of exits).

One student rollout per step: on a step that updates both groups, the critic trains on the student's detached output
of that step (as DMD2's reference code does), handed over in ``Batch.shared``; only critic-only (TTUR) steps roll the
student out again, without gradients.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..conditions import Condition
from ..teachers.base import frozen
from .base import (Batch, LossOutput, Objective, ObjectiveConfig, check_lr_decay, conditioning_sampler, conditioning_time,
                   decay_factor, register)
from .critics import Critic, GANHead, _plain, fake_score  # noqa: F401  (re-exported)
from .regression import cached_ode_paths


class ExitCritics(nn.Module):
    """One :class:`Critic` per exit of a multi-step student's backward simulation, as one module (one group).

    ``forward(..., exit=k)`` (a per-sample LongTensor of exit indices) routes each sample to critic ``k``, so
    critic ``k`` is trained only on exit ``k``'s outputs and the DM gradient at exit ``k`` uses its score: each
    exit's own distribution must match the data (``objective.backward_simulation=per_exit``).  Cost: ``K``
    critics (and their optimizer state) instead of one, and each critic step runs on ``K`` batches.
    """

    def __init__(self, critics: list[Critic]):
        super().__init__()
        if not critics:
            raise ValueError("ExitCritics needs at least one critic")
        self.critics = nn.ModuleList(critics)

    @property
    def num_exits(self) -> int:
        return len(self.critics)

    @property
    def schedule(self):
        return self.critics[0].schedule

    @property
    def denoiser(self):
        """Exit 0's denoiser (its prediction kind and schedule are every exit's)."""
        return self.critics[0].denoiser

    def forward(self, x_t, t, cond, return_native: bool = False, with_logits: bool = False,
                exit: Optional[Tensor] = None):
        if exit is None:
            raise ValueError("per-exit critics need the exit index of every sample (exit=LongTensor of shape (B,))")
        outs = None
        for k in range(self.num_exits):
            idx = (exit == k).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            o = self.critics[k](x_t[idx], t[idx], cond[idx], return_native=return_native, with_logits=with_logits)
            o = o if isinstance(o, tuple) else (o,)
            if outs is None:
                outs = [v.new_zeros((x_t.shape[0], *v.shape[1:])) for v in o]
            for buf, v in zip(outs, o):
                buf.index_copy_(0, idx, v)
        if outs is None or bool(((exit < 0) | (exit >= self.num_exits)).any()):
            raise ValueError(f"exit indices must lie in [0, {self.num_exits}), got {sorted(set(exit.tolist()))}")
        return tuple(outs) if len(outs) > 1 else outs[0]


BACKWARD_SIMULATION = {  # objective.backward_simulation values -> (exit rule, one critic per exit)
    "phased": ("phased", False),  # exits trained one after another, DM times in each exit's range (default)
    "per_exit": ("stratified", True),  # one critic per exit, each on its exit's outputs
    "dmd2": ("random", False),  # DMD2 (Yin et al. 2024, Sec. 4.5): random exit, one shared critic
    "random": ("random", False),  # alias of "dmd2"
    "last": ("last", False),  # train only the last exit
}


@dataclass
class DMD2Config(ObjectiveConfig):
    name: str = "dmd2"
    min_t: float = 0.02  # DM-gradient time range (fraction of the teacher's steps), official 0.02..0.98
    max_t: float = 0.98
    critic_steps: int = 5  # student updates once every this many critic updates (TTUR; SD1.5: 10)
    critic_lr_scale: float = 1.0  # critic lr = train.lr * this
    guidance_scale: Optional[float] = None  # teacher CFG for the DM gradient; None -> teacher.guidance_scale
    dm_weight: float = 1.0
    gan_weight: float = 0.0  # generator GAN weight (SDXL: 5e-3); > 0 needs real data (data.images)
    gan_disc_weight: Optional[float] = None  # discriminator weight; None -> 2 * gan_weight (SDXL: 1e-2)
    reg_weight: float = 0.0  # regression on cached teacher ODE pairs (DMD: 0.25); 0 disables
    reg_pairs: int = 1024  # number of cached (noise, teacher ODE sample) pairs
    reg_ode_steps: int = 50  # teacher DDIM steps used to make the pairs
    # "phased" at 2-4 steps: on-policy regression of each exit from its own rollout input onto the teacher's ODE from
    # there (phased_dmd's objective.reg_online, reg_online_rows; README "Regression on the teacher's ODE"); 0 = off
    reg_online: float = 0.0
    reg_online_rows: int = 0
    critic_t_min: float = 0.001  # critic denoising time range (all t)
    # multi-step students: "phased" (exits trained one after another, each in its own noise range), "per_exit"
    # (every exit at once, one critic per exit), "dmd2" (alias "random": a random exit, one critic for all
    # exits, the published recipe) or "last" (always the last exit); see BACKWARD_SIMULATION
    backward_simulation: str = "phased"
    phase_steps: int = 0  # "phased": steps per exit; 0 splits train.max_steps evenly
    # "phased": DM and critic times of exit k within its own range (t_{k+1}, t_k] ("phase") or anywhere above t_{k+1}
    # ("above", Phased DMD's paper range; phased_dmd's objective.dm_times)
    dm_times: str = "phase"
    # "phased": how one exit's output becomes the next exit's input: "renoise" (DMD2's sampler: x0, then fresh noise at
    # the next grid time; exported on the stock LCMScheduler, any K) or "ddim" (a deterministic DDIM / Euler move on the
    # grid, as phased_dmd's default; exported on a stock DDIMScheduler / FlowMatchEulerDiscreteScheduler; on a 1000-step
    # teacher K must divide 1000). The other rules re-noise.
    transition: str = "renoise"
    # "phased": while exit k trains, an MSE term (this weight) keeps the shared network's x0 at the earlier exits'
    # inputs on a frozen snapshot of its trainable weights (a LoRA: the adapter) taken when exit k's phase started:
    # the earlier exits no longer drift (phased_dmd's objective.anchor_weight; README "Multi-step students"); 0 = off
    anchor_weight: float = 0.0
    # "phased": clear the student's optimizer state at each exit's phase start, as the critic's, and ramp its lr up
    # again over reset_warmup_steps (null: a fifth of the phase; 0: no ramp). Without the reset the earlier exits'
    # Adam moments damp the new exit (ring8 4 steps: 3.36x / spread 0.67); without the ramp the fresh state's first
    # updates (~lr on every weight) can wreck the net (skew3 4 steps: 17.3x / 0.68). README "Multi-step students"
    student_opt_reset: bool = True
    reset_warmup_steps: Optional[int] = None
    # the critic as a LoRA (peft adapter): null = the student's rank and alpha when the student is a LoRA on the shared
    # base (student.share_base), else a full copy; 0 = a full float32 copy; > 0 = a LoRA of this rank
    critic_lora_rank: Optional[int] = None
    critic_lora_alpha: Optional[float] = None  # null: the rank (scale 1); with critic_lora_rank null: the student's
    dm_fp32: bool = True  # the critic's prediction in the DM gradient in float32, autocast off (float32 critics)
    # 1-step students on VP UNet teachers: fed pure noise but called at this teacher timestep (DMD2's SDXL 1-step:
    # 399), its output read as x0 with that timestep's alpha/sigma; null: the top of the grid (999). Exported with a
    # stock DDIMScheduler whose 1-step call is [conditioning_t] (objectives.base.conditioning_sampler)
    conditioning_t: Optional[int] = None
    # "cosine": the student's and the critic's lr follow a half cosine from train.lr down to lr_decay_min x train.lr
    # over the run (a 1-step student) or over each exit's phase ("phased"), so the two players settle instead of
    # circling each other at the end (ring8 1 step, seed 0: 6.18x / spread 0.46 with a constant lr, 1.06x / 0.98 with
    # it); "constant" (default): the lr stays (README "Training behaviour you can rely on")
    lr_decay: str = "constant"
    lr_decay_min: float = 0.05


@dataclass
class DMDConfig(DMD2Config):
    name: str = "dmd"
    critic_steps: int = 1
    reg_weight: float = 0.25


@register
class DMD2(Objective):
    name = "dmd2"
    Config = DMD2Config
    shares_base = True  # LoRA student / critic as adapters on the teacher's UNet (student.share_base)

    def __init__(self, config, teacher, student_steps):
        super().__init__(config, teacher, student_steps)
        c = config
        if not 0.0 <= c.min_t < c.max_t <= 1.0:
            raise ValueError(f"objective.min_t/max_t must satisfy 0 <= min_t < max_t <= 1, got {c.min_t}, {c.max_t}")
        if c.critic_steps < 1:
            raise ValueError(f"objective.critic_steps must be >= 1, got {c.critic_steps}")
        if c.backward_simulation not in BACKWARD_SIMULATION:
            raise ValueError(f"objective.backward_simulation must be one of {', '.join(BACKWARD_SIMULATION)}; "
                             f"got {c.backward_simulation!r}")
        self.exit_rule, per_exit = BACKWARD_SIMULATION[c.backward_simulation]
        if c.transition not in ("renoise", "ddim"):
            raise ValueError(f"objective.transition must be 'renoise' or 'ddim', got {c.transition!r}")
        if c.transition == "ddim" and self.exit_rule != "phased" and student_steps > 1:
            raise ValueError(f"objective.transition=ddim needs backward_simulation=phased; "
                             f"backward_simulation={c.backward_simulation} re-noises between exits")
        if c.conditioning_t is not None:  # pure noise in, the network called at timestep conditioning_t
            self.times = [conditioning_time(teacher, self.steps, c.conditioning_t)]
        if c.gan_weight < 0 or c.reg_weight < 0:
            raise ValueError("objective.gan_weight and objective.reg_weight must be >= 0")
        check_lr_decay(c)
        self.max_steps: Optional[int] = None
        self.phased = None
        if c.reg_online and not (self.exit_rule == "phased" and self.steps > 1):
            raise ValueError(f"objective.reg_online={c.reg_online} needs student.steps >= 2 with "
                             f"backward_simulation=phased (got {self.steps} step(s), {c.backward_simulation}); "
                             f"a 1-step student takes reg_weight's cached pairs")
        if self.exit_rule == "phased" and self.steps > 1:
            from .phased_dmd import PhasedDMD, PhasedDMDConfig

            # every option the two configs share passes through (DMD2's phased exits are phased_dmd with one shared
            # network; objective.transition picks the sampler between exits)
            shared = {f.name for f in dataclasses.fields(PhasedDMDConfig)} & {f.name for f in dataclasses.fields(c)}
            passed = {k: getattr(c, k) for k in shared - {"name", "experts"}}
            self.phased = PhasedDMD(PhasedDMDConfig(experts="shared", **passed), teacher, student_steps)
            self.student, self.critic = self.phased.student, self.phased.critic
            self.guidance, self.disc_weight, self.reg, self.per_exit = self.phased.guidance, 0.0, None, False
            return
        self.student = teacher.new_network("student")

        def one_critic():
            # the GAN head before the network (same init)
            head = GANHead(teacher.feature_channels, teacher.feature_size) if c.gan_weight > 0 else None
            return Critic(teacher.new_network("critic"), head)

        self.per_exit = per_exit and self.steps > 1
        if self.per_exit:
            self.critic = ExitCritics([one_critic() for _ in range(self.steps)])
        else:  # a 1-step student has one exit: every rule is plain DMD2
            self.critic = one_critic()
        self.guidance = teacher.guidance_scale if c.guidance_scale is None else float(c.guidance_scale)
        self.disc_weight = 2 * c.gan_weight if c.gan_disc_weight is None else c.gan_disc_weight
        self.reg: Optional[dict] = None

    # ---- contract -------------------------------------------------------------------------------
    def networks(self):
        return {"student": self.student, "critic": self.critic}

    def set_max_steps(self, max_steps):
        self.max_steps = int(max_steps)
        if self.phased is not None:
            self.phased.set_max_steps(max_steps)

    def reset_groups(self, step):
        return self.phased.reset_groups(step) if self.phased is not None else []

    def lr_factor(self, group, step):
        if self.phased is not None:
            return self.phased.lr_factor(group, step)
        return decay_factor(self.config, step, self.max_steps)

    def export_spec(self):
        if self.phased is not None:  # its sampler between exits (objective.transition) sets the scheduler
            return self.phased.export_spec()
        spec = super().export_spec()
        if self.config.conditioning_t is not None:
            t = self.config.conditioning_t
            spec.update(conditioning_sampler(self.teacher.schedule, t))
            spec["card_note"] = (f"The student takes pure noise and is conditioned at timestep {t} (not the top one): "
                                 f"the scheduler (the teacher's first {t + 1} training betas, `trailing` spacing) "
                                 f"gives the timesteps [{t}] for `num_inference_steps=1`; use one step.")
        return spec

    def sample(self, student, noise, cond, num_steps=None, generator=None):
        if self.phased is not None:
            return self.phased.sample(student, noise, cond, num_steps, generator)
        return super().sample(student, noise, cond, num_steps, generator)

    def plan(self, step):
        if step % self.config.critic_steps == 0:
            return ["student", "critic"]
        return ["critic"]

    def wants_conditions(self, group, step):
        # after a student update in the same step the critic trains on the student's samples and their conditions
        return group != "critic" or "student" not in self.plan(step)

    def wants_real(self, step):
        return self.config.gan_weight > 0

    def lr_scale(self, group):
        return self.config.critic_lr_scale if group == "critic" else 1.0

    def setup(self, run_dir, accelerator, data=None):
        if self.phased is not None:  # its own regression term: per exit, on the teacher's ODE states (phased_dmd)
            self.phased.setup(run_dir, accelerator, data)
        elif self.config.reg_weight > 0:
            c = self.config
            self.reg = cached_ode_paths(Path(run_dir) / "regression_pairs.safetensors", self.teacher, c.reg_pairs,
                                        c.reg_ode_steps, self.guidance, accelerator, data)

    # ---- student rollout (backward simulation) --------------------------------------------------
    def _rollout_input(self, student_plain, batch: Batch, cond: Condition):
        """(input, time) of :meth:`_backward_simulation` (without the exit indices)."""
        return self._backward_simulation(student_plain, batch, cond)[:2]

    def _backward_simulation(self, student_plain, batch: Batch, cond: Condition, keep_all: bool = False):
        """Noise, or for a multi-step student a state at a grid time reached by the student itself.

        Backward simulation (DMD2 Sec. 4.5): run the student ``k`` steps from noise without grad, re-noise
        its x0 to ``times[k]``, and train there.  Exit rules (``objective.backward_simulation``):
        ``dmd2``/``random``: one random ``k`` per micro-batch (DMD2); ``last``: always ``K - 1``;
        ``per_exit``: exits stratified over the batch, sample ``i`` at ``(offset + i) % K`` with a random
        offset (a random exit when the micro-batch is smaller than ``K``), each exit's DM gradient from its
        own critic (the critics themselves train on every exit's outputs: :meth:`_all_exits`).
        With one shared critic (``dmd2``) the critic models the *mixture* of all exits' outputs, and the DM
        gradient only asks that mixture to match the data: the exits can settle where they compensate each
        other (each collapsed or too wide, the mixture right).  Per-exit critics ask it of every exit.
        Returns ``(x, t, exit)``, ``exit`` a (B,) LongTensor of exit indices.  ``keep_all``: run every sample through
        every exit (the same noise stream once the batch holds every exit) and return, fourth, what
        :meth:`_all_exits` returns for the per-exit critics: one rollout for both groups of the step.
        """
        n, dev = batch.size, batch.device
        x = batch.randn((n, *self.teacher.sample_shape))
        if self.steps == 1:  # one exit: noise at the first grid time
            return x, torch.full((n,), self.times[0], device=dev), torch.zeros((n,), dtype=torch.long, device=dev)
        k = batch.randint(self.steps)  # drawn in every mode: same noise stream
        if self.exit_rule == "last":
            k = self.steps - 1
        if self.exit_rule == "stratified":
            exits = (k + torch.arange(n)) % self.steps
        else:
            exits = torch.full((n,), k, dtype=torch.long)
        top = int(exits.max()) if n else 0  # the deepest exit (on the CPU: no device sync)
        exits = exits.to(dev)
        times = torch.tensor(self.times, device=dev)
        if keep_all:
            states, outs = [], []
            with torch.no_grad():
                for i in range(self.steps):
                    t = torch.full((n,), self.times[i], device=dev)
                    states.append(x)
                    outs.append(student_plain(x, t, cond))
                    if i + 1 < self.steps:
                        x = self.teacher.schedule.add_noise(outs[-1], batch.randn(x.shape), torch.full_like(t, self.times[i + 1]))
            x_in = torch.stack(states)[exits, torch.arange(n, device=dev)]
            every = torch.arange(self.steps, device=dev).repeat_interleave(n)
            return x_in, times[exits], exits, (torch.cat(outs), every, Condition.cat([cond] * self.steps))
        with torch.no_grad():
            for i in range(top):
                eps = batch.randn(x.shape)  # the whole batch's noise each step: the stream does not depend on exits
                go = (exits > i).nonzero().squeeze(1)
                if len(go) == n:
                    x = self._renoised_step(student_plain, x, eps, cond, i)
                else:
                    x = x.index_copy(0, go, self._renoised_step(student_plain, x[go], eps[go], cond[go], i))
        return x, times[exits], exits

    @torch.no_grad()
    def _all_exits(self, student_plain, batch: Batch, cond: Condition):
        """Every exit's x0 for the whole batch, from one K-step rollout: ``(x0 (K*B, ...), exit (K*B,), cond)``.

        The per-exit critics' data: each critic sees a full batch of its exit's outputs every step (with the
        batch split between them, ``B/K`` each, the later exits' critics lag and those exits stay too narrow:
        uneq6 2-step spread 0.80 vs 0.92, tools/multistep_ablation.py).  Critic compute is ``K`` times DMD2's.
        """
        n = batch.size
        x = batch.randn((n, *self.teacher.sample_shape))
        outs = []
        for i in range(self.steps):
            t = torch.full((n,), self.times[i], device=batch.device)
            outs.append(student_plain(x, t, cond))
            if i + 1 < self.steps:
                x = self.teacher.schedule.add_noise(outs[-1], batch.randn(x.shape), torch.full_like(t, self.times[i + 1]))
        exits = torch.arange(self.steps, device=batch.device).repeat_interleave(n)
        return torch.cat(outs), exits, Condition.cat([cond] * self.steps)

    def _renoised_step(self, student_plain, x, eps, cond, i: int):
        """One student step from ``times[i]``: its x0, re-noised with ``eps`` to ``times[i + 1]``."""
        t = torch.full((x.shape[0],), self.times[i], device=x.device)
        x0 = student_plain(x, t, cond)
        return self.teacher.schedule.add_noise(x0, eps, torch.full_like(t, self.times[i + 1]))

    def _noised(self, x0: Tensor, batch: Batch, lo: float, hi: float):
        t = lo + (hi - lo) * batch.rand(x0.shape[0])
        eps = batch.randn(x0.shape)
        return self.teacher.schedule.add_noise(x0, eps, t), t, eps

    # ---- losses ---------------------------------------------------------------------------------
    def loss(self, group, batch, step, nets):
        if self.phased is not None:
            return self.phased.loss(group, batch, step, nets)
        if group == "student":
            return self._student_loss(batch, nets)
        if group == "critic":
            return self._critic_loss(batch, nets)
        raise KeyError(group)

    def _student_loss(self, batch: Batch, nets) -> LossOutput:
        c = self.config
        student, critic = nets["student"], nets["critic"]
        plain = _plain(student)
        handoff = batch.shared is not None  # inside the trainer: the critic update of this step reuses the rollout
        if self.per_exit and handoff:  # the per-exit critics want every exit: roll every sample through all of them
            x_in, t_in, exits, every = self._backward_simulation(plain, batch, batch.cond, keep_all=True)
            batch.shared["dmd2_fake"] = every
        else:
            x_in, t_in, exits = self._backward_simulation(plain, batch, batch.cond)
        cond = batch.cond
        n_reg = 0
        if self.reg is not None:  # one forward over [main batch, regression pairs] (one DDP forward per step)
            idx = torch.randint(len(self.reg["path"][0]), (batch.size,), generator=batch.generator)
            z_ref, y_ref = (v[idx].to(batch.device) for v in self.reg["path"])
            x_in = torch.cat([x_in, z_ref])
            t_in = torch.cat([t_in, torch.full_like(t_in, self.times[0])])
            cond = Condition.cat([cond, self.reg["cond"][idx].to(batch.device)])
            n_reg = batch.size
        out = student(x_in, t_in, cond)
        x = out[: batch.size]
        if handoff and not self.per_exit:
            batch.shared["dmd2_fake"] = (x.detach(), exits, batch.cond)
        logs = {}
        xt, t, _ = self._noised(x, batch, c.min_t, c.max_t)
        with torch.no_grad():
            real = self.teacher(xt.detach(), t, batch.cond, guidance_scale=self.guidance)
            fake = fake_score(critic, xt.detach(), t, batch.cond, c.dm_fp32, exit=exits)
        loss_dm, grad = losses.dm_loss(x, real, fake)
        total = c.dm_weight * loss_dm
        logs["loss_dm"] = loss_dm.detach()
        logs["dm_grad_norm"] = grad.flatten(1).norm(dim=1).mean()
        logs["x0_gap_teacher_critic"] = (real - fake).abs().mean()
        if n_reg:
            loss_reg = F.mse_loss(out[batch.size:].float(), y_ref.float())
            total = total + c.reg_weight * loss_reg
            logs["loss_reg_mse"] = loss_reg.detach()
        if c.gan_weight > 0:
            xg, tg, _ = self._noised(x, batch, c.critic_t_min, 1.0)
            crit = _plain(critic)
            with frozen(crit):
                _, logits = crit(xg, tg, batch.cond, with_logits=True, exit=exits)
            loss_g = losses.gan_generator_loss(logits)
            total = total + c.gan_weight * loss_g
            logs["loss_gan_g"] = loss_g.detach()
            logs["logits_fake_g"] = logits.detach().mean()
        return LossOutput(total, logs)

    def _critic_loss(self, batch: Batch, nets) -> LossOutput:
        c = self.config
        student, critic = _plain(nets["student"]), nets["critic"]
        per_exit = _plain(critic).num_exits > 1
        def rollout(cond):
            if per_exit:  # every critic on its own exit's x0 for the whole batch (one K-step rollout gives them all)
                return self._all_exits(student, batch, cond)
            x_in, t_in, exits = self._backward_simulation(student, batch, cond)
            return student(x_in, t_in, cond), exits, cond

        fake, exits, cond = batch.handed_or_rollout("dmd2_fake", rollout, "dmd2")
        xt, t, eps = self._noised(fake, batch, c.critic_t_min, 1.0)
        pred_kind = _plain(critic).denoiser.prediction
        target = self.teacher.schedule.target(pred_kind, fake, eps, t)
        logs = {}
        if c.gan_weight > 0:
            if batch.real is None:
                raise ValueError("objective.gan_weight > 0 needs real samples (set data.images)")
            reps = len(fake) // batch.size  # per-exit critics: every exit's head sees the whole real batch
            real = batch.real[: batch.size].repeat(reps, *([1] * (batch.real.ndim - 1)))
            real_cond = Condition.cat([batch.real_cond[: batch.size]] * reps)
            xr, tr, _ = self._noised(real, batch, c.critic_t_min, 1.0)
            x_all = torch.cat([xt, xr])
            t_all = torch.cat([t, tr])
            cond_all = Condition.cat([cond, real_cond])
            _, native, logits = critic(x_all, t_all, cond_all, return_native=True, with_logits=True,
                                       exit=torch.cat([exits, exits]))
            n = xt.shape[0]
            loss_dsm = losses.dsm_loss(native[:n], target)
            loss_d = losses.gan_discriminator_loss(logits[:n], logits[n:])
            total = loss_dsm + self.disc_weight * loss_d
            logs.update(loss_gan_d=loss_d.detach(), logits_fake=logits[:n].detach().mean(),
                        logits_real=logits[n:].detach().mean())
        else:
            _, native = critic(xt, t, cond, return_native=True, exit=exits)
            loss_dsm = losses.dsm_loss(native, target)
            total = loss_dsm
        logs["loss_critic_dsm"] = loss_dsm.detach()
        return LossOutput(total, logs)


@register
class DMD(DMD2):
    name = "dmd"
    Config = DMDConfig
