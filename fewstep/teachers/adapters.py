"""One frozen base, many adapters: LoRA networks as named peft adapters on the teacher's own weights.

With ``student.share_base`` (on by default when the student or the critic is a LoRA), the teacher's network stays
one frozen copy in the teacher's dtype (fp16/bf16/fp32) and every LoRA network is a named adapter on it
(``student``, ``critic``, ``critic_1`` ...).  Each network is an :class:`AdapterDenoiser`: a view that calls the base
through the teacher's own denoiser with its adapter switched on (:func:`use_adapter`, around every call, restoring
the previous state after it), and that registers only its adapter's parameters, so its optimizer, checkpoint and EMA
hold the adapter alone.  The teacher's calls are the same base with the adapters switched off, which runs exactly
the teacher's layers (peft calls ``base_layer`` alone): bit-identical to the teacher before any adapter was added.

Gradients: an adapter's parameters enter a graph only through a call of its own view, so the student loss reaches
the critic adapter only where the objective says (the GAN generator term runs the critic under ``frozen``, the DM
term under ``no_grad``), and the critic loss never sees the student adapter (its samples are detached).

Adapter weights are float32 master weights on a base of any dtype (peft casts the input of the LoRA path to them).
Export merges one adapter into the base tensor by tensor, writing safetensors shards as it goes
(:func:`fewstep.lora.save_merged`), so it needs one shard of memory beyond the base, not a second copy of the network.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from ..lora import adapter_names, adapter_parameters, add_adapter, plain_clone, tuner_layers, use_adapter
from .base import Denoiser


# ---- the networks -------------------------------------------------------------------------------------------------
class AdapterDenoiser(Denoiser):
    """Adapter ``adapter`` on a shared frozen base (``None``: the base with adapters off: the teacher), called
    through the base's own denoiser ``inner``.

    ``inner`` (and with it the base) is not a submodule: ``parameters()``, ``state_dict()`` and ``.to()`` cover the
    adapter's weights only (the base belongs to the teacher).  A deep copy is a new adapter on the same base with
    the weights copied (an EMA copy of the student costs an adapter, not a network).
    """

    shared_base = True

    def __init__(self, inner: Denoiser, adapter: Optional[str]):
        nn.Module.__init__(self)
        self.__dict__["inner"] = inner  # not registered: see the class doc
        self.schedule = inner.schedule
        self.prediction = inner.prediction
        self.feature_module = inner.feature_module
        self.adapter = adapter
        self.__dict__["_replaced"] = False
        if adapter is not None:
            for key, p in adapter_parameters(inner.net, adapter).items():
                self.register_parameter(key, p)

    @property
    def net(self) -> nn.Module:
        return self.inner.net

    def __setattr__(self, name, value):
        if name == "net":  # a plain network in place of the adapter (``fewstep export`` re-exporting a merged student)
            self.__dict__["inner"] = type(self.inner)(value, self.schedule, self.prediction)
            self.__dict__["_replaced"] = True
            return
        super().__setattr__(name, value)

    def net_call(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        if self._replaced:
            return self.inner.net_call(x_t, t, cond)
        with use_adapter(self.inner.net, self.adapter):
            return self.inner.net_call(x_t, t, cond)

    def trainable_copy(self) -> Denoiser:
        """A float32 full copy of the base *without* adapters (a full student or critic beside LoRA networks)."""
        return full_copy(self.inner)

    def __deepcopy__(self, memo):
        if self.adapter is None or self._replaced:
            new = AdapterDenoiser(copy.deepcopy(self.inner, memo), self.adapter)
            new.__dict__["_replaced"] = self._replaced
            return new
        base = self.inner.net
        names = adapter_names(base)
        name = next(f"{self.adapter}_copy{i}" for i in range(1, 10**6) if f"{self.adapter}_copy{i}" not in names)
        cfg = base.peft_config[self.adapter]
        add_adapter(base, name, cfg.r, cfg.lora_alpha, sorted(cfg.target_modules))
        new = AdapterDenoiser(self.inner, name)
        with torch.no_grad():
            for (_, src), (_, dst) in zip(sorted(self.named_parameters()), sorted(new.named_parameters())):
                dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
        new.train(self.training)
        memo[id(self)] = new
        return new


def full_copy(inner: Denoiser) -> Denoiser:
    """A float32 trainable full copy of ``inner``'s network, without any adapters its base carries."""
    if not tuner_layers(inner.net):
        return inner.trainable_copy()
    d = type(inner)(plain_clone(inner.net, dtype=torch.float32), inner.schedule, inner.prediction)
    d.net.requires_grad_(True)
    d.net.train()
    return d
