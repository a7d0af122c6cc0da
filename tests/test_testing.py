"""Tests for fewstep.testing: tiny offline diffusers pipelines."""

from __future__ import annotations

import os
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from fewstep.testing import (  # noqa: E402
    KNOWN_KINDS,
    make_tokenizer,
    save_tiny_pipeline,
    tiny_ddpm_components,
    tiny_sd15_components,
    tiny_sdxl_components,
)

EXPECTED_CLASS = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "ddpm": "DDPMPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")
DENOISER = {"sd3": "transformer", "flux": "transformer"}  # the other kinds: "unet"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each kind saved once (seed 0) for the whole module."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny_pipeline(kind, root / kind, seed=0) for kind in KNOWN_KINDS}


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_and_special_tokens(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    assert type(tok).__name__ == "CLIPTokenizer"
    assert (tmp_path / "tok" / "vocab.json").is_file()
    assert (tmp_path / "tok" / "merges.txt").is_file()
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>"
    assert tok.eos_token == "<|endoftext|>"
    vocab = tok.get_vocab()
    for ch in string.ascii_lowercase + string.digits + ".,!?":
        assert ch in vocab and ch + "</w>" in vocab
    for word in ("a", "photo", "of", "cat", "dog"):
        assert word + "</w>" in vocab


def test_tokenizer_round_trip_without_unknown(tmp_path):
    tok = make_tokenizer(tmp_path)
    prompt = "a photo of a cat and a zebra"
    ids = tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    inner = ids[1:-1]
    assert tok.unk_token_id not in inner
    # whole words come out as single tokens
    assert tok.convert_ids_to_tokens(inner[:5]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == prompt


def test_tokenizer_any_ascii_prompt(tmp_path):
    tok = make_tokenizer(tmp_path)
    prompt = "A Photo, of 2 DOGS!! (x=3; y~4) \"quoted\" 'it's' #tag @me {}[]<>|\\/^_`$%&*+-?:"
    out = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert len(out.input_ids) == 77
    inner = [i for i in out.input_ids if i not in (tok.bos_token_id, tok.eos_token_id)]
    assert inner and tok.unk_token_id not in inner


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("kind", KNOWN_KINDS)
def test_save_reload_and_run(saved, kind):
    from diffusers import DiffusionPipeline

    path = saved[kind]
    assert isinstance(path, str)
    assert os.path.isfile(os.path.join(path, DENOISER.get(kind, "unet"), "diffusion_pytorch_model.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == EXPECTED_CLASS[kind]
    assert isinstance(pipe, getattr(diffusers, EXPECTED_CLASS[kind]))
    pipe.set_progress_bar_config(disable=True)

    generator = torch.Generator("cpu").manual_seed(0)
    if kind == "ddpm":
        images = pipe(num_inference_steps=2, output_type="np", generator=generator).images
        assert images.shape == (1, 16, 16, 3)
    else:
        images = pipe(
            "a photo of a cat",
            num_inference_steps=2,
            guidance_scale=5.0,
            output_type="np",
            generator=generator,
            **({"height": 32, "width": 32} if kind == "flux" else {}),  # Flux's default is 128 * vae_scale
        ).images
        assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


def test_sdxl_config(saved):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(saved["sdxl"])
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == 64
    assert pipe.text_encoder_2.config.projection_dim == 32
    assert pipe.vae_scale_factor == 2


def test_sd15_has_no_safety_checker(saved):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(saved["sd15"])
    assert pipe.safety_checker is None
    assert pipe.config.requires_safety_checker is False
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_same_seed_same_weights(saved, tmp_path):
    again = save_tiny_pipeline("sd15", tmp_path / "again", seed=0)
    a = load_file(os.path.join(saved["sd15"], UNET_WEIGHTS))
    b = load_file(os.path.join(again, UNET_WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_components_deterministic_and_seed_dependent():
    for build in (tiny_sdxl_components, tiny_ddpm_components):
        a = build(seed=0)["unet"].state_dict()
        b = build(seed=0)["unet"].state_dict()
        c = build(seed=1)["unet"].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
    te = tiny_sd15_components(seed=3)["text_encoder"].state_dict()
    te2 = tiny_sd15_components(seed=3)["text_encoder"].state_dict()
    assert all(torch.equal(te[k], te2[k]) for k in te)


def test_ddpm_class_conditional(tmp_path):
    comps = tiny_ddpm_components(num_class_embeds=10, sample_size=8, in_channels=1)
    unet = comps["unet"]
    assert unet.config.num_class_embeds == 10
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([3, 7])).sample
    assert out.shape == x.shape
    path = save_tiny_pipeline("ddpm", tmp_path / "cls", num_class_embeds=10)
    from diffusers import UNet2DModel

    assert UNet2DModel.from_pretrained(path, subfolder="unet").config.num_class_embeds == 10


def test_unknown_kind_raises(tmp_path):
    with pytest.raises(ValueError) as info:
        save_tiny_pipeline("sd9", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    for kind in KNOWN_KINDS:
        assert kind in msg
    assert not any(tmp_path.iterdir())
