"""Phased DMD: the subinterval critic target, the phase schedule, resume mid-phase, exports."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_same_students, run_cli_here


def _objective(schedule="vp", steps=2, **cfg):
    from fewstep.objectives.phased_dmd import PhasedDMD, PhasedDMDConfig
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    teacher = GMMTeacher(load_mixture("line4"), schedule)
    return PhasedDMD(PhasedDMDConfig(**cfg), teacher, steps), teacher


def _bias_z(target, reference, x_t):
    """Largest |z-score| of E[(target - reference) phi(x_t)] over a few test functions phi (0 if unbiased)."""
    r = (target - reference).double().flatten()
    x = x_t.double().flatten()
    zs = []
    for phi in (torch.ones_like(x), x, torch.tanh(3 * x), torch.sin(4 * x), (x - 0.5).abs()):
        v = r * phi
        zs.append(float(v.mean() / (v.std() / len(v) ** 0.5)))
    return max(abs(z) for z in zs)


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_subinterval_critic_target_is_unbiased_and_naive_is_not(schedule):
    """1-D data on {-1, 0, 1, 2}: x_s are exact samples of p_s (a perfect earlier phase), x_t is diffused from
    them.  E[target | x_t] must be the teacher's exact posterior prediction in every parameterisation;
    the naive target (x_s taken as data) is not."""
    from fewstep.objectives.base import Batch
    from fewstep.conditions import Condition

    obj, teacher = _objective(schedule)
    sched = teacher.schedule
    s = obj.bounds[1]  # phase 0 generates x at t_1 = 0.5
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x0, _ = teacher.mixture.sample(n, g)
    x_s = sched.add_noise(x0.float(), torch.randn(x0.shape, generator=g), torch.full((n,), s))
    for kind in ("x0", "eps", "v", "velocity"):
        for t_val in (0.55, 0.8):
            t = torch.full((n,), t_val)
            zs = {}
            for mode in ("unbiased", "naive"):
                obj.config.critic_target = mode
                batch = Batch(size=n, cond=Condition(), generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
                x_t, target, weight = obj.critic_targets(kind, x_s, 0, t, batch)
                exact = sched.convert(teacher(x_t, t, None), "x0", kind, x_t, t)
                zs[mode] = _bias_z(target, exact, x_t)
                if mode == "unbiased":
                    assert torch.all((weight > 0) & (weight <= 1))
            assert zs["unbiased"] < 4.5, (kind, t_val, zs)
            assert zs["naive"] > 20, (kind, t_val, zs)


def test_renoise_targets_reduce_to_data_targets_at_s0():
    from fewstep.schedules import make_schedule

    sched = make_schedule("vp")
    g = torch.Generator().manual_seed(0)
    x0, xi = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t, s = torch.full((5,), 0.7), torch.zeros(5)
    x_t = sched.renoise(x0, s, t, xi)
    a, e = sched.renoise_targets(x_t, xi, s, t)
    assert torch.allclose(a, x0, atol=1e-5) and torch.allclose(e, xi, atol=1e-5)


def test_phase_schedule_and_critic_reset():
    obj, teacher = _objective(steps=4, phase_steps=10)
    start = {k: v.clone() for k, v in obj.critic.denoiser.state_dict().items()}
    assert [obj.phase(s) for s in (0, 9, 10, 29, 30, 39, 55)] == [0, 0, 1, 2, 3, 3, 3]
    assert obj.bounds == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with torch.no_grad():
        for p in obj.critic.parameters():
            p.add_(1.0)
    assert obj.reset_groups(5) == [] and obj.reset_groups(0) == []
    assert obj.reset_groups(20) == ["critic"]
    for k, v in obj.critic.denoiser.state_dict().items():  # back to its start: the teacher's function
        assert torch.equal(v, start[k]), k
    x, t = torch.randn(16, 1), torch.rand(16)
    assert torch.allclose(obj.critic(x, t, None), teacher(x, t, None), atol=1e-6)
    obj2, _ = _objective(steps=4)
    obj2.set_max_steps(100)
    assert obj2.phase_length() == 25 and obj2.phase(99) == 3


def test_expert_init_previous_copies_the_trained_expert_at_its_phase_start():
    obj, _ = _objective(steps=3, phase_steps=10, expert_init="previous")
    ex = obj.student.experts
    with torch.no_grad():
        for p in ex[0].parameters():
            p.add_(0.5)  # "trained" expert 0
    init1 = {k: v.clone() for k, v in ex[1].state_dict().items()}
    assert obj.reset_groups(5) == []  # mid-phase: nothing copied
    assert all(torch.equal(v, init1[k]) for k, v in ex[1].state_dict().items())
    obj.reset_groups(10)  # phase 1 starts from expert 0
    trainable = [n for n, p in ex[1].named_parameters() if p.requires_grad]
    assert trainable
    p0, p1 = dict(ex[0].named_parameters()), dict(ex[1].named_parameters())
    assert all(torch.equal(p1[n], p0[n]) for n in trainable)
    assert not any(torch.equal(p1[n], init1[n]) for n in trainable)
    p1[trainable[0]].data.add_(1.0)  # a copy, not a tie
    assert not torch.equal(p1[trainable[0]], p0[trainable[0]])
    default, _ = _objective(steps=3, phase_steps=10)  # the paper's init: each expert stays the teacher's copy
    before = {k: v.clone() for k, v in default.student.experts[1].state_dict().items()}
    with torch.no_grad():
        for p in default.student.experts[0].parameters():
            p.add_(0.5)
    default.reset_groups(10)
    assert all(torch.equal(v, before[k]) for k, v in default.student.experts[1].state_dict().items())


def test_expert_init_previous_copies_lora_adapters_by_name():
    """LoRA experts (named adapters on one base): adapter phase{k} := the adapter before it; the base is untouched."""
    from torch import nn

    from fewstep.objectives.phased_dmd import PhasedStudent

    obj, _ = _objective(steps=3, phase_steps=10, expert_init="previous")
    net = nn.ModuleDict({"base": nn.Linear(2, 2), "lora": nn.ModuleDict({a: nn.Linear(2, 2) for a in
                                                                         ("default", "phase1", "phase2")})})
    obj.student = PhasedStudent([net], obj.times, adapters=["default", "phase1", "phase2"])
    base = net["base"].weight.clone()
    two = net["lora"]["phase2"].weight.clone()
    obj.reset_groups(10)
    assert torch.equal(net["lora"]["phase1"].weight, net["lora"]["default"].weight)
    assert torch.equal(net["lora"]["phase2"].weight, two) and torch.equal(net["base"].weight, base)
    obj.reset_groups(20)
    assert torch.equal(net["lora"]["phase2"].weight, net["lora"]["phase1"].weight)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="objective.experts must be 'separate' or 'shared', got 'many'"):
        _objective(experts="many")
    with pytest.raises(ValueError, match="objective.expert_init must be 'teacher' or 'previous', got 'last'"):
        _objective(expert_init="last")
    with pytest.raises(ValueError, match="critic_target"):
        _objective(critic_target="exact")
    obj, _ = _objective(steps=4)
    obj.set_max_steps(3)  # a smoke run: one step a phase, the last phase none (with a warning)
    assert [obj.phase(s) for s in range(3)] == [0, 1, 2]


def _run(tmp_path, name, *overrides):
    from fewstep.api import distill
    from fewstep.config import load_config

    cfg = load_config("configs/gmm_phased_dmd.yaml", ["train.tracker=none", f"output_dir={tmp_path}/{name}",
                                                      "teacher.path=gmm:line4", "train.batch_size=64", *overrides])
    return distill(cfg, log=lambda *a: None)


def test_each_expert_trains_only_in_its_phase(tmp_path):
    from safetensors.torch import load_file

    from fewstep.trainer import list_checkpoints

    _run(tmp_path, "r", "student.steps=2", "train.max_steps=8", "train.checkpoint_every=4", "objective.critic_steps=1",
         "train.keep_checkpoints=5")
    cks = list_checkpoints(tmp_path / "r")
    a, b = (load_file(str(c / "model.safetensors")) for c in cks[:2])  # student after phase 0, after phase 1
    init = _objective(steps=2)[0].student.state_dict()
    e0 = [k for k in a if k.startswith("experts.0.") and "residual.out" in k]
    e1 = [k for k in a if k.startswith("experts.1.") and "residual.out" in k]
    assert e0 and e1
    assert any(not torch.equal(a[k], init[k]) for k in e0)  # phase 0 trained expert 0 ...
    assert all(torch.equal(a[k], init[k]) for k in e1)  # ... and left expert 1 alone
    assert all(torch.equal(b[k], a[k]) for k in e0)  # phase 1 froze expert 0
    assert any(not torch.equal(b[k], a[k]) for k in e1)


def test_resume_mid_phase_is_exact(tmp_path):
    """6 steps straight == 3 (mid phase 0) + resume, across the phase boundary at step 4 (critic reset)."""
    common = ["student.steps=2", "objective.phase_steps=4", "objective.critic_steps=2", "train.max_steps=6",
              "train.checkpoint_every=3"]
    _run(tmp_path, "straight", *common)
    _run(tmp_path, "resumed", *common[:-2], "train.max_steps=3", "train.checkpoint_every=3")
    m = _run(tmp_path, "resumed", *common)
    assert m["steps"] == 6
    assert_same_students(tmp_path / "straight", tmp_path / "resumed")


def test_sample_command_loads_phased_students(tmp_path):
    _run(tmp_path, "r", "student.steps=2", "train.max_steps=4")
    out = tmp_path / "s.npy"
    r = run_cli_here("sample", tmp_path / "r", "--num-samples", "100", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    import numpy as np

    assert np.load(out).shape == (100, 1)


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
    obj.student.load_state_dict(load_file(str(list_checkpoints(run)[-1] / "model.safetensors")))
    obj.student.eval()
    meta = json.load(open(run + "/pipeline/fewstep.json"))
    pipe = load_pipeline(run + "/pipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(meta["num_inference_steps"])
    out = {"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
           "timesteps": [float(t) for t in pipe.scheduler.timesteps], "meta": meta,
           "expert_timesteps": pipe.config.get("expert_timesteps"),
           "max_diff": check_roundtrip(run + "/pipeline", obj, teacher, obj.student, ["a red dog"])}
    kw = dict(num_inference_steps=meta["num_inference_steps"], guidance_scale=meta["guidance_scale"],
              output_type="latent", **meta["call_kwargs"])
    if meta.get("custom_pipeline"):
        # diffusers alone: the folder's own code as a custom pipeline gives the same latents
        p2 = DiffusionPipeline.from_pretrained(run + "/pipeline", custom_pipeline=meta["custom_pipeline"],
                                               trust_remote_code=True)
        p2.set_progress_bar_config(disable=True)
        a = pipe(["a red dog"], generator=torch.Generator().manual_seed(1), **kw).images
        b = p2(["a red dog"], generator=torch.Generator().manual_seed(1), **kw).images
        out["custom_code"] = [type(p2).__name__, float((a - b).abs().max())]
        # the first expert alone (no switching) samples something else: the experts differ and are used
        base = type(pipe).__mro__[2]  # the stock parent class (after the expert-switching mixin)
        comps = {k: v for k, v in pipe.components.items() if not k.startswith("expert_")}
        c = base(**comps)(["a red dog"], generator=torch.Generator().manual_seed(1), **kw).images
        out["first_expert_only"] = float((a - c).abs().max())
    results[run] = out
print("RESULT " + json.dumps(results))
"""

EXPORTS = {"sdxl-separate": ("sdxl", "separate", 0), "sdxl-shared": ("sdxl", "shared", 0),
           "sdxl-separate-lora": ("sdxl", "separate", 4), "sd3-separate": ("sd3", "separate", 0),
           "sd3-shared": ("sd3", "shared", 0), "flux-separate": ("flux", "separate", 0),
           # dmd2's phased exits with objective.transition=ddim: the same sampler and export as one shared network
           "sdxl-dmd2-ddim": ("sdxl", "dmd2", 0), "sd3-dmd2-ddim": ("sd3", "dmd2", 0)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Train each 2-step run 4 steps in-process (2 per phase), export, then check all in one fresh process."""
    from fewstep.api import distill
    from fewstep.config import load_config
    from fewstep.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("phased_exports")
    tiny = {k: save_tiny_pipeline(k, str(root / k)) for k in ("sdxl", "sd3", "flux")}
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\n")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (family, experts, lora) in EXPORTS.items():
            kind = "dmd2" if experts == "dmd2" else "phased_dmd"
            cfg = f"configs/{'sdxl' if family == 'sdxl' else 'sd3'}_{kind}.yaml"
            which = (["objective.transition=ddim", "objective.gan_weight=0", "data.images=null"] if experts == "dmd2"
                     else [f"objective.experts={experts}"])
            ov = [f"teacher.path={tiny[family]}", "teacher.dtype=float32", "student.steps=2",
                  f"student.lora_rank={lora}", *which, "objective.critic_steps=1",
                  "train.max_steps=4", "train.batch_size=2", "train.lr=1e-2", "train.mixed_precision=no",
                  "train.checkpoint_every=4", "train.sample_every=0", "train.tracker=none",
                  # DM times inside each phase: 2 steps a phase move the two experts measurably apart (above)
                  "objective.dm_times=phase", f"data.prompts={prompts}", f"output_dir={root / name}"]
            if family != "sdxl":
                ov.append("data.resolution=32")
            if family == "flux":
                ov.append("teacher.guidance_scale=3.5")  # Flux: guidance is an embedding input
            distill(load_config(str(ROOT / cfg), ov), log=lambda *a: None)
    finally:
        torch.set_num_threads(n)
    p = subprocess.run([sys.executable, "-c", CHECK, *[str(root / k) for k in EXPORTS]], capture_output=True,
                       text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    return {k: res[str(root / k)] for k in EXPORTS}, root


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_roundtrip(exports, name):
    """Default call of the exported folder == the in-training phased sampler, for the same noise."""
    res, root = exports
    family, experts, _ = EXPORTS[name]
    r = res[name]
    stock = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    assert r["class"] == (stock if experts in ("shared", "dmd2") else "Phased" + stock)
    if family == "sdxl":
        assert r["scheduler"] == "DDIMScheduler" and r["timesteps"] == [999.0, 499.0]
    else:
        assert r["scheduler"] == "FlowMatchEulerDiscreteScheduler" and r["timesteps"] == [1000.0, 500.0]
        assert r["meta"]["guidance_scale"] == (3.5 if family == "flux" else 0.0)
    assert r["max_diff"] < 1e-4, r
    if experts == "separate":
        # in the units the pipeline hands its network: timesteps, or sigmas for Flux
        assert r["expert_timesteps"] == [t / 1000 if family == "flux" else t for t in r["timesteps"]]
        assert r["custom_code"][1] < 1e-5, r
        assert r["first_expert_only"] > 1e-3, r
    assert "num_inference_steps=2" in (root / name / "pipeline" / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("mixture", ["uneq6", "skew3", "ring8"])
@pytest.mark.parametrize("steps", [2, 4])
def test_phased_dmd_keeps_modes_and_spread(tmp_path, mixture, steps):
    m = _run(tmp_path, "q", f"teacher.path=gmm:{mixture}", f"student.steps={steps}", "train.batch_size=256")
    ev = m["eval"]
    assert ev["student"]["modes_covered"] == ev["student"]["num_modes"], m["table"]
    assert ev["student"]["energy_distance"] <= 1.5 * ev["teacher"]["energy_distance"], m["table"]
    assert 0.9 <= ev["student"]["spread"] <= 1.1, m["table"]


# ---- trajectory regression (objective.reg_weight) ---------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_ddim_x0_inverts_the_ddim_move(schedule):
    from fewstep.schedules import make_schedule

    sched = make_schedule(schedule)
    g = torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = torch.tensor([0.9, 0.9, 0.6, 0.6, 0.3, 0.3])
    for s in (t - 0.2, torch.zeros_like(t)):
        x0 = sched.ddim_x0(x_t, x_s, t, s)
        assert torch.allclose(sched.ddim_step(x0, x_t, t, s), x_s, atol=1e-5)
    assert torch.equal(sched.ddim_x0(x_t, x_s, t, torch.zeros_like(t)), x_s)


def test_ode_trajectory_lands_on_the_student_grid():
    """The states at the grid equal a plain uniform DDIM run's where the grids coincide, and the path ends at its
    sample; an unsorted grid is a one-line error."""
    from fewstep.conditions import Condition
    from fewstep.sampling import ode_sample, ode_trajectory

    _, teacher = _objective(steps=2)
    z = torch.randn(32, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    cond = Condition(class_labels=torch.arange(32) % 4)
    states = ode_trajectory(teacher, z, cond, [1.0, 0.5], 20)
    y, path, ts = ode_sample(teacher, z, cond, 20, return_path=True)
    assert len(states) == 3 and states[0] is z
    assert ts[10] == 0.5 and torch.allclose(states[1], path[10], atol=1e-5) and torch.allclose(states[2], y, atol=1e-5)
    with pytest.raises(ValueError, match=r"decreasing times above 0, got \[0.5, 1.0\]"):
        ode_trajectory(teacher, z, cond, [0.5, 1.0], 20)


@pytest.mark.parametrize("transition", ["ddim", "renoise"])
def test_regression_targets_retrace_the_teacher_ode(transition):
    """Expert k's target x0* from the teacher's ODE states: with DDIM moves, the move from x_{t_k} with x0* lands on the
    teacher's x_{t_{k+1}} (so a student that meets every target is the teacher's ODE at K steps); with re-noising
    transitions every target is the teacher's final sample."""
    from fewstep.conditions import Condition
    from fewstep.sampling import ode_trajectory

    obj, teacher = _objective(steps=4, transition=transition)
    z = torch.randn(16, *teacher.sample_shape, generator=torch.Generator().manual_seed(2))
    path = ode_trajectory(teacher, z, Condition(class_labels=torch.arange(16) % 4), obj.times, 40)
    targets = obj.regression(path, None).x0
    assert len(targets) == 4 and torch.equal(targets[-1], path[-1])
    for k in range(3):
        if transition == "renoise":
            assert torch.equal(targets[k], path[-1])
        else:
            assert torch.allclose(obj._move(targets[k], path[k], k)[1], path[k + 1], atol=1e-4)
            assert not torch.allclose(targets[k], path[-1], atol=1e-2)  # not the endpoint: the landing point


def test_trajectory_regression_pulls_the_sampler_onto_the_teacher_ode(tmp_path):
    """reg_weight > 0: the ODE paths are cached at the student's grid and the term is logged; trained on it alone
    (dm_weight=0) the 2-step student maps the cached noise to the teacher's ODE samples (the noise -> sample pairing
    it started far from: the initial student is the teacher at 2 DDIM steps)."""
    from safetensors.torch import load_file

    from fewstep.api import load_run
    from fewstep.conditions import Condition

    m = _run(tmp_path, "reg", "teacher.path=gmm:uneq6", "student.steps=2", "train.max_steps=300", "train.log_every=1",
             "objective.critic_steps=1", "objective.dm_weight=0", "objective.reg_weight=1", "objective.reg_pairs=256",
             "objective.reg_ode_steps=20")
    d = load_file(str(tmp_path / "reg" / "regression_paths_2step.safetensors"))
    assert d["path.0"].shape == d["path.2"].shape == (256, 2) and "path.3" not in d
    assert any("student/loss_reg_mse" in h for h in m["history_tail"])
    z, y, cond = d["path.0"], d["path.2"], Condition(class_labels=d["cond.class_labels"])
    _, teacher, _, obj = load_run(str(tmp_path / "reg"))
    err = {}
    with torch.no_grad():
        err["init"] = float(((obj.sample(obj.student, z, cond) - y) ** 2).mean())
        trained = teacher.load_student(tmp_path / "reg" / teacher.student_folder, obj)
        err["trained"] = float(((obj.sample(trained, z, cond) - y) ** 2).mean())
    assert err["trained"] < 0.25 * err["init"], err


@pytest.mark.parametrize("transition", ["ddim", "renoise"])
def test_online_regression_targets_are_the_teacher_ode_from_the_given_state(transition):
    """reg_online's target from a state x_{t_k}: on the teacher's own ODE states it is reg_weight's cached target (the
    same ODE, the same steps); from any other state (here the teacher's state shifted) its move lands where the
    teacher's ODE from that state lands, and the last step's (and with re-noising every step's) is the ODE's sample."""
    from fewstep.conditions import Condition
    from fewstep.sampling import ode_segment, ode_trajectory

    obj, teacher = _objective(steps=4, transition=transition, reg_online=1.0, reg_ode_steps=40)
    assert obj.times[0] == 1.0  # ode_trajectory's step density is per unit time on this grid, as reg_online's
    cond = Condition(class_labels=torch.arange(16) % 4)
    z = torch.randn(16, *teacher.sample_shape, generator=torch.Generator().manual_seed(2))
    path = ode_trajectory(teacher, z, cond, obj.times, 40)
    cached = obj.regression(path, cond).x0
    for k in range(4):
        assert torch.allclose(obj.online_target(path[k], k, cond), cached[k], atol=1e-5), k
        x = path[k] + 0.3
        y = obj.online_target(x, k, cond)
        last = k == 3 or transition == "renoise"
        lo = 0.0 if last else obj.bounds[k + 1]
        landing = ode_segment(teacher, x, cond, obj.bounds[k], lo, round(40 * (obj.bounds[k] - lo)))
        got = y if last else obj._move(y, x, k)[1]
        assert torch.allclose(got, landing, atol=1e-4), k
        if not last:  # it lands off the teacher's own path: the shifted state's target, not the cached one
            assert not torch.allclose(got, path[k + 1], atol=1e-2), k


def test_online_regression_pulls_the_students_own_sampler_onto_the_teacher_ode(tmp_path):
    """Trained on reg_online alone (no DM term, no cached pairs), a 2-step student maps fresh noise to the teacher's
    ODE sample from that noise (it starts as the teacher at 2 DDIM steps, far from it); the term is logged; bad
    values and a 1-step dmd2 student are one-line errors."""
    from fewstep.api import load_run
    from fewstep.conditions import Condition
    from fewstep.objectives.dmd import DMD2, DMD2Config
    from fewstep.sampling import ode_sample

    m = _run(tmp_path, "online", "teacher.path=gmm:uneq6", "student.steps=2", "train.max_steps=300",
             "train.log_every=1", "objective.critic_steps=1", "objective.dm_weight=0", "objective.reg_online=1",
             "objective.reg_online_rows=32", "objective.reg_ode_steps=20")
    assert any("student/loss_reg_online_mse" in h for h in m["history_tail"])
    assert not (tmp_path / "online" / "regression_paths_2step.safetensors").exists()
    _, teacher, _, obj = load_run(str(tmp_path / "online"))
    z = torch.randn(256, *teacher.sample_shape, generator=torch.Generator().manual_seed(9))
    cond = Condition(class_labels=torch.arange(256) % 6)
    err = {}
    with torch.no_grad():
        y = ode_sample(teacher, z, cond, 20)
        err["init"] = float(((obj.sample(obj.student, z, cond) - y) ** 2).mean())
        trained = teacher.load_student(tmp_path / "online" / teacher.student_folder, obj)
        err["trained"] = float(((obj.sample(trained, z, cond) - y) ** 2).mean())
    assert err["trained"] < 0.25 * err["init"], err
    with pytest.raises(ValueError, match="objective.reg_online and reg_online_rows must be >= 0; got -1.0, 0"):
        _objective(reg_online=-1.0)
    with pytest.raises(ValueError, match=r"objective.reg_online=1.0 needs student.steps >= 2 with "
                                         r"backward_simulation=phased \(got 1 step\(s\), phased\)"):
        DMD2(DMD2Config(reg_online=1.0), teacher, 1)


@pytest.mark.parametrize("experts", ["shared", "separate"])
def test_regression_rows_cover_the_exits_the_network_serves(experts):
    """Phase 2 of 4: one shared network takes the regression term at every exit trained so far (its times 0..2: it
    holds the earlier exits too), separate experts only at their own (the earlier experts are frozen)."""
    from fewstep.conditions import Condition
    from fewstep.objectives.base import Batch
    from fewstep.sampling import ode_trajectory

    obj, teacher = _objective(steps=4, experts=experts, reg_weight=1.0)
    obj.set_max_steps(40)
    z = torch.randn(64, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = Condition(class_labels=torch.arange(64) % 4)
    path = ode_trajectory(teacher, z, cond, obj.times, 20)
    obj.reg = obj.regression(path, cond)
    seen = []
    hook = obj.student.register_forward_hook(lambda m, args, out: seen.append(args[1].tolist()))
    batch = Batch(size=256, cond=teacher.sample_conditions(256, torch.Generator().manual_seed(4)),
                  generator=torch.Generator().manual_seed(5), device=torch.device("cpu"))
    out = obj.loss("student", batch, 25, {"student": obj.student, "critic": obj.critic})
    hook.remove()
    assert obj.phase(25) == 2 and "loss_reg_mse" in out.logs
    reg_times = set(seen[-1][256:])  # the rows after the phase's own batch: the regression rows
    want = set(obj.times[:3]) if experts == "shared" else {obj.times[2]}
    assert reg_times == want, (reg_times, want)


def test_resume_under_a_changed_config_says_what_changed(tmp_path):
    """Resuming a run folder whose checkpoints were trained under another config names the changed keys (and not
    output_dir); an unchanged resume says nothing."""
    from fewstep.api import distill
    from fewstep.config import load_config

    def run(*extra):
        logs = []
        cfg = load_config("configs/gmm_phased_dmd.yaml", ["train.tracker=none", f"output_dir={tmp_path}/r",
                                                          "teacher.path=gmm:line4", "train.batch_size=16",
                                                          "student.steps=2", "train.max_steps=4", *extra])
        distill(cfg, log=logs.append)
        return [l for l in logs if "trained under another config" in l]

    assert run() == [] and run() == []
    (warn,) = run("objective.dm_times=above", "train.max_steps=6")
    assert "objective.dm_times phase -> above" in warn and "train.max_steps 4 -> 6" in warn
    assert "output_dir " not in warn.split(" (a new output_dir")[0]
