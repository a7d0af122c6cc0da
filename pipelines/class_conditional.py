"""Class-conditional image generation with a ``UNet2DModel`` (``num_class_embeds`` set) and any stock scheduler.

No stock diffusers pipeline passes ``class_labels`` to a ``UNet2DModel``; this one does, with
classifier-free guidance against the null class when ``guidance_scale > 1``.

Convention (shared with fewstep's teacher adapter): ``num_class_embeds = num_classes + 1`` and the
LAST embedding index is the null (unconditional) class; a label of ``-1`` means "null".

This file imports only torch and diffusers, so it also works as diffusers custom-pipeline code: a
pipeline folder saved by this class carries a copy of it and loads without fewstep installed::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="class_conditional", trust_remote_code=True)

With fewstep installed, no remote code is needed::

    from pipelines.class_conditional import ClassConditionalPipeline
    pipe = ClassConditionalPipeline.from_pretrained(folder)
"""
from __future__ import annotations

import inspect
import os
import shutil
from typing import List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

NULL_LABEL = -1  # the unconditional class, mapped to the last class-embedding index
MODULE_FILE = "class_conditional.py"  # name of the copy written next to model_index.json


class ClassConditionalPipeline(DiffusionPipeline):
    """``pipe(class_labels=[3, 7], num_inference_steps=4, guidance_scale=1.0)`` -> ``ImagePipelineOutput``.

    Components: ``unet`` (a class-conditional ``UNet2DModel``) and ``scheduler`` (any diffusers scheduler:
    DDPM, DDIM, LCM, Euler, ...).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null class excluded)."""
        n = getattr(self.unet.config, "num_class_embeds", None)
        if not n:
            raise ValueError("this UNet2DModel is not class-conditional (num_class_embeds is not set)")
        return int(n) - 1

    @staticmethod
    def model_card_usage(num_inference_steps: int, guidance_scale: float) -> tuple:
        """``(loading lines, call expression)`` for model cards of folders saved with this class."""
        load = ["from pipelines.class_conditional import ClassConditionalPipeline  # ships with fewstep", "",
                'pipe = ClassConditionalPipeline.from_pretrained("PATH_TO_THIS_FOLDER")',
                '# without fewstep: DiffusionPipeline.from_pretrained(PATH, custom_pipeline="class_conditional", '
                "trust_remote_code=True)"]
        call = (f"pipe(class_labels=[0, 1, 2, 3], num_inference_steps={num_inference_steps}, "
                f"guidance_scale={guidance_scale})")
        return load, call

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus a copy of this file (custom-pipeline code)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        src = os.path.abspath(inspect.getsourcefile(type(self)) or __file__)
        dst = os.path.join(str(save_directory), MODULE_FILE)
        if os.path.abspath(dst) != src:
            shutil.copyfile(src, dst)

    def _labels(self, class_labels, batch_size: int, device) -> torch.Tensor:
        k = self.num_classes
        if class_labels is None:
            labels = torch.arange(batch_size) % k  # balanced over classes
        else:
            if isinstance(class_labels, int):
                class_labels = [class_labels]
            labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
            bad = [int(c) for c in labels.tolist() if not (c == NULL_LABEL or 0 <= c < k)]
            if bad:
                raise ValueError(f"class labels must be in 0..{k - 1} (or {NULL_LABEL} for the null class), got {bad[:5]}")
        labels = torch.where(labels == NULL_LABEL, torch.full_like(labels, k), labels)  # null -> last index
        return labels.to(device)

    def _step_kwargs(self, generator, eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kw = {}
        if "generator" in params:
            kw["generator"] = generator
        if "eta" in params:
            kw["eta"] = eta
        return kw

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, Sequence[int], torch.Tensor]] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 1,
        eta: float = 0.0,
    ):
        """Generate one image per class label.

        Args:
            class_labels: class per image (``-1`` = null class); ``None`` -> ``batch_size`` images with labels
                ``0, 1, ..., num_classes - 1, 0, ...``.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance in diffusers' form ``uncond + s * (cond - uncond)``;
                ``<= 1`` runs the conditional branch only.
            generator: one generator, or one per image (then each image depends on its own generator only).
            output_type: ``"pil"``, ``"np"`` (float in [0, 1], NHWC) or ``"pt"`` (float in [0, 1], NCHW).
            eta: DDIM eta, for schedulers that take it.
        """
        device = self._execution_device
        # 1. labels
        labels = self._labels(class_labels, batch_size, device)
        n = labels.shape[0]
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images")
        # 2. initial noise
        cfg = self.unet.config
        size = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        shape = (n, cfg.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        # 3. timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        image = image * self.scheduler.init_noise_sigma
        do_cfg = guidance_scale > 1.0
        null = torch.full_like(labels, self.num_classes)
        step_kw = self._step_kwargs(generator, eta)
        # 4. denoising loop
        for t in self.progress_bar(self.scheduler.timesteps):
            x = self.scheduler.scale_model_input(image, t)
            if do_cfg:
                out = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            else:
                out = self.unet(x, t, class_labels=labels).sample
            image = self.scheduler.step(out, t, image, **step_kw).prev_sample
        # 5. to images
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
