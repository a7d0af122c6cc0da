"""The one model contract: ``denoiser(x_t, t, cond, guidance_scale=None) -> x0_hat``.

A :class:`Denoiser` wraps a network that makes a *native* prediction (``eps``, ``v``, ``x0`` or flow
``velocity``) and converts it to ``x0`` through the shared :class:`~fewstep.schedules.NoiseSchedule`.
Classifier-free guidance is applied here, once, in the native space, in diffusers' (Ho) form
``uncond + s * (cond - uncond)`` (``s = 1`` or ``None``: no guidance).

Teachers, students and critics are all Denoisers of the same family (students and critics are
trainable copies of the teacher's network), so every objective calls them the same way.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import Condition
from ..errors import TeacherLoadError  # noqa: F401  (defined there: importable without torch)
from ..schedules import NoiseSchedule, _bcast


class Denoiser(nn.Module):
    """``forward(x_t, t, cond, guidance_scale=None) -> x0`` around a native-prediction network."""

    feature_module: Optional[str] = None  # dotted name of the bottleneck module (GAN-head features)
    shared_base: bool = False  # an adapter on the teacher's own weights (teachers/adapters.py), not a network of its own

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str):
        super().__init__()
        self.net = net  # the trainable/frozen network (a diffusers model, or an MLP)
        self.schedule = schedule
        self.prediction = prediction

    # subclasses implement the family-specific call
    def net_call(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def native(self, x_t: Tensor, t: Tensor, cond: Condition, guidance_scale: Optional[float] = None) -> Tensor:
        """Native prediction, with CFG (one batched forward over [cond, null]) when ``guidance_scale != 1``."""
        t = _as_batch(t, x_t)
        if guidance_scale is None or guidance_scale == 1.0:
            return self.net_call(x_t, t, cond)
        both = self.net_call(torch.cat([x_t, x_t]), torch.cat([t, t]), Condition.cat([cond, cond.null()]))
        pc, pu = both.chunk(2)
        return pu + guidance_scale * (pc - pu)

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition, guidance_scale: Optional[float] = None,
                return_native: bool = False, return_features: bool = False):
        """x0-prediction (float32 conversion); optionally also the native prediction and bottleneck features."""
        t = _as_batch(t, x_t)
        feats: list[Tensor] = []
        handle = None
        if return_features:
            if self.feature_module is None:
                raise ValueError(f"{type(self).__name__} exposes no bottleneck features for a GAN head")
            mod = self.net.get_submodule(self.feature_module)
            handle = mod.register_forward_hook(lambda m, i, o: feats.append(o[0] if isinstance(o, tuple) else o))
        try:
            pred = self.native(x_t, t, cond, guidance_scale)
        finally:
            if handle is not None:
                handle.remove()
        x0 = self.schedule.to_x0(pred.float(), self.prediction, x_t.float(), t.float()).to(x_t.dtype)
        out = [x0]
        if return_native:
            out.append(pred)
        if return_features:
            out.append(feats[-1])
        return out[0] if len(out) == 1 else tuple(out)

    def trainable_copy(self) -> "Denoiser":
        """A float32 deep copy whose parameters require grad (a student or critic initialised from this)."""
        new = copy.deepcopy(self)
        new.net.float()  # float32 master weights; mixed precision is the trainer's autocast
        new.net.requires_grad_(True)
        new.net.train()
        return new


def _as_batch(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


@contextmanager
def frozen(*modules: nn.Module):
    """Temporarily set ``requires_grad=False`` on the given modules' parameters."""
    saved = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, flags in zip(modules, saved):
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)


class Teacher:
    """A frozen denoiser plus what the trainer needs to use it: the teacher's contract, declared.

    Everything the API, the trainer, export and the CLI read from a teacher is an attribute or method here, with
    its default; an adapter (``unet.py``, ``transformer.py``, ``gmm.py``) overrides what differs.  Attributes set
    at construction: ``denoiser`` (frozen), ``schedule``, ``guidance_scale`` (default CFG scale, diffusers form).
    """

    family: str = "base"  # gmm, sd15, sdxl, ddpm, sd3, flux: for messages and model cards, never for branching
    sample_shape: tuple = ()  # per-sample tensor shape (latents for latent pipelines)
    feature_channels: int = 0  # width of the bottleneck features, for a GAN head
    feature_size: int = 0  # side of the square bottleneck feature map (UNets, at the training resolution); 0: no map
    text_conditioned: bool = False  # conditions come from prompts (data.prompts required)
    num_classes: int = 0  # class-conditional teachers: number of classes (0: none)
    supports_jump: bool = False  # new_network(..., jump=True) gives a flow-map student
    supports_lora: bool = False  # student.lora_rank > 0 is honoured (student_lora below)
    student_lora: Optional[tuple] = None  # (rank, alpha) of a LoRA student; set by api.build
    critic_lora: Optional[tuple] = None  # (rank, alpha) of a LoRA critic (objective.critic_lora_rank); set by api.build
    share_base: bool = False  # LoRA networks are adapters on the teacher's own frozen network (student.share_base)
    embedded_guidance: Optional[float] = None  # guidance-distilled teachers (Flux): the guidance-embedding value
    export_guidance_scale: float = 0.0  # guidance_scale of the exported pipeline's recommended call
    # ---- the trained student: where it goes, how it is judged ---------------------------------------
    exports_pipeline: bool = True  # the student becomes a diffusers pipeline folder; False: save_student's own format
    student_folder: str = "pipeline"  # where a run keeps the saved student (RUN/<student_folder>)
    needs_image_folder: bool = True  # real samples (GAN / consistency terms) need data.images; False: drawn by the teacher
    panel_samples: int = 8  # samples in a training-time sample panel (image grid, or scatter plot)

    def __init__(self, denoiser: Denoiser, guidance_scale: float = 1.0):
        self.denoiser = denoiser
        self.denoiser.requires_grad_(False)
        self.denoiser.eval()
        self.schedule = denoiser.schedule
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x_t, t, cond, guidance_scale=None, **kw):
        return self.denoiser(x_t, t, cond, guidance_scale=guidance_scale, **kw)

    def to(self, device, dtype=None):
        self.denoiser.to(device=device, dtype=dtype)
        return self

    @property
    def device(self):
        return next(iter(self.denoiser.parameters()), torch.empty(0)).device

    # ---- what objectives and the trainer need ---------------------------------------------------
    def new_network(self, role: str) -> Denoiser:
        """A trainable denoiser initialised from the teacher (``role``: student, critic, ...)."""
        return self.denoiser.trainable_copy()

    def sample_conditions(self, n: int, generator: torch.Generator, data=None) -> Condition:
        """Training conditions for ``n`` samples (prompts from ``data``, random classes, or empty)."""
        raise NotImplementedError

    def noise(self, n: int, generator: torch.Generator, device="cpu") -> Tensor:
        return torch.randn((n, *self.sample_shape), generator=generator).to(device)

    def real_samples(self, n: int, generator: torch.Generator, data=None):
        """Real (clean) samples and their conditions, for GAN or consistency terms; ``None`` if unavailable."""
        return None

    def prepare_real_samples(self, data=None, bar: bool = False, log=None) -> None:
        """One-time work behind :meth:`real_samples` (e.g. VAE-encoding ``data.images``), done by the trainer before
        the first step; ``bar``: show a progress bar, ``log``: a callable for a start/end line.  Default: none."""

    def prepare_conditions(self, data=None, bar: bool = False, log=None) -> None:
        """One-time work behind :meth:`sample_conditions` (encoding every prompt of the run into a cache, then freeing
        the text encoders: ``data.cache``, ``data.free_text_encoders``), done by the trainer before the first step,
        after :meth:`prepare_real_samples` (whose image captions it encodes too).  Default: none."""

    def free_vae(self, log=None) -> bool:
        """Drop the image decoder between uses once its training work is cached (``data.free_vae``); previews and
        exports load it again.  Returns whether it was dropped.  Default: nothing to drop."""
        return False

    def save_freed_components(self, folder) -> None:
        """Write the pipeline components this teacher dropped to save memory (freed text encoders) into an exported
        pipeline ``folder``.  Default: none were dropped."""

    def to_images(self, x0: Tensor) -> Optional[Tensor]:
        """Decode clean samples to images in [0, 1] (B, 3, H, W) for grids; ``None`` for non-image data."""
        return None

    def set_resolution(self, pixels: int) -> None:
        """Sample size from ``data.resolution`` (pixels); teachers with a fixed size ignore it."""

    def call_kwargs(self) -> dict:
        """Extra keyword arguments of the exported pipeline's recommended call (e.g. Flux's trained resolution)."""
        return {}

    # ---- the trained student ----------------------------------------------------------------------
    def write_panel(self, x0: Tensor, path: str, title: str) -> None:
        """A training-time sample panel of clean samples ``x0``: an image grid (``title`` unused)."""
        from torchvision.utils import save_image

        save_image(self.to_images(x0).cpu(), str(path), nrow=4)

    def save_student(self, student, objective, folder, run_config: Optional[dict] = None) -> dict:
        """Write the trained student into ``folder`` (a run keeps it in ``RUN/<student_folder>``); returns the
        metrics entries that say where.  Default: a diffusers pipeline folder (:func:`fewstep.export.export_pipeline`)."""
        from ..export import export_pipeline

        return {"pipeline": str(export_pipeline(self, student, objective, folder, run_config))}

    def load_student(self, folder, objective=None):
        """The student :meth:`save_student` wrote (teachers with ``exports_pipeline=False``)."""
        raise NotImplementedError(f"{self.family} students are diffusers pipelines: load them with "
                                  f"DiffusionPipeline.from_pretrained({str(folder)!r})")

    def evaluate(self, objective, student, **kw) -> Optional[dict]:
        """Known-answer evaluation of a student against this teacher; ``None`` where there is none
        (image teachers are judged with ``fewstep eval``)."""
        return None

    def evaluate_run(self, objective, student, run_dir) -> dict:
        """Metrics entries (and plots in ``run_dir``) for the end of a run; ``{}`` where there is no known answer."""
        return {}

    def describe(self) -> dict:
        return {"family": self.family, "sample_shape": list(self.sample_shape),
                "guidance_scale": self.guidance_scale, "schedule": self.schedule.describe()}
