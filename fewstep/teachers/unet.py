"""Diffusers UNet teachers: SD1.5-, SDXL-shaped (UNet2DConditionModel) and UNet2DModel (DDPM) pipelines.

The adapter maps fewstep's continuous ``t`` to the teacher's discrete timestep (``VPDiscrete``),
conditions to the UNet's keyword arguments, and uses the pipeline's own ``encode_prompt`` so the
unconditional branch follows the pipeline's rule (SDXL: zeros when ``force_zeros_for_empty_prompt``;
SD1.5: the empty prompt).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..conditions import NULL_CLASS, Condition, PromptCache
from ..schedules import VPDiscrete, diffusers_prediction
from .base import Denoiser, Teacher

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections, as in diffusers' LoRA scripts
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherLoadError(ValueError):
    """One-line, user-facing problem loading a teacher."""


class UNetDenoiser(Denoiser):
    """``UNet2DConditionModel`` (text / SDXL added conditions) or ``UNet2DModel`` (class labels) behind one call."""

    feature_module = "mid_block"

    def __init__(self, net, schedule: VPDiscrete, prediction: str):
        super().__init__(net, schedule, prediction)
        self.conditional = hasattr(net.config, "cross_attention_dim") and net.config.cross_attention_dim is not None
        self.sdxl = getattr(net.config, "addition_embed_type", None) == "text_time"

    def net_call(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        net = self.net
        dtype = next(net.parameters()).dtype
        ts = self.schedule.t_to_timestep(t).clamp_min(0).to(x_t.device)
        x = x_t.to(dtype)
        if not self.conditional:
            labels = None
            if getattr(net.config, "num_class_embeds", None):
                if cond is None or cond.class_labels is None:
                    raise ValueError("this UNet is class-conditional: the condition needs class_labels")
                null_idx = net.config.num_class_embeds - 1  # convention: the last class embedding is the null class
                labels = torch.where(cond.class_labels == NULL_CLASS, torch.full_like(cond.class_labels, null_idx),
                                     cond.class_labels)
            return net(x, ts, class_labels=labels).sample
        if cond is None or cond.prompt_embeds is None:
            raise ValueError("this UNet is text-conditioned: the condition needs prompt embeddings")
        kw = {"encoder_hidden_states": cond.prompt_embeds.to(dtype)}
        if self.sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled_embeds.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        return net(x, ts, **kw).sample


class DiffusersUNetTeacher(Teacher):
    """A diffusers pipeline with a ``unet`` and a DDPM-family scheduler (eps or v prediction)."""

    def __init__(self, pipe, guidance_scale: float = 1.0, source: str = ""):
        from diffusers import UNet2DConditionModel, UNet2DModel

        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, (UNet2DConditionModel, UNet2DModel)):
            raise TeacherLoadError(f"{source}: {type(pipe).__name__} has no UNet2DConditionModel/UNet2DModel 'unet'; "
                                   "flow transformers are not supported yet")
        cfg = pipe.scheduler.config
        schedule = VPDiscrete.from_scheduler_config(cfg)
        prediction = diffusers_prediction(cfg.get("prediction_type", "epsilon"))
        super().__init__(UNetDenoiser(unet, schedule, prediction), guidance_scale)
        self.pipe = pipe
        self.source = source
        self.prompt_cache = PromptCache(self.encode_prompts)
        self.student_lora: Optional[tuple] = None  # (rank, alpha): set by api.build from student.lora_rank/alpha
        if getattr(pipe, "text_encoder_2", None) is not None:
            self.family = "sdxl"
        elif getattr(pipe, "text_encoder", None) is not None:
            self.family = "sd15"
        else:
            self.family = "ddpm"
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        self.sample_shape = (unet.config.in_channels, size, size)
        self.feature_channels = unet.config.block_out_channels[-1]
        self.vae_scale = getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1
        self.num_classes = (unet.config.num_class_embeds - 1) if getattr(unet.config, "num_class_embeds", None) else 0

    @property
    def text_conditioned(self) -> bool:
        return self.family in ("sd15", "sdxl")

    @property
    def image_size(self) -> int:
        return self.sample_shape[-1] * self.vae_scale

    # ---- conditions ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Condition:
        """Encode prompts with the pipeline's own ``encode_prompt`` (null branch per the pipeline's rule)."""
        pipe, dev = self.pipe, self.device
        if self.family == "sdxl":
            pe, npe, pooled, npooled = pipe.encode_prompt(prompt=list(prompts), device=dev, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
            h = self.image_size
            time_ids = torch.tensor([[h, h, 0, 0, h, h]], dtype=pe.dtype).repeat(len(prompts), 1)
            return Condition(prompt_embeds=pe, pooled_embeds=pooled, time_ids=time_ids.to(dev),
                             null_prompt_embeds=npe, null_pooled_embeds=npooled)
        if self.family == "sd15":
            pe, npe = pipe.encode_prompt(list(prompts), dev, 1, True)
            return Condition(prompt_embeds=pe, null_prompt_embeds=npe)
        raise ValueError(f"{self.family} teachers take no prompts")

    def sample_conditions(self, n, generator, data=None):
        if self.text_conditioned:
            if data is None:
                raise ValueError("a text-conditioned teacher needs data.prompts")
            return self.prompt_cache.get(data.sample_prompts(n, generator))
        if self.num_classes:
            return Condition(class_labels=torch.randint(self.num_classes, (n,), generator=generator))
        return Condition()

    def new_network(self, role: str) -> Denoiser:
        """A float32 trainable copy of the teacher UNet; a LoRA on it for the student when ``student.lora_rank > 0``."""
        d = self.denoiser.trainable_copy()
        if role == "student" and self.student_lora:
            from peft import LoraConfig

            rank, alpha = self.student_lora
            d.net.requires_grad_(False)
            d.net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,  # B = 0: starts at the teacher
                                         target_modules=LORA_TARGETS))
        return d

    def conditions_for_prompts(self, prompts: list[str]) -> Condition:
        return self.prompt_cache.get(prompts)

    # ---- images -------------------------------------------------------------------------------
    @torch.no_grad()
    def to_images(self, x0: Tensor) -> Tensor:
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return (x0.float() / 2 + 0.5).clamp(0, 1)
        z = x0.to(vae.dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        img = vae.decode(z).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> clean latents (the VAE's mean, scaled), batched."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return images
        out = []
        for i in range(0, len(images), 16):
            z = vae.encode(images[i:i + 16].to(self.device, vae.dtype)).latent_dist.mean
            if getattr(vae.config, "shift_factor", None):
                z = z - vae.config.shift_factor
            out.append((z * vae.config.scaling_factor).float().cpu())
        return torch.cat(out)

    def real_samples(self, n, generator, data=None):
        """Real latents for the GAN term: ``data.images`` encoded once with the VAE and cached."""
        if not hasattr(self, "_real"):
            from ..data import load_images

            files = data.image_files()
            imgs = load_images(files, self.image_size)
            self._real = self.encode_images(imgs)
            self._real_prompts = [Path(f).stem.replace("_", " ") for f in files]
        idx = torch.randint(len(self._real), (n,), generator=generator)
        x = self._real[idx]
        if self.text_conditioned:
            cond = self.prompt_cache.get([self._real_prompts[i] for i in idx.tolist()])
        elif self.num_classes:
            cond = Condition(class_labels=torch.randint(self.num_classes, (n,), generator=generator))
        else:
            cond = Condition()
        return x, cond

    def to(self, device, dtype=None):
        self.pipe.to(device)
        return self

    @property
    def device(self):
        return self.pipe.unet.device

    def describe(self):
        d = super().describe()
        d.update(source=self.source, pipeline=type(self.pipe).__name__, prediction=self.denoiser.prediction)
        return d


def load_diffusers_teacher(path: str, guidance_scale: float = 1.0, dtype: str = "float32",
                           revision: Optional[str] = None, variant: Optional[str] = None) -> Teacher:
    """``DiffusionPipeline.from_pretrained`` on a hub id or local folder, wrapped as a fewstep teacher."""
    from diffusers import DiffusionPipeline

    if dtype not in DTYPES:
        raise TeacherLoadError(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "float32" and not torch.cuda.is_available():
        print(f"fewstep: warning: teacher.dtype={dtype} on a CPU is slow or unsupported; loading float32 instead")
        dtype = "float32"
    p = Path(path)
    looks_local = path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "model_index.json").is_file():
        raise TeacherLoadError(f"teacher path {path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=DTYPES[dtype], revision=revision, variant=variant)
    except Exception as e:  # hub errors, offline errors, bad folders: one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherLoadError(f"cannot load teacher {path!r}: {msg}") from None
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae", "transformer"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return DiffusersUNetTeacher(pipe, guidance_scale, source=path)
