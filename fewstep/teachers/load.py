"""Teacher loading: one place that dispatches a ``teacher.path`` to its adapter (gmm, unet, transformer).

The adapters import only ``base``; this module imports them all, so no adapter imports another's loader.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .base import Teacher, TeacherLoadError
from .transformer import DiffusersTransformerTeacher
from .unet import DTYPES, DiffusersUNetTeacher


def load_teacher(path: str, guidance_scale: float = 1.0, dtype: str = "float32", revision: Optional[str] = None,
                 variant: Optional[str] = None, schedule: str = "vp") -> Teacher:
    """``gmm:NAME`` / ``gmm:FILE.json`` analytic teachers, else a diffusers pipeline (hub id or folder)."""
    if path.startswith("gmm:"):
        from .gmm import GMMTeacher, load_mixture

        spec = path[4:]
        if schedule not in ("vp", "flow"):
            raise TeacherLoadError(f"teacher.schedule must be 'vp' or 'flow', got {schedule!r}")
        return GMMTeacher(load_mixture(spec), schedule, guidance_scale, name=spec)
    return load_diffusers_teacher(path, guidance_scale, dtype, revision, variant)


def load_diffusers_teacher(path: str, guidance_scale: float = 1.0, dtype: str = "float32",
                           revision: Optional[str] = None, variant: Optional[str] = None) -> Teacher:
    """``DiffusionPipeline.from_pretrained`` on a hub id or local folder, wrapped as a fewstep teacher."""
    from pipelines import load_pipeline

    if dtype not in DTYPES:
        raise TeacherLoadError(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "float16" and not torch.cuda.is_available():  # bfloat16 runs on CPUs (half the memory of float32)
        print(f"fewstep: warning: teacher.dtype={dtype} on a CPU is slow or unsupported; loading float32 instead "
              f"(bfloat16 works on CPUs)")
        dtype = "float32"
    p = Path(path)
    looks_local = path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "model_index.json").is_file():
        raise TeacherLoadError(f"teacher path {path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = load_pipeline(path, dtype=DTYPES[dtype], revision=revision, variant=variant)  # + pipelines/ classes
    except Exception as e:  # hub errors, offline errors, bad folders: one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherLoadError(f"cannot load teacher {path!r}: {msg}") from None
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    if getattr(pipe, "transformer", None) is not None:  # flow transformers (SD3, Flux): their own adapter
        teacher = DiffusersTransformerTeacher(pipe, guidance_scale, source=path)
    else:
        teacher = DiffusersUNetTeacher(pipe, guidance_scale, source=path)
    # how it was loaded: cache fingerprints, and an export reloading the text encoders it freed
    teacher.load_options = {"revision": revision, "variant": variant, "dtype": dtype}
    return teacher
