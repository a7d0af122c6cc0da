"""``FluxPipeline`` for a multi-jump flow-map student (see ``flow_map.py``).

Load an exported folder with fewstep installed::

    from pipelines import load_pipeline
    pipe = load_pipeline(folder)          # or FlowMapFluxPipeline.from_pretrained(folder)

or with diffusers alone (the folder carries this file)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="flow_map_flux", trust_remote_code=True)

then call it like the stock pipeline: ``pipe(prompt, num_inference_steps=K, guidance_scale=G)`` (``G``
goes into Flux's guidance embedding, as the student was trained).
"""
from __future__ import annotations

from diffusers import FluxPipeline

from .flow_map import FlowMapMixin, JumpEmbedding


class FlowMapFluxPipeline(FlowMapMixin, FluxPipeline):
    """The stock Flux pipeline plus a ``jump_embedder`` component fed ``d = sigma - sigma_next`` each step."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 jump_embedder: JumpEmbedding, image_encoder=None, feature_extractor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self.register_modules(jump_embedder=jump_embedder)
