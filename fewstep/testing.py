"""Tiny, randomly initialised diffusers pipelines for offline tests.

Everything here is built from configs (nothing is downloaded), seeded so the
weights are deterministic, and sized to run a few denoising steps on a CPU in
well under a second.

- :func:`make_tokenizer` writes a miniature CLIP BPE vocabulary to a folder and
  loads a :class:`transformers.CLIPTokenizer` from it.
- :func:`tiny_sd15_components`, :func:`tiny_sdxl_components` and
  :func:`tiny_ddpm_components` return ``dict``\\ s of components that can be
  passed as keyword arguments to ``StableDiffusionPipeline``,
  ``StableDiffusionXLPipeline`` and ``DDPMPipeline``.
- :func:`tiny_sd3_components` and :func:`tiny_flux_components` return the
  components of a tiny ``StableDiffusion3Pipeline`` (SD3Transformer2DModel, two
  CLIP encoders with projection, a T5 encoder, FlowMatchEulerDiscreteScheduler
  with shift 3) and a tiny ``FluxPipeline`` (FluxTransformer2DModel with a
  guidance embedding, CLIP + T5, dynamic shifting).
- :func:`save_tiny_pipeline` builds one of those pipelines and saves it with
  ``save_pretrained`` (safetensors) so it can be loaded back with
  ``DiffusionPipeline.from_pretrained(path)``.

Sizes: the UNets work on 16x16 latents/images, the VAE has a scale factor of 2,
so the Stable Diffusion pipelines produce 32x32 images.  The SD3 transformer
works on 16x16 latents (patch 2: 64 tokens); the Flux transformer on packed
16x16 latents (64 tokens) when called with ``height=width=32`` (its pipeline's
own default resolution is ``128 * vae_scale_factor``, too large for a CPU).
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "KNOWN_KINDS",
    "make_tokenizer",
    "tiny_sd15_components",
    "tiny_sdxl_components",
    "tiny_ddpm_components",
    "tiny_sd3_components",
    "tiny_flux_components",
    "make_t5_tokenizer",
    "save_tiny_pipeline",
]

KNOWN_KINDS = ("sd15", "sdxl", "ddpm", "sd3", "flux")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_EOW = "</w>"

# Whole words that get their own token (built through the BPE merges below).
_WORDS = ("a", "an", "the", "of", "photo", "cat", "dog", "in", "on", "with", "and", "red", "blue")

# Text-encoder / UNet sizes shared by the SD builders.
_TEXT_HIDDEN = 32
_SDXL_PROJ_DIM = 32
_SDXL_TIME_EMBED_DIM = 8


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny vocabulary and merge list (deterministic order)."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens: list[str] = [BOS_TOKEN, EOS_TOKEN]
    tokens += chars
    tokens += [c + _EOW for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in _WORDS:
        if len(word) < 2:
            continue  # single letters are already "x</w>" tokens
        # Merge left to right: "p h" -> "ph", "ph o" -> "pho", ..., "phot o</w>" -> "photo</w>".
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + _EOW if i == len(word) - 1 else ch
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            if merged not in seen:
                tokens.append(merged)
                seen.add(merged)
            left = merged
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, merges


def make_tokenizer(dirpath: str | os.PathLike) -> Any:
    """Write a tiny CLIP BPE vocabulary to ``dirpath`` and load a ``CLIPTokenizer`` from it.

    The vocabulary holds ``<|startoftext|>`` (id 0), ``<|endoftext|>`` (id 1, also
    the pad and unknown token), every lowercase letter, digit and ASCII
    punctuation character both plain and with the ``</w>`` end-of-word suffix,
    plus a few whole words (``a photo of a cat`` tokenizes to one token per word).
    Upper case is lowered by the tokenizer's normalizer, so any prompt made of
    ASCII letters, digits, whitespace and punctuation maps to known tokens.
    """
    from transformers import CLIPTokenizer

    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tokenizer_files()
    with open(path / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(path / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    # transformers 5: CLIPTokenizer is tokenizers-backed and takes the files as
    # ``vocab=`` / ``merges=`` (paths or objects). ``vocab_file=`` / ``merges_file=``
    # are silently ignored by ``__init__`` (only ``from_pretrained`` maps them), which
    # would leave a 3-token default vocabulary. ``from_pretrained`` also works, but it
    # records ``local_files_only``/``is_local`` in the saved tokenizer_config.json.
    return CLIPTokenizer(
        vocab=str(path / "vocab.json"),
        merges=str(path / "merges.txt"),
        model_max_length=77,
    )


def make_t5_tokenizer() -> Any:
    """A tiny Unigram ``T5Tokenizer`` built in memory (no sentencepiece file, no download).

    Pieces: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), the words of the CLIP vocabulary
    above as whole pieces, and every ASCII letter, digit and punctuation character, so
    any ASCII prompt tokenizes without unknowns.
    """
    from transformers import T5Tokenizer

    # transformers 5: T5Tokenizer is tokenizers-backed and takes the Unigram vocabulary as a
    # list of (piece, log-prob) pairs; extra_ids=0 drops the 100 sentinel tokens.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    pieces += [("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _tokenizer() -> Any:
    with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as d:
        # The tokenizers backend keeps everything in memory, so the folder can go.
        return make_tokenizer(d)


# --------------------------------------------------------------------------- model builders


def _text_encoder(tokenizer: Any, seed: int, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        projection_dim=_SDXL_PROJ_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer: Any, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_TEXT_HIDDEN,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        **extra,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    ).eval()


def _sd_scheduler_kwargs() -> dict[str, Any]:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


def tiny_sd15_components(seed: int = 0) -> dict[str, Any]:
    """Components for a tiny ``StableDiffusionPipeline`` (32x32 images, DDIM scheduler)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=8,
    ).eval()
    scheduler = DDIMScheduler(**_sd_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False)
    vae = _vae(seed)
    tokenizer = _tokenizer()
    text_encoder = _text_encoder(tokenizer, seed, with_projection=False)
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """Components for a tiny ``StableDiffusionXLPipeline`` (32x32 images, Euler scheduler)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        # Both text encoders' hidden states are concatenated: 32 + 32.
        cross_attention_dim=2 * _TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        # 6 micro-conditioning ids (orig size, crop, target size) + pooled text embedding.
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _SDXL_PROJ_DIM,
    ).eval()
    scheduler = EulerDiscreteScheduler(**_sd_scheduler_kwargs(), interpolation_type="linear")
    vae = _vae(seed)
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    text_encoder = _text_encoder(tokenizer, seed, with_projection=False)
    text_encoder_2 = _text_encoder(tokenizer_2, seed + 1, with_projection=True)
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def tiny_ddpm_components(
    seed: int = 0,
    num_class_embeds: int | None = None,
    sample_size: int = 16,
    in_channels: int = 3,
) -> dict[str, Any]:
    """Components for a tiny ``DDPMPipeline`` (pixel space, ``sample_size`` square).

    ``num_class_embeds`` makes the UNet class-conditional (it then needs
    ``class_labels`` in its forward, which ``DDPMPipeline.__call__`` does not pass).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=True,
    )
    return {"unet": unet, "scheduler": scheduler}


def tiny_sd3_components(seed: int = 0, shift: float = 3.0) -> dict[str, Any]:
    """Components for a tiny ``StableDiffusion3Pipeline`` (32x32 images, FlowMatchEuler with ``shift``).

    Text conditioning follows SD3: the two CLIP encoders' penultimate states (32 + 32) are
    concatenated, then cut/padded to the T5 width (32) and stacked with the T5 states; the
    pooled embedding is both CLIP projections (32 + 32 = 64).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_TEXT_HIDDEN,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _SDXL_PROJ_DIM,
        pos_embed_max_size=16,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    # SD3's VAE latents are shifted and scaled before the transformer sees them.
    vae = _vae(seed, scaling_factor=1.5305, shift_factor=0.0609)
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
    tokenizer_3 = make_t5_tokenizer()
    return {
        "transformer": transformer,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": _text_encoder(tokenizer, seed, with_projection=True),
        "tokenizer": tokenizer,
        "text_encoder_2": _text_encoder(tokenizer_2, seed + 1, with_projection=True),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": _t5_encoder(tokenizer_3, seed + 2),
        "tokenizer_3": tokenizer_3,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict[str, Any]:
    """Components for a tiny ``FluxPipeline`` (guidance-distilled when ``guidance_embeds``).

    Latents have 4 channels, packed 2x2 into 16-wide tokens; CLIP gives the pooled
    embedding (32), T5 the token states (32).  Call the pipeline with ``height=width=32``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,
        pooled_projection_dim=_TEXT_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    # Flux-dev's scheduler: resolution-dependent ("dynamic") shifting, mu from the token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    vae = _vae(seed, scaling_factor=0.3611, shift_factor=0.1159)
    tokenizer = _tokenizer()
    tokenizer_2 = make_t5_tokenizer()
    return {
        "transformer": transformer,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": _text_encoder(tokenizer, seed, with_projection=False),
        "tokenizer": tokenizer,
        "text_encoder_2": _t5_encoder(tokenizer_2, seed + 2),
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


# --------------------------------------------------------------------------- save


def _build_pipeline(kind: str, seed: int, **kw: Any) -> Any:
    if kind == "sd15":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**tiny_sd15_components(seed=seed, **kw))
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**tiny_sdxl_components(seed=seed, **kw))
    if kind == "ddpm":
        from diffusers import DDPMPipeline

        return DDPMPipeline(**tiny_ddpm_components(seed=seed, **kw))
    if kind == "sd3":
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(**tiny_sd3_components(seed=seed, **kw))
    if kind == "flux":
        from diffusers import FluxPipeline

        return FluxPipeline(**tiny_flux_components(seed=seed, **kw))
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; known kinds: {', '.join(KNOWN_KINDS)}")


def save_tiny_pipeline(kind: str, path: str | os.PathLike, seed: int = 0, **kw: Any) -> str:
    """Build the tiny pipeline ``kind`` ("sd15", "sdxl", "ddpm", "sd3" or "flux") and save it to ``path``.

    Extra keyword arguments go to the matching ``tiny_*_components`` builder
    (e.g. ``num_class_embeds=10`` for "ddpm"). Weights are written as
    safetensors. Returns ``str(path)``.
    """
    if kind not in KNOWN_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; known kinds: {', '.join(KNOWN_KINDS)}")
    pipe = _build_pipeline(kind, seed, **kw)
    out = str(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
