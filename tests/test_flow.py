"""Flow teachers (SD3-, Flux-shaped pipelines; GMM in flow form) and data-free flow-map distillation."""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

PROMPTS = ["a red dog", "a photo of a cat"]


@contextlib.contextmanager
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def flow_pipes(tmp_path_factory):
    from fewstep.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_flow")
    return {k: save_tiny_pipeline(k, str(root / k)) for k in ("sd3", "flux")}


# ---- the adapter: t is the flow sigma, x0 as diffusers' scheduler computes it --------------------------
@pytest.mark.parametrize("family,guidance", [("sd3", 4.0), ("flux", 3.5)])
def test_adapter_x0_equals_scheduler_step_by_hand(flow_pipes, family, guidance):
    """x0 = one FlowMatchEuler step to sigma 0 from a *shifted* sigma, with the pipeline's own guidance rule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fewstep.teachers.transformer import DiffusersTransformerTeacher
    from fewstep.teachers.load import load_diffusers_teacher

    teacher = load_diffusers_teacher(flow_pipes[family], guidance_scale=guidance)
    assert isinstance(teacher, DiffusersTransformerTeacher) and teacher.family == family
    if family == "flux":
        teacher.set_resolution(32)
    pipe = teacher.pipe
    cond = teacher.conditions_for_prompts(PROMPTS)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if family == "sd3":
        sched.set_timesteps(3)  # shift 3: sigmas are not the uniform grid
    else:
        sched.set_timesteps(sigmas=[1.0, 2 / 3, 1 / 3], mu=0.6)  # FluxPipeline's call: dynamic shifting
    ts, sigma = sched.timesteps[1], sched.sigmas[1]
    assert abs(float(sigma) - 2 / 3) > 0.05  # really shifted
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _one_thread():
        x0 = teacher(x, sigma.expand(2), cond, guidance_scale=guidance)
        if family == "sd3":  # CFG against the empty prompt, diffusers' form
            v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=ts.expand(4),
                                 encoder_hidden_states=torch.cat([cond.null_prompt_embeds, cond.prompt_embeds]),
                                 pooled_projections=torch.cat([cond.null_pooled_embeds, cond.pooled_embeds])).sample
            vu, vc = v.chunk(2)
            v, lat = vu + guidance * (vc - vu), x
        else:  # packed tokens, timestep = sigma, guidance into the embedding
            b, c, h, w = x.shape
            lat = FluxPipeline._pack_latents(x, b, c, h, w)
            v = pipe.transformer(hidden_states=lat, timestep=ts.expand(2) / 1000, guidance=torch.full((2,), guidance),
                                 pooled_projections=cond.pooled_embeds, encoder_hidden_states=cond.prompt_embeds,
                                 txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3),
                                 img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype)).sample
        one = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False)
        one.set_timesteps(sigmas=[float(sigma)])  # then sigma_next = 0: prev_sample is the x0 estimate
        hand = one.step(v, one.timesteps[0], lat).prev_sample
        if family == "flux":
            hand = FluxPipeline._unpack_latents(hand, 32, 32, pipe.vae_scale_factor)
    assert hand.abs().max() > 0.5
    assert torch.allclose(x0, hand, atol=1e-5), float((x0 - hand).abs().max())


def test_sd3_timestep_reaches_the_transformer_in_float32(flow_pipes):
    """A bf16 SD3 transformer gets the timestep as StableDiffusion3Pipeline passes it (float32): 750 stays 750,
    where bf16 would round it to 752."""
    from fewstep.teachers.load import load_diffusers_teacher

    teacher = load_diffusers_teacher(flow_pipes["sd3"], dtype="bfloat16")
    cond = teacher.conditions_for_prompts(PROMPTS[:1])
    seen = []
    hook = teacher.pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]),
                                                              with_kwargs=True)
    try:
        with torch.no_grad():
            teacher(torch.randn(1, *teacher.sample_shape), torch.tensor([0.75]), cond)
    finally:
        hook.remove()
    assert torch.tensor(750.0, dtype=torch.bfloat16).item() == 752.0  # what a bf16 timestep would have been
    assert seen and all(t.dtype == torch.float32 and t.tolist() == [750.0] * len(t) for t in seen), seen


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_exported_flow_scheduler_gives_the_student_grid(flow_pipes, family, steps):
    """The stock scheduler the export writes yields exactly the student's grid (then 0), whatever the teacher's shift."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.export import _scheduler_from_spec
    from fewstep.objectives.base import sampler_for
    from fewstep.schedules import RectifiedFlow, student_times

    teacher_sched = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_pipes[family], subfolder="scheduler")
    for renoise in (True, False):
        spec = sampler_for(RectifiedFlow(), steps, renoise=renoise)
        sched = _scheduler_from_spec(teacher_sched, spec)
        if family == "sd3":
            sched.set_timesteps(steps)  # StableDiffusion3Pipeline's call
        else:  # FluxPipeline's call: its own sigmas and a resolution-dependent mu
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=1.1)
        assert sched.sigmas.tolist()[-1] == 0.0
        assert np.allclose(sched.sigmas[:-1].numpy(), student_times(steps, RectifiedFlow()), atol=1e-6)
        assert np.allclose(sched.timesteps.numpy(), 1000 * sched.sigmas[:-1].numpy(), atol=1e-3)
        assert sched.config.stochastic_sampling == (renoise and steps > 1)
    # deterministic step is plain Euler: x + (sigma_next - sigma) v
    x, v = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    out = sched.step(v, sched.timesteps[0], x).prev_sample
    assert torch.allclose(out, x + (sched.sigmas[1] - sched.sigmas[0]) * v, atol=1e-6)


# ---- distil, export, reload in a fresh process ---------------------------------------------------------
RUNS = {  # name: (family, config, student steps, extra overrides)
    "sd3-dmd2-4": ("sd3", "configs/sd3_dmd2.yaml", 4, []),
    "flux-dmd2-4": ("flux", "configs/flux_dmd2.yaml", 4, []),
    "sd3-flow_map-1": ("sd3", "configs/sd3_flow_map.yaml", 1, ["data.prompts=null"]),
    "flux-flow_map-2": ("flux", "configs/sd3_flow_map.yaml", 2, ["teacher.guidance_scale=3.5"]),
}

CHECK = r"""
import json, sys, torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from diffusers import DiffusionPipeline
from fewstep.api import load_run
from fewstep.export import check_roundtrip
from fewstep.trainer import list_checkpoints
from pipelines import load_pipeline
results = {}
for run in sys.argv[1:]:
    cfg, teacher, data, obj = load_run(run)
    # the in-training sampler: the student as trained (last checkpoint), not the exported weights
    obj.student.load_state_dict(load_file(str(list_checkpoints(run)[-1] / "model.safetensors")))
    obj.student.eval()
    meta = json.load(open(run + "/pipeline/fewstep.json"))
    pipe = load_pipeline(run + "/pipeline")
    pipe.scheduler.set_timesteps(meta["num_inference_steps"])
    out = {"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
           "sigmas": pipe.scheduler.sigmas.tolist(), "times": obj.times, "meta": meta,
           "max_diff": check_roundtrip(run + "/pipeline", obj, teacher, obj.student, %(prompts)r)}
    if obj.name == "flow_map" and obj.steps > 1:
        # diffusers alone: the folder's own pipeline file as custom code gives the same images
        module = obj.export_spec()["pipeline_module"]
        p2 = DiffusionPipeline.from_pretrained(run + "/pipeline", custom_pipeline=module, trust_remote_code=True)
        p2.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=meta["num_inference_steps"], guidance_scale=meta["guidance_scale"],
                  output_type="latent", **meta["call_kwargs"])
        a = pipe(%(prompts)r, generator=torch.Generator().manual_seed(1), **kw).images
        b = p2(%(prompts)r, generator=torch.Generator().manual_seed(1), **kw).images
        out["custom_code"] = [type(p2).__module__, float((a - b).abs().max())]
        # and without the jump embedding the same transformer samples something else
        from diffusers import FluxPipeline, StableDiffusion3Pipeline
        base_cls = FluxPipeline if teacher.family == "flux" else StableDiffusion3Pipeline
        comps = {k: v for k, v in pipe.components.items() if k != "jump_embedder"}
        c = base_cls(**comps)(%(prompts)r, generator=torch.Generator().manual_seed(1), **kw).images
        out["without_jump"] = float((a - c).abs().max())
    results[run] = out
print("RESULT " + json.dumps(results))
""" % {"prompts": PROMPTS}


def _train_and_export(cfg):
    """``fewstep distill`` in-process, keeping the data source the run used (``api.distill`` builds its own)."""
    from fewstep.api import build
    from fewstep.config import config_to_dict, dump_config
    from fewstep.export import export_pipeline
    from fewstep.trainer import Trainer

    run = Path(cfg.output_dir)
    teacher, data, objective = build(cfg)
    trainer = Trainer(cfg, teacher, objective, data, run, log=lambda *a: None)
    dump_config(cfg, run / "config.yaml")
    trainer.fit()
    student = trainer.final_student().eval()
    export_pipeline(teacher, student, objective, run / "pipeline", config_to_dict(cfg))
    trainer.end()
    return data


@pytest.fixture(scope="module")
def roundtrips(flow_pipes, tmp_path_factory):
    """Train each run a few steps in-process (lr high enough to move every weight), check all in one fresh process."""
    from PIL import Image

    from fewstep.config import load_config

    root = tmp_path_factory.mktemp("flow_runs")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\nan astronaut riding a horse\n")
    images = root / "images"  # present, but no run here may read it (no GAN term; flow_map is data-free)
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "red_square.png")
    opened = {}
    for name, (family, config, steps, extra) in RUNS.items():
        overrides = [f"teacher.path={flow_pipes[family]}", "teacher.dtype=float32", f"student.steps={steps}",
                     "train.max_steps=3", "train.batch_size=2", "train.lr=1e-3", "train.mixed_precision=no",
                     "train.checkpoint_every=3", "train.sample_every=0", "train.tracker=none",
                     f"data.prompts={prompts}", f"data.images={images}", "data.resolution=32",
                     f"output_dir={root / name}", *extra]
        cfg = load_config(str(ROOT / config), overrides)
        with _one_thread():
            opened[name] = [str(p) for p in _train_and_export(cfg).opened]
    p = subprocess.run([sys.executable, "-c", CHECK, *[str(root / n) for n in RUNS]], capture_output=True, text=True,
                       cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    return {name: res[str(root / name)] for name in RUNS}, root, opened, str(prompts)


@pytest.mark.parametrize("name", list(RUNS))
def test_roundtrip_default_call_equals_training_sampler(roundtrips, name):
    res, root, _, _ = roundtrips
    family, _, steps, _ = RUNS[name]
    r = res[name]
    objective = name.split("-")[1]
    multi_jump = objective == "flow_map" and steps > 1
    expected = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    if multi_jump:
        expected = {"sd3": "FlowMapStableDiffusion3Pipeline", "flux": "FlowMapFluxPipeline"}[family]
    assert r["class"] == expected
    assert r["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert r["sigmas"][:-1] == pytest.approx(r["times"], abs=1e-6) and r["sigmas"][-1] == 0.0
    assert r["times"] == pytest.approx([1 - k / steps for k in range(steps)])
    assert r["meta"]["num_inference_steps"] == steps
    # Flux: guidance goes into the embedding at the teacher's value; SD3: no CFG in the student's call
    assert r["meta"]["guidance_scale"] == (3.5 if family == "flux" else 0.0)
    assert r["max_diff"] < 1e-4, r
    card = (root / name / "pipeline" / "README.md").read_text()
    assert f"num_inference_steps={steps}" in card
    if multi_jump:
        assert "custom_pipeline" in card and "load_pipeline" in card
        module, diff = r["custom_code"]
        assert module.startswith("diffusers_modules") and diff < 1e-5
        assert r["without_jump"] > 1e-3  # the jump embedding is trained and used


def test_flow_runs_read_no_images_and_flow_map_no_prompts(roundtrips):
    """flow_map samples only noise: with no prompt file it conditions on the empty prompt and reads nothing."""
    _, _, opened, prompts = roundtrips
    assert opened["sd3-flow_map-1"] == []
    assert opened["flux-flow_map-2"] == [prompts]  # prompts are conditions, read when given
    assert opened["sd3-dmd2-4"] == [prompts] and opened["flux-dmd2-4"] == [prompts]


# ---- the GMM in flow form: known answers ---------------------------------------------------------------
def _gmm(tmp_path, config, *overrides, steps=None):
    from fewstep.api import build
    from fewstep.config import load_config
    from fewstep.trainer import Trainer

    ov = ["train.tracker=none", "train.resume=false", f"output_dir={tmp_path}/run", "train.sample_every=0", *overrides]
    if steps:
        ov += [f"train.max_steps={steps}", f"train.checkpoint_every={steps}"]
    cfg = load_config(str(ROOT / config), ov)
    teacher, data, objective = build(cfg)
    with _one_thread():
        trainer = Trainer(cfg, teacher, objective, data, tmp_path / "run", log=lambda *a: None)
        trainer.fit()
    return teacher, data, objective, trainer.final_student()


def test_gmm_flow_map_one_jump_matches_teacher_and_tracks_its_flow(tmp_path):
    """Acceptance: 1-jump energy distance <= 1.5x the teacher ODE's, 8/8 modes, f(z, d) on the teacher's flow."""
    from fewstep.api import evaluate_toy, toy_table

    img = tmp_path / "images"  # data-free: a data source with files that must never be read
    img.mkdir()
    teacher, data, objective, student = _gmm(tmp_path, "configs/gmm_flow_map.yaml", f"data.images={img}", steps=2000)
    assert teacher.schedule.kind == "flow" and data.opened == []
    with _one_thread():
        res = evaluate_toy(teacher, objective, student, n=4000)
    table = toy_table(res)
    assert res["student"]["modes_covered"] == 8, table
    assert res["student"]["energy_distance"] <= 1.5 * res["teacher"]["energy_distance"], table
    track = res["flow_map_tracking"]
    assert set(track) == {"0.25", "0.5", "1"}
    # a fresh (teacher-initialised) student jumps with the teacher's velocity at t = 1: far off at d = 1
    fresh = teacher.new_network("student", jump=True)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 2, generator=g)
    cond = teacher.sample_conditions(2000, g)
    with _one_thread():
        base = objective.tracking_errors(fresh, z, cond)
    assert base["1"] > 0.1, base  # (each class is one Gaussian: the teacher's 1-step Euler is already close)
    assert track["1"] < 0.3 * base["1"] and track["0.5"] < 0.01 and track["0.25"] < 0.01, (track, base, table)


def test_dmd2_runs_on_a_flow_gmm(tmp_path):
    """DMD2 unchanged on the flow-form teacher: velocity critic, all modes after a short run."""
    from fewstep.api import evaluate_toy

    teacher, _, objective, student = _gmm(tmp_path, "configs/gmm_dmd2.yaml", "teacher.schedule=flow", steps=3000)
    assert objective.critic.denoiser.prediction == "velocity"
    with _one_thread():
        res = evaluate_toy(teacher, objective, student, n=4000)
    # the teacher-initialised student puts every sample on its class mean: energy ratio ~15. After 3k steps the
    # VP teacher is at ~4 as well (10k steps: <= 1.5, tools/benchmark.py rows dmd2-1step and dmd2-flow-1step)
    assert res["student"]["modes_covered"] == 8
    assert res["energy_ratio"] < 6.0, (res["energy_ratio"], res["student"])


def test_multi_jump_gmm_sampler_walks_the_grid():
    """K jumps chain f(x_t, t, t - t_next); with d = t every jump is a direct sample (teacher-initialised)."""
    from fewstep.objectives.flow_map import FlowMap, FlowMapConfig, flow_map_sample
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    teacher = GMMTeacher(load_mixture("ring8"), schedule="flow")
    obj = FlowMap(FlowMapConfig(), teacher, 4)
    assert obj.times == [1.0, 0.75, 0.5, 0.25]
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    cond = teacher.sample_conditions(64, torch.Generator().manual_seed(1))
    x = flow_map_sample(obj.student, z, cond, obj.times)
    # a fresh student is the teacher: its jumps are Euler steps of the teacher's ODE on the same grid
    from fewstep.sampling import ode_sample

    assert torch.allclose(x, ode_sample(teacher, z, cond, 4), atol=1e-5)
    assert obj.export_spec()["scheduler_config"]["stochastic_sampling"] is False


# ---- bad input: one-line errors ------------------------------------------------------------------------
def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_flow_map_needs_a_flow_teacher():
    from fewstep.api import build
    from fewstep.config import ConfigError, load_config

    cfg = load_config(str(ROOT / "configs/gmm_flow_map.yaml"), ["teacher.schedule=vp"])
    with pytest.raises(ConfigError) as e:
        build(cfg)
    assert "flow teacher" in _one_line(e) and "'vp'" in str(e.value)
    cfg = load_config(str(ROOT / "configs/gmm_flow_map.yaml"), ["objective.corrector_fraction=1.5"])
    with pytest.raises(ConfigError) as e:
        build(cfg)
    assert "corrector_fraction" in _one_line(e)


def test_vp_only_option_on_a_flow_teacher_is_an_error():
    from dataclasses import dataclass

    from fewstep.objectives.base import vp_only
    from fewstep.objectives.dmd import DMD2, DMD2Config
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    @dataclass
    class Cfg(DMD2Config):
        noise_offset: float = vp_only(0.0)  # an option that only a VP (eps/v) teacher understands

    class WithVPOption(DMD2):
        Config = Cfg

    vp, flow = (GMMTeacher(load_mixture("ring8"), schedule=s) for s in ("vp", "flow"))
    WithVPOption(Cfg(noise_offset=0.1), vp, 1)  # fine on VP
    WithVPOption(Cfg(), flow, 1)  # left at its default: fine on flow
    with pytest.raises(ValueError) as e:
        WithVPOption(Cfg(noise_offset=0.1), flow, 1)
    assert "objective.noise_offset" in _one_line(e) and "flow teacher" in str(e.value)


def test_transformer_without_needed_conditioning(flow_pipes, tmp_path):
    from fewstep.conditions import Condition
    from fewstep.teachers.load import TeacherLoadError, load_diffusers_teacher
    from fewstep.testing import save_tiny_pipeline

    teacher = load_diffusers_teacher(flow_pipes["sd3"], guidance_scale=4.0)
    x = torch.randn(1, *teacher.sample_shape)
    with pytest.raises(ValueError) as e:  # no prompt embeddings
        teacher(x, torch.ones(1), Condition())
    assert "prompt_embeds" in _one_line(e)
    cond = teacher.conditions_for_prompts(["a cat"])
    with pytest.raises(ValueError) as e:  # the teacher has no jump input
        teacher(x, torch.ones(1), Condition(**{**vars(cond), "jump": torch.ones(1)}))
    assert "jump" in _one_line(e)
    # a Flux transformer without a guidance embedding cannot take a guidance scale
    path = save_tiny_pipeline("flux", tmp_path / "schnell", guidance_embeds=False)
    with pytest.raises(TeacherLoadError) as e:
        load_diffusers_teacher(path, guidance_scale=3.5)
    assert "guidance_embeds" in _one_line(e)
    assert load_diffusers_teacher(path, guidance_scale=1.0).embedded_guidance is None


def test_jump_length_outside_unit_interval():
    from fewstep.objectives.flow_map import FlowMap, FlowMapConfig
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    teacher = GMMTeacher(load_mixture("ring8"), schedule="flow")
    obj = FlowMap(FlowMapConfig(), teacher, 1)
    z = torch.randn(4, 2)
    cond = teacher.sample_conditions(4, torch.Generator().manual_seed(0))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError) as e:
            obj.jump_from_noise(obj.student, z, cond, bad)
        assert "(0, 1]" in _one_line(e)
    with pytest.raises(ValueError) as e:
        obj.tracking_errors(obj.student, z, cond, ds=(0.0, 0.5))
    assert "(0, 1]" in _one_line(e)
    assert obj.jump_from_noise(obj.student, z, cond, 1.0).shape == z.shape
    # a student needs its jump: calling it without one is an error, not a silent d = 0
    with pytest.raises(ValueError) as e:
        obj.student(z, torch.ones(4), cond)
    assert "jump" in _one_line(e)
