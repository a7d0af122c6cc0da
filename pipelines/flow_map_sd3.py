"""``StableDiffusion3Pipeline`` for a multi-jump flow-map student (see ``flow_map.py``).

Load an exported folder with fewstep installed::

    from pipelines import load_pipeline
    pipe = load_pipeline(folder)          # or FlowMapStableDiffusion3Pipeline.from_pretrained(folder)

or with diffusers alone (the folder carries this file)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="flow_map_sd3", trust_remote_code=True)

then call it like the stock pipeline: ``pipe(prompt, num_inference_steps=K, guidance_scale=0)``.
"""
from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from .flow_map import FlowMapMixin, JumpEmbedding


class FlowMapStableDiffusion3Pipeline(FlowMapMixin, StableDiffusion3Pipeline):
    """The stock SD3 pipeline plus a ``jump_embedder`` component fed ``d = sigma - sigma_next`` each step."""

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, jump_embedder: JumpEmbedding, image_encoder=None,
                 feature_extractor=None):
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=image_encoder,
                         feature_extractor=feature_extractor)
        self.register_modules(jump_embedder=jump_embedder)
