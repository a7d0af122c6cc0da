"""``StableDiffusionPipeline`` with one expert per phase (SD1.5 Phased DMD students; see ``phased_experts.py``).

With fewstep installed: ``from pipelines import load_pipeline; pipe = load_pipeline(folder)``.  With diffusers
alone (the folder carries this file)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="phased_sd15", trust_remote_code=True)

then call it like the stock pipeline; the default call (the recommended steps) is the phased sampler.
"""
from __future__ import annotations

from diffusers import StableDiffusionPipeline

from .phased_experts import EXPERT_NAMES, PhasedExpertsMixin


class PhasedStableDiffusionPipeline(PhasedExpertsMixin, StableDiffusionPipeline):
    """The stock pipeline; its denoiser calls go to ``expert_1`` .. ``expert_3`` in their phases."""

    _optional_components = [*StableDiffusionPipeline._optional_components, *EXPERT_NAMES]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker: bool = False, expert_1=None, expert_2=None, expert_3=None, expert_timesteps=None):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self._register_experts({"expert_1": expert_1, "expert_2": expert_2, "expert_3": expert_3}, expert_timesteps)
