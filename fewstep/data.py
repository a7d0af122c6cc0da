"""Data sources: prompts (txt / jsonl / csv), image folders (encoded once to latents), nothing (data-free).

All sampling is driven by a caller-supplied ``torch.Generator``, so a batch is a pure function of
(seed, step, micro-batch, process) and resume is exact without saving a data-loader position.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import DataError  # noqa: F401  (defined there: importable without torch)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_prompts(path: str, one_per_image: bool = False) -> list[str]:
    """Prompts from a ``.txt`` (one a line), ``.jsonl`` / ``.json`` (key ``prompt``, ``caption`` or ``text``; or the
    COCO captions JSON with an ``annotations`` list) or ``.csv`` (column ``prompt``/``caption``/``text``) file.

    ``one_per_image``: from a COCO captions JSON keep only the first caption of each ``image_id`` (the usual
    COCO-FID / CLIP-score protocol; COCO has about five captions an image)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"prompt file {path} is a folder; expected a .txt, .jsonl, .json or .csv file")
    if not p.is_file():
        raise DataError(f"prompt file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read prompt file {path}: {e}") from None
    keys = ("prompt", "caption", "text")
    prompts: list[str] = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"malformed JSON on line {i} of {path}") from None
            val = next((obj[k] for k in keys if isinstance(obj, dict) and k in obj), obj if isinstance(obj, str) else None)
            if val is None:
                raise DataError(f"line {i} of {path} has none of the keys {keys}")
            prompts.append(str(val))
    elif p.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON in {path}: {e.msg} (line {e.lineno})") from None
        items = obj.get("annotations", []) if isinstance(obj, dict) else obj
        seen_images = set()
        for it in items if isinstance(items, list) else []:
            if one_per_image and isinstance(it, dict) and "image_id" in it:
                if it["image_id"] in seen_images:
                    continue
                seen_images.add(it["image_id"])
            val = it if isinstance(it, str) else next((it[k] for k in keys if k in it), None) if isinstance(it, dict) else None
            if val is not None:
                prompts.append(str(val))
    elif p.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        col = next((k for k in keys if rows and k in rows[0]), None)
        if col is None:
            raise DataError(f"{path} needs a column named one of {keys}")
        prompts = [r[col] for r in rows]
    else:
        prompts = text.splitlines()
    prompts = [q.strip() for q in prompts if q and q.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} has no prompts")
    return prompts


def list_images(folder: str) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted); a missing, non-folder or image-less path is a DataError."""
    p = Path(folder)
    if p.is_file():
        raise DataError(f"{folder} is a file, not an image folder")
    if not p.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(f"image folder {folder} has no images ({', '.join(sorted(IMAGE_EXTS))})")
    return files


def image_problem(f) -> Optional[str]:
    """Why ``f`` cannot be used as an image (fully decoded: truncated files are caught), or None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def usable_images(files: Sequence[Path], min_images: int = 1, log=None, where: str = "") -> list[Path]:
    """``data.on_bad_image=skip``: the files that decode; each skipped file is logged by name, then the total.

    Fewer than ``min_images`` (one batch) left is a DataError."""
    import sys

    log = log or (lambda msg: print(msg, file=sys.stderr))
    good, bad = [], 0
    for f in files:
        why = image_problem(f)
        if why is None:
            good.append(f)
        else:
            bad += 1
            log(f"fewstep: warning: skipping unreadable image {f} ({why})")
    if bad:
        log(f"fewstep: warning: skipped {bad} of {len(files)} images in {where or 'the image folder'} "
            f"(data.on_bad_image=skip); {len(good)} remain")
    if len(good) < min_images:
        raise DataError(f"only {len(good)} readable images in {where or 'the image folder'} ({bad} skipped); "
                        f"need at least one batch ({min_images})")
    return good


def load_images(files: Sequence[Path], size: int) -> Tensor:
    """Images as a float tensor in [-1, 1], (N, 3, size, size), center-cropped and resized."""
    from PIL import Image, UnidentifiedImageError
    import numpy as np

    out = []
    for f in files:
        try:
            im = Image.open(f).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"unreadable image {f}: {e}") from None
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def read_image_uint8(f) -> "np.ndarray":
    """One image file as an RGB uint8 array ``(H, W, 3)``; unreadable files are a DataError."""
    from PIL import Image, UnidentifiedImageError
    import numpy as np

    try:
        with Image.open(f) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"unreadable image {f}: {e}") from None


def load_images_uint8(files: Sequence[Path], size: Optional[int] = None) -> Tensor:
    """Images as uint8 ``(N, 3, H, W)``, unchanged; ``size``: center-crop each to a square and resize (bicubic) to
    ``size`` x ``size``.  Without ``size`` all images must have one size (FID networks resize on their own)."""
    from PIL import Image
    import numpy as np

    arrs = []
    for f in files:
        a = read_image_uint8(f)
        if size is not None and a.shape[:2] != (size, size):
            h, w = a.shape[:2]
            s = min(h, w)
            a = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            a = np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))
        if arrs and a.shape != arrs[0].shape:
            raise DataError(f"images differ in size ({files[0].name} is {arrs[0].shape[1]}x{arrs[0].shape[0]}, "
                            f"{Path(f).name} is {a.shape[1]}x{a.shape[0]}); pass a resize (--ref-resize N)")
        arrs.append(a)
    if not arrs:
        return torch.zeros(0, 3, size or 0, size or 0, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


class DataSource:
    """What a run reads: prompts and/or real samples.  Built from ``DataConfig``; lazily loaded."""

    def __init__(self, prompts: Optional[str] = None, images: Optional[str] = None, on_bad_image: str = "error",
                 min_images: int = 1, cache: str = "auto", cache_dir: Optional[str] = None,
                 cache_memory_mb: float = 1024.0, free_text_encoders: bool = False, free_vae: bool = False):
        self.prompts_path = prompts
        self.images_path = images
        self.on_bad_image = on_bad_image  # "error": an unreadable image stops the run; "skip": it is left out
        self.min_images = min_images  # with "skip": fewer readable images than this (one batch) is an error
        # encoded prompts and image latents (fewstep.cache): memory, disk (shards in cache_dir), auto (disk when
        # larger than cache_memory_mb and cache_dir is set); the text encoders are dropped once the prompts are cached
        # when free_text_encoders (a run's config turns it on: data.free_text_encoders)
        self.cache = cache
        self.cache_dir = cache_dir
        self.cache_memory_mb = cache_memory_mb
        self.free_text_encoders = free_text_encoders
        self.free_vae = free_vae  # likewise the VAE, once image latents are cached (data.free_vae)
        self._prompts: Optional[list[str]] = None
        self._images: Optional[list[Path]] = None
        self.opened: list[str] = []  # what was actually read (data-free objectives assert this stays empty)

    @property
    def prompts(self) -> Optional[list[str]]:
        if self._prompts is None and self.prompts_path:
            self._prompts = read_prompts(self.prompts_path)
            self.opened.append(self.prompts_path)
        return self._prompts

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        ps = self.prompts
        if not ps:
            raise DataError("this teacher is text-conditioned: set data.prompts to a text file, one prompt a line")
        idx = torch.randint(len(ps), (n,), generator=generator).tolist()
        return [ps[i] for i in idx]

    def image_files(self) -> list[Path]:
        if not self.images_path:
            raise DataError("real images are needed (GAN term): set data.images to a folder of images")
        if self._images is None:
            files = list_images(self.images_path)
            if self.on_bad_image == "skip":
                import os

                quiet = os.environ.get("RANK", "0") != "0"  # one log under torchrun
                files = usable_images(files, self.min_images, log=(lambda m: None) if quiet else None,
                                      where=self.images_path)
            self._images = files
        self.opened.append(self.images_path)
        return list(self._images)
