"""DMD2 / DMD on the built-in 8-mode mixture, judged against the exact teacher."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli_here


def _distill(tmp_path, *overrides):
    from fewstep.api import distill
    from fewstep.config import load_config

    cfg = load_config("configs/gmm_dmd2.yaml", ["train.tracker=none", f"output_dir={tmp_path}/run", *overrides])
    return distill(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """The config's own 1-step run (10k steps), trained once: judged against the teacher, then sampled by the CLI."""
    root = tmp_path_factory.mktemp("dmd2_1step")
    return _distill(root), root / "run"


def test_dmd2_one_step_matches_teacher_distribution(one_step):
    """One seed: every mode, most samples in a mode, energy distance within 3x the teacher ODE's.  The ratio varies
    with the seed (the config's cosine lr, seeds 0-5: 0.92-1.51; a constant lr left seed 0 at 6.18x on the current
    CI machine), so the 1.5x acceptance is asserted on the median of five seeds in
    test_dmd2_one_step_median_over_seeds (slow)."""
    m, _ = one_step
    ev = m["eval"]
    assert ev["student"]["modes_covered"] == 8
    assert ev["student"]["in_mode_frac"] > 0.9, m["table"]
    assert ev["student"]["energy_distance"] <= 3.0 * ev["teacher"]["energy_distance"], m["table"]
    assert 0.85 <= ev["student"]["spread"] <= 1.15, m["table"]  # not shrunk inside the modes
    assert ev["student"]["nfe"] == 1 and ev["teacher"]["nfe"] == 100
    assert os.path.isfile(m["plot"])


@pytest.mark.slow
def test_dmd2_one_step_median_over_seeds(tmp_path):
    """Acceptance: over seeds 0-4, the median 1-step energy distance is <= 1.5x the teacher ODE's, all modes."""
    import statistics

    ratios = []
    for seed in range(5):
        ev = _distill(tmp_path / str(seed), f"train.seed={seed}")["eval"]
        assert ev["student"]["modes_covered"] == 8
        ratios.append(ev["student"]["energy_distance"] / ev["teacher"]["energy_distance"])
    assert statistics.median(ratios) <= 1.5, ratios


def test_sample_command_is_deterministic(one_step, tmp_path):
    _, run = one_step
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.npy"
        r = subprocess.run([sys.executable, "-m", "fewstep", "sample", str(run), "--num-samples", "4000", "--seed", "3",
                            "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out)
    import numpy as np
    import torch

    a, b = np.load(outs[0]), np.load(outs[1])
    assert a.shape == (4000, 2) and np.array_equal(a, b)
    # classes are drawn by the mixture weights: every one of the 8 equal modes gets ~1/8 of the samples
    from fewstep.teachers.gmm import load_mixture

    mix = load_mixture("ring8")
    near = torch.cdist(torch.as_tensor(a).double(), mix.means).argmin(1)
    frac = torch.bincount(near, minlength=8).double() / len(a)
    assert (frac - 0.125).abs().max() < 0.03
    r = run_cli_here("sample", run, "--class", "2", "--num-samples", "500", "--out", tmp_path / "c2.npy")
    assert r.returncode == 0, r.stderr[-2000:]
    c2 = torch.as_tensor(np.load(tmp_path / "c2.npy")).double()
    assert (torch.cdist(c2, mix.means).argmin(1) == 2).float().mean() > 0.95


def test_dmd_regression_pairs_are_cached(tmp_path):
    m = _distill(tmp_path, "objective.name=dmd", "objective.critic_steps=1", "objective.reg_pairs=256", "objective.reg_ode_steps=20",
                 "train.max_steps=20")
    pairs = tmp_path / "run" / "regression_pairs.safetensors"
    assert pairs.is_file()
    from safetensors.torch import load_file
    import torch

    from fewstep.sampling import ode_sample
    from fewstep.teachers.gmm import GMMTeacher, load_mixture
    from fewstep.conditions import Condition

    d = load_file(str(pairs))
    assert d["path.0"].shape == (256, 2) and d["path.1"].shape == (256, 2) and "path.2" not in d
    teacher = GMMTeacher(load_mixture("ring8"))
    y = ode_sample(teacher, d["path.0"][:8], Condition(class_labels=d["cond.class_labels"][:8]), 20)
    assert torch.allclose(y, d["path.1"][:8], atol=1e-5)
    assert any("loss_reg_mse" in h for h in [json.dumps(x) for x in m["history_tail"]])


@pytest.mark.slow  # 1500 DDP steps; the fast suite covers torchrun through tests/test_faults.py (12 DDP steps, exact rerun)
def test_two_processes_torchrun(tmp_path):
    """torchrun --nproc_per_node 2 trains the same config (DDP over gloo) and reaches the same quality band."""
    run = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "fewstep",
                        "distill", "configs/gmm_dmd2.yaml", "train.max_steps=1500", "train.batch_size=128",
                        "train.tracker=none", f"output_dir={run}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["num_processes"] == 2
    assert m["eval"]["student"]["modes_covered"] == 8
    assert m["eval"]["student"]["in_mode_frac"] > 0.9


def _objective(steps=2, mixture="uneq6", **kw):
    from fewstep.objectives.dmd import DMD2, DMD2Config
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    return DMD2(DMD2Config(**kw), GMMTeacher(load_mixture(mixture)), steps)


def _batch(n, seed, labels):
    import torch

    from fewstep.conditions import Condition
    from fewstep.objectives.base import Batch

    return Batch(size=n, cond=Condition(class_labels=labels), generator=torch.Generator().manual_seed(seed),
                 device=torch.device("cpu"))


def test_per_exit_critic_sees_only_its_exit():
    """Default multi-step rule: one critic per exit; critic k is trained, and gives the DM gradient, on exit k only."""
    import torch

    from fewstep.objectives.dmd import ExitCritics

    obj = _objective(steps=2, backward_simulation="per_exit")
    assert obj.config.backward_simulation == "per_exit"
    assert isinstance(obj.critic, ExitCritics) and obj.critic.num_exits == 2
    n, labels = 6, torch.arange(6)  # uneq6: one sample per class, so the labels name the samples
    seen = {0: [], 1: []}

    def record(k):
        return lambda m, args, out: seen[k].append((args[0].clone(), args[2].class_labels.clone()))

    hooks = [c.denoiser.register_forward_hook(record(k)) for k, c in enumerate(obj.critic.critics)]
    nets = {"student": obj.student, "critic": obj.critic}
    for seed in (0, 1):
        # critic step: critic k trains on exit k's x0 for the whole batch, re-noised; rebuilt here from the same seed
        b = _batch(n, seed, labels)
        fake, exits, _ = obj._all_exits(obj.student, b, b.cond)
        x_t, _, _ = obj._noised(fake, b, obj.config.critic_t_min, 1.0)
        assert torch.equal(exits, torch.tensor([0] * n + [1] * n))
        for k in seen:
            seen[k].clear()
        obj.critic.zero_grad(set_to_none=True)
        obj.loss("critic", _batch(n, seed, labels), 0, nets).loss.backward()
        for k, c in enumerate(obj.critic.critics):
            (xk, lk), = seen[k]
            assert torch.equal(lk, labels) and torch.allclose(xk, x_t[exits == k]), k
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in c.parameters())
        # student step: exits stratified over the batch; the DM gradient at exit k comes from critic k
        b = _batch(n, seed, labels)
        _, t_in, exits = obj._backward_simulation(obj.student, b, b.cond)
        assert sorted(torch.bincount(exits, minlength=2).tolist()) == [3, 3]
        assert torch.equal(t_in, torch.tensor(obj.times)[exits])
        for k in seen:
            seen[k].clear()
        obj.loss("student", _batch(n, seed, labels), 0, nets)
        for k in (0, 1):
            assert sorted(torch.cat([lab for _, lab in seen[k]]).tolist()) == sorted(labels[exits == k].tolist()), k
    for h in hooks:
        h.remove()


def test_exit_critics_route_each_sample():
    import torch

    obj = _objective(steps=4, gan_weight=0.01, backward_simulation="per_exit")
    crit = obj.critic
    with torch.no_grad():  # make the four critics differ
        for k, c in enumerate(crit.critics):
            c.denoiser.net.residual.out.bias.fill_(float(k))
    x, t = torch.randn(8, 2), torch.rand(8)
    cond = _batch(8, 0, torch.arange(8) % 6).cond
    exits = torch.tensor([3, 0, 1, 2, 2, 1, 0, 3])
    x0, logits = crit(x, t, cond, with_logits=True, exit=exits)
    for i in range(8):
        ref_x0, ref_logits = crit.critics[int(exits[i])](x[i:i + 1], t[i:i + 1], cond[i:i + 1], with_logits=True)
        assert torch.allclose(x0[i], ref_x0[0], atol=1e-6) and torch.allclose(logits[i], ref_logits[0], atol=1e-6)
    with pytest.raises(ValueError, match="exit"):
        crit(x, t, cond)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        crit(x, t, cond, exit=torch.full((8,), 4))


def test_backward_simulation_values():
    """dmd2 (alias random): one shared critic, the published recipe; bad values: a one-line error naming the choices."""
    import torch

    from fewstep.api import build
    from fewstep.config import ConfigError, load_config
    from fewstep.objectives.dmd import Critic

    a, b = _objective(backward_simulation="dmd2"), _objective(backward_simulation="random")
    assert type(a.critic) is Critic and type(b.critic) is Critic
    labels = torch.arange(6)
    for seed in range(4):
        xa, ta, ea = a._backward_simulation(a.student, _batch(6, seed, labels), _batch(6, seed, labels).cond)
        xb, tb, eb = b._backward_simulation(b.student, _batch(6, seed, labels), _batch(6, seed, labels).cond)
        assert torch.equal(xa, xb) and torch.equal(ta, tb) and len(set(ea.tolist())) == 1
    assert type(_objective(steps=1).critic) is Critic  # one exit: plain DMD2 whatever the rule
    assert type(_objective(backward_simulation="last").critic) is Critic
    cfg = load_config("configs/gmm_dmd2.yaml", ["objective.backward_simulation=bogus", "student.steps=2"])
    with pytest.raises(ConfigError) as e:
        build(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "'bogus'" in msg
    assert all(v in msg for v in ("phased", "per_exit", "dmd2", "random", "last"))
    from fewstep.objectives.phased_dmd import PhasedStudent

    ph = _objective(steps=4)  # the default: exits one after another on one shared network
    assert ph.phased is not None and isinstance(ph.student, PhasedStudent) and ph.student.num_experts == 1
    assert ph.phased.config.transition == "renoise" and ph.phased.config.dm_times == "phase"
    assert ph.export_spec()["scheduler"] == "LCMScheduler"
    reg = _objective(steps=2, reg_weight=0.25)  # DMD's regression, per exit on the teacher's ODE states (phased_dmd)
    assert reg.phased.config.reg_weight == 0.25 and reg.phased.config.transition == "renoise"
    assert _objective(steps=2, dm_times="above").phased.config.dm_times == "above"
    with pytest.raises(ValueError, match="objective.dm_times must be 'above' or 'phase', got 'all'"):
        _objective(steps=2, dm_times="all")


def test_dmd2_phased_transition_ddim():
    """objective.transition=ddim: dmd2's exits move by deterministic DDIM steps on the grid (phased_dmd's sampler on one
    shared network), exported on a stock DDIMScheduler; with a re-noising rule it is a one-line error."""
    import torch

    from fewstep.conditions import Condition

    d = _objective(steps=4, transition="ddim")
    assert d.phased.config.transition == "ddim" and d.student.num_experts == 1
    spec = d.export_spec()
    assert spec["scheduler"] == "DDIMScheduler" and spec["scheduler_config"]["timestep_spacing"] == "trailing"
    cond = Condition(class_labels=torch.arange(6))
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the sampler by hand: x0 at t_k, a DDIM move to t_{k+1}, no fresh noise
        x, grid = noise, [*d.phased.times, 0.0]
        for k in range(4):
            t = torch.full((6,), grid[k])
            x0 = d.student(x, t, cond)
            x = d.teacher.schedule.ddim_step(x0, x, t, torch.full((6,), grid[k + 1])) if k < 3 else x0
        out = d.sample(d.student, noise, cond, generator=torch.Generator().manual_seed(1))
        again = d.sample(d.student, noise, cond, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, x, atol=1e-6) and torch.equal(out, again)  # deterministic: the generator is unused
    r = _objective(steps=4)  # the default re-noises: another generator, another sample
    with torch.no_grad():
        assert not torch.allclose(r.sample(r.student, noise, cond, generator=torch.Generator().manual_seed(1)),
                                  r.sample(r.student, noise, cond, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="objective.transition=ddim needs backward_simulation=phased; "
                                         "backward_simulation=dmd2 re-noises between exits"):
        _objective(steps=4, transition="ddim", backward_simulation="dmd2")
    with pytest.raises(ValueError, match="objective.transition must be 'renoise' or 'ddim', got 'euler'"):
        _objective(steps=4, transition="euler")
    assert _objective(steps=1, transition="ddim").phased is None  # one exit: nothing to move between
    from diffusers import DDPMScheduler

    from fewstep.objectives.dmd import DMD2, DMD2Config
    from fewstep.schedules import VPDiscrete
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    teacher = GMMTeacher(load_mixture("uneq6"))
    teacher.schedule = VPDiscrete(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)  # a 1000-step teacher's grid
    with pytest.raises(ValueError, match=r"objective.transition=ddim on a 1000-step teacher needs student.steps "
                                         r"dividing 1000 .* or objective.transition=renoise \(any K\); got 3"):
        DMD2(DMD2Config(transition="ddim"), teacher, 3)
    assert DMD2(DMD2Config(), teacher, 3).export_spec()["scheduler"] == "LCMScheduler"  # renoise: any K


PER_EXIT_GAN = ["student.steps=2", "objective.backward_simulation=per_exit", "train.batch_size=64", "objective.gan_weight=0.01", "objective.critic_steps=2",
                "train.log_every=1", "train.checkpoint_every=4"]


def test_per_exit_gan_run(tmp_path):
    """2-step per-exit critics with the GAN head: both groups train, and the critic group is one module whose checkpoint
    holds every exit's critic and head."""
    import numpy as np
    from safetensors.torch import load_file

    m = _distill(tmp_path, *PER_EXIT_GAN, "train.max_steps=8")
    keys = set().union(*[h.keys() for h in m["history_tail"]])
    assert {"critic/loss_gan_d", "student/loss_gan_g", "student/loss_dm"} <= keys
    assert all(np.isfinite(v) for h in m["history_tail"] for v in h.values() if isinstance(v, float))
    ck = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-0000008" / "model_1.safetensors"))
    assert {k.split(".")[1] for k in ck if k.startswith("critics.")} == {"0", "1"}
    assert {k.split(".")[1] for k in ck if ".head." in k} == {"0", "1"}


@pytest.mark.slow
def test_per_exit_gan_exact_resume(tmp_path):
    """Per-exit critics + GAN: 4 steps, then resume to 8, equals 8 steps straight."""
    import torch
    from safetensors.torch import load_file

    _distill(tmp_path / "a", *PER_EXIT_GAN, "train.max_steps=8")
    _distill(tmp_path / "b", *PER_EXIT_GAN, "train.max_steps=4")
    _distill(tmp_path / "b", *PER_EXIT_GAN, "train.max_steps=8")  # resumes from checkpoint 4
    sa = load_file(str(tmp_path / "a" / "run" / "student" / "student.safetensors"))
    sb = load_file(str(tmp_path / "b" / "run" / "student" / "student.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("mixture", ["uneq6", "skew3", "ring8"])
@pytest.mark.parametrize("steps", [2, 4])
def test_dmd2_multistep_default_matches_teacher(tmp_path, mixture, steps):
    """Default multi-step DMD2 (phased exits) on mixtures with unequal weights and stds, 10k steps, EMA 0.98: all
    modes, energy <= 1.5x the teacher ODE's, within-mode spread 0.9-1.1."""
    m = _distill(tmp_path, f"teacher.path=gmm:{mixture}", f"student.steps={steps}", "train.ema_decay=0.98")
    ev = m["eval"]
    assert ev["student"]["modes_covered"] == ev["student"]["num_modes"], m["table"]
    assert ev["student"]["energy_distance"] <= 1.5 * ev["teacher"]["energy_distance"], m["table"]
    assert 0.9 <= ev["student"]["spread"] <= 1.1, m["table"]


@pytest.mark.slow
def test_dmd2_recipe_two_step_exits_compensate(tmp_path):
    """The published rule (random exit, one shared critic) on uneq6: the exits settle off the data (shifted in
    opposite directions, each too narrow), energy far above the teacher ODE's (9.2x at 5k steps, seed 0)."""
    m = _distill(tmp_path, "teacher.path=gmm:uneq6", "student.steps=2", "objective.backward_simulation=dmd2",
                 "train.max_steps=5000")
    assert m["eval"]["student"]["energy_distance"] > 3 * m["eval"]["teacher"]["energy_distance"], m["table"]


@pytest.mark.slow
def test_ttur_critic_steps_matter(tmp_path):
    """critic_steps=5 (TTUR) ends closer to the mixture than critic_steps=1 on the same number of steps."""
    five = _distill(tmp_path / "five")
    one = _distill(tmp_path / "one", "objective.critic_steps=1")
    assert five["eval"]["student"]["energy_distance"] < one["eval"]["student"]["energy_distance"]


def test_phased_exits_take_the_regression_term_beside_the_anchor(tmp_path):
    """dmd2 at 2 steps (exits one after another on one network) with the anchor and DMD's regression term: the anchor's
    rows and the regression rows ride in one forward; the anchor is zero at the first step of exit 1 (its snapshot is
    the network right then, so reading the regression rows in its place would show), and both terms are logged."""
    m = _distill(tmp_path, "student.steps=2", "objective.phase_steps=3", "train.max_steps=5", "objective.critic_steps=1",
                 "train.log_every=1", "objective.anchor_weight=0.1", "objective.reg_weight=1", "objective.reg_pairs=64",
                 "objective.reg_ode_steps=10", "train.batch_size=32")
    hist = {h["step"]: h for h in m["history_tail"]}
    assert hist[4]["student/loss_anchor"] < 1e-10 < hist[5]["student/loss_anchor"], hist
    assert all(hist[s]["student/loss_reg_mse"] > 0 for s in (3, 4, 5)), hist
    assert (tmp_path / "run" / "regression_paths_2step.safetensors").is_file()
