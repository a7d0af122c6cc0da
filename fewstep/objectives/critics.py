"""The fake-score critic shared by the distribution-matching objectives (dmd, dmd2, phased_dmd): the
denoiser and an optional GAN head on its bottleneck features behind one ``forward``."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from torch import Tensor, nn


class GANHead(nn.Module):
    """DMD2's classifier on the critic's bottleneck features, run in float32 (autocast off).

    Feature maps ``(B, C, H, W)`` (UNet mid-block; ``size`` = H = W): blocks of a stride-2 4x4 convolution
    (padding 1) + GroupNorm + SiLU, each halving the map, as many as take ``size`` down to 1x1
    (:func:`halvings`: SDXL at 1024^2, 32x32 -> 5 blocks), then a 1x1 convolution to one logit per sample.
    Features without a map (``size`` 0: GMM vectors ``(B, C)``, transformer tokens ``(B, N, C)``): an MLP and a
    linear layer (one logit per token for tokens).
    """

    def __init__(self, channels: int, size: int = 0):
        super().__init__()
        self.channels = channels  # bottleneck width (teacher.feature_channels)
        self.size = int(size)  # side of the square bottleneck map (teacher.feature_size); 0: no map
        if self.size < 0:
            raise ValueError(f"GANHead size must be >= 0 (side of the bottleneck map, 0: none), got {size}")
        if self.size:
            g = _groups(channels)
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 4, stride=2, padding=1),
                                                        nn.GroupNorm(g, channels), nn.SiLU())
                                          for _ in range(halvings(self.size))])
            self.out = nn.Conv2d(channels, 1, 1)
        else:
            self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU())
            self.out = nn.Linear(channels, 1)

    def forward(self, feats: Tensor) -> Tensor:
        """Logits ``(B,)`` (``(B, N)`` for tokens), in float32 whatever autocast is on outside."""
        dtype = self.out.weight.dtype  # float32 (the critic's weights); FSDP's mixed precision may cast them
        dev = feats.device.type
        with torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else nullcontext():
            x = feats.to(dtype)
            if self.size:
                if x.ndim != 4 or x.shape[-2:] != (self.size, self.size):
                    raise ValueError(f"GAN head built for {self.size}x{self.size} bottleneck maps, got features of "
                                     f"shape {tuple(x.shape)} (data.resolution changed after the head was built?)")
                return self.out(self.blocks(x)).flatten(1).squeeze(1)
            return self.out(self.mlp(x)).squeeze(-1)


def halvings(size: int) -> int:
    """Stride-2 4x4 convolutions (padding 1) taking a ``size`` x ``size`` map to 1x1 (each: n -> (n - 2) // 2 + 1)."""
    n, k = int(size), 0
    while n > 1:
        n, k = (n - 2) // 2 + 1, k + 1
    return k


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class Critic(nn.Module):
    """The fake-score denoiser, and the GAN head reading its bottleneck, behind one ``forward``.

    One module per trainable group keeps DDP/FSDP gradient synchronisation correct: every call that
    trains the critic goes through this ``forward``.
    """

    num_exits = 1  # one critic for every exit of a multi-step student (see ExitCritics)

    def __init__(self, denoiser: nn.Module, head: Optional[GANHead] = None):
        super().__init__()
        self.denoiser = denoiser
        self.head = head

    @property
    def schedule(self):
        return self.denoiser.schedule

    def forward(self, x_t, t, cond, return_native: bool = False, with_logits: bool = False,
                exit: Optional[Tensor] = None):
        """x0 (and the native prediction, and GAN logits) of the fake score; ``exit`` is accepted and ignored
        (one critic for every exit: the DMD2 recipe)."""
        if with_logits:
            if self.head is None:
                raise ValueError("critic has no GAN head (objective.gan_weight is 0)")
            x0, native, feats = self.denoiser(x_t, t, cond, return_native=True, return_features=True)
            logits = self.head(feats.float())
            return (x0, native, logits) if return_native else (x0, logits)
        return self.denoiser(x_t, t, cond, return_native=return_native)


def _plain(module: nn.Module) -> nn.Module:
    """The module without a DDP/FSDP wrapper (for frozen use inside another group's loss)."""
    return getattr(module, "module", module)


def fake_score(critic: nn.Module, x_t: Tensor, t: Tensor, cond, fp32: bool = True, **kw) -> Tensor:
    """The critic's x0 at ``(x_t, t)`` for the generator's DM gradient (call it under ``no_grad``).

    ``fp32`` (``objective.dm_fp32``) and a critic network whose weights are all float32 (a full copy, or a LoRA on a
    float32 copy): autocast off and float32 inputs, so this term is computed in full precision, as DMD2's reference
    does, whatever ``train.mixed_precision`` says; the critic's own training step keeps the mixed precision.  A LoRA
    on a shared bf16/fp16 base runs the base in its dtype either way, so it keeps the trainer's autocast; the
    gradient and its normaliser are formed in float64 for every critic (:func:`fewstep.losses.dm_loss`).
    """
    net = _plain(critic)
    if fp32 and all(p.dtype == torch.float32 for p in net.denoiser.net.parameters() if p.is_floating_point()):
        with torch.autocast(x_t.device.type, enabled=False), _own_forward(net):
            return net(x_t.float(), t.float(), cond, **kw)
    return net(x_t, t, cond, **kw)


@contextmanager
def _own_forward(module: nn.Module):
    """Call ``module`` with its class's ``forward`` (module hooks kept): accelerate's mixed precision replaces a
    prepared module's ``forward`` with one that enters autocast on every call, keeping the original as
    ``_original_forward``; this puts the original back for the duration."""
    patched, own = module.__dict__.get("forward"), module.__dict__.get("_original_forward")
    if patched is None or own is None:
        yield
        return
    module.forward = own
    try:
        yield
    finally:
        module.forward = patched
