"""UNet teachers at ``data.resolution`` (latents, SDXL time ids, the export's default size) and DMD2's 1-step
``objective.conditioning_t`` (pure noise fed at a teacher timestep; exported with a stock DDIMScheduler)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from fewstep.api import build, load_run
from fewstep.config import ConfigError, load_config
from fewstep.export import check_roundtrip, export_pipeline

PROMPTS = ["a red dog", "a photo of a cat"]


def _build(path, prompts_file, *overrides, config="configs/sdxl_dmd2.yaml"):
    cfg = load_config(config, [f"teacher.path={path}", "teacher.dtype=float32", "objective.gan_weight=0",
                               "data.images=null", f"data.prompts={prompts_file}", *overrides])
    return build(cfg)


def _error(path, prompts_file, *overrides, config="configs/sdxl_dmd2.yaml"):
    with pytest.raises(ConfigError) as e:
        _build(path, prompts_file, *overrides, config=config)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _default_call(folder, text: bool, steps: int):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    if text:
        img = pipe("a red dog", num_inference_steps=steps, guidance_scale=0.0, generator=g, output_type="np").images
        return pipe, img
    return pipe, pipe(batch_size=1, num_inference_steps=steps, generator=g, output_type="np").images


# ---- data.resolution ------------------------------------------------------------------------------
@pytest.mark.parametrize("family,pixels", [("sdxl", 48), ("sd15", 40), ("ddpm", 24)])
def test_unet_teacher_trains_and_exports_at_resolution(family, pixels, tiny_pipelines, prompts_file, tmp_path):
    config = "configs/sdxl_dmd2.yaml" if family == "sdxl" else "configs/sd15_dmd2.yaml"
    prompts = prompts_file if family != "ddpm" else "null"
    teacher, _, obj = _build(tiny_pipelines[family], prompts, f"data.resolution={pixels}", "student.steps=2",
                             config=config)
    lat = pixels // teacher.vae_scale
    assert teacher.vae_scale == (1 if family == "ddpm" else 2)
    assert teacher.sample_shape[1:] == (lat, lat) and teacher.image_size == pixels
    assert teacher.pipe.unet.config.sample_size == lat
    assert obj.student.net.config.sample_size == lat  # every copy carries it
    if family == "sdxl":  # micro-conditioning: original_size, crop (0, 0), target_size, as the pipeline's own call
        ids = teacher.conditions_for_prompts(PROMPTS).time_ids
        assert ids.tolist() == [[pixels, pixels, 0, 0, pixels, pixels]] * 2
    out = export_pipeline(teacher, obj.student, obj, tmp_path / "pipe")
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == lat
    pipe, img = _default_call(out, family != "ddpm", obj.steps)  # no height/width: the trained size
    assert img.shape == (1, pixels, pixels, 3)
    if family == "sdxl":
        assert pipe.default_sample_size == lat
    diff = check_roundtrip(out, obj, teacher, obj.student, PROMPTS if family != "ddpm" else None)
    assert diff < 1e-4


def test_sdxl_time_ids_follow_the_pipeline_call(tiny_pipelines, prompts_file):
    """The teacher's time ids are what StableDiffusionXLPipeline builds for the same height/width."""
    teacher, _, _ = _build(tiny_pipelines["sdxl"], prompts_file, "data.resolution=64")
    pipe = teacher.pipe
    proj = pipe.text_encoder_2.config.projection_dim
    ref = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=proj)
    assert torch.equal(teacher.conditions_for_prompts(["a red dog"]).time_ids.float(), ref)
    teacher.set_resolution(48)  # prompts encoded at another size are encoded again
    assert teacher.conditions_for_prompts(["a red dog"]).time_ids.tolist() == [[48, 48, 0, 0, 48, 48]]


@pytest.mark.parametrize("family,bad,step", [("sdxl", 50, 4), ("sdxl", 2, 4), ("ddpm", 25, 2)])
def test_bad_resolution_is_one_line(family, bad, step, tiny_pipelines, prompts_file):
    prompts = prompts_file if family != "ddpm" else "null"
    msg = _error(tiny_pipelines[family], prompts, f"data.resolution={bad}",
                 config="configs/sdxl_dmd2.yaml" if family == "sdxl" else "configs/sd15_dmd2.yaml")
    assert f"data.resolution={bad}" in msg and f"multiple of {step}" in msg


def test_memory_estimate_reads_the_resolution(tiny_pipelines, tmp_path):
    """The --dry-run estimate at data.resolution=48 is the estimate of the same UNet whose sample_size is 24."""
    from fewstep.memory import estimate_config

    def est(path, *ov):
        return estimate_config(load_config("configs/sdxl_dmd2.yaml", [f"teacher.path={path}", *ov]), cpu=True)

    copy = tmp_path / "sdxl24"
    shutil.copytree(tiny_pipelines["sdxl"], copy)
    f = copy / "unet" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "sample_size": 24}))
    at48 = est(tiny_pipelines["sdxl"], "data.resolution=48")
    assert at48 is not None and at48 == est(copy) and at48 != est(tiny_pipelines["sdxl"])


# ---- objective.conditioning_t ---------------------------------------------------------------------
def test_conditioning_t_feeds_pure_noise_at_that_timestep(tiny_pipelines, prompts_file):
    """The 1-step sampler calls the UNet on x_T ~ N(0, I) at timestep 399 and returns that timestep's VP x0."""
    from diffusers import DDPMScheduler

    teacher, _, obj = _build(tiny_pipelines["sdxl"], prompts_file, "student.steps=1", "objective.conditioning_t=399")
    seen = {}

    def hook(module, args, kwargs, out):
        seen["x"], seen["t"], seen["eps"] = args[0].clone(), args[1].clone(), out.sample.clone()

    net = obj.student.net
    h = net.register_forward_hook(hook, with_kwargs=True)
    noise = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x0 = obj.sample(obj.student, noise, teacher.conditions_for_prompts(PROMPTS))
    h.remove()
    assert torch.equal(seen["x"], noise)
    assert seen["t"].tolist() == [399.0, 399.0]
    ac = DDPMScheduler.from_config(teacher.pipe.scheduler.config).alphas_cumprod[399]
    ref = (noise - (1 - ac).sqrt() * seen["eps"]) / ac.sqrt()
    assert (x0 - ref).abs().max() < 1e-5
    assert obj.times == [pytest.approx(0.4)]


@pytest.mark.parametrize("overrides,expected", [
    (["student.steps=4", "objective.conditioning_t=399"],
     "objective.conditioning_t=399 is for 1-step students; got student.steps=4"),
    (["student.steps=1", "objective.conditioning_t=1000"],
     "objective.conditioning_t=1000 must be a teacher timestep in 0..999"),
    (["student.steps=1", "objective.conditioning_t=-1"],
     "objective.conditioning_t=-1 must be a teacher timestep in 0..999"),
])
def test_conditioning_t_errors(overrides, expected, tiny_pipelines, prompts_file):
    assert _error(tiny_pipelines["sdxl"], prompts_file, *overrides) == expected


@pytest.mark.parametrize("schedule", ["flow", "vp"])
def test_conditioning_t_needs_a_discrete_vp_teacher(schedule):
    cfg = load_config("configs/gmm_dmd2.yaml", [f"teacher.schedule={schedule}", "student.steps=1",
                                                "objective.conditioning_t=399"])
    with pytest.raises(ConfigError) as e:
        build(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "objective.conditioning_t=399" in msg
    assert "discrete VP teacher" in msg or "VP (noise-prediction) teachers only" in msg


@pytest.mark.parametrize("family,prediction", [("sdxl", "v_prediction"), ("sd15", "epsilon"), ("ddpm", "epsilon")])
def test_conditioning_t_export_default_call(family, prediction, tiny_pipelines, prompts_file, tmp_path):
    """eps and v heads, text and DDPM pipelines: the stock DDIMScheduler's 1-step default call is the sampler."""
    src = Path(tiny_pipelines[family])
    if prediction != "epsilon":
        shutil.copytree(src, tmp_path / "teacher")
        src = tmp_path / "teacher"
        f = src / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": prediction}))
    config = "configs/sdxl_dmd2.yaml" if family == "sdxl" else "configs/sd15_dmd2.yaml"
    prompts = prompts_file if family != "ddpm" else "null"
    teacher, _, obj = _build(src, prompts, "student.steps=1", "objective.conditioning_t=250", config=config)
    assert teacher.denoiser.prediction == ("v" if prediction == "v_prediction" else "eps")
    out = export_pipeline(teacher, obj.student, obj, tmp_path / "pipe")
    pipe, img = _default_call(out, family != "ddpm", 1)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [250]
    assert check_roundtrip(out, obj, teacher, obj.student, PROMPTS if family != "ddpm" else None) < 1e-5


def test_sdxl_conditioning_t_distill_export_roundtrip(tiny_pipelines, prompts_file, tmp_path):
    """Distill a 1-step SDXL DMD2 student conditioned at 399 at 48 px, export, reload with the stock API: the default
    1-step call samples 48 px at timestep 399 and equals the in-training sampler for the same noise."""
    run = tmp_path / "run"
    r = run_cli("distill", "configs/sdxl_dmd2.yaml", f"teacher.path={tiny_pipelines['sdxl']}", "teacher.dtype=float32",
                "student.steps=1", "objective.conditioning_t=399", "data.resolution=48", "objective.gan_weight=0",
                "objective.critic_steps=1", "data.images=null", f"data.prompts={prompts_file}", "train.max_steps=2",
                "train.batch_size=2", "train.mixed_precision=no", "train.checkpoint_every=1000", "train.sample_every=0",
                "teacher.guidance_scale=3", "train.lr=1e-3", f"output_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    card = (run / "pipeline" / "README.md").read_text()
    assert "num_inference_steps=1" in card and "DDIMScheduler" in card and "'num_train_timesteps': 400" in card
    assert "conditioned at timestep 399" in card and "'trained_betas': '<400 values>'" in card
    pipe, img = _default_call(run / "pipeline", True, 1)
    assert img.shape == (1, 48, 48, 3) and bool(torch.isfinite(torch.as_tensor(img)).all())
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [399]
    cfg, teacher, data, obj = load_run(str(run))
    student = obj.student
    before = {k: v.clone() for k, v in student.net.state_dict().items()}
    student.net = type(student.net).from_pretrained(str(run / "pipeline" / "unet"))
    assert any(not torch.equal(before[k], v) for k, v in student.net.state_dict().items())  # it trained
    assert obj.times == [pytest.approx(0.4)] and teacher.sample_shape[1:] == (24, 24)
    assert check_roundtrip(run / "pipeline", obj, teacher, student, PROMPTS) < 1e-5
