"""What a training step costs: one student rollout per DMD2 step, no unused conditions, a fused/foreach AdamW
(recorded), log values read back once per interval, real data prepared before the loop, and a light CLI start
(``fewstep --help`` / ``distill --dry-run`` without torch; no ``torch._dynamo`` before the first step).

Fast: tiny GMM runs in-process, two short subprocesses."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def _trainer(tmp_path, config="configs/gmm_dmd2.yaml", overrides=()):
    from fewstep.api import build
    from fewstep.config import load_config
    from fewstep.trainer import Trainer

    cfg = load_config(config, ["train.batch_size=16", "train.tracker=none", "train.progress=none",
                               "train.max_steps=4", "train.log_every=2", f"output_dir={tmp_path / 'run'}",
                               *overrides])
    teacher, data, objective = build(cfg)
    return Trainer(cfg, teacher, objective, data, tmp_path / "run", log=lambda *a: None)


def _count_calls(denoiser, counts: dict, name: str):
    """Wrap ``denoiser.net_call``: counts[name] gets one (grad-enabled?) entry per network pass."""
    orig = denoiser.net_call

    def net_call(x_t, t, cond):
        counts.setdefault(name, []).append(torch.is_grad_enabled())
        return orig(x_t, t, cond)

    denoiser.net_call = net_call


def test_optimizer_is_fused_or_foreach_and_recorded(tmp_path):
    """One AdamW per group, fused (or foreach where fused does not run), logged and returned by fit (-> metrics.json)."""
    tr = _trainer(tmp_path, overrides=["train.max_steps=1"])
    lines = []
    tr.log = lambda *a: lines.append(" ".join(map(str, a)))
    fit = tr.fit()
    impl = fit["optimizer"]["impl"]
    assert set(impl) == {"student", "critic"} and set(impl.values()) <= {"fused", "foreach"}, impl
    for group, opt in tr.optims.items():
        flags = getattr(opt, "optimizer", opt).param_groups[0]
        assert bool(flags.get("fused")) == (impl[group] == "fused") and bool(flags.get("foreach")) == (impl[group] == "foreach")
    assert any(line.startswith("optimizer: AdamW") for line in lines), lines


def test_optimizer_choice_survives_a_checkpoint_with_other_flags():
    """A checkpoint written by the per-parameter AdamW (older runs) resumes into the chosen implementation."""
    from fewstep.optim import apply_impl, choose_impl, make_adamw

    p = torch.nn.Parameter(torch.randn(5, 3))
    old = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    old.step()
    impl = choose_impl([p])
    assert impl in ("fused", "foreach")
    opt, got = make_adamw([p], lr=1e-3)
    assert got == impl
    opt.load_state_dict(old.state_dict())
    assert not opt.param_groups[0].get("fused") and not opt.param_groups[0].get("foreach")  # the saved flags
    apply_impl(opt, impl)
    assert bool(opt.param_groups[0].get("fused")) == (impl == "fused")
    assert bool(opt.param_groups[0].get("foreach")) == (impl == "foreach")
    opt.step()  # the resumed state steps under the chosen kernel
    assert float(opt.state[p]["step"]) == 2.0


@pytest.mark.parametrize("config, overrides", [
    ("configs/gmm_dmd2.yaml", ["objective.critic_steps=2"]),
    ("configs/gmm_phased_dmd.yaml", ["student.steps=2", "objective.critic_steps=2", "objective.phase_steps=100"]),
])
def test_dmd2_one_student_rollout_per_step(tmp_path, config, overrides):
    """Both groups update: one student pass (with grad), the critic trains on its detached output.  Critic only:
    one student pass, without grad."""
    tr = _trainer(tmp_path, config, overrides)
    counts: dict = {}
    for d in [m for m in tr.plain["student"].modules() if hasattr(m, "net_call")]:
        _count_calls(d, counts, "student")
    _count_calls(tr.teacher.denoiser, counts, "teacher")
    for step in range(4):
        counts.clear()
        tr.step = step
        logs = tr.train_step()
        if step % 2 == 0:  # student and critic
            assert counts["student"] == [True], (step, counts)
            assert "student/loss" in logs and "critic/loss" in logs
        else:  # critic only (TTUR): the rollout runs without gradients
            assert counts["student"] == [False], (step, counts)
        # losses and norms stay tensors: fit reads them back at logging steps only
        assert all(torch.is_tensor(v) for k, v in logs.items() if "loss" in k or "norm" in k), logs


def test_critic_gets_no_conditions_when_it_reuses_the_student_samples(tmp_path):
    tr = _trainer(tmp_path, overrides=["objective.critic_steps=2"])
    calls = []
    orig = tr.teacher.sample_conditions
    tr.teacher.sample_conditions = lambda *a, **k: calls.append(1) or orig(*a, **k)
    tr.step = 0
    tr.train_step()
    assert len(calls) == 1  # the student's batch only
    calls.clear()
    tr.step = 1
    tr.train_step()
    assert len(calls) == 1  # critic only: it rolls the student out on its own conditions


def test_consistency_samples_no_conditions(tmp_path):
    tr = _trainer(tmp_path, "configs/gmm_consistency.yaml")
    calls = []
    tr.teacher.sample_conditions = lambda *a, **k: calls.append(1)
    for step in range(2):
        tr.step = step
        tr.train_step()
    assert calls == []


def test_real_samples_are_prepared_before_the_first_step(tmp_path):
    tr = _trainer(tmp_path, "configs/gmm_consistency.yaml", ["train.max_steps=2"])
    events = []
    tr.teacher.prepare_real_samples = lambda data, bar=False, log=None: events.append("prepare")
    step = tr.train_step
    tr.train_step = lambda: events.append("step") or step()
    tr.fit()
    assert events == ["prepare", "step", "step"]
    assert tr.history and all(isinstance(v, float) for row in tr.history for k, v in row.items() if k != "step")


def _probe(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_and_dry_run_do_not_import_torch():
    got = _probe(
        "import contextlib, io, json, sys\n"
        "from fewstep.cli import main\n"
        "out = {}\n"
        "for argv in (['--help'], ['distill', 'configs/gmm_dmd2.yaml', '--dry-run']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    out[argv[0]] = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print(json.dumps(out))\n")
    assert got == {"--help": [], "distill": []}, got


def test_first_gmm_step_does_not_import_dynamo(tmp_path):
    """torch._dynamo (1-2 s to import) stays out of a GMM run up to and including its first optimizer step."""
    got = _probe(
        "import json, sys\n"
        "from fewstep.api import build\n"
        "from fewstep.config import load_config\n"
        "from fewstep.trainer import Trainer\n"
        f"cfg = load_config('configs/gmm_dmd2.yaml', ['train.batch_size=8', 'train.tracker=none', "
        f"'train.ema_decay=0.9', 'output_dir={tmp_path / 'run'}'])\n"
        "teacher, data, objective = build(cfg)\n"
        f"tr = Trainer(cfg, teacher, objective, data, {str(tmp_path / 'run')!r}, log=lambda *a: None)\n"
        "tr.train_step()\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch._dynamo', 'diffusers')}))\n")
    assert got == {"torch._dynamo": False, "diffusers": False}, got
