"""Peak-memory estimate of a run, before the teacher is loaded (``fewstep distill --dry-run``, tools/memory_bench.py).

Imports no torch: tensor shapes come from the teacher folder's safetensors headers (or, in the bench tool, from a
model built on the meta device).  Per device (the GPU's allocated memory, or the CPU's resident set):

- the frozen teacher: every pipeline module's weights in ``teacher.dtype`` (float16 loads as float32 on a CPU);
- each trained network: a full copy costs float32 weights and two AdamW moments (12 bytes a weight, plus a 2-byte
  autocast copy of the weights under mixed precision); a LoRA on a copy of its own, the float32 copy (4 bytes a
  weight) plus its adapter; a LoRA on the shared base (``student.share_base``), its adapter alone (12 bytes a LoRA
  weight); gradients, 4 bytes a trained weight of the one group being stepped (the trainer frees them after its
  step); the student's EMA, 4 bytes a trained weight;
- activations of the calls that keep a graph, a rough linear model: ``ACT_FACTOR`` saved values per layer output
  (each weight's output width times the latent pixels at its level), per sample, in the compute dtype;
- on a CPU, the process's own footprint (torch, diffusers; ``CPU_OVERHEAD``).

LoRA sizes are exact (rank times the in/out widths of every targeted Linear/Conv weight); the activation term is the
rough one: tools/memory_bench.py prints the estimate beside the measurement.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Optional

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4}
ACT_FACTOR = 6.0  # saved values per layer output (input, norm, activation, ...): calibrated on one CPU run (README)
ACT_FACTOR_CHECKPOINTED = 1.0  # train.gradient_checkpointing: block inputs kept, one block's values at a time (rough)
CPU_OVERHEAD = 1.1e9  # python + torch + diffusers + transformers + fewstep resident on a CPU before any model (measured)
GB = 1e9


def safetensors_shapes(folder) -> dict[str, tuple]:
    """``{tensor name: shape}`` from the headers of every ``*.safetensors`` file in ``folder`` (reads no weights)."""
    out: dict[str, tuple] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def numel(shapes: dict[str, tuple]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def targeted(name: str, targets) -> bool:
    """Whether weight ``name`` (``X.weight``) belongs to a module matched by peft's suffix rule for ``targets``."""
    mod = name.rsplit(".", 1)[0]
    return any(mod == t or mod.endswith("." + t) for t in targets)


def lora_numel(shapes: dict[str, tuple], targets, rank: int) -> int:
    """Weights of a rank-``rank`` LoRA on ``targets``: Linear ``r (in + out)``; Conv ``r in kh kw + out r``."""
    total = 0
    for name, shape in shapes.items():
        if not name.endswith(".weight") or not targeted(name, targets):
            continue
        if len(shape) == 2:
            total += rank * (shape[0] + shape[1])
        elif len(shape) == 4:
            total += rank * shape[1] * shape[2] * shape[3] + shape[0] * rank
    return total


def activation_units(shapes: dict[str, tuple], latent_hw: tuple) -> float:
    """Sum over Linear/Conv weights of output width times the latent pixels at the weight's level (UNets: level from
    ``down_blocks.i`` / ``mid_block`` / ``up_blocks.j``; transformers: every token)."""
    levels = 1 + max([int(m.group(1)) for n in shapes for m in [re.match(r"down_blocks\.(\d+)\.", n)] if m] or [0])
    h, w = latent_hw
    total = 0.0
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) not in (2, 4):
            continue
        if name.startswith(("time_embedding.", "add_embedding.")) or ".time_emb_proj." in name:
            pixels = 1.0
        else:
            m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
            level = 0 if m is None and not name.startswith("mid_block.") else \
                levels - 1 if m is None else int(m.group(2)) if m.group(1) == "down_blocks" else levels - 1 - int(m.group(2))
            pixels = (h / 2 ** level) * (w / 2 ** level)
        total += shape[0] * pixels
    return total


ADAM_BYTES = {"adamw": 8, "adamw8bit": 2}  # moment bytes a trained weight (8-bit: two uint8 moments; absmax ~0.1%)


def network_bytes(kind: str, p: int, lora: int, mixed: bool, adam: int = 8) -> dict[str, float]:
    """Bytes of one trained network: ``full`` / ``lora`` (on a float32 copy of its own) / ``shared`` (an adapter)."""
    if kind == "full":
        return {"weights": 4 * p, "grads": 4 * p, "adam": adam * p, "autocast": 2 * p if mixed else 0}
    own = 4 * p if kind == "lora" else 0
    return {"weights": own + 4 * lora, "grads": 4 * lora, "adam": adam * lora, "autocast": 0}


def estimate(unet: dict[str, tuple], others: dict[str, int], *, dtype: str, cpu: bool, student: str, critic: str,
             lora_rank: int, critic_rank: int, targets, batch: int, latent_hw: tuple, mixed: bool, ema: bool = False,
             critics: int = 1, gan: bool = False, optimizer: str = "adamw", checkpointing: bool = False,
             free_text_encoders: bool = False, free_vae: bool = False) -> dict:
    """Peak bytes by part.  ``unet``: the denoiser's tensor shapes; ``others``: weight counts of the other pipeline
    modules; ``student`` / ``critic``: ``full``, ``lora`` (own copy) or ``shared`` (adapter on the teacher).

    ``free_text_encoders``: the encoders are in memory only while prompts are encoded, before any training state
    exists; the total is then the larger of that phase and the training phase (the part is listed, not summed).
    ``free_vae``: likewise the VAE, which comes back (float32) only for a preview's decode, when no gradients or
    activations are held."""
    if cpu and dtype == "float16":
        dtype = "float32"
    b = BYTES[dtype]
    p = numel(unet)
    encoders = b * sum(v for k, v in others.items() if k != "vae")
    # the VAE and text encoders in the teacher's dtype (the VAE goes float32 only while it encodes or decodes)
    vae = b * others.get("vae", 0)
    parts = {"teacher denoiser": b * p, "VAE": 0 if free_vae else vae}
    if not free_text_encoders:
        parts["text encoders"] = encoders
    adam = ADAM_BYTES[optimizer]
    s = network_bytes(student, p, lora_numel(unet, targets, lora_rank), mixed, adam)
    c = network_bytes(critic, p, lora_numel(unet, targets, critic_rank), mixed, adam)
    for k in ("weights", "adam"):
        parts[f"student {k}"] = s[k]
        parts[f"critic {k}"] = critics * c[k]
    parts["gradients (one group at a time)"] = max(s["grads"], critics * c["grads"])  # freed after each group's step
    parts["autocast weight copies"] = max(s["autocast"], critics * c["autocast"])
    if ema:
        parts["student EMA"] = s["weights"] if student == "full" else 4 * lora_numel(unet, targets, lora_rank)
    act_bytes = 2 if (mixed or b == 2) else 4
    graphs = 2 if gan else 1  # calls that keep a graph at once: the student's (and the critic's, for the GAN term)
    factor = ACT_FACTOR_CHECKPOINTED if checkpointing else ACT_FACTOR
    parts["activations (rough)"] = factor * act_bytes * batch * graphs * activation_units(unet, latent_hw)
    if cpu:
        parts["process (torch, libraries)"] = CPU_OVERHEAD
    parts = {k: float(v) for k, v in parts.items() if v}
    total = sum(parts.values())
    if free_text_encoders and encoders:  # the encoding phase: base, VAE, encoders, process; nothing trained yet
        before = parts["teacher denoiser"] + vae + encoders + parts.get("process (torch, libraries)", 0)
        total = max(total, before)
        parts["text encoders (freed before training; not summed)"] = float(encoders)
    if free_vae and vae:  # a preview: the VAE back in float32, no gradients or activations
        preview = (total - parts.get("gradients (one group at a time)", 0) - parts.get("activations (rough)", 0)
                   + 4 * others.get("vae", 0))
        total = max(total, preview)
        parts["VAE (freed before training, back for previews; not summed)"] = float(vae)
    return {"parts": parts, "total": total, "dtype": dtype, "params": p,
            "student_lora_params": lora_numel(unet, targets, lora_rank) if student != "full" else 0,
            "critic_lora_params": lora_numel(unet, targets, critic_rank) if critic != "full" else 0}


def table(est: dict, title: str = "") -> str:
    lines = [title] if title else []
    width = max(len(k) for k in est["parts"])
    for k, v in est["parts"].items():
        lines.append(f"  {k:<{width}}  {v / GB:8.2f} GB")
    lines.append(f"  {'total':<{width}}  {est['total'] / GB:8.2f} GB")
    return "\n".join(lines)


_LIBC: list = []


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``, every arena; elsewhere a no-op): memory
    freed in many mid-sized blocks (gradients, optimizer state, a text encoder) otherwise stays in the resident set
    and adds to the peak of whatever is allocated next."""
    if not _LIBC:
        import ctypes

        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def release_unused() -> None:
    """Collect garbage, then :func:`trim_heap`."""
    import gc

    gc.collect()
    trim_heap()


# ---- from a run config, before loading anything ------------------------------------------------------------------
def teacher_folder(path: str) -> Optional[Path]:
    """A local pipeline folder for ``teacher.path``: the folder itself, or a hub id's snapshot in the local cache."""
    p = Path(os.path.expanduser(path))
    if (p / "model_index.json").is_file():
        return p
    if "/" not in path or path.startswith((".", "/", "~")):
        return None
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snaps = Path(os.path.expanduser(str(cache))) / f"models--{path.replace('/', '--')}" / "snapshots"
    found = sorted(snaps.glob("*/model_index.json")) if snaps.is_dir() else []
    return found[-1].parent if found else None


def folder_source(folder: Path) -> Optional[tuple]:
    """``(unet shapes, {module: weight count}, unet config, VAE scale factor)`` of a pipeline folder, from its
    safetensors headers and configs; ``None`` where it has no UNet weights."""
    if not (folder / "unet" / "config.json").is_file():
        return None
    unet = safetensors_shapes(folder / "unet")
    if not unet:
        return None
    index = json.loads((folder / "model_index.json").read_text())
    others = {k: numel(safetensors_shapes(folder / k)) for k, v in index.items()
              if k != "unet" and isinstance(v, list) and v[0] and (folder / k).is_dir()}
    vae_cfg = folder / "vae" / "config.json"
    scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1) if vae_cfg.is_file() else 1
    return unet, others, json.loads((folder / "unet" / "config.json").read_text()), scale


def estimate_config(cfg, cpu: Optional[bool] = None, source: Optional[tuple] = None) -> Optional[dict]:
    """The estimate for a resolved :class:`~fewstep.config.Config` whose teacher is a local (or cached) UNet pipeline,
    else ``None``.  ``cpu``: the device to estimate for (default: a CPU unless ``nvidia-smi`` is on the PATH);
    ``source``: :func:`folder_source`'s tuple from elsewhere (the bench tool: a model on the meta device)."""
    import shutil

    if source is None:
        folder = teacher_folder(cfg.teacher.path)
        source = folder_source(folder) if folder is not None else None
    if source is None:
        return None
    unet, others, ucfg, scale = source
    size = ucfg.get("sample_size", 64)
    size = size if isinstance(size, int) else size[0]
    if cfg.data.resolution:  # UNet teachers train at data.resolution (DiffusersUNetTeacher.set_resolution)
        size = cfg.data.resolution // scale
    obj = dict(cfg.objective)
    lora, share = cfg.student.lora_rank, cfg.student.share_base
    crank = obj.get("critic_lora_rank")
    if share is None:
        share = obj.get("name") in ("dmd", "dmd2", "phased_dmd") and bool(lora or crank)
    if crank is None:
        crank = lora if share else 0
    student = "full" if not lora else "shared" if share else "lora"
    critic = "full" if not crank else "shared" if share else "lora"
    from .lora import LORA_TARGETS

    per_exit = obj.get("backward_simulation") == "per_exit" and cfg.student.steps > 1
    return estimate(unet, others, dtype=cfg.teacher.dtype, cpu=shutil.which("nvidia-smi") is None if cpu is None else cpu,
                    student=student, critic=critic, lora_rank=lora, critic_rank=crank or 0, targets=LORA_TARGETS,
                    batch=cfg.train.batch_size, latent_hw=(size, size), mixed=cfg.train.mixed_precision != "no",
                    ema=cfg.train.ema_decay > 0, critics=cfg.student.steps if per_exit else 1,
                    gan=float(obj.get("gan_weight", 0) or 0) > 0, optimizer=cfg.train.optimizer,
                    checkpointing=cfg.train.gradient_checkpointing,
                    free_text_encoders=bool(getattr(cfg.data, "free_text_encoders", False)),
                    free_vae=bool(getattr(cfg.data, "free_vae", False)))
