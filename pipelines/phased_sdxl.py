"""``StableDiffusionXLPipeline`` with one expert per phase (SDXL Phased DMD students; see ``phased_experts.py``).

With fewstep installed: ``from pipelines import load_pipeline; pipe = load_pipeline(folder)``.  With diffusers
alone (the folder carries this file)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="phased_sdxl", trust_remote_code=True)

then call it like the stock pipeline; the default call (the recommended steps) is the phased sampler.
"""
from __future__ import annotations

from diffusers import StableDiffusionXLPipeline

from .phased_experts import EXPERT_NAMES, PhasedExpertsMixin


class PhasedStableDiffusionXLPipeline(PhasedExpertsMixin, StableDiffusionXLPipeline):
    """The stock pipeline; its denoiser calls go to ``expert_1`` .. ``expert_3`` in their phases."""

    _optional_components = [*StableDiffusionXLPipeline._optional_components, *EXPERT_NAMES]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True, add_watermarker=None, expert_1=None, expert_2=None, expert_3=None, expert_timesteps=None):
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder, feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self._register_experts({"expert_1": expert_1, "expert_2": expert_2, "expert_3": expert_3}, expert_timesteps)
