"""CLIP score (Hessel et al. 2021) of images against their prompts, with torchmetrics' ``CLIPScore``.

torchmetrics computes ``max(100 * mean_i cos(E_img_i, E_txt_i), 0)``.  The model is a transformers
``CLIPModel`` plus ``CLIPProcessor`` loaded from a hub id (needs the hub cache when offline) or a local
folder (``save_pretrained`` output with the tokenizer and ``preprocessor_config.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..data import DataError


def load_clip(model: str, device: str = "cpu"):
    """``(CLIPModel, CLIPProcessor)`` from a hub id or a local folder; one-line errors."""
    from transformers import CLIPModel, CLIPProcessor

    if not model:
        raise DataError("--clip is required: a CLIP model hub id (e.g. openai/clip-vit-large-patch14) or a local folder")
    p = Path(model)
    if (model.startswith((".", "/", "~")) or p.exists()) and not (p / "config.json").is_file():
        raise DataError(f"CLIP model folder {model} has no config.json (expected a transformers CLIPModel folder)")
    try:
        net = CLIPModel.from_pretrained(model).eval().to(device)
        proc = CLIPProcessor.from_pretrained(model)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load CLIP model {model!r}: {msg[:300]}") from None
    return net, proc


class _FeatureTensors(nn.Module):
    """transformers >= 5 returns model outputs from ``get_*_features`` (the projected embedding in
    ``pooler_output``); torchmetrics expects tensors.  This adapter hands torchmetrics tensors with either."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class CLIPScorer:
    """Wraps ``torchmetrics.multimodal.CLIPScore`` around an already loaded model (local folders work too)."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 32):
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.model_id = model
        self.device = device
        self.batch_size = batch_size
        net, proc = load_clip(model, device)
        self.metric = CLIPScore(model_name_or_path=lambda: (_FeatureTensors(net), proc)).to(device)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> dict:
        """``images`` uint8 ``(N, 3, H, W)``, one prompt each -> ``{"clip_score", "num_images", ...}``."""
        if len(images) != len(prompts):
            raise DataError(f"{len(images)} images but {len(prompts)} prompts")
        if len(images) == 0:
            raise DataError("no images to score")
        self.metric.reset()
        for i in range(0, len(images), self.batch_size):
            self.metric.update(list(images[i:i + self.batch_size].to(self.device)), list(prompts[i:i + self.batch_size]))
        return {"clip_score": float(self.metric.compute()), "num_images": len(images), "clip_model": self.model_id}
