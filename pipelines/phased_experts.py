"""Pipelines whose denoiser is switched between per-phase experts by timestep (Phased DMD students).

A phased student with separate experts is K networks of the teacher's architecture: expert k serves the
step that starts at the k-th grid timestep.  :class:`PhasedExpertsMixin` keeps the parent pipeline (the
teacher's stock class) as it is and, for the length of one call, routes each call of its ``unet`` /
``transformer`` to the expert whose phase covers the timestep it is called with: the first expert is the
pipeline's own ``unet`` / ``transformer``, the others are the components ``expert_1`` .. ``expert_3``
(stock diffusers model classes), and ``expert_timesteps`` (in ``model_index.json``) holds where each
takes over, in the units the pipeline passes to the network.

This file imports only torch and diffusers, so an exported folder carries a copy and loads without
fewstep installed::

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="phased_sdxl", trust_remote_code=True)
"""
from __future__ import annotations

import inspect
import os
import shutil
from typing import Optional, Sequence, Union

import torch

MODULE_FILE = "phased_experts.py"  # the copy of this file written into an exported folder
EXPERT_NAMES = ("expert_1", "expert_2", "expert_3")


class PhasedExpertsMixin:
    """Routes the denoiser's calls to ``[unet|transformer, expert_1, ...]`` by the timestep of each call."""

    _optional_components = list(EXPERT_NAMES)

    def _register_experts(self, experts: dict, expert_timesteps: Optional[Sequence[float]]) -> None:
        self.register_modules(**{n: experts.get(n) for n in EXPERT_NAMES})
        self.register_to_config(expert_timesteps=None if expert_timesteps is None else [float(t) for t in expert_timesteps])

    @property
    def _denoiser_name(self) -> str:
        return "transformer" if getattr(self, "transformer", None) is not None else "unet"

    def experts(self) -> list:
        """The per-phase networks, first phase (noisiest) first."""
        nets = [getattr(self, self._denoiser_name)]
        return nets + [m for m in (getattr(self, n, None) for n in EXPERT_NAMES) if m is not None]

    def expert_index(self, timestep: float) -> int:
        """The expert whose phase covers ``timestep``: the number of phase starts above it."""
        ts = self.config.expert_timesteps or []
        tol = 1e-3 * max([abs(t) for t in ts] + [1.0])
        return min(sum(1 for t in ts if t > float(timestep) + tol), len(self.experts()) - 1)

    def __call__(self, *args, **kwargs):
        nets = self.experts()
        if len(nets) != len(self.config.expert_timesteps or []):
            raise ValueError(f"{type(self).__name__}: {len(nets)} experts but expert_timesteps="
                             f"{self.config.expert_timesteps}")
        base = nets[0]
        own = base.forward

        def forward(*a, **kw):
            t = kw["timestep"] if "timestep" in kw else a[1]
            k = self.expert_index(float(torch.as_tensor(t).reshape(-1)[0]))
            return own(*a, **kw) if k == 0 else nets[k](*a, **kw)

        base.forward = forward  # for this call only: the instance attribute shadows the class method
        try:
            return super().__call__(*args, **kwargs)
        finally:
            del base.forward

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        """``save_pretrained`` plus copies of the pipeline code, so the folder loads as diffusers custom code."""
        super().save_pretrained(save_directory, *args, **kwargs)
        out = str(save_directory)
        here = os.path.abspath(__file__)
        own = os.path.abspath(inspect.getsourcefile(type(self)))
        for src in (here, own):
            dst = os.path.join(out, os.path.basename(src))
            if os.path.abspath(dst) != src:
                shutil.copyfile(src, dst)
        parent_file = getattr(type(self), "_parent_module_file", None)  # a fewstep parent (class_conditional.py)
        if parent_file:
            src = os.path.join(os.path.dirname(here), parent_file)
            shutil.copyfile(src, os.path.join(out, parent_file))
