"""Pure loss functions shared by objectives."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def dsm_loss(pred_native: Tensor, target_native: Tensor) -> Tensor:
    """Denoising score matching in the network's native space (its own weighting)."""
    return F.mse_loss(pred_native.float(), target_native.float())


def dm_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    """Distribution-matching loss of DMD (Yin et al. 2023, Eq. 7-8) with its per-sample normaliser.

    ``grad = (D_fake - D_real) / mean|x - D_real|``; ``loss = 0.5 ||x - sg(x - grad)||^2`` (mean), whose
    gradient w.r.t. ``x`` is ``grad / numel``.  Returns (loss, grad).
    """
    x32, real, fake = x.float(), x0_real.detach().double(), x0_fake.detach().double()
    norm = (x32.detach().double() - real).abs().flatten(1).mean(1).clamp_min(1e-8)
    grad = (fake - real) / norm.view(-1, *([1] * (x.ndim - 1)))
    grad = torch.nan_to_num(grad).float()
    return 0.5 * F.mse_loss(x32, (x32 - grad).detach()), grad


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))``."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """``softplus(D(fake)) + softplus(-D(real))``."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def pseudo_huber(a: Tensor, b: Tensor, c: float = 1e-3) -> Tensor:
    """``sqrt(||a-b||^2 + c^2) - c`` per sample, averaged (Song & Dhariwal 2023)."""
    d2 = ((a.float() - b.float()) ** 2).flatten(1).sum(1)
    return (torch.sqrt(d2 + c * c) - c).mean()
