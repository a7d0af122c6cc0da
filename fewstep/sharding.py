"""Sharded training through accelerate: FSDP2 for every objective, DeepSpeed ZeRO for one-network objectives.

``accelerate launch --config_file configs/accelerate/fsdp.yaml -m fewstep distill CONFIG`` (or torchrun with
``ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ...`` in the environment) shards the parameters, gradients and optimizer
states of each trained network (student, critic with its GAN head) over the processes.  What fewstep adds to
accelerate's own FSDP support:

- Several networks: accelerate's FSDP2 prepares one model (with its optimizer) per ``prepare`` call, so each
  network is prepared on its own, and the transformer-block classes to wrap are chosen per network (the classes
  named in ``fsdp_transformer_layer_cls_to_wrap`` that the network has, or by default every diffusers model's
  ``_no_split_modules`` found in it: UNet resnet/attention blocks, SD3/Flux transformer blocks); accelerate would
  otherwise take the first network's classes for all of them and stop at a network that lacks one.
- Checkpoints: ``accelerate.save_state`` writes each network and its optimizer state as a sharded
  ``torch.distributed.checkpoint`` folder (``pytorch_model_fsdp_N``, ``optimizer_N``), so resume is exact, optimizer
  moments included; the student's EMA is gathered to full tensors when saved and re-sharded when loaded.
- Export and sample grids: the full student is gathered on every process (a collective) into an unsharded copy on
  the main process, which is what is sampled and saved as a normal diffusers model.
- CPU processes: accelerate runs FSDP only on GPUs (it starts CPU processes as DDP whatever the config says);
  torch's FSDP2 works over gloo, so on CPUs fewstep switches accelerate's state to FSDP itself (tests, debugging).

DeepSpeed: accelerate gives one DeepSpeed engine per ``Accelerator``; training two networks needs two accelerators
and a dict of plugins (its "multiple disjoint models" API), which a launch config cannot express and which DMD's
critic (the student's loss runs through it) is not.  So DeepSpeed is refused, with a one-line error, for objectives
that train more than one network; FSDP is the sharded path for those.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from typing import Optional

import torch
from torch import nn

FSDP_CONFIG = "configs/accelerate/fsdp.yaml"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("true", "1", "yes")


def requested() -> str:
    """The sharding the launch asked for: ``fsdp``, ``deepspeed`` or ``""`` (accelerate's environment variables)."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return ""


def _shares_parameters(modules: dict) -> Optional[tuple]:
    seen: dict = {}
    for name, m in modules.items():
        for p in m.parameters():
            other = seen.setdefault(id(p), name)
            if other != name:
                return other, name
    return None


def check_launch(objective, cfg) -> None:
    """One-line ConfigErrors for a sharded launch that cannot work, before accelerate starts."""
    from .config import ConfigError

    mode = requested()
    if not mode:
        return
    nets = objective.networks()
    if mode == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("deepspeed is not installed: pip install deepspeed")
        if not torch.cuda.is_available():
            raise ConfigError("DeepSpeed needs CUDA GPUs (accelerate starts CPU processes without it); on CPUs "
                              f"use --config_file {FSDP_CONFIG} or plain torchrun")
        if len(nets) > 1:
            raise ConfigError(f"DeepSpeed prepares one trained network per engine and objective {objective.name!r} "
                              f"trains {len(nets)} ({', '.join(nets)}); use --config_file {FSDP_CONFIG} instead")
        if cfg.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} with DeepSpeed: its engine steps at every "
                              f"backward here; use train.grad_accum=1 (a larger train.batch_size) or FSDP")
        return
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"FSDP_VERSION={version} (fsdp_version in the accelerate config): fewstep shards with "
                          f"FSDP2; set fsdp_version: 2 (see {FSDP_CONFIG})")
    shared = _shares_parameters(nets)
    if shared is not None:
        raise ConfigError(f"networks {shared[0]!r} and {shared[1]!r} share parameters (student.share_base=true: "
                          f"adapters on one base); FSDP shards separate networks only: set student.share_base=false")


def enable_cpu_fsdp(acc) -> bool:
    """Under torchrun on CPUs with ``ACCELERATE_USE_FSDP=true``: make ``acc`` an FSDP accelerator (accelerate
    1.x starts CPU processes as plain DDP whatever the FSDP variables say).  Returns whether it switched."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if requested() != "fsdp" or acc.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as accelerate builds it on GPUs
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def configure_deepspeed(acc, cfg) -> None:
    """DeepSpeed's ``auto`` batch size and clipping from fewstep's config (no data loader is prepared to infer them)."""
    plugin = getattr(acc.state, "deepspeed_plugin", None) if requested() == "deepspeed" else None
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    if plugin.is_auto("gradient_clipping") and cfg.train.max_grad_norm > 0:
        ds["gradient_clipping"] = cfg.train.max_grad_norm


def is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def block_classes(module: nn.Module, wanted: Optional[list]) -> list:
    """Class names to give their own FSDP unit in ``module``: those of ``wanted`` that occur in it, or (``wanted``
    None) every ``_no_split_modules`` class of the diffusers models inside it."""
    present = {type(m).__name__ for m in module.modules()}
    if wanted is None:
        wanted = []
        for m in module.modules():
            for name in getattr(m, "_no_split_modules", None) or []:
                if name not in wanted:
                    wanted.append(name)
    return [n for n in wanted if n in present]


def prepare(acc, modules: list, optims: list) -> tuple[list, list]:
    """``acc.prepare`` of every network with its optimizer: one call per pair under FSDP2 (accelerate's rule), with
    the transformer-block classes of that network; one call for all of them otherwise."""
    if not is_fsdp(acc):
        out = acc.prepare(*modules, *optims)
        return list(out[: len(modules)]), list(out[len(modules):])
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = acc.state.fsdp_plugin
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    wanted = plugin.transformer_cls_names_to_wrap
    wanted = list(wanted) if wanted else None
    mods, opts = [], []
    for m, o in zip(modules, optims):
        if policy is transformer_auto_wrap_policy:
            plugin.transformer_cls_names_to_wrap = block_classes(m, wanted)
        pm, po = acc.prepare(m, o)
        mods.append(pm)
        opts.append(po)
    plugin.transformer_cls_names_to_wrap = wanted
    return mods, opts


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this process (a plain tensor is itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to the whole tensor on every process (a collective); a plain tensor is itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``src`` (a whole tensor, the same on every process) cut to ``like``'s sharding; a plain ``like``: ``src``."""
    if not hasattr(like, "device_mesh"):
        return src
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(src.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def load_whole(module: nn.Module, state: dict) -> None:
    """``module.load_state_dict(state)`` for a ``state`` of whole tensors; under FSDP each process copies in its shard
    (e.g. a critic restarted from the teacher's weights between phases)."""
    own = module.state_dict()
    if not any(hasattr(v, "device_mesh") for v in own.values()):
        module.load_state_dict(state)
        return
    if own.keys() != state.keys():
        module.load_state_dict(state)  # torch's message names the missing and unexpected keys
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(shard_like(state[k], v))


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory) and whose buffers are real: the
    frame that :func:`gather` fills with the full weights after training."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def gather(module: nn.Module, frame: nn.Module, is_main: bool) -> Optional[nn.Module]:
    """The full weights of the FSDP-sharded ``module`` (a collective: call on every process) in a copy of ``frame``
    on the main process (``None`` elsewhere), on the device ``module`` trains on."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    out = copy.deepcopy(frame)
    dtypes = {n: p.dtype for n, p in frame.named_parameters()}
    out.load_state_dict(sd, strict=True, assign=True)  # keeps each parameter's requires_grad (what EMA copies into)
    with torch.no_grad():
        for n, p in out.named_parameters():  # mixed precision: accelerate kept fp32 masters of low-precision weights
            if p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])
    device = next((local(p).device for p in module.parameters()), torch.device("cpu"))
    return out.to(device)
