"""Teacher adapters behind one call: ``teacher(x_t, t, cond, guidance_scale) -> x0``."""
from .base import Denoiser, Teacher, frozen  # noqa: F401
