"""Flow-map students in diffusers: the jump-length embedding and the sampler that passes the jump.

A flow-map student ``f(x_t, t, d) = x_t - d * V(x_t, t, d)`` jumps from time ``t`` (flow sigma) to
``t - d``.  ``V`` is the teacher's transformer plus one extra input: the jump length ``d``, embedded
like a timestep (sinusoid of ``d * 1000``, then an MLP) and added to the transformer's
timestep/text conditioning vector (the output of ``transformer.time_text_embed``).  The MLP's last
layer starts at zero, so a fresh student is exactly its teacher.

Sampling with K jumps on the grid ``sigma_0 = 1 > ... > sigma_{K-1} > sigma_K = 0`` of a stock
``FlowMatchEulerDiscreteScheduler`` is its plain Euler step ``x + (sigma_next - sigma) * V`` with
``d = sigma - sigma_next`` fed to the embedding: :class:`FlowMapMixin` adds that embedding for the
scheduler's current step and otherwise leaves the teacher's pipeline untouched.  A one-jump student
needs no pipeline of its own: :func:`fold_jump` adds the constant embedding of ``d = 1`` to a bias,
and the teacher's stock pipeline samples it.

This file imports only torch and diffusers, so an exported folder carries a copy and loads without
fewstep installed (see ``flow_map_sd3.py`` / ``flow_map_flux.py``).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
from typing import Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

MODULE_FILE = "flow_map.py"  # the copy of this file written into an exported folder
COMPONENT_FILE = "pipelines.flow_map.py"  # its copy in jump_embedder/ (diffusers custom-component code)


class JumpEmbedding(ModelMixin, ConfigMixin):
    """``d`` in [0, 1] (B,) -> (B, embedding_dim): sinusoid of ``d * 1000`` (as timesteps are), then an MLP."""

    @register_to_config
    def __init__(self, embedding_dim: int, num_channels: int = 256):
        super().__init__()
        self.proj = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedder = TimestepEmbedding(num_channels, embedding_dim)
        nn.init.zeros_(self.embedder.linear_2.weight)  # zero output: the student starts as its teacher
        nn.init.zeros_(self.embedder.linear_2.bias)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        w = self.embedder.linear_1.weight
        return self.embedder(self.proj(d.reshape(-1) * 1000.0).to(w.dtype))


def conditioning_module(transformer: nn.Module) -> nn.Module:
    """The module whose output is the transformer's conditioning vector (timestep + pooled text [+ guidance])."""
    mod = getattr(transformer, "time_text_embed", None)
    if mod is None:
        raise ValueError(f"{type(transformer).__name__} has no 'time_text_embed' module to add a jump embedding to")
    return mod


@contextlib.contextmanager
def jump_conditioning(transformer: nn.Module, embedder: nn.Module, d: torch.Tensor):
    """Within the block, ``transformer`` sees ``embedder(d)`` added to its conditioning vector."""

    def hook(module, inputs, output):
        e = embedder(d.to(output.device))
        if e.shape[0] != output.shape[0]:  # one d for a batch (e.g. CFG doubled it)
            e = e.expand(output.shape[0], -1) if e.shape[0] == 1 else e.repeat(output.shape[0] // e.shape[0], 1)
        return output + e.to(output.dtype)

    handle = conditioning_module(transformer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def fold_jump(transformer: nn.Module, embedder: nn.Module, d: float = 1.0) -> nn.Module:
    """Add the constant ``embedder(d)`` to the conditioning MLP's output bias, in place (a stock model again)."""
    linear = conditioning_module(transformer).timestep_embedder.linear_2
    w = embedder.embedder.linear_1.weight
    e = embedder(torch.tensor([float(d)], device=w.device, dtype=w.dtype))[0]
    linear.bias.add_(e.to(linear.bias.dtype))
    return transformer


class FlowMapMixin:
    """Adds the jump embedding of the scheduler's current step to the parent pipeline's transformer calls.

    The parent is a stock flow pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``) with a stock
    ``FlowMatchEulerDiscreteScheduler``; its Euler step with ``d = sigma - sigma_next`` is the flow-map jump.
    """

    def _jump_hook(self):
        sched, emb = self.scheduler, self.jump_embedder

        def hook(module, inputs, output):
            i = sched.step_index if sched.step_index is not None else (sched.begin_index or 0)
            d = (sched.sigmas[i] - sched.sigmas[i + 1]).reshape(1).to(output.device, torch.float32)
            e = emb(d).to(output.dtype)
            return output + e.expand(output.shape[0], -1)

        return conditioning_module(self.transformer).register_forward_hook(hook)

    def __call__(self, *args, **kwargs):
        handle = self._jump_hook()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            handle.remove()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``from_pretrained`` that builds ``jump_embedder`` with this module's class (no remote code needed)."""
        sub = os.path.join(str(pretrained_model_name_or_path), "jump_embedder")
        if "jump_embedder" not in kwargs and os.path.isdir(sub):
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            kwargs["jump_embedder"] = JumpEmbedding.from_pretrained(sub, **({"dtype": dtype} if dtype else {}))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        """``save_pretrained`` plus copies of the pipeline code, so the folder loads as diffusers custom code."""
        super().save_pretrained(save_directory, *args, **kwargs)
        out = str(save_directory)
        here = os.path.abspath(__file__)
        own = os.path.abspath(inspect.getsourcefile(type(self)))
        for src, dst in ((here, os.path.join(out, MODULE_FILE)),
                         (own, os.path.join(out, os.path.basename(own))),
                         (here, os.path.join(out, "jump_embedder", COMPONENT_FILE))):
            if os.path.abspath(dst) != src:
                shutil.copyfile(src, dst)
        index = os.path.join(out, "model_index.json")
        with open(index) as f:
            cfg = json.load(f)
        cfg["jump_embedder"] = ["pipelines.flow_map", "JumpEmbedding"]  # this module, by its import path
        with open(index, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
