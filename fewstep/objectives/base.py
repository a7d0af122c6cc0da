"""The objective contract and the registry that finds objectives by name.

The trainer owns optimisation; an objective only says *what* to optimise::

    obj.networks()                      -> {"student": module, "critic": module, ...}   trainable groups
    obj.plan(step)                      -> ["student", "critic"] ...   groups that step now (in order)
    obj.loss(group, batch, step, nets)  -> LossOutput(loss, logs)       logs: tensors (read back per log interval)
    obj.sample(student, noise, cond, num_steps, generator) -> x0       few-step sampler
    obj.export_spec()                   -> scheduler + recommended call

``nets`` maps every group name to the module to call: the one being optimised is the trainer's
wrapped (DDP/FSDP, autocast) module, the others their plain, frozen selves.  Passing them in, rather
than having the trainer swap attributes on the objective, keeps objectives free of injected state.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from ..conditions import Condition
from ..schedules import student_times
from ..sampling import few_step_sample


@dataclass
class LossOutput:
    loss: Tensor
    logs: dict = field(default_factory=dict)


@dataclass
class Batch:
    """One micro-batch's inputs: conditions, an optional real batch, and the generator for all its noise.

    ``cond`` is None when the objective said it does not read it (:meth:`Objective.wants_conditions`).
    ``shared``: within one optimisation step, the one dict that every group's micro-batch of the same index gets from
    the trainer (None outside the trainer): an objective leaves something there for a later group of the same step,
    e.g. the student's detached samples, which the critic trains on instead of rolling the student out again."""

    size: int
    cond: Optional[Condition]
    generator: torch.Generator  # CPU generator seeded from (seed, step, micro-batch, process)
    device: torch.device
    real: Optional[Tensor] = None  # clean real samples (latents) when the objective asks for data
    real_cond: Optional[Condition] = None
    shared: Optional[dict] = None

    def randn(self, shape) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator).to(self.device)

    def rand(self, n: int) -> Tensor:
        return torch.rand((n,), generator=self.generator).to(self.device)

    def randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def handed_or_rollout(self, key: str, rollout, who: str) -> tuple:
        """What the student left in :attr:`shared` under ``key`` this step (it updated first: its detached samples
        and their conditions), else ``rollout(cond)``, under ``no_grad``, which returns the same tuple."""
        handed = self.shared.get(key) if self.shared is not None else None
        if handed is not None:
            return handed
        if self.cond is None:
            raise RuntimeError(f"{who} critic step without conditions and without the student's samples")
        with torch.no_grad():
            return rollout(self.cond)


@dataclass
class ObjectiveConfig:
    """Base of every objective's config (``objective.*`` keys)."""

    name: str = ""


def vp_only(default, **kw):
    """A config field that only means something for VP (noise-prediction) teachers.

    Setting it to anything but its default with a flow teacher is a one-line ``ValueError`` at
    construction, rather than a silently ignored option.
    """
    return field(default=default, metadata={"vp_only": True}, **kw)


def sampler_for(schedule, steps: int, renoise: bool = True) -> dict:
    """Stock diffusers scheduler (class name + config) that runs a ``steps``-step student sampler on ``schedule``.

    VP (discrete) teachers: ``LCMScheduler(original_inference_steps=steps)``, which denoises to x0 and
    re-noises with fresh noise on the grid of :func:`~fewstep.schedules.student_times` (999/749/499/249).

    Flow teachers: ``FlowMatchEulerDiscreteScheduler`` with ``shift=1`` and, for ``steps > 1``,
    ``shift_terminal=1/steps``, whose ``set_timesteps(steps)`` gives the sigmas ``1, 1 - 1/K, ..., 1/K``
    (then 0) = ``student_times``, whatever shift the teacher's pipeline uses (FluxPipeline's own sigmas
    and ``mu`` then change nothing: dynamic shifting is off).  ``renoise=True`` (DMD2/LCM-style: x0, then
    fresh noise) sets ``stochastic_sampling``; note that diffusers' flow pipelines do not pass their
    generator to ``scheduler.step``, so that noise comes from torch's global generator (seed it with
    ``torch.manual_seed`` for a reproducible multi-step call).  ``renoise=False`` is the deterministic
    Euler step ``x + (sigma_next - sigma) v`` (flow-map jumps).
    """
    if schedule.kind != "flow":
        return {"scheduler": "LCMScheduler",
                "scheduler_config": {"original_inference_steps": steps, "clip_sample": False, "thresholding": False}}
    cfg = {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": 1.0 / steps if steps > 1 else None,
           "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
           "invert_sigmas": False, "stochastic_sampling": bool(renoise and steps > 1)}
    return {"scheduler": "FlowMatchEulerDiscreteScheduler", "scheduler_config": cfg}


def conditioning_time(teacher, steps: int, timestep: int) -> float:
    """``t`` of a 1-step student fed pure noise but conditioned at teacher timestep ``timestep`` (DMD2's SDXL
    1-step student: 399).  The student's output becomes x0 with that timestep's alpha/sigma, as the Denoiser does at
    ``t``.  Only for ``steps == 1`` on discrete VP teachers with an eps or v head; a one-line ``ValueError`` else."""
    n = getattr(teacher.schedule, "num_train_timesteps", None)
    if steps != 1:
        raise ValueError(f"objective.conditioning_t={timestep} is for 1-step students; got student.steps={steps}")
    if teacher.schedule.kind != "vp_discrete" or not n or teacher.denoiser.prediction not in ("eps", "v"):
        raise ValueError(f"objective.conditioning_t={timestep} needs a discrete VP teacher with an eps or v head "
                         f"(SD1.5/SDXL/DDPM UNets); teacher {teacher.family!r} has schedule "
                         f"{teacher.schedule.kind!r} and prediction {teacher.denoiser.prediction!r}")
    if not 0 <= timestep < n:
        raise ValueError(f"objective.conditioning_t={timestep} must be a teacher timestep in 0..{n - 1}")
    return float(teacher.schedule.timestep_to_t(int(timestep)))


def conditioning_sampler(schedule, timestep: int) -> dict:
    """Stock scheduler whose 1-step default call is the :func:`conditioning_time` sampler on a discrete VP
    ``schedule``: ``DDIMScheduler`` over the teacher's first ``timestep + 1`` training steps (their betas as
    ``trained_betas``, ``timestep_spacing="trailing"``), whose one step is ``[timestep]``: the initial noise is
    unscaled (``init_noise_sigma = 1``), the network sees it at ``timestep``, and with ``set_alpha_to_one`` the step
    to the end returns that timestep's x0 (eps or v head) exactly.  (``timestep_spacing="leading"`` with
    ``steps_offset=timestep`` gives the same timesteps, but ``StableDiffusionPipeline`` resets any
    ``steps_offset`` to 1 when it is built.)"""
    n = int(timestep) + 1
    t = schedule.timestep_to_t(torch.arange(n, dtype=torch.float64))
    ab = schedule.alpha(t) ** 2  # alpha_bar of timesteps 0..timestep (rescaled when the teacher's are)
    betas = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
    return {"scheduler": "DDIMScheduler",
            "scheduler_config": {"num_train_timesteps": n, "trained_betas": betas.tolist(),
                                 "rescale_betas_zero_snr": False, "timestep_spacing": "trailing",
                                 "set_alpha_to_one": True, "clip_sample": False, "thresholding": False}}


class Objective:
    """Base class. Subclasses set ``name``, ``Config`` and implement networks / plan / loss."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = ObjectiveConfig
    needs_real_data: ClassVar[bool] = False  # ask the trainer for a real batch every step
    data_free: ClassVar[bool] = False  # never opens a data source
    shares_base: ClassVar[bool] = False  # its LoRA networks may be adapters on the teacher's own weights (student.share_base)
    schedules: ClassVar[tuple] = ("vp", "vp_discrete", "flow")  # teacher schedule kinds it supports

    def __init__(self, config, teacher, student_steps: int):
        self.config = config
        self.teacher = teacher
        self.steps = int(student_steps)
        kind = teacher.schedule.kind
        if kind not in self.schedules:
            want = "a flow teacher (rectified flow: SD3/Flux, or teacher.schedule=flow)" if self.schedules == ("flow",) \
                else f"a teacher with schedule {' or '.join(self.schedules)}"
            raise ValueError(f"objective {self.name!r} needs {want}; teacher {teacher.family!r} has schedule {kind!r}")
        if kind == "flow":
            for f in dataclasses.fields(config):
                if f.metadata.get("vp_only") and getattr(config, f.name) != f.default:
                    raise ValueError(f"objective.{f.name} applies to VP (noise-prediction) teachers only; "
                                     f"teacher {teacher.family!r} is a flow teacher: leave it unset")
        self.times = student_times(self.steps, teacher.schedule)

    # ---- contract -------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self, step: int) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, group: str, batch: Batch, step: int, nets: dict) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def setup(self, run_dir, accelerator, data=None) -> None:
        """One-time work before training (e.g. caching teacher ODE pairs; ``data``: the run's
        :class:`~fewstep.data.DataSource`, whose prompts condition them); default none."""

    def set_max_steps(self, max_steps: int) -> None:
        """The run's ``train.max_steps`` (objectives with a step curriculum, e.g. phases); default ignores it."""

    def reset_groups(self, step: int) -> list[str]:
        """Groups whose weights the objective has just re-initialised at the start of ``step`` (e.g. a new
        phase's critic); the trainer then clears their optimizer state.  A pure function of ``step``."""
        return []

    def wants_real(self, step: int) -> bool:
        """Whether this step's batches need real samples."""
        return self.needs_real_data

    def uses_real_data(self) -> bool:
        """Whether any step will want real samples: the trainer then prepares them (e.g. VAE-encodes
        ``data.images``) once, before the first step.  Default: ``needs_real_data`` or ``wants_real(0)``."""
        return bool(self.needs_real_data or self.wants_real(0))

    def wants_conditions(self, group: str, step: int) -> bool:
        """Whether ``loss(group, ...)`` at ``step`` reads ``batch.cond``; if not, the trainer samples (and encodes)
        no conditions for it and ``batch.cond`` is None.  Default: always."""
        return True

    def lr_scale(self, group: str) -> float:
        return 1.0

    def lr_factor(self, group: str, step: int) -> float:
        """A factor on ``group``'s learning rate for its update at ``step`` (e.g. a warm-up after the objective
        cleared its optimizer state), on top of ``lr_scale`` and ``train.lr_warmup_steps``.  A pure function of
        ``step``.  Default: 1."""
        return 1.0

    def state_modules(self) -> dict[str, nn.Module]:
        """Objective-owned modules that are not trained by an optimizer but are part of the run's state (e.g. a
        consistency model's EMA target): the trainer moves them to the device and saves/loads them with every
        checkpoint, so resume is exact.  Default: none."""
        return {}

    def after_step(self, group: str, step: int) -> None:
        """Called by the trainer after each optimizer step of ``group`` (e.g. to update an EMA target)."""

    def student_module(self, nets: dict) -> nn.Module:
        return nets["student"]

    def sample(self, student, noise: Tensor, cond: Condition, num_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Few-step sampling with the student on its trained grid (``num_steps`` a divisor-compatible subset)."""
        times = self.times if num_steps in (None, self.steps) else student_times(num_steps, self.teacher.schedule)
        randn = getattr(self.teacher, "scheduler_randn", None)
        if randn is None:
            return few_step_sample(student, noise, cond, times, generator=generator)
        return _renoise_sample(student, noise, cond, times, generator, randn)

    def export_spec(self) -> dict:
        """Stock scheduler and recommended call of the exported pipeline (see :func:`sampler_for`)."""
        # LCM: clip_sample/thresholding off, the student was trained (and is validated) without clipping x0.
        # guidance 0 (no CFG in the exported call) except where guidance is a network input (Flux).
        return {**sampler_for(self.teacher.schedule, self.steps), "num_inference_steps": self.steps,
                "guidance_scale": getattr(self.teacher, "export_guidance_scale", 0.0)}

    def export_modules(self, student) -> dict:
        """Pipeline components that differ from the teacher's (default: the student's network, by export)."""
        return {}


@torch.no_grad()
def _renoise_sample(student, noise: Tensor, cond: Condition, times, generator, randn) -> Tensor:
    """:func:`~fewstep.sampling.few_step_sample` with the fresh noise drawn by ``randn(shape, generator)``.

    For teachers whose pipeline draws the scheduler's noise in another layout (Flux: packed tokens),
    so that the exported call reproduces this sampler for the same generator state.
    """
    x, x0 = noise, noise
    for i, ti in enumerate(times):
        t = torch.full((x.shape[0],), float(ti), device=x.device)
        x0 = student(x, t, cond)
        if i + 1 < len(times):
            eps = randn(tuple(x0.shape), generator).to(x0.device, x0.dtype)
            x = student.schedule.add_noise(x0, eps, torch.full_like(t, float(times[i + 1])))
    return x0


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make an objective available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def known_objectives() -> list[str]:
    from . import _load_all  # noqa: F401 - import side effect registers built-ins

    return sorted(_REGISTRY)


def get_objective(name: str) -> type:
    known = known_objectives()
    if name not in _REGISTRY:
        raise KeyError(f"unknown objective {name!r}; known objectives: {', '.join(known)}")
    return _REGISTRY[name]


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls.Config)}


LR_DECAYS = ("constant", "cosine")


def check_lr_decay(c) -> None:
    """``objective.lr_decay`` / ``lr_decay_min`` (dmd, dmd2, phased_dmd): one-line errors for bad values."""
    if c.lr_decay not in LR_DECAYS:
        raise ValueError(f"objective.lr_decay must be one of {', '.join(LR_DECAYS)}; got {c.lr_decay!r}")
    if not 0.0 <= c.lr_decay_min <= 1.0:
        raise ValueError(f"objective.lr_decay_min must lie in [0, 1] (a fraction of train.lr); got {c.lr_decay_min}")


def decay_factor(c, step: int, length: Optional[int]) -> float:
    """The lr factor of ``objective.lr_decay`` at ``step`` of a stretch of ``length`` steps (the run, or one phase):
    1 for ``constant``; for ``cosine`` a half cosine from 1 at step 0 to ``lr_decay_min`` at ``length``."""
    if c.lr_decay == "constant" or not length:
        return 1.0
    frac = min(max(step, 0), length) / length
    return c.lr_decay_min + (1.0 - c.lr_decay_min) * 0.5 * (1.0 + math.cos(math.pi * frac))
