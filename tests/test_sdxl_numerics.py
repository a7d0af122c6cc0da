"""SDXL-scale numerics (issue 9): the VAE in float32 when ``force_upcast``, the critic's DM-gradient term in float32
under bf16 mixed precision, and the lr warm-up (with weight decay) resuming exactly."""
import copy

import pytest
import torch

from conftest import assert_same_students


# ---- 1. the VAE in float32 when force_upcast ------------------------------------------------------------------------
def _overflowing_sdxl(folder, force_upcast=True):
    """A tiny SDXL pipeline whose VAE overflows in float16: the first conv of the encoder and of the decoder scaled so
    that their outputs pass 65504 (the GroupNorm after each makes float32 results independent of the scale)."""
    from diffusers import StableDiffusionXLPipeline

    from fewstep.testing import tiny_sdxl_components

    comps = tiny_sdxl_components(seed=0)
    vae = comps["vae"]
    with torch.no_grad():
        for conv, k in ((vae.encoder.conv_in, 1e5), (vae.decoder.conv_in, 2e5)):  # weights stay < 65504 in fp16
            conv.weight.mul_(k)
            conv.bias.mul_(k)
    vae.register_to_config(force_upcast=force_upcast)
    StableDiffusionXLPipeline(**comps).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _images(n=2):
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_force_upcast_vae_encodes_and_decodes_in_float32(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from fewstep.teachers.unet import DiffusersUNetTeacher

    path = _overflowing_sdxl(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=torch.float16)
    ref_vae = copy.deepcopy(pipe.vae).float()  # the same (fp16-rounded) weights, computed in float32
    x = _images()
    with torch.no_grad():  # what a plain fp16 VAE gives: the test can fail
        plain = pipe.vae.encode(x.half()).latent_dist.mean
        ref_z = ref_vae.encode(x).latent_dist.mean
        plain_img = pipe.vae.decode(ref_z.half()).sample
        ref_img = ref_vae.decode(ref_z).sample
    assert not torch.isfinite(plain).all() and not torch.isfinite(plain_img).all()
    assert torch.isfinite(ref_z).all() and torch.isfinite(ref_img).all()

    teacher = DiffusersUNetTeacher(pipe, source=path)
    seen = []
    pipe.vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    z = teacher.encode_images(x)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z, ref_z * pipe.vae.config.scaling_factor, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a decode inside an autocast region stays float32 too
        img = teacher.to_images(z.half())  # fp16 latents, as a fp16 network would hand them over
    assert torch.isfinite(img).all()
    ref = (ref_vae.decode(z.half().float() / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(img, ref.detach(), rtol=1e-5, atol=1e-5)
    assert seen and set(seen) == {torch.float32}  # decoded in float32 ...
    assert pipe.vae.dtype == torch.float16 and pipe.unet.dtype == torch.float16  # ... and back to fp16 at rest


def test_vae_without_force_upcast_keeps_its_dtype(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from fewstep.teachers.unet import DiffusersUNetTeacher

    path = _overflowing_sdxl(tmp_path / "sdxl", force_upcast=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=torch.float16)
    teacher = DiffusersUNetTeacher(pipe, source=path)
    assert pipe.vae.dtype == torch.float16  # the config did not ask: left as loaded (and it overflows)
    assert not torch.isfinite(teacher.encode_images(_images())).all()


def test_bf16_teacher_keeps_its_vae_in_bf16_at_rest_and_decodes_in_float32(tiny_pipelines, tmp_path):
    from diffusers import AutoencoderKL

    from fewstep.teachers.load import load_diffusers_teacher

    teacher = load_diffusers_teacher(tiny_pipelines["sdxl"], dtype="bfloat16")
    vae = teacher.pipe.vae
    assert vae.dtype == torch.bfloat16 and teacher.pipe.unet.dtype == torch.bfloat16  # no float32 copy held
    seen = []
    vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    img = teacher.to_images(torch.randn((1, *teacher.sample_shape), generator=torch.Generator().manual_seed(0)))
    assert img.dtype == torch.float32 and torch.isfinite(img).all() and seen == [torch.float32]
    assert vae.dtype == torch.bfloat16
    # the round trip through float32 is lossless: the VAE's weights are the bf16-loaded ones, exactly
    bf16 = AutoencoderKL.from_pretrained(tiny_pipelines["sdxl"], subfolder="vae", dtype=torch.bfloat16)
    for (k, a), (_, b) in zip(vae.state_dict().items(), bf16.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), k


# ---- 2. the critic's DM-gradient term in float32 ------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["dmd2", "phased_dmd"])
@pytest.mark.parametrize("dm_fp32", [True, False])
def test_dm_critic_term_runs_in_float32_under_bf16(tmp_path, objective, dm_fp32):
    """Under train.mixed_precision=bf16 the critic's no-grad call for the generator's DM gradient sees float32
    (autocast off); the critic's own training forward keeps bf16.  dm_fp32=false: the old bf16 call."""
    from fewstep.api import build
    from fewstep.config import load_config
    from fewstep.trainer import Trainer

    cfg = load_config(f"configs/gmm_{objective}.yaml", [
        "train.tracker=none", f"output_dir={tmp_path}/run", "train.batch_size=16", "train.max_steps=4",
        "train.mixed_precision=bf16", f"objective.dm_fp32={str(dm_fp32).lower()}"])
    teacher, data, obj = build(cfg)
    trainer = Trainer(cfg, teacher, obj, data, tmp_path / "run", log=lambda *a: None)
    seen = []  # (grad enabled, output dtype, autocast on) of every critic network call

    def hook(mod, inp, out):
        out = out[0] if isinstance(out, tuple) else out
        seen.append((torch.is_grad_enabled(), out.dtype, torch.is_autocast_enabled("cpu")))

    critic = trainer.plain["critic"].denoiser.net
    linear = next(m for m in critic.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(hook)
    try:
        assert "student" in obj.plan(0)
        trainer.train_step()
    finally:
        handle.remove()
    dm_calls = [s for s in seen if not s[0]]  # the generator's DM term runs the critic under no_grad
    train_calls = [s for s in seen if s[0]]
    assert dm_calls and train_calls
    want = (torch.float32, False) if dm_fp32 else (torch.bfloat16, True)
    assert all((d, a) == want for _, d, a in dm_calls), dm_calls
    assert all(d == torch.bfloat16 for _, d, _ in train_calls), train_calls


def test_dm_fp32_keeps_autocast_for_a_low_precision_base():
    """A critic whose network is not all float32 (a LoRA on a shared bf16 base) is called as it was: under autocast."""
    from fewstep.objectives.critics import Critic, fake_score
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    teacher = GMMTeacher(load_mixture("ring8"))
    critic = Critic(teacher.new_network("critic"))
    seen = []
    linear = next(m for m in critic.denoiser.net.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    cond = teacher.sample_conditions(4, torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fake_score(critic, x, t, cond)
        next(critic.denoiser.net.parameters()).data = next(critic.denoiser.net.parameters()).data.bfloat16()
        fake_score(critic, x, t, cond)
    assert seen == [False, True]


# ---- 3. lr warm-up and weight decay --------------------------------------------------------------------------------
def _distill(tmp_path, name, *overrides):
    from fewstep.api import distill
    from fewstep.config import load_config

    cfg = load_config("configs/gmm_dmd2.yaml", [
        "train.tracker=none", f"output_dir={tmp_path}/{name}", "train.batch_size=32", "train.log_every=1",
        "train.checkpoint_every=2", "objective.critic_steps=2", "train.lr_warmup_steps=3", "train.weight_decay=0.01",
        "train.ema_decay=0", "objective.lr_decay=constant", *overrides])
    return distill(cfg, log=lambda *a: None)


def test_lr_warmup_ramps_per_group_and_resumes_exactly(tmp_path):
    straight = _distill(tmp_path, "straight", "train.max_steps=4")
    _distill(tmp_path, "resumed", "train.max_steps=2")
    resumed = _distill(tmp_path, "resumed", "train.max_steps=4")
    lr = 1e-3
    rows = {h["step"]: h for h in straight["history_tail"]}
    # each group ramps over its own optimizer steps (diffusers' constant_with_warmup: k / 3 at its k-th update)
    assert [rows[s]["critic/lr"] for s in (1, 2, 3, 4)] == pytest.approx([0, lr / 3, 2 * lr / 3, lr])
    assert [rows[s]["student/lr"] for s in (1, 3)] == pytest.approx([0, lr / 3])  # student updates at steps 0, 2
    rows_r = {h["step"]: h for h in resumed["history_tail"]}
    assert [rows_r[s]["critic/lr"] for s in (3, 4)] == pytest.approx([2 * lr / 3, lr])  # continued, not restarted
    assert_same_students(tmp_path / "straight", tmp_path / "resumed")


def test_lr_warmup_zero_is_constant_lr(tmp_path):
    m = _distill(tmp_path, "flat", "train.max_steps=2", "train.lr_warmup_steps=0")
    assert [h["critic/lr"] for h in m["history_tail"]] == pytest.approx([1e-3, 1e-3])


def test_lr_warmup_steps_must_be_non_negative():
    from fewstep.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("configs/gmm_dmd2.yaml", ["train.lr_warmup_steps=-5"])
    msg = str(e.value)
    assert "\n" not in msg and "train.lr_warmup_steps" in msg and "-5" in msg and ">= 0" in msg


@pytest.mark.parametrize("name", ["sdxl_dmd2", "sdxl_dmd2_lora", "sdxl_phased_dmd", "sdxl_consistency", "sdxl_slam",
                                  "sdxl_boot"])
def test_sdxl_configs_use_the_recipe_decay_and_warmup(name):
    from fewstep.config import load_config

    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.train.weight_decay == 0.01 and cfg.train.lr_warmup_steps == 500
