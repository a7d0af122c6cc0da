"""Flow-matching transformer teachers: SD3-shaped (``StableDiffusion3Pipeline``) and Flux-shaped (``FluxPipeline``).

Time: fewstep's ``t`` *is* the flow sigma (``x_t = (1 - t) x0 + t eps``, ``RectifiedFlow``); diffusers'
``FlowMatchEulerDiscreteScheduler`` shift only changes *which* sigmas a sampler visits, so the adapter
never applies it.  The network sees SD3's ``timestep = sigma * 1000`` and Flux's ``timestep = sigma``
(``FluxPipeline`` divides by 1000 before the call, the transformer multiplies back).  Both predict the
flow velocity ``eps - x0``.

Guidance: SD3 uses classifier-free guidance against the empty prompt (its pipeline's rule), applied once
in the base :class:`~fewstep.teachers.base.Denoiser`.  Flux (guidance-distilled) has no unconditional
branch: ``guidance_scale`` goes into its guidance embedding instead, and a student or critic copy keeps
the teacher's value as its fixed embedded guidance, which is also the exported pipeline's
``guidance_scale``.

Flux latents are packed 2x2 into tokens inside :meth:`TransformerDenoiser.net_call` (``FluxPipeline``'s
own ``_pack_latents`` / ``_unpack_latents``), so everything outside sees ``(B, C, H, W)`` latents.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import Condition, PromptCache
from ..schedules import RectifiedFlow
from .base import Denoiser
from .unet import DiffusersUNetTeacher, TeacherLoadError

FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


class TransformerDenoiser(Denoiser):
    """``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` behind the one call (velocity prediction).

    ``jump_embedder`` (flow-map students only) embeds ``cond.jump`` into the conditioning vector.
    """

    def __init__(self, net: nn.Module, schedule: RectifiedFlow, kind: str, embedded_guidance: Optional[float] = None,
                 jump_embedder: Optional[nn.Module] = None):
        super().__init__(net, schedule, "velocity")
        self.kind = kind  # "sd3" or "flux"
        self.embedded_guidance = embedded_guidance  # Flux guidance-embedding value when none is passed
        self.jump_embedder = jump_embedder
        n = len(net.transformer_blocks)
        # bottleneck features for a GAN head: the normalised tokens entering the middle joint block
        self.feature_module = f"transformer_blocks.{n // 2}.norm1"

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.net.config, "guidance_embeds", False))

    def native(self, x_t: Tensor, t: Tensor, cond: Condition, guidance_scale: Optional[float] = None) -> Tensor:
        if self.kind == "flux":  # no CFG: guidance is an input of the network
            g = self.embedded_guidance if guidance_scale is None else guidance_scale
            if not self.guidance_embeds and g not in (None, 1.0):
                raise ValueError(f"guidance_scale={g} needs a guidance-distilled Flux transformer "
                                 "(config guidance_embeds=true); this one has none: use guidance_scale 1")
            return self._call(x_t, _batch_t(t, x_t), cond, g)
        return super().native(x_t, t, cond, guidance_scale)

    def net_call(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        return self._call(x_t, t, cond, self.embedded_guidance)

    def _call(self, x_t: Tensor, t: Tensor, cond: Condition, guidance: Optional[float]) -> Tensor:
        net = self.net
        dtype = next(net.parameters()).dtype
        if cond is None or cond.prompt_embeds is None or cond.pooled_embeds is None:
            raise ValueError(f"this {self.kind.upper()} transformer is text-conditioned: the condition needs "
                             "prompt_embeds and pooled_embeds (encode prompts with the teacher's pipeline)")
        kw = {"encoder_hidden_states": cond.prompt_embeds.to(x_t.device, dtype),
              "pooled_projections": cond.pooled_embeds.to(x_t.device, dtype)}
        if self.kind == "sd3":
            # float32 as StableDiffusion3Pipeline passes it: in bf16, 750 would round to 752
            kw["timestep"] = self.schedule.t_to_timestep(t).to(x_t.device, torch.float32)
            x = x_t.to(dtype)
        else:
            from diffusers import FluxPipeline

            b, c, h, w = x_t.shape
            x = FluxPipeline._pack_latents(x_t.to(dtype), b, c, h, w)
            kw["timestep"] = t.to(x_t.device, dtype)  # FluxPipeline passes sigma (timestep / 1000)
            kw["img_ids"] = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, dtype)
            kw["txt_ids"] = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype)
            kw["guidance"] = torch.full((b,), float(guidance), device=x_t.device, dtype=torch.float32) \
                if self.guidance_embeds else None
        if cond.jump is not None:
            if self.jump_embedder is None:
                raise ValueError("this network has no jump input (only flow-map students take cond.jump)")
            from pipelines.flow_map import jump_conditioning

            with jump_conditioning(net, self.jump_embedder, cond.jump.to(x_t.device)):
                out = net(hidden_states=x, **kw, return_dict=False)[0]
        else:
            out = net(hidden_states=x, **kw, return_dict=False)[0]
        if self.kind == "flux":
            b, c, h, w = x_t.shape
            out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return out


def _batch_t(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class DiffusersTransformerTeacher(DiffusersUNetTeacher):
    """A diffusers flow pipeline with a ``transformer`` (SD3- or Flux-shaped) and a flow-matching scheduler."""

    supports_jump = True  # new_network(..., jump=True) gives a flow-map student
    supports_lora = False  # LoRA students are UNet-only for now

    def __init__(self, pipe, guidance_scale: float = 1.0, source: str = ""):
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        tr = getattr(pipe, "transformer", None)
        kind = FAMILIES.get(type(tr).__name__)
        if kind is None:
            raise TeacherLoadError(f"{source}: {type(pipe).__name__}'s transformer {type(tr).__name__} is not supported; "
                                   f"fewstep wraps {', '.join(FAMILIES)}")
        if not isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline)):
            raise TeacherLoadError(f"{source}: {type(pipe).__name__} is not supported; fewstep wraps "
                                   "StableDiffusion3Pipeline and FluxPipeline for flow transformers")
        if "FlowMatch" not in type(pipe.scheduler).__name__:
            raise TeacherLoadError(f"{source}: a flow transformer needs a flow-matching scheduler, "
                                   f"got {type(pipe.scheduler).__name__}")
        guides = bool(getattr(tr.config, "guidance_embeds", False))
        if kind == "flux" and not guides and guidance_scale != 1.0:
            raise TeacherLoadError(f"teacher.guidance_scale={guidance_scale} needs a guidance-distilled Flux "
                                   "transformer (guidance_embeds=true); this one has no guidance input: use 1")
        embedded = float(guidance_scale) if kind == "flux" and guides else None
        denoiser = TransformerDenoiser(tr, RectifiedFlow(), kind, embedded_guidance=embedded)
        # SD3: guidance_scale is CFG; Flux: it is the guidance-embedding value (TransformerDenoiser.native)
        super(DiffusersUNetTeacher, self).__init__(denoiser, guidance_scale)
        self.pipe = pipe
        self.source = source
        self.family = kind
        self.prompt_cache = PromptCache(self.encode_prompts)
        self.load_options: dict = {}  # as DiffusersUNetTeacher: set by teachers.load
        self.freed_components: dict = {}
        self.vae_scale = getattr(pipe, "vae_scale_factor", 1)
        self.num_classes = 0
        self.feature_channels = tr.config.num_attention_heads * tr.config.attention_head_dim
        self.embedded_guidance = embedded
        # the exported pipeline's guidance_scale: Flux feeds it to the embedding; SD3 must run without CFG
        self.export_guidance_scale = embedded if embedded is not None else 0.0
        if kind == "sd3":
            size = tr.config.sample_size
            self.sample_shape = (tr.config.in_channels, size, size)
        else:
            self.set_resolution(pipe.default_sample_size * self.vae_scale)

    @property
    def text_conditioned(self) -> bool:
        return True

    def set_resolution(self, pixels: int) -> None:
        """Image side in pixels (Flux's pipeline has no fixed size; SD3 follows its transformer's sample_size)."""
        tr = self.pipe.transformer
        if self.family == "flux":
            lat = 2 * (int(pixels) // (self.vae_scale * 2))
            if lat < 2:
                raise ValueError(f"data.resolution={pixels} is too small for this Flux pipeline")
            self.sample_shape = (tr.config.in_channels // 4, lat, lat)
        else:
            lat = int(pixels) // self.vae_scale
            if lat % tr.config.patch_size:
                raise ValueError(f"data.resolution={pixels} is not a multiple of {self.vae_scale * tr.config.patch_size}")
            self.sample_shape = (tr.config.in_channels, lat, lat)

    def scheduler_randn(self, shape, generator):
        """Noise as the exported pipeline's scheduler draws it (Flux: in the packed token layout), unpacked."""
        if self.family != "flux":
            return torch.randn(shape, generator=generator)
        from diffusers import FluxPipeline

        b, c, h, w = shape
        packed = torch.randn((b, (h // 2) * (w // 2), c * 4), generator=generator)
        return FluxPipeline._unpack_latents(packed, h * self.vae_scale, w * self.vae_scale, self.vae_scale)

    def call_kwargs(self) -> dict:
        """Extra keyword arguments the exported pipeline's call needs to sample at the trained resolution."""
        return {"height": self.image_size, "width": self.image_size}

    # ---- networks -----------------------------------------------------------------------------
    def new_network(self, role: str, jump: bool = False) -> Denoiser:
        """A trainable copy of the teacher; ``jump=True`` adds the zero-initialised jump-length embedding."""
        d = self.denoiser.trainable_copy()
        if jump:
            from pipelines.flow_map import JumpEmbedding

            tr = d.net
            emb = JumpEmbedding(self.feature_channels)
            src = tr.time_text_embed.timestep_embedder.linear_1
            if tuple(src.weight.shape) == tuple(emb.embedder.linear_1.weight.shape):
                # start from the teacher's timestep MLP input layer (same sinusoid, same scale)
                emb.embedder.linear_1.load_state_dict(src.state_dict())
            d.jump_embedder = emb.to(next(tr.parameters()).device)
            d.jump_embedder.requires_grad_(True)
        return d

    # ---- conditions ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Condition:
        """The pipeline's own ``encode_prompt``; SD3's null branch is its negative default (the empty prompt)."""
        pipe, dev = self.pipe, self.device
        if self.family == "sd3":
            pe, npe, pooled, npooled = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                          device=dev, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
            return Condition(prompt_embeds=pe, pooled_embeds=pooled, null_prompt_embeds=npe, null_pooled_embeds=npooled)
        pe, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=dev, num_images_per_prompt=1)
        return Condition(prompt_embeds=pe, pooled_embeds=pooled)

    def cached_prompts(self, data) -> list[str]:
        """As the UNet teacher's, and the empty prompt when there is no prompt file (:meth:`sample_conditions`)."""
        return super().cached_prompts(data) if data.prompts_path else [""] + super().cached_prompts(data)

    def sample_conditions(self, n, generator, data=None):
        """Prompts from ``data.prompts``; without a prompt file (data-free objectives) the empty prompt."""
        if data is None or not getattr(data, "prompts_path", None):
            return self.prompt_cache.get([""] * n)
        return self.prompt_cache.get(data.sample_prompts(n, generator))

    @property
    def device(self):
        return self.pipe.transformer.device

    def describe(self):
        d = super().describe()
        d.update(embedded_guidance=self.embedded_guidance,
                 scheduler_shift=self.pipe.scheduler.config.get("shift"),
                 dynamic_shifting=self.pipe.scheduler.config.get("use_dynamic_shifting"))
        return d
