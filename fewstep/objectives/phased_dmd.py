"""Phased DMD (arXiv 2510.27684): distribution matching one subinterval of the noise range at a time.

A K-step student's noise range is split into K phases at its grid ``1 = t_0 > t_1 > ... > t_K = 0``.
Phase k trains the step ``t_k -> t_{k+1}``: its expert ``G_k`` predicts x0 from ``x_{t_k}`` and moves
deterministically (DDIM / Euler) to ``x_{t_{k+1}}`` (the last phase outputs x0).  Its input comes from
the frozen earlier experts, run from noise.  Its target is the teacher's marginal at ``t_{k+1}``: the
DM gradient is taken at ``t`` drawn above ``t_{k+1}``, on ``x_t`` forward-diffused from the generated
``x_{t_{k+1}}``.  By default (``dm_times=phase``) ``t`` stays inside the phase, ``(t_{k+1}, t_k]``: what
a late phase changes (fine detail, within-mode spread) is invisible at high noise, and drawing ``t`` over
all of ``(t_{k+1}, 1]`` (``dm_times=above``) starves it of signal (4-step spread 0.30 vs 0.99 on a
mixture with unequal stds, same budget; README "Multi-step students").  The phase's critic (re-initialised from the teacher at the phase start) cannot see x0,
so it learns by score matching within the subinterval, with the unbiased target of
:meth:`~fewstep.schedules.NoiseSchedule.renoise_targets` weighted by ``(beta / sigma_t)^2``.

Phases run one after another inside one run (``objective.phase_steps`` each, or ``train.max_steps``
split evenly).  ``objective.experts``: ``separate`` (one expert per phase, as in the paper: full copies,
or LoRA adapters on one base when ``student.lora_rank > 0``) or ``shared`` (one network for all steps;
earlier steps then drift while later phases train).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .. import losses
from ..conditions import Condition
from ..sampling import ode_segment
from ..schedules import _bcast
from ..teachers.base import frozen
from .base import Batch, LossOutput, Objective, ObjectiveConfig, check_lr_decay, decay_factor, register, sampler_for
from .anchor import PhaseAnchor
from .critics import Critic, GANHead, _plain, fake_score
from .regression import TrajectoryRegression, cached_ode_paths

EXPERT_PIPELINES = {  # teacher pipeline class -> (pipelines/ class with per-phase experts, its module)
    "StableDiffusionPipeline": ("PhasedStableDiffusionPipeline", "phased_sd15"),
    "StableDiffusionXLPipeline": ("PhasedStableDiffusionXLPipeline", "phased_sdxl"),
    "StableDiffusion3Pipeline": ("PhasedStableDiffusion3Pipeline", "phased_sd3"),
    "FluxPipeline": ("PhasedFluxPipeline", "phased_flux"),
    "ClassConditionalPipeline": ("PhasedClassConditionalPipeline", "phased_class_conditional"),
}
NET_TIME_IS_SIGMA = ("FluxPipeline",)  # pipelines that pass the network sigma in [0, 1], not a timestep


@dataclass
class PhasedDMDConfig(ObjectiveConfig):
    name: str = "phased_dmd"
    experts: str = "separate"  # separate: one expert per phase (paper); shared: one network for every phase
    transition: str = "ddim"  # between phases: deterministic "ddim"/Euler move, or "renoise" (x0, then fresh noise:
    #                           DMD2/LCM's sampler, exported on the stock LCMScheduler)
    phase_steps: int = 0  # optimisation steps per phase; 0 splits train.max_steps evenly over the K phases
    dm_times: str = "phase"  # DM/critic times: within the "phase" (t_{k+1}, t_k], or all "above" t_{k+1} (t_{k+1}, 1]
    min_t: float = 0.02  # DM time range, as fractions of that interval
    max_t: float = 0.98
    critic_steps: int = 5  # student updates once every this many critic updates (TTUR, as DMD2)
    critic_lr_scale: float = 1.0
    dm_weight: float = 1.0  # the distribution-matching term's weight (0: the regression term alone)
    critic_reset: bool = True  # re-initialise the critic from the teacher (and its optimizer) at each phase start
    critic_t_min: float = 0.001  # critic times: (t_{k+1} + critic_t_min * (1 - t_{k+1}), 1]
    critic_target: str = "unbiased"  # unbiased subinterval score-matching target, or "naive" (x_{t_k} as data; biased)
    guidance_scale: Optional[float] = None  # teacher CFG for the DM gradient; None -> teacher.guidance_scale
    gan_weight: float = 0.0  # optional GAN term (needs data.images), on the critic's bottleneck, as in DMD2
    gan_disc_weight: Optional[float] = None
    critic_lora_rank: Optional[int] = None  # the critic as a LoRA: as dmd2's objective.critic_lora_rank
    critic_lora_alpha: Optional[float] = None
    dm_fp32: bool = True  # the critic's prediction for the DM gradient in float32, autocast off (as dmd2's)
    # experts=shared: while phase k trains, an MSE term (this weight) keeps the network's x0 at the earlier steps'
    # inputs (x_{t_j}, t_j, j < k, from this step's rollout) on a frozen snapshot of its trainable weights taken at
    # the start of phase k (a LoRA: the adapter only), against the drift of the earlier steps; 0 disables
    anchor_weight: float = 0.0
    # clear the student's optimizer state at each phase start (with the critic's): with one shared network Adam's
    # moments from the earlier phases otherwise carry over and damp the new phase's updates. null: on for
    # experts=shared (dmd2 passes its own), off for separate experts (each new expert's state is fresh anyway)
    student_opt_reset: Optional[bool] = None
    # from each later phase's start where the student's optimizer state is fresh (that reset, or a new separate
    # expert) its lr ramps linearly from 0 over this many steps (a fresh Adam state otherwise moves every weight by
    # ~lr at its first updates); null: a fifth of the phase; 0: no ramp
    reset_warmup_steps: Optional[int] = None
    # experts=separate: what expert k (k >= 1) starts from at its phase start: "teacher" (a copy of the teacher, as in
    # the paper) or "previous" (expert k-1's trained weights: a sharp one-step generator one phase noisier)
    expert_init: str = "teacher"
    # trajectory regression (DMD's regression term, per phase): expert k, fed the teacher's ODE state x_{t_k}, is pulled
    # (MSE on x0, this weight) to the x0 whose move lands on the teacher's x_{t_{k+1}} (transition=renoise: on the
    # teacher's final sample); one shared network takes it at every exit trained so far (0..k: it also holds the
    # earlier exits in place); reg_pairs ODE paths of reg_ode_steps DDIM steps, cached in the run folder; 0 = off
    reg_weight: float = 0.0
    reg_pairs: int = 1024
    reg_ode_steps: int = 50
    # on-policy regression (this weight; 0 = off): the step's own input x_{t_k} (the student's earlier steps, run from
    # noise) pulled to the x0 of the teacher's ODE run from that same x_{t_k} (reg_ode_steps per unit time) to
    # t_{k+1} (the last step and transition=renoise: to the sample). reg_weight's cached rows start from the teacher's
    # states, which the student's own earlier steps never quite reach; these start where the student actually is.
    # Costs ~reg_ode_steps * (t_k - t_{k+1}) teacher calls per student update on reg_online_rows rows (0: the batch)
    reg_online: float = 0.0
    reg_online_rows: int = 0
    # "cosine": the student's and the critic's lr follow a half cosine within each phase, from train.lr down to
    # lr_decay_min x train.lr at the phase's end (times the reset ramp); "constant": no decay (dmd2's objective.lr_decay)
    lr_decay: str = "constant"
    lr_decay_min: float = 0.05


class PhasedStudent(nn.Module):
    """The K-step student as one module: experts switched by the time of their phase's start.

    ``forward(x_t, t, cond)`` gives the x0-prediction of the expert whose phase starts at ``t`` (a grid
    time; between grid times, the expert of the next grid time above ``t``).  LoRA experts are named
    adapters on one base network (``adapters``), activated per call without touching ``requires_grad``.
    """

    def __init__(self, experts: list, times: list[float], adapters: Optional[list[str]] = None):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.times = [float(t) for t in times]
        self.adapters = adapters  # LoRA experts: one Denoiser in ``experts``, one adapter name per phase

    @property
    def schedule(self):
        return self.experts[0].schedule

    @property
    def prediction(self):
        return self.experts[0].prediction

    @property
    def num_experts(self) -> int:
        return len(self.adapters) if self.adapters else len(self.experts)

    @property
    def net(self):
        """The network of a single shared expert (what export and LoRA handling read)."""
        if self.num_experts != 1:
            raise AttributeError("a PhasedStudent with separate experts has no single 'net'")
        return self.experts[0].net

    def __setattr__(self, name, value):
        if name == "net":  # replace the shared expert's network (e.g. with exported weights)
            if self.num_experts != 1:
                raise AttributeError("a PhasedStudent with separate experts has no single 'net'")
            self.experts[0].net = value
            return
        super().__setattr__(name, value)

    def phase_of(self, t: float) -> int:
        return min(sum(1 for g in self.times if g > float(t) + 1e-6), len(self.times) - 1)

    def expert(self, k: int) -> nn.Module:
        if self.adapters:
            _activate_adapter(self.experts[0].net, self.adapters[k])
            return self.experts[0]
        return self.experts[k if len(self.experts) > 1 else 0]

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition, **kw):
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.num_experts == 1:  # one shared network: any times in one call (e.g. the anchor's, batched)
            return self.expert(0)(x_t, t, cond, **kw)
        ks = {self.phase_of(v) for v in t.tolist()}
        if len(ks) != 1:
            raise ValueError(f"one call of a phased student takes one phase; got times {sorted(set(t.tolist()))}")
        return self.expert(ks.pop())(x_t, t, cond, **kw)


def _activate_adapter(net: nn.Module, name: str) -> None:
    """Make ``name`` the active LoRA adapter of every peft layer (``requires_grad`` left as it is)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in net.modules():
        if isinstance(m, BaseTunerLayer):
            m._active_adapter = name


@register
class PhasedDMD(Objective):
    name = "phased_dmd"
    Config = PhasedDMDConfig
    shares_base = True  # LoRA experts / critic as adapters on the teacher's UNet (student.share_base)

    def __init__(self, config, teacher, student_steps):
        super().__init__(config, teacher, student_steps)
        c = config
        if c.experts not in ("separate", "shared"):
            raise ValueError(f"objective.experts must be 'separate' or 'shared', got {c.experts!r}")
        if c.transition not in ("ddim", "renoise"):
            raise ValueError(f"objective.transition must be 'ddim' or 'renoise', got {c.transition!r}")
        if c.dm_times not in ("above", "phase"):
            raise ValueError(f"objective.dm_times must be 'above' or 'phase', got {c.dm_times!r}")
        if c.critic_target not in ("unbiased", "naive"):
            raise ValueError(f"objective.critic_target must be 'unbiased' or 'naive', got {c.critic_target!r}")
        if not 0.0 <= c.min_t < c.max_t <= 1.0:
            raise ValueError(f"objective.min_t/max_t must satisfy 0 <= min_t < max_t <= 1, got {c.min_t}, {c.max_t}")
        if c.expert_init not in ("teacher", "previous"):
            raise ValueError(f"objective.expert_init must be 'teacher' or 'previous', got {c.expert_init!r}")
        if c.critic_steps < 1 or c.phase_steps < 0:
            raise ValueError(f"objective.critic_steps must be >= 1 and objective.phase_steps >= 0, "
                             f"got {c.critic_steps}, {c.phase_steps}")
        n = getattr(teacher.schedule, "num_train_timesteps", None)
        if n and n % self.steps and c.transition == "ddim":
            raise ValueError(f"objective.transition=ddim on a {n}-step teacher needs student.steps dividing {n} (1, 2, 4, "
                             f"5, 8, ...) so that a stock DDIMScheduler reproduces the sampler, or "
                             f"objective.transition=renoise (any K); got {self.steps}")
        self.bounds = [*self.times, 0.0]  # phase k: t_k -> t_{k+1}
        self.student = self._build_student(c.experts == "separate" and self.steps > 1)
        head = GANHead(teacher.feature_channels, teacher.feature_size) if c.gan_weight > 0 else None
        self.critic = Critic(teacher.new_network("critic"), head)
        self._critic_init = self._critic_restart_state() if c.critic_reset and self.steps > 1 else None
        self.guidance = teacher.guidance_scale if c.guidance_scale is None else float(c.guidance_scale)
        self.disc_weight = 2 * c.gan_weight if c.gan_disc_weight is None else c.gan_disc_weight
        self.max_steps: Optional[int] = None
        check_lr_decay(c)
        if c.anchor_weight < 0:
            raise ValueError(f"objective.anchor_weight must be >= 0, got {c.anchor_weight}")
        if c.reset_warmup_steps is not None and c.reset_warmup_steps < 0:
            raise ValueError(f"objective.reset_warmup_steps must be >= 0, got {c.reset_warmup_steps}")
        self.anchored = c.anchor_weight > 0 and self.steps > 1 and self.student.num_experts == 1
        self.anchor = PhaseAnchor(self.bounds)
        if c.dm_weight < 0:
            raise ValueError(f"objective.dm_weight must be >= 0, got {c.dm_weight}")
        if c.reg_weight < 0 or c.reg_pairs < 1 or c.reg_ode_steps < self.steps:
            raise ValueError(f"objective.reg_weight must be >= 0, reg_pairs >= 1 and reg_ode_steps >= student.steps "
                             f"({self.steps}); got {c.reg_weight}, {c.reg_pairs}, {c.reg_ode_steps}")
        self.reg: Optional[TrajectoryRegression] = None  # setup() with reg_weight > 0
        if c.reg_online < 0 or c.reg_online_rows < 0:
            raise ValueError(f"objective.reg_online and reg_online_rows must be >= 0; got {c.reg_online}, "
                             f"{c.reg_online_rows}")

    def _build_student(self, separate: bool) -> PhasedStudent:
        first = self.teacher.new_network("student")
        if not separate:
            return PhasedStudent([first], self.times)
        if first.shared_base:  # adapters on the teacher's UNet: one more adapter (a network of its own) per expert
            return PhasedStudent([first] + [self.teacher.new_network("student") for _ in range(self.steps - 1)],
                                 self.times)
        peft_cfg = getattr(first.net, "peft_config", None)
        if peft_cfg:  # LoRA experts: K adapters on one frozen base
            base_cfg = peft_cfg["default"]
            names = ["default"] + [f"phase{k}" for k in range(1, self.steps)]
            import warnings

            with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                for name in names[1:]:
                    first.net.add_adapter(copy.deepcopy(base_cfg), adapter_name=name)
            for n_, p in first.net.named_parameters():
                if "lora_" in n_:
                    p.requires_grad_(True)
            _activate_adapter(first.net, "default")
            return PhasedStudent([first], self.times, adapters=names)
        return PhasedStudent([first] + [self.teacher.new_network("student") for _ in range(self.steps - 1)],
                             self.times)

    # ---- phases ---------------------------------------------------------------------------------
    def set_max_steps(self, max_steps: int) -> None:
        self.max_steps = int(max_steps)
        if self.config.phase_steps == 0 and self.max_steps < self.steps:
            import sys

            print(f"fewstep: warning: train.max_steps={max_steps} is fewer than the {self.steps} phases: the last "
                  f"{self.steps - self.max_steps} phase(s) get no training step", file=sys.stderr)

    def phase_length(self) -> int:
        if self.config.phase_steps:
            return self.config.phase_steps
        if self.max_steps is None:
            raise RuntimeError("phased_dmd needs objective.phase_steps or set_max_steps(train.max_steps)")
        return max(1, -(-self.max_steps // self.steps))

    def phase(self, step: int) -> int:
        return min(step // self.phase_length(), self.steps - 1)

    def _critic_restart_state(self) -> dict:
        """What a phase restart writes into the critic's trainable tensors, holding as little as it can: a LoRA's B
        -> zeros (``None``: the adapter then adds nothing and the critic is the teacher again; A keeps its values),
        a full copy of a diffusers teacher -> the teacher's own weights (references, cast at the copy: no second
        copy of an SDXL UNet in memory), anything else (a toy critic's residual) -> a clone of its initial value.
        Frozen tensors are not held: they never change."""
        teacher_net = getattr(self.teacher.denoiser, "net", None)
        base = {}
        if isinstance(teacher_net, nn.Module) and hasattr(teacher_net, "config"):  # a diffusers model
            from ..lora import plain_state

            base = {f"net.{k}": v for k, v in plain_state(teacher_net, None)}
        init: dict = {}
        for name, p in self.critic.denoiser.named_parameters():
            if not p.requires_grad or "lora_A" in name:  # peft's "x.lora_A.ad.weight", a view's "x/lora_A/weight"
                continue
            if "lora_B" in name:
                init[name] = None
            elif name in base and base[name].shape == p.shape:
                init[name] = base[name]
            else:
                init[name] = p.detach().clone()
        return init

    def reset_groups(self, step: int) -> list[str]:
        """At the first step of phases 1..K-1: the critic restarts from the teacher (weights and optimizer); with
        ``expert_init=previous`` the phase's expert starts from the one before it."""
        if step == 0 or step % self.phase_length() or step // self.phase_length() >= self.steps:
            return []
        if self.config.expert_init == "previous" and self.student.num_experts > 1:
            self._copy_expert(step // self.phase_length())
        if self._critic_init is None:
            return ["student"] if self.student_reset else []
        from ..sharding import shard_like

        with torch.no_grad():
            for name, p in self.critic.denoiser.named_parameters():
                if name not in self._critic_init:
                    continue
                src = self._critic_init[name]
                if src is None:
                    p.zero_()
                else:  # under FSDP: this process's shard of the whole tensor
                    p.copy_(shard_like(src, p) if hasattr(p, "device_mesh") else src)
        return ["critic", "student"] if self.student_reset else ["critic"]

    @torch.no_grad()
    def _copy_expert(self, k: int) -> None:
        """Expert ``k``'s trainable weights := expert ``k-1``'s (full copies or adapter modules: parameter by parameter,
        under FSDP shard by shard; LoRA experts on one base: adapter ``phase{k}`` := the one before it)."""
        st = self.student
        if st.adapters:
            params = dict(st.experts[0].named_parameters())
            new, old = f".{st.adapters[k]}.", f".{st.adapters[k - 1]}."
            for name, p in params.items():
                if new in name:
                    p.copy_(params[name.replace(new, old)])
            return
        dst, src = st.experts[k], st.experts[k - 1]
        for (n_dst, p), (n_src, q) in zip(dst.named_parameters(), src.named_parameters()):
            if n_dst != n_src:
                raise RuntimeError(f"experts {k - 1} and {k} differ in their parameters ({n_src} vs {n_dst})")
            if p.requires_grad:
                p.copy_(q)

    @property
    def student_reset(self) -> bool:
        """``student_opt_reset`` resolved: null means on for one shared network, off for separate experts."""
        c = self.config.student_opt_reset
        return self.student.num_experts == 1 and self.steps > 1 if c is None else bool(c)

    def lr_factor(self, group: str, step: int) -> float:
        """``reset_warmup_steps``: from each phase start after the first where the student's optimizer state is
        fresh (a new separate expert, or one shared network with ``student_opt_reset``), its lr ramps up linearly: the
        phase's step i updates at lr (i + 1) / W.  A fresh Adam state (beta1 = 0, or bias-corrected) otherwise moves
        every weight by about the lr at its first updates (README "Multi-step students").  Both groups take
        ``objective.lr_decay`` within each phase on top."""
        into = step - self.phase(step) * self.phase_length()
        decay = decay_factor(self.config, into, self.phase_length())  # objective.lr_decay, within the phase
        w = self.config.reset_warmup_steps
        if w is None:
            w = self.phase_length() // 5
        fresh = self.student_reset or self.student.num_experts > 1  # a new expert's Adam state is empty as well
        if group != "student" or not w or not fresh or step < self.phase_length():
            return decay
        return decay * min(1.0, (into + 1) / w)

    # ---- contract -------------------------------------------------------------------------------
    def networks(self):
        return {"student": self.student, "critic": self.critic}

    def plan(self, step):
        return ["student", "critic"] if step % self.config.critic_steps == 0 else ["critic"]

    def wants_conditions(self, group, step):
        # after a student update in the same step the critic trains on the student's x_s and its conditions
        return group != "critic" or "student" not in self.plan(step)

    def wants_real(self, step):
        return self.config.gan_weight > 0

    def setup(self, run_dir, accelerator, data=None):
        from pathlib import Path

        self.anchor.run_dir = Path(run_dir)  # the anchor snapshots of experts=shared are kept there (resume)
        c = self.config
        if c.reg_weight > 0:
            ode = cached_ode_paths(Path(run_dir) / f"regression_paths_{self.steps}step.safetensors", self.teacher,
                                   c.reg_pairs, c.reg_ode_steps, self.guidance, accelerator, data, times=self.times)
            self.reg = self.regression(ode["path"], ode["cond"])

    def regression(self, path: list, cond: Condition) -> TrajectoryRegression:
        """The regression rows of the teacher's ODE states ``path`` at this student's grid and moves."""
        return TrajectoryRegression(path, cond, self.teacher.schedule, self.bounds, self.config.transition == "renoise")

    def lr_scale(self, group):
        return self.config.critic_lr_scale if group == "critic" else 1.0

    def _step(self, student, x: Tensor, k: int, cond: Condition, randn=None) -> tuple[Tensor, Tensor]:
        """Expert k from ``x_{t_k}``: (x0-prediction, ``x_{t_{k+1}}``): a deterministic DDIM/Euler move, or
        (``transition=renoise``) the x0-prediction diffused to ``t_{k+1}`` with fresh noise from ``randn(shape)``."""
        t = torch.full((x.shape[0],), self.bounds[k], device=x.device)
        return self._move(student(x, t, cond), x, k, randn)

    def _move(self, x0: Tensor, x: Tensor, k: int, randn=None) -> tuple[Tensor, Tensor]:
        """:meth:`_step` from expert k's x0-prediction ``x0`` at ``x = x_{t_k}``."""
        t = torch.full((x.shape[0],), self.bounds[k], device=x.device)
        if k == self.steps - 1:
            return x0, x0
        s = torch.full_like(t, self.bounds[k + 1])
        if self.config.transition == "renoise":
            return x0, self.teacher.schedule.add_noise(x0, randn(x0.shape), s)
        return x0, self.teacher.schedule.ddim_step(x0, x, t, s)

    @torch.no_grad()
    def _phase_input(self, student_plain, batch: Batch, k: int, states: Optional[list] = None) -> Tensor:
        """``x_{t_k}`` from the frozen experts 0..k-1, run from noise (``states``: gets ``x_{t_0..t_{k-1}}``)."""
        x = batch.randn((batch.size, *self.teacher.sample_shape))
        for j in range(k):
            if states is not None:
                states.append(x)
            _, x = self._step(student_plain, x, j, batch.cond, batch.randn)
        return x

    def _sub_times(self, k: int, lo: float, hi: float, batch: Batch) -> Tensor:
        """Times in ``(t_{k+1}, top]`` at fractions ``[lo, hi]``; top = 1 (``above``) or ``t_k`` (``phase``)."""
        s = self.bounds[k + 1]
        top = 1.0 if self.config.dm_times == "above" else self.bounds[k]
        u = lo + (hi - lo) * batch.rand(batch.size)
        return s + (top - s) * u

    def _renoised(self, x_s: Tensor, k: int, t: Tensor, batch: Batch):
        s = torch.full_like(t, self.bounds[k + 1])
        xi = batch.randn(x_s.shape)
        return self.teacher.schedule.renoise(x_s, s, t, xi), s, xi

    # ---- losses ---------------------------------------------------------------------------------
    def loss(self, group, batch, step, nets):
        k = self.phase(step)
        self.anchor.phases_seen.add(k)
        if group == "student":
            return self._student_loss(batch, nets, k)
        if group == "critic":
            return self._critic_loss(batch, nets, k)
        raise KeyError(group)

    def _student_loss(self, batch: Batch, nets, k: int) -> LossOutput:
        c = self.config
        student, critic = nets["student"], nets["critic"]
        states = [] if self.anchored and k > 0 else None
        x_in = self._phase_input(_plain(student), batch, k, states)
        n = x_in.shape[0]
        extra = []  # (x, t, cond) rows that ride along in the student's forward (one DDP forward per step)
        if states:  # the anchor's inputs: the earlier exits'
            extra.append(self.anchor.inputs(states, batch.cond))
        if self.reg is not None:  # the teacher's ODE states at t_k (one shared network: at the exits 0..k)
            *rows, y_r = self.reg.rows(k, n, batch.generator, x_in.device, upto=self.student.num_experts == 1)
            extra.append(tuple(rows))
        if extra:
            out = student(torch.cat([x_in] + [e[0] for e in extra]),
                          torch.cat([torch.full((n,), self.bounds[k], device=x_in.device)] + [e[1] for e in extra]),
                          Condition.cat([batch.cond] + [e[2] for e in extra]))
            x0, x_out = self._move(out[:n], x_in, k, batch.randn)
        else:
            x0, x_out = self._step(student, x_in, k, batch.cond, batch.randn)
        if batch.shared is not None:  # the critic update of this step trains on these samples (one rollout a step)
            batch.shared["phased_x_s"] = (x_out.detach(), batch.cond)
        t = self._sub_times(k, c.min_t, c.max_t, batch)
        xt, _, _ = self._renoised(x_out, k, t, batch)
        with torch.no_grad():
            real = self.teacher(xt.detach(), t, batch.cond, guidance_scale=self.guidance)
            fake = fake_score(critic, xt.detach(), t, batch.cond, c.dm_fp32)
        # the generator's x0 carries the gradient: x_{t_{k+1}} is an affine map of it with a positive scale
        loss_dm, grad = losses.dm_loss(x0, real, fake)
        logs = {"phase": float(k), "loss_dm": loss_dm.detach(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean(),
                "x0_gap_teacher_critic": (real - fake).abs().mean()}
        total = c.dm_weight * loss_dm
        if c.gan_weight > 0:
            tg = self._sub_times(k, c.critic_t_min, 1.0, batch)
            xg, _, _ = self._renoised(x_out, k, tg, batch)
            crit = _plain(critic)
            with frozen(crit):
                _, logits = crit(xg, tg, batch.cond, with_logits=True)
            loss_g = losses.gan_generator_loss(logits)
            total = total + c.gan_weight * loss_g
            logs["loss_gan_g"] = loss_g.detach()
        if states:  # experts=shared, phase k > 0: keep the earlier steps where phase k started
            xa, ta, ca = extra[0]
            self.anchor.take(_plain(student), k)
            loss_a = self.anchor.loss(out[n: n + len(xa)], _plain(student), xa, ta, ca)
            total = total + c.anchor_weight * loss_a
            logs["loss_anchor"] = loss_a.detach()
        if self.reg is not None:
            loss_r = torch.nn.functional.mse_loss(out[len(out) - n:].float(), y_r.float())
            total = total + c.reg_weight * loss_r
            logs["loss_reg_mse"] = loss_r.detach()
        if c.reg_online > 0:
            m = min(n, c.reg_online_rows or n)
            loss_o = torch.nn.functional.mse_loss(x0[:m].float(), self.online_target(x_in[:m], k, batch.cond[:m]))
            total = total + c.reg_online * loss_o
            logs["loss_reg_online_mse"] = loss_o.detach()
        return LossOutput(total, logs)

    @torch.no_grad()
    def online_target(self, x: Tensor, k: int, cond: Condition) -> Tensor:
        """The x0 target of step k from the student's own ``x = x_{t_k}``: the teacher's ODE from ``x`` over the step
        (``reg_ode_steps`` per unit time), as :class:`TrajectoryRegression`'s targets are from the teacher's states:
        the x0 whose DDIM/Euler move lands where the ODE does, or (last step, re-noising moves) the ODE's sample."""
        hi = self.bounds[k]
        lo = 0.0 if k == self.steps - 1 or self.config.transition == "renoise" else self.bounds[k + 1]
        x_end = ode_segment(self.teacher, x, cond, hi, lo, max(1, round(self.config.reg_ode_steps * (hi - lo))),
                            self.guidance)
        if lo == 0.0:
            return x_end.float()
        t = torch.full((x.shape[0],), hi, device=x.device)
        return self.teacher.schedule.ddim_x0(x, x_end, t, torch.full_like(t, lo)).float()

    def critic_targets(self, kind: str, x_s: Tensor, k: int, t: Tensor, batch: Batch):
        """``(x_t, target, weight)``: x_t forward-diffused from the generated ``x_s = x_{t_{k+1}}``.

        ``unbiased``: :meth:`~fewstep.schedules.NoiseSchedule.renoise_targets`, weight ``(beta/sigma_t)^2``;
        ``naive``: ``x_s`` taken as data (x0 = x_s, eps = the fresh noise): biased for k < K-1.
        """
        sched = self.teacher.schedule
        xt, s, xi = self._renoised(x_s, k, t, batch)
        if self.config.critic_target == "naive":
            return xt, sched.target(kind, x_s, xi, t), torch.ones_like(t)
        x0_tgt, eps_tgt = sched.renoise_targets(xt, xi, s, t)
        return xt, sched.target(kind, x0_tgt, eps_tgt, t), sched.renoise_weight(s, t)

    def _critic_loss(self, batch: Batch, nets, k: int) -> LossOutput:
        c = self.config
        critic = nets["critic"]
        student = _plain(nets["student"])

        def rollout(cond):  # the critic-only step's own x_{t_{k+1}}
            return self._step(student, self._phase_input(student, batch, k), k, cond, batch.randn)[1], cond

        x_s, cond = batch.handed_or_rollout("phased_x_s", rollout, "phased_dmd")
        t = self._sub_times(k, c.critic_t_min, 1.0, batch)
        kind = _plain(critic).denoiser.prediction
        xt, target, weight = self.critic_targets(kind, x_s, k, t, batch)
        logs = {}
        if c.gan_weight > 0:
            if batch.real is None:
                raise ValueError("objective.gan_weight > 0 needs real samples (set data.images)")
            # real data reach the phase's subinterval by the teacher's own marginal: noise x0 to t directly
            xr = self.teacher.schedule.add_noise(batch.real[: batch.size], batch.randn(x_s.shape), t)
            _, native, logits = critic(torch.cat([xt, xr]), torch.cat([t, t]),
                                       Condition.cat([cond, batch.real_cond[: batch.size]]),
                                       return_native=True, with_logits=True)
            n = xt.shape[0]
            native = native[:n]
            loss_d = losses.gan_discriminator_loss(logits[:n], logits[n:])
            logs["loss_gan_d"] = loss_d.detach()
        else:
            _, native = critic(xt, t, cond, return_native=True)
            loss_d = None
        per = ((native.float() - target.float()) ** 2).flatten(1).mean(1)
        loss_dsm = (_bcast(weight, per) * per).mean()
        total = loss_dsm if loss_d is None else loss_dsm + self.disc_weight * loss_d
        logs["loss_critic_dsm"] = loss_dsm.detach()
        return LossOutput(total, logs)

    # ---- sampling and export ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, student, noise: Tensor, cond: Condition, num_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """The phased sampler: expert k at ``t_k``, a deterministic DDIM/Euler move to ``t_{k+1}``, ..., x0."""
        if num_steps not in (None, self.steps):
            raise ValueError(f"a phased student samples with its {self.steps} trained steps, got num_steps={num_steps}")
        if self.config.transition == "renoise":  # DMD2/LCM's sampler, fresh noise drawn as the stock scheduler does
            return super().sample(student, noise, cond, generator=generator)
        x = noise
        for k in range(self.steps):
            x0, x = self._step(student, x, k, cond)
        return x0

    def export_spec(self) -> dict:
        """Stock DDIM (VP, ``trailing`` grid = the student's) or flow Euler scheduler; experts need our pipeline."""
        sched = self.teacher.schedule
        if self.config.transition == "renoise":
            spec = sampler_for(sched, self.steps, renoise=True)
        elif sched.kind == "flow":
            spec = sampler_for(sched, self.steps, renoise=False)
        else:
            spec = {"scheduler": "DDIMScheduler",
                    "scheduler_config": {"timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 0,
                                         "clip_sample": False, "thresholding": False}}
        spec.update(num_inference_steps=self.steps, guidance_scale=getattr(self.teacher, "export_guidance_scale", 0.0))
        if self.student.num_experts > 1:
            parent = type(getattr(self.teacher, "pipe", None)).__name__
            if parent not in EXPERT_PIPELINES:
                raise ValueError(f"separate phased experts export for {', '.join(EXPERT_PIPELINES)} teachers, not "
                                 f"{parent}: use objective.experts=shared")
            spec["pipeline_class"], spec["pipeline_module"] = EXPERT_PIPELINES[parent]
        return spec

    def export_modules(self, student) -> dict:
        """Shared: nothing extra (export handles the one network). Separate: ``unet``/``transformer`` = expert 0,
        ``expert_1..`` the others (LoRA experts merged), and the timesteps where each takes over."""
        if student.num_experts == 1:
            return {}
        name = "transformer" if "transformer" in self.teacher.pipe.components else "unet"
        nets = []
        for k in range(student.num_experts):
            if student.experts[0].shared_base:  # expert k is an adapter on the teacher's UNet: merged as it is saved
                from ..lora import merged_placeholder

                net = merged_placeholder(student.experts[k].net, student.experts[k].adapter)
            elif student.adapters:
                net = copy.deepcopy(student.experts[0].net)
                net.set_adapter(student.adapters[k])
                net.fuse_lora(adapter_names=[student.adapters[k]])
                net.unload_lora()
            else:
                net = student.experts[k].net
            nets.append(net)
        sched = self.teacher.schedule  # the times as the pipeline hands them to the network
        sigma = type(self.teacher.pipe).__name__ in NET_TIME_IS_SIGMA
        ts = [float(t) if sigma else float(sched.t_to_timestep(torch.tensor(t)))
              for t in self.times]
        out = {name: nets[0], "expert_timesteps": ts}
        out.update({f"expert_{k}": nets[k] for k in range(1, len(nets))})
        return out
