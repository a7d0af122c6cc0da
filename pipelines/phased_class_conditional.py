"""``ClassConditionalPipeline`` with one expert per phase (class-conditional UNet2DModel Phased DMD students; see ``phased_experts.py``).

With fewstep installed: ``from pipelines import load_pipeline; pipe = load_pipeline(folder)``.  With diffusers
alone (the folder carries this file)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="phased_class_conditional", trust_remote_code=True)

then call it like the stock pipeline; the default call (the recommended steps) is the phased sampler.
"""
from __future__ import annotations

from .class_conditional import ClassConditionalPipeline

from .phased_experts import EXPERT_NAMES, PhasedExpertsMixin


class PhasedClassConditionalPipeline(PhasedExpertsMixin, ClassConditionalPipeline):
    """The stock pipeline; its denoiser calls go to ``expert_1`` .. ``expert_3`` in their phases."""

    _optional_components = [*ClassConditionalPipeline._optional_components, *EXPERT_NAMES]
    _parent_module_file = "class_conditional.py"


    def __init__(self, unet, scheduler, expert_1=None, expert_2=None, expert_3=None, expert_timesteps=None):
        super().__init__(unet=unet, scheduler=scheduler)
        self._register_experts({"expert_1": expert_1, "expert_2": expert_2, "expert_3": expert_3}, expert_timesteps)
