"""The objective contract and the registry that finds objectives by name.

The trainer owns optimisation; an objective only says *what* to optimise::

    obj.networks()                      -> {"student": module, "critic": module, ...}   trainable groups
    obj.plan(step)                      -> ["student", "critic"] ...   groups that step now (in order)
    obj.loss(group, batch, step, nets)  -> LossOutput(loss, logs)
    obj.sample(student, noise, cond, num_steps, generator) -> x0       few-step sampler
    obj.export_spec()                   -> scheduler + recommended call

``nets`` maps every group name to the module to call: the one being optimised is the trainer's
wrapped (DDP/FSDP, autocast) module, the others their plain, frozen selves.  Passing them in, rather
than having the trainer swap attributes on the objective, keeps objectives free of injected state.
"""
from __future__ import annotations

import dataclasses
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
    """One micro-batch's inputs: conditions, an optional real batch, and the generator for all its noise."""

    size: int
    cond: Condition
    generator: torch.Generator  # CPU generator seeded from (seed, step, micro-batch, process)
    device: torch.device
    real: Optional[Tensor] = None  # clean real samples (latents) when the objective asks for data
    real_cond: Optional[Condition] = None

    def randn(self, shape) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator).to(self.device)

    def rand(self, n: int) -> Tensor:
        return torch.rand((n,), generator=self.generator).to(self.device)

    def randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))


@dataclass
class ObjectiveConfig:
    """Base of every objective's config (``objective.*`` keys)."""

    name: str = ""


class Objective:
    """Base class. Subclasses set ``name``, ``Config`` and implement networks / plan / loss."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = ObjectiveConfig
    needs_real_data: ClassVar[bool] = False  # ask the trainer for a real batch every step
    data_free: ClassVar[bool] = False  # never opens a data source

    def __init__(self, config, teacher, student_steps: int):
        self.config = config
        self.teacher = teacher
        self.steps = int(student_steps)
        self.times = student_times(self.steps, teacher.schedule)

    # ---- contract -------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self, step: int) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, group: str, batch: Batch, step: int, nets: dict) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def setup(self, run_dir, accelerator) -> None:
        """One-time work before training (e.g. caching teacher ODE pairs); default none."""

    def wants_real(self, step: int) -> bool:
        """Whether this step's batches need real samples."""
        return self.needs_real_data

    def lr_scale(self, group: str) -> float:
        return 1.0

    def student_module(self, nets: dict) -> nn.Module:
        return nets["student"]

    def sample(self, student, noise: Tensor, cond: Condition, num_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Few-step sampling with the student on its trained grid (``num_steps`` a divisor-compatible subset)."""
        times = self.times if num_steps in (None, self.steps) else student_times(num_steps, self.teacher.schedule)
        return few_step_sample(student, noise, cond, times, generator=generator)

    def export_spec(self) -> dict:
        """Stock scheduler and recommended call of the exported pipeline."""
        # clip_sample/thresholding off: the student was trained (and is validated) without clipping x0
        return {"scheduler": "LCMScheduler",
                "scheduler_config": {"original_inference_steps": self.steps, "clip_sample": False, "thresholding": False},
                "num_inference_steps": self.steps, "guidance_scale": 0.0}


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
