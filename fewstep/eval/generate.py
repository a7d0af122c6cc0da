"""Generate evaluation images from a diffusers pipeline folder: recommended settings, batched, one seed an image.

Image ``i`` is drawn with its own generator seeded ``seed + i``, so it does not depend on the batch size
and can be reproduced alone.  Settings come from the folder's ``fewstep.json`` (written by fewstep's
export: ``num_inference_steps``, ``guidance_scale``) unless overridden.  Text pipelines take prompt
``i % len(prompts)``; class-conditional pipelines class ``i % num_classes``; unconditional ones neither.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError

DEFAULT_STEPS = 50  # for a folder without fewstep.json (a teacher)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_pipeline(path: str, device: str = "cpu", dtype: Optional[str] = None):
    """Load a pipeline folder (or hub id) with fewstep's pipeline resolution; one-line errors."""
    from pipelines import load_pipeline

    p = Path(path)
    if (path.startswith((".", "/", "~")) or p.exists()) and not (p / "model_index.json").is_file():
        raise ConfigError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    kw = {}
    if dtype:
        kw["dtype"] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    try:
        pipe = load_pipeline(path, **kw)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load pipeline {path!r}: {msg}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_kind(pipe) -> str:
    """``text`` (takes prompts), ``class`` (class labels) or ``uncond``."""
    if getattr(pipe, "tokenizer", None) is not None or getattr(pipe, "text_encoder", None) is not None:
        return "text"
    if any(c.__name__ == "ClassConditionalPipeline" for c in type(pipe).__mro__):  # also its phased-expert subclass
        return "class"
    return "uncond"


def recommended(path: str) -> dict:
    """``num_inference_steps`` / ``guidance_scale`` recommended by the folder's ``fewstep.json`` (if any)."""
    f = Path(path) / "fewstep.json"
    info = json.loads(f.read_text()) if f.is_file() else {}
    return {"num_inference_steps": int(info.get("num_inference_steps", DEFAULT_STEPS)),
            "guidance_scale": info.get("guidance_scale"), "objective": info.get("objective"),
            "from_fewstep_json": f.is_file()}


@dataclass
class Generated:
    images: Tensor  # uint8 (N, 3, H, W)
    records: list  # per image: {"index", "seed", "prompt" | "class_label"}
    settings: dict
    seconds: float  # wall time of the pipeline calls only
    labels: Optional[Tensor] = None  # class labels (class-conditional pipelines)
    prompts: Optional[list] = None

    @property
    def sec_per_image(self) -> float:
        return self.seconds / max(len(self.images), 1)


def _to_uint8(images) -> Tensor:
    """Pipeline ``np`` output (N, H, W, C) in [0, 1] -> uint8 (N, 3, H, W) (grey replicated to RGB)."""
    x = torch.as_tensor(np.asarray(images)).float()
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 3, 1, 2)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x[:, :3].contiguous()


def generate(pipe, num_images: int, *, prompts: Optional[Sequence[str]] = None, num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: Optional[float] = None, batch_size: int = 16, seed: int = 0,
             out_dir: Optional[str] = None, progress: bool = True, desc: str = "generating",
             class_labels: Optional[Sequence[int]] = None) -> Generated:
    """``num_images`` images (uint8) with per-image seeds; optionally saved as PNGs plus ``manifest.json``."""
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {num_images}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    kind = pipeline_kind(pipe)
    if kind == "text" and not prompts:
        raise ConfigError("this pipeline is text-conditioned: pass --prompts FILE (one caption a line, or COCO captions JSON)")
    labels = None
    if kind == "class":
        k = pipe.num_classes
        labels = torch.as_tensor(list(class_labels) if class_labels is not None else [i % k for i in range(num_images)])
    settings = {"num_inference_steps": int(num_inference_steps), "batch_size": batch_size, "seed": seed,
                "pipeline_class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "kind": kind}
    if guidance_scale is not None:
        settings["guidance_scale"] = float(guidance_scale)
    records, chunks, seconds = [], [], 0.0
    with tqdm(total=num_images, desc=desc, unit="img", disable=None if progress else True, leave=False) as bar:
        for start in range(0, num_images, batch_size):
            idx = list(range(start, min(start + batch_size, num_images)))
            gens = [torch.Generator().manual_seed(seed + i) for i in idx]
            kw = {"num_inference_steps": int(num_inference_steps), "generator": gens, "output_type": "np"}
            if guidance_scale is not None:
                kw["guidance_scale"] = float(guidance_scale)
            if kind == "text":
                batch_prompts = [prompts[i % len(prompts)] for i in idx]
                kw["prompt"] = batch_prompts
            elif kind == "class":
                kw["class_labels"] = labels[idx].tolist()
            else:
                kw["batch_size"] = len(idx)
                kw.pop("guidance_scale", None)
            t0 = time.perf_counter()
            out = pipe(**kw).images
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            chunks.append(_to_uint8(out))
            for j, i in enumerate(idx):
                rec = {"index": i, "seed": seed + i}
                if kind == "text":
                    rec["prompt"] = batch_prompts[j]
                elif kind == "class":
                    rec["class_label"] = int(labels[i])
                records.append(rec)
            bar.update(len(idx))
    images = torch.cat(chunks)
    gen = Generated(images, records, settings, seconds, labels,
                    [r["prompt"] for r in records] if kind == "text" else None)
    if out_dir:
        save_generated(gen, out_dir)
    return gen


def save_generated(gen: Generated, out_dir) -> Path:
    """PNG per image (``000000.png`` ...) and ``manifest.json`` (settings, per-image seed and prompt/class)."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rec, img in zip(gen.records, gen.images):
        rec["file"] = f"{rec['index']:06d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / rec["file"])
    (out / "manifest.json").write_text(json.dumps(
        {"settings": gen.settings, "sec_per_image": gen.sec_per_image, "images": gen.records}, indent=1))
    return out


def read_manifest(folder) -> Optional[dict]:
    f = Path(folder) / "manifest.json"
    return json.loads(f.read_text()) if f.is_file() else None
