"""LoRA adapters (peft) on diffusers models: add, switch per call, merge, save merged: torch and peft only.

Several named adapters can live on one network; :func:`use_adapter` runs it with one of them (or none) active and
restores the previous state afterwards.  :func:`plain_state` gives the network as it would be without peft layers,
optionally with one adapter merged, tensor by tensor, so that :func:`save_merged` writes a merged model one shard at
a time (no second copy of the network in memory).  Used by :mod:`fewstep.teachers.adapters` (adapters on a shared
frozen base) and :mod:`fewstep.export` (the LoRA file and the merged student).
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:  # torch is imported by the functions that use it: LORA_TARGETS is importable without it
    import torch
    from torch import Tensor, nn

# LoRA target modules of a diffusers UNet (peft suffix match), as the DMD2 and diffusers LCM-LoRA SDXL reference
# scripts target them: attention projections, the transformer blocks' proj_in/out and feed-forward, the resnet convs
# and time projection, and the down/up-sampler convs (tests/test_shared_base.py checks each on an SDXL-shaped UNet)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
SHARD_BYTES = 256 * 2**20  # merged-export shard size (safetensors serialises a shard in memory before writing it)


# ---- the peft layers of a network ---------------------------------------------------------------
def tuner_layers(net: nn.Module) -> dict[str, nn.Module]:
    """``{module path: peft tuner layer}`` of ``net`` (cached on it; :func:`add_adapter` refreshes the cache)."""
    got = net.__dict__.get("_fewstep_tuners")
    if got is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        got = {n: m for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)}
        net.__dict__["_fewstep_tuners"] = got
    return got


def adapter_names(net: nn.Module) -> list[str]:
    """Names of the adapters on ``net`` (diffusers' ``peft_config``), in the order they were added."""
    return list(getattr(net, "peft_config", None) or {})


@contextmanager
def use_adapter(net: nn.Module, name: Optional[str]):
    """Run ``net`` with adapter ``name`` alone active (``None``: every adapter off, the base network), then restore.

    Sets peft's per-layer flags directly: unlike ``set_adapter`` it leaves ``requires_grad`` as it is."""
    layers = tuner_layers(net).values()
    if not layers:
        yield
        return
    with _adapter_state(net, [(m._active_adapter, True) if name is None else (name, False) for m in layers]):
        yield


def _state(net: nn.Module) -> list:
    """Every peft layer's (active adapter, adapters off) flags."""
    return [(m._active_adapter, m._disable_adapters) for m in tuner_layers(net).values()]


@contextmanager
def _adapter_state(net: nn.Module, state: list):
    """Set :func:`_state` flags for the duration, then restore the previous ones."""
    layers = list(tuner_layers(net).values())
    saved = _state(net)
    for m, (active, off) in zip(layers, state):
        m._active_adapter, m._disable_adapters = active, off
    try:
        yield
    finally:
        for m, (active, off) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, off


@contextmanager
def _as_in_forward(net: nn.Module, state: list, flags: list):
    """The recomputation's context: the adapters (:func:`_state`) and the parameters' ``requires_grad`` as they were
    in the forward, restored after."""
    now = [p.requires_grad for p, _ in flags]
    for p, rg in flags:
        p.requires_grad_(rg)
    try:
        with _adapter_state(net, state):
            yield
    finally:
        for (p, _), rg in zip(flags, now):
            p.requires_grad_(rg)


def enable_gradient_checkpointing(net: nn.Module) -> None:
    """Gradient checkpointing of a diffusers model whose recomputation (in backward) runs as its forward did: with the
    adapters that were active then, and each parameter's ``requires_grad`` as it was then.  Between a network's
    forward and its backward other calls switch adapters (the teacher, the critic, on a shared base), and a critic
    called frozen in the student's loss (the GAN generator term) is unfrozen again by backward time; diffusers'
    default recomputes under whatever holds then, which saves other tensors (torch's CheckpointError)."""
    from contextlib import nullcontext

    from torch.utils.checkpoint import checkpoint

    def checkpointed(module, *args):
        state = _state(net)
        flags = [(p, p.requires_grad) for p in module.parameters()]
        return checkpoint(module.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _as_in_forward(net, state, flags)))

    net.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)


def checkpoint_networks(*roots) -> int:
    """Gradient checkpointing (:func:`enable_gradient_checkpointing`) on every diffusers model that supports it and
    is reachable from ``roots`` (modules, or denoisers whose ``net`` is one: a shared base is reached through the
    teacher's); each model once.  Returns how many were switched on."""
    from torch import nn

    seen: dict[int, nn.Module] = {}
    for root in roots:
        for top in (root, getattr(root, "net", None)):
            if isinstance(top, nn.Module):
                for m in top.modules():
                    if getattr(m, "_supports_gradient_checkpointing", False) and \
                            hasattr(m, "enable_gradient_checkpointing"):  # a diffusers model (not one of its blocks)
                        seen.setdefault(id(m), m)
    for m in seen.values():
        enable_gradient_checkpointing(m)
    return len(seen)


def add_adapter(net: nn.Module, name: str, rank: int, alpha: float, targets: list[str]) -> None:
    """Add LoRA adapter ``name`` (``B = 0``: it starts as the base) with float32 weights that require grad.

    Every other parameter keeps its ``requires_grad`` (peft's ``set_adapter`` would switch the other adapters off),
    and afterwards every adapter is off until a :func:`use_adapter` call turns one on."""
    from peft import LoraConfig

    if name in adapter_names(net):
        raise ValueError(f"adapter {name!r} already exists on this network")
    before = {id(p): p.requires_grad for p in net.parameters()}
    with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(targets)),
                        adapter_name=name)
    for p in net.parameters():
        if id(p) in before:
            p.requires_grad_(before[id(p)])
        else:  # the new adapter's weights: float32 masters whatever the base's dtype
            p.data = p.data.float()
            p.requires_grad_(True)
    net.__dict__.pop("_fewstep_tuners", None)
    for m in tuner_layers(net).values():
        m._disable_adapters = True


def adapter_parameters(net: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s parameters, keyed by their path in ``net`` without the adapter name, ``/`` for ``.``."""
    out = {}
    for key, p in net.named_parameters():
        parts = key.split(".")
        if len(parts) > 2 and parts[-3].startswith("lora_") and parts[-2] == name:
            out["/".join(parts[:-2] + parts[-1:])] = p
    if not out:
        raise ValueError(f"network has no adapter {name!r} (adapters: {adapter_names(net)})")
    return out


def lora_adapter(student) -> Optional[str]:
    """The adapter that export merges for ``student``: a view's own, a LoRA copy's only (or active) adapter, or
    ``None`` for a plain network."""
    views = [m for m in student.modules() if getattr(m, "shared_base", False) and not m._replaced]
    if views:
        return views[0].adapter
    net = getattr(student, "net", student)
    names = adapter_names(net)
    if len(names) == 1:
        return names[0]
    if names:
        active = net.active_adapters()
        return active[0] if len(active) == 1 else None
    return None


# ---- plain (merged) networks --------------------------------------------------------------------
def plain_state(net: nn.Module, adapter: Optional[str] = None, dtype: Optional[str] = None
                ) -> Iterator[tuple[str, Tensor]]:
    """``net``'s state as the network without peft layers (``X.base_layer.weight`` -> ``X.weight``), with adapter
    ``adapter`` merged in (``W + delta``); ``None``: the base alone.  ``dtype`` (``"float32"`` ...): every tensor in
    it, merged ones summed in float32 first (a bfloat16 base keeps the adapter's float32 update); ``None``: the
    base's dtype, as peft's ``merge`` (``W + delta`` rounded to it).

    Yields the base's own tensors where nothing is converted (no copy), a new tensor otherwise."""
    import torch

    dt = getattr(torch, dtype) if dtype else None

    layers = tuner_layers(net)
    for key, value in net.state_dict().items():
        if ".lora_" in key or key.startswith("lora_"):
            continue
        if ".base_layer." in key:
            path, _, leaf = key.partition(".base_layer.")
            layer = layers[path]
            if adapter is not None and leaf == "weight" and adapter in getattr(layer, "lora_A", {}):
                with torch.no_grad():
                    delta = layer.get_delta_weight(adapter)  # in the adapter's dtype (float32 masters)
                    value = (value.float() + delta.float()).to(dt) if dt else value + delta.to(value.dtype)
            key = f"{path}.{leaf}"
        yield key, (value.to(dt) if dt is not None and value.is_floating_point() else value)


def plain_clone(net: nn.Module, adapter: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A new diffusers model of ``net``'s class and config holding :func:`plain_state` (copied; ``dtype`` if given)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        new = type(net).from_config(net.config)
    state = {k: (v.detach().clone() if dtype is None else v.detach().to(dtype, copy=True))
             for k, v in plain_state(net, adapter)}
    new.load_state_dict(state, strict=True, assign=True)
    new.requires_grad_(False)
    return new.eval()


def save_merged(net: nn.Module, adapter: Optional[str], folder, dtype: Optional[str] = "float32",
                shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``net`` with ``adapter`` merged as a diffusers model folder (``config.json`` + safetensors shards and
    their index, as ``save_pretrained`` writes them), one shard in memory at a time.  ``dtype``: of the weights
    written (default float32, as a float32 student copy is exported; ``None``: the base's)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_config(str(folder))
    shards: list[dict] = [{}]
    size, total, files = 0, 0, []

    def flush():
        name = f"part{len(files)}"
        save_file({k: v.contiguous() for k, v in shards[-1].items()}, str(folder / name), metadata={"format": "pt"})
        files.append((name, list(shards[-1])))
        shards[-1] = {}

    for key, value in plain_state(net, adapter, dtype):
        value = value.detach().cpu()  # a GPU network: one shard at a time in host memory, none on the device
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][key] = value
        size += nbytes
        total += nbytes
    flush()
    if len(files) == 1:
        os.replace(folder / files[0][0], folder / "diffusion_pytorch_model.safetensors")
        return folder
    n = len(files)
    weight_map = {}
    for i, (name, keys) in enumerate(files, 1):
        final = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(folder / name, folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def merged_placeholder(net: nn.Module, adapter: Optional[str]) -> nn.Module:
    """A weightless (meta) model of ``net``'s class and config whose ``save_pretrained`` writes ``net`` with
    ``adapter`` merged (:func:`save_merged`): what an exported pipeline holds instead of a merged copy in memory."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        holder = type(net).from_config(net.config)

    def save_pretrained(save_directory, safe_serialization: bool = True, variant=None, **kw):
        save_merged(net, adapter, save_directory)

    holder.save_pretrained = save_pretrained
    return holder
