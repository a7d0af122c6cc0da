"""Diffusers UNet teachers: SD1.5-, SDXL-shaped (UNet2DConditionModel) and UNet2DModel (DDPM) pipelines.

The adapter maps fewstep's continuous ``t`` to the teacher's discrete timestep (``VPDiscrete``),
conditions to the UNet's keyword arguments, and uses the pipeline's own ``encode_prompt`` so the
unconditional branch follows the pipeline's rule (SDXL: zeros when ``force_zeros_for_empty_prompt``;
SD1.5: the empty prompt).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .. import cache as cache_mod
from ..conditions import NULL_CLASS, Condition, PromptCache
from ..schedules import VPDiscrete, diffusers_prediction
from .base import Denoiser, Teacher

from ..lora import LORA_TARGETS  # noqa: E402,F401  (the UNet LoRA targets; defined there: importable without torch)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # what data.free_text_encoders drops


def _cache_settings(data, name: str):
    """``(data.cache, its folder for cache ``name`` or None, data.cache_memory_mb in bytes)`` of a DataSource."""
    folder = None if data.cache_dir is None else Path(data.cache_dir) / name
    return data.cache, folder, float(data.cache_memory_mb) * 2 ** 20


from .base import TeacherLoadError  # noqa: E402  (re-exported: fewstep.teachers.unet.TeacherLoadError)


def vae_needs_upcast(vae) -> bool:
    """Whether ``vae`` must run in float32: its config says it overflows in half precision (``force_upcast``: SDXL's
    VAE gives NaN in fp16) and it is held in float16 or bfloat16."""
    return vae is not None and bool(getattr(vae.config, "force_upcast", False)) and \
        vae.dtype in (torch.float16, torch.bfloat16)


@contextmanager
def float32_vae(vae):
    """``vae`` in float32 for the duration where :func:`vae_needs_upcast`, then back in its own dtype (lossless both
    ways), as the stock SDXL pipeline does around its decode.  The references (diffusers' LCM script, DMD2) keep this
    VAE in float32 for encoding and decoding; so does fewstep, but only while it encodes or decodes: at rest the VAE
    keeps the pipeline's dtype, so a training step holds no float32 copy (SDXL's: 0.33 GB) and an export writes the
    teacher's own VAE.  Cast parameter by parameter (``nn.Module.float``: no second copy of the module)."""
    if not vae_needs_upcast(vae):
        yield
        return
    dtype = vae.dtype
    vae.float()  # nn.Module.float/to: diffusers' .to(dtype) would warn about _keep_in_fp32_modules for nothing
    try:
        yield
    finally:
        nn.Module.to(vae, dtype=dtype)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """``timestep_cond`` for a UNet with ``time_cond_proj_dim``: the sinusoidal embedding of ``w * 1000``.

    ``w`` is LCM's guidance form (``guidance_scale - 1``).  This is the stock pipelines' own function
    (``StableDiffusion[XL]Pipeline.get_guidance_scale_embedding``, which they call with
    ``guidance_scale - 1`` whenever ``unet.config.time_cond_proj_dim`` is set), so an exported student
    sees exactly the embedding it was trained with.
    """
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float().reshape(-1), embedding_dim=dim)


def add_guidance_embedding(unet, dim: int):
    """A float32 copy of ``unet`` (UNet2DConditionModel) with ``time_cond_proj_dim=dim`` added.

    Every teacher weight is kept; the new ``time_embedding.cond_proj`` linear is zero-initialised, so the
    copy computes exactly what the teacher does until it is trained.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"a guidance embedding (time_cond_proj_dim) can only be added to a UNet2DConditionModel, "
                         f"not {type(unet).__name__}")
    have = unet.config.time_cond_proj_dim
    if have is not None and have != dim:
        raise ValueError(f"the teacher UNet already has time_cond_proj_dim={have}; set objective.embedding_dim={have}")
    state = {k: v.detach().clone().float() for k, v in unet.state_dict().items()}
    with init_empty_weights():
        new = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"time_embedding.cond_proj.weight", "time_embedding.cond_proj.bias"}:
        raise RuntimeError(f"cannot add a guidance embedding: unexpected {unexpected[:3]}, missing {missing[:3]}")
    if have is None:
        old = new.time_embedding.cond_proj
        proj = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
        torch.nn.init.zeros_(proj.weight)
        if proj.bias is not None:
            torch.nn.init.zeros_(proj.bias)
        new.time_embedding.cond_proj = proj
    new.to(device=next(iter(state.values())).device)
    return new


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
            if cond is not None and cond.guidance_w is not None:
                raise ValueError("a UNet2DModel takes no guidance embedding (the condition carries guidance_w)")
            return net(x, ts, class_labels=labels).sample
        if cond is None or cond.prompt_embeds is None:
            raise ValueError("this UNet is text-conditioned: the condition needs prompt embeddings")
        kw = {"encoder_hidden_states": cond.prompt_embeds.to(dtype)}
        if self.sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled_embeds.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        if cond.guidance_w is not None:  # LCM-style guidance embedding, as the stock pipelines compute it
            dim = getattr(net.config, "time_cond_proj_dim", None)
            if not dim:
                raise ValueError("this UNet has no guidance embedding (time_cond_proj_dim) but the condition "
                                 "carries guidance_w")
            kw["timestep_cond"] = guidance_embedding(cond.guidance_w, dim).to(device=x_t.device, dtype=dtype)
        return net(x, ts, **kw).sample


def bottleneck_side(side: int, num_down_blocks: int) -> int:
    """Side of a diffusers UNet's mid-block map for a ``side`` x ``side`` input: every down block but the last
    halves it (a stride-2 3x3 convolution with padding 1: n -> ceil(n / 2)); SDXL at 1024^2: 128 -> 32."""
    for _ in range(num_down_blocks - 1):
        side = (side + 1) // 2
    return side


class DiffusersUNetTeacher(Teacher):
    """A diffusers pipeline with a ``unet`` and a DDPM-family scheduler (eps or v prediction)."""

    supports_lora = True  # student.lora_rank > 0: a peft LoRA on the copied UNet

    def __init__(self, pipe, guidance_scale: float = 1.0, source: str = ""):
        from diffusers import UNet2DConditionModel, UNet2DModel

        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, (UNet2DConditionModel, UNet2DModel)):
            raise TeacherLoadError(f"{source}: {type(pipe).__name__} has no UNet2DConditionModel/UNet2DModel 'unet'; "
                                   "SD3/Flux pipelines load through fewstep.teachers.transformer")
        cfg = pipe.scheduler.config
        schedule = VPDiscrete.from_scheduler_config(cfg)
        prediction = diffusers_prediction(cfg.get("prediction_type", "epsilon"))
        super().__init__(UNetDenoiser(unet, schedule, prediction), guidance_scale)
        self.pipe = pipe
        self.source = source
        self.prompt_cache = PromptCache(self.encode_prompts)
        self.load_options: dict = {}  # revision, variant, dtype of the load (teachers.load): caches, freed components
        self.freed_components: dict = {}  # name -> (library, class) of the text encoders free_text_encoders dropped
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
        self.feature_size = bottleneck_side(size, len(unet.config.down_block_types))
        self.vae_scale = getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1
        self.num_classes = (unet.config.num_class_embeds - 1) if getattr(unet.config, "num_class_embeds", None) else 0

    @property
    def text_conditioned(self) -> bool:
        return self.family in ("sd15", "sdxl")

    @property
    def image_size(self) -> int:
        return self.sample_shape[-1] * self.vae_scale

    def set_resolution(self, pixels: int) -> None:
        """Train at ``pixels`` square (``data.resolution``): latents of ``pixels / vae_scale``, SDXL time ids of it.

        The teacher UNet's config ``sample_size`` is set to that latent size, so every copy of it (student, critic)
        and the exported UNet carry it: the stock pipelines' default height/width is ``sample_size * vae_scale``.
        """
        unet = self.pipe.unet
        step = self.vae_scale * 2 ** (len(unet.config.down_block_types) - 1)
        if pixels < step or pixels % step:
            raise ValueError(f"data.resolution={pixels} does not fit this UNet: expected a positive multiple of {step} "
                             f"(VAE factor {self.vae_scale} x 2^{len(unet.config.down_block_types) - 1} downsamplings)")
        lat = int(pixels) // self.vae_scale
        unet.register_to_config(sample_size=lat)
        if hasattr(self.pipe, "default_sample_size"):  # SDXL pipelines read it once, at construction
            self.pipe.default_sample_size = lat
        if self.sample_shape[1:] != (lat, lat) and len(self.prompt_cache):  # SDXL time ids carry the size: re-encode
            old = self.prompt_cache
            self.prompt_cache = PromptCache(self.encode_prompts)
            self.prompt_cache.encoder_available = old.encoder_available
        self.sample_shape = (self.sample_shape[0], lat, lat)
        self.feature_size = bottleneck_side(lat, len(unet.config.down_block_types))

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

    def new_network(self, role: str, guidance_dim: int = 0) -> Denoiser:
        """A float32 trainable copy of the teacher UNet, or a LoRA: for the student when ``student.lora_rank > 0``, for
        the critic when ``objective.critic_lora_rank`` asks for one (``student_lora`` / ``critic_lora``).

        With ``share_base`` a LoRA is a named adapter on the teacher's own frozen UNet (:mod:`.adapters`; the teacher's
        calls then run with every adapter off); without, a LoRA on a float32 copy of its own.
        ``guidance_dim > 0``: the copy gets a zero-initialised guidance embedding (``time_cond_proj_dim``),
        fed from ``cond.guidance_w`` (full-copy students of a UNet2DConditionModel only).
        """
        lora = self.student_lora if role == "student" else self.critic_lora if role == "critic" else None
        if guidance_dim:
            if role == "student" and self.student_lora:
                raise ValueError("a LoRA student cannot get a guidance embedding (time_cond_proj_dim is a new layer)")
            d = UNetDenoiser(add_guidance_embedding(self.denoiser.net, guidance_dim), self.schedule,
                             self.denoiser.prediction)
            d.net.requires_grad_(True)
            d.net.train()
            return d
        if lora and self.share_base:
            return self._adapter_network(role, *lora)
        d = self.denoiser.trainable_copy()  # of the base without adapters, when it carries some
        if lora:
            from peft import LoraConfig

            rank, alpha = lora
            d.net.requires_grad_(False)
            d.net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,  # B = 0: starts at the teacher
                                         target_modules=LORA_TARGETS))
        return d

    def _adapter_network(self, role: str, rank: int, alpha: float) -> Denoiser:
        """A new adapter ``role`` (``role_1``, ... for further networks of the role) on the teacher's own UNet."""
        from ..lora import add_adapter, adapter_names
        from .adapters import AdapterDenoiser

        if not self.denoiser.shared_base:  # the first adapter: from now on the teacher's calls switch them all off
            self.denoiser = AdapterDenoiser(self.denoiser, None)
        base = self.denoiser.net
        taken = adapter_names(base)
        name = next(n for n in [role] + [f"{role}_{i}" for i in range(1, len(taken) + 2)] if n not in taken)
        add_adapter(base, name, rank, alpha, LORA_TARGETS)
        d = AdapterDenoiser(self.denoiser.inner, name)
        d.train()
        return d

    def conditions_for_prompts(self, prompts: list[str]) -> Condition:
        return self.prompt_cache.get(prompts)

    # ---- caches before the first step; freeing the text encoders ---------------------------------
    def _identity(self, components) -> dict:
        """What a cache of this teacher's ``components``' outputs depends on (part of the cache fingerprints): the
        source, its load options, and for a local folder the size and time of those components' files."""
        root = Path(self.source)
        files = sorted(f for c in components for f in (root / c).rglob("*") if f.is_file()) if root.is_dir() else []
        return {"source": self.source, "load": self.load_options, "pipeline": type(self.pipe).__name__,
                "family": self.family, "files": cache_mod.file_stats(files)}

    def cached_prompts(self, data) -> list[str]:
        """Every prompt a run can ask this teacher to encode: ``data.prompts``, then the captions of the real images
        (once :meth:`prepare_real_samples` has read them)."""
        prompts = list(data.prompts or []) if data.prompts_path else []
        return prompts + list(getattr(self, "_real_prompts", []))

    def prepare_conditions(self, data=None, bar: bool = False, log=None) -> None:
        """Encode every prompt of the run (:meth:`cached_prompts`) once, in chunks, with a progress bar (``bar``) or a
        start and an end line (``log``), into the prompt cache: in memory, or safetensors shards in
        ``DATA.cache_dir/prompts`` (``data.cache``; a complete cache of the same teacher, resolution and prompts is
        reused).  Then, with ``data.free_text_encoders``, drop the text encoders (:meth:`free_text_encoders`).
        A second call does nothing."""
        if data is None or not self.text_conditioned or self.prompt_cache.prepared:
            return
        prompts = self.cached_prompts(data)
        if not prompts:
            return
        names = [n for n in TEXT_ENCODERS if getattr(self.pipe, n, None) is not None]
        distinct = list(dict.fromkeys(prompts))
        fp = cache_mod.fingerprint(kind="prompts", teacher=self._identity(names), size=self.image_size,
                                   dtype=[str(getattr(self.pipe, n).dtype) for n in names],
                                   prompts=cache_mod.fingerprint(p=distinct))
        mode, folder, limit = _cache_settings(data, "prompts")
        self.prompt_cache.prepare(distinct, mode, folder, fp, limit, bar=bar, log=log)
        if data.free_text_encoders:
            self.free_text_encoders(log)

    def free_text_encoders(self, log=None) -> list[str]:
        """Drop the text encoders from the pipeline (and so from memory); the prompt cache then serves only the
        prompts it holds.  An export writes them back from the teacher's source (:meth:`save_freed_components`).
        Returns the names dropped."""
        names = [n for n in TEXT_ENCODERS if getattr(self.pipe, n, None) is not None]
        self._drop(names)
        if names and log is not None:
            log(f"fewstep: freed the text encoders ({', '.join(names)}); prompts are served from the cache")
        return names

    def free_vae(self, log=None) -> bool:
        """Drop the VAE (``data.free_vae``, once the image latents are cached): a training step never decodes.
        Sample grids load it again for their decode (:meth:`vae`), an export writes it from the teacher's source
        (:meth:`save_freed_components`).  Kept when that source cannot give it back (a pipeline built in memory)."""
        if getattr(self.pipe, "vae", None) is None or not self._reloadable("vae"):
            return False
        self._drop(["vae"])
        if log is not None:
            log("fewstep: freed the VAE (latents are cached); sample grids load it for their decode")
        return True

    def _drop(self, names: list[str]) -> None:
        """Remove components ``names`` from the pipeline and from memory, remembering their (library, class) for the
        export (:meth:`save_freed_components`); the prompt cache then serves only what it holds once an encoder is gone."""
        from ..memory import release_unused

        freed = dict(self.freed_components)
        for n in names:
            freed[n] = tuple(self.pipe.config[n])  # (library, class), as model_index.json names it
            setattr(self.pipe, n, None)  # DiffusionPipeline.__setattr__ also sets its config entry to (None, None)
        self.freed_components = freed
        self.prompt_cache.encoder_available = not any(n in freed for n in TEXT_ENCODERS)
        release_unused()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _reloadable(self, name: str) -> bool:
        """Whether ``name`` can be loaded again from the teacher's source: a local folder that has it, or a hub id."""
        if not self.source:
            return False
        root = Path(self.source)
        return (root / name).is_dir() if root.exists() else re.fullmatch(r"[\w.-]+/[\w.-]+", self.source) is not None

    def _load_component(self, name: str, library: str, cls_name: str):
        """Component ``name`` from the teacher's source, with its revision, variant and dtype (as it was loaded)."""
        import importlib

        opts = self.load_options
        cls = getattr(importlib.import_module(library), cls_name)
        return cls.from_pretrained(self.source, subfolder=name, revision=opts.get("revision"),
                                   variant=opts.get("variant"), torch_dtype=DTYPES[opts.get("dtype", "float32")])

    @contextmanager
    def vae(self):
        """The pipeline's VAE (``None`` without one); when :meth:`free_vae` dropped it, a copy loaded from the
        teacher's source for the duration, on the teacher's device, then dropped again."""
        vae = getattr(self.pipe, "vae", None)
        if vae is not None or "vae" not in self.freed_components:
            yield vae
            return
        vae = self._load_component("vae", *self.freed_components["vae"]).to(self.device)
        try:
            yield vae
        finally:
            del vae
            from ..memory import release_unused

            release_unused()

    def save_freed_components(self, folder) -> None:
        """Write the components that :meth:`free_text_encoders` and :meth:`free_vae` dropped into the exported pipeline
        ``folder`` and name them in its ``model_index.json`` again, one at a time: copied file for file from a local
        teacher folder loaded without a variant (no memory), else loaded from ``teacher.path`` with the teacher's
        revision, variant and dtype and saved."""
        import gc
        import json
        import shutil

        if not self.freed_components:
            return
        folder = Path(folder)
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text())
        for name, (library, cls_name) in self.freed_components.items():
            src = Path(self.source) / name
            if src.is_dir() and not self.load_options.get("variant"):
                shutil.copytree(src, folder / name)
            else:
                module = self._load_component(name, library, cls_name)
                module.save_pretrained(str(folder / name), safe_serialization=True)
                del module
                gc.collect()
            index[name] = [library, cls_name]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ---- images -------------------------------------------------------------------------------
    @torch.no_grad()
    def to_images(self, x0: Tensor) -> Tensor:
        with self.vae() as vae:
            if vae is None:
                return (x0.float() / 2 + 0.5).clamp(0, 1)
            z = x0.float() / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None):
                z = z + vae.config.shift_factor
            out = []
            for i in range(len(z)):  # one image at a time (diffusers' VAE slicing): a float32 SDXL decode of a whole
                # preview grid at 1024^2 would hold gigabytes of activations
                with torch.autocast(z.device.type, enabled=False), float32_vae(vae):  # float32 where force_upcast
                    img = vae.decode(z[i:i + 1].to(vae.device, vae.dtype)).sample
                out.append((img.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> clean latents (the VAE's mean, scaled), batched."""
        with self.vae() as vae:
            if vae is None:
                return images
            out = []
            for i in range(0, len(images), 16):
                with torch.autocast(self.device.type, enabled=False), float32_vae(vae):  # float32 where force_upcast
                    z = vae.encode(images[i:i + 16].to(self.device, vae.dtype)).latent_dist.mean.float()
                if getattr(vae.config, "shift_factor", None):
                    z = z - vae.config.shift_factor
                out.append((z * vae.config.scaling_factor).float().cpu())
        return torch.cat(out)

    def prepare_real_samples(self, data=None, bar: bool = False, log=None) -> None:
        """Encode ``data.images`` with the VAE, once (read and encoded 16 images at a time), with a progress bar
        (``bar``) or a start and an end line (``log``).  The float32 latents go into a row store (:mod:`fewstep.cache`,
        ``data.cache``): in memory, or written chunk by chunk as safetensors shards in ``DATA.cache_dir/latents``, of
        which a batch reads only its rows; a complete disk cache of the same teacher, resolution and files is reused.
        A second call does nothing."""
        if hasattr(self, "_real"):
            return
        import time

        from tqdm.auto import tqdm

        from ..data import load_images

        files = data.image_files()
        captions = image_captions(data.images_path, files)
        vae = getattr(self.pipe, "vae", None)
        has_vae = vae is not None or "vae" in self.freed_components
        vae_dtype = str(vae.dtype) if vae is not None else str(DTYPES[self.load_options.get("dtype", "float32")])
        fp = cache_mod.fingerprint(kind="latents", teacher=self._identity(["vae"] if has_vae else []),
                                   size=self.image_size, vae_dtype=vae_dtype if has_vae else None,
                                   files=cache_mod.file_stats(files), n=len(files))
        mode, folder, limit = _cache_settings(data, "latents")
        store = cache_mod.open_rows(folder, fp) if folder is not None and mode != "memory" else None
        if store is not None and len(store) == len(files):
            if log is not None:
                log(f"fewstep: reusing the {len(files)} image latents cached in {folder}")
        else:
            if log is not None:
                log(f"fewstep: encoding {len(files)} images with the VAE ...")
            t0 = time.time()

            def chunks():
                with tqdm(total=len(files), desc="encoding images", unit="img", disable=not bar,
                          dynamic_ncols=True) as pb:
                    for i in range(0, len(files), 16):
                        yield {"latents": self.encode_images(load_images(files[i:i + 16], self.image_size)).float()}
                        pb.update(len(files[i:i + 16]))

            store = cache_mod.build_rows(len(files), chunks(), mode, folder, fp, limit, what="latent cache",
                                         meta={"what": "image latents", "images": str(data.images_path)})
            if log is not None:
                log(f"fewstep: encoded {len(files)} images in {time.time() - t0:.1f} s "
                    f"({'in memory' if store.kind == 'memory' else f'cached in {folder}'})")
        self._real = store
        self._real_prompts = captions

    def real_samples(self, n, generator, data=None):
        """Real latents (GAN term, consistency distillation): ``data.images`` encoded once with the VAE and cached
        (:meth:`prepare_real_samples`, which the trainer calls before the first step).

        Captions come from ``captions.jsonl`` / ``metadata.jsonl`` (``{"file_name": ..., "text": ...}``) or
        ``captions.txt`` (``FILE<TAB>caption`` a line) in the image folder, else from the file names.
        """
        self.prepare_real_samples(data)
        idx = torch.randint(len(self._real), (n,), generator=generator)
        x = self._real.rows(idx)["latents"]  # only these rows are read (a disk cache: from its shards)
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


def image_captions(folder, files) -> list[str]:
    """A caption per image file: from a captions file in ``folder`` where it names the file, else the file stem."""
    import json

    from ..data import DataError

    root = Path(folder)
    table: dict[str, str] = {}
    for name in ("captions.jsonl", "metadata.jsonl"):
        f = root / name
        if f.is_file():
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    key = obj.get("file_name", obj.get("file"))
                    text = next(obj[k] for k in ("text", "caption", "prompt") if k in obj)
                except (json.JSONDecodeError, AttributeError, StopIteration):
                    raise DataError(f"line {i} of {f}: expected {{\"file_name\": ..., \"text\": ...}}") from None
                table[str(key)] = str(text)
    f = root / "captions.txt"
    if f.is_file():
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                if "\t" not in line:
                    raise DataError(f"line {i} of {f}: expected FILE<TAB>caption")
                key, text = line.split("\t", 1)
                table[key.strip()] = text.strip()
    out = []
    for fp in files:
        fp = Path(fp)
        rel = fp.relative_to(root).as_posix() if fp.is_relative_to(root) else fp.name
        out.append(table.get(rel, table.get(fp.name, fp.stem.replace("_", " "))))
    return out
