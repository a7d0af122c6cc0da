"""Multi-step dmd2 (``backward_simulation=phased``: one shared network): the options objective.student_opt_reset
(the student's optimizer state restarts with each exit's phase) and objective.anchor_weight (earlier exits anchored)."""
import torch

from conftest import ROOT


def _dmd2(steps=4, **cfg):
    from fewstep.objectives.dmd import DMD2, DMD2Config
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    teacher = GMMTeacher(load_mixture("line4"), "vp")
    return DMD2(DMD2Config(**cfg), teacher, steps), teacher


def test_phase_start_resets_the_shared_students_optimizer():
    from fewstep.objectives.phased_dmd import PhasedDMD, PhasedDMDConfig
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    obj, _ = _dmd2(phase_steps=10, student_opt_reset=True)
    assert obj.reset_groups(0) == [] and obj.reset_groups(5) == []
    assert obj.reset_groups(10) == ["critic", "student"] and obj.reset_groups(30) == ["critic", "student"]
    assert _dmd2(phase_steps=10)[0].reset_groups(10) == ["critic", "student"]  # dmd2's default
    assert _dmd2(phase_steps=10, student_opt_reset=False)[0].reset_groups(10) == ["critic"]
    teacher = GMMTeacher(load_mixture("line4"), "vp")
    sep = PhasedDMD(PhasedDMDConfig(phase_steps=10), teacher, 2)
    shared = PhasedDMD(PhasedDMDConfig(phase_steps=10, experts="shared"), teacher, 2)  # null: on for shared
    assert sep.reset_groups(10) == ["critic"] and shared.reset_groups(10) == ["critic", "student"]
    assert PhasedDMD(PhasedDMDConfig(phase_steps=10, experts="shared", student_opt_reset=False), teacher,
                     2).reset_groups(10) == ["critic"]


def test_anchor_is_zero_at_the_snapshot_and_grows_after_an_update():
    from fewstep.conditions import Condition
    from fewstep.objectives.base import Batch

    obj, teacher = _dmd2(phase_steps=10, anchor_weight=1.0)
    ph = obj.phased
    student = ph.student
    g = torch.Generator().manual_seed(0)
    n = 64
    batch = Batch(n, teacher.sample_conditions(n, g), g, torch.device("cpu"))
    ph.anchor.phases_seen.update({0, 1, 2})
    states = []
    ph._phase_input(student, batch, 3, states)
    assert len(states) == 3
    ph.anchor.take(student, 3)
    xa, ta, ca = ph.anchor.inputs(states, batch.cond)
    assert sorted(set(ta.tolist())) == [0.5, 0.75, 1.0]
    loss = ph.anchor.loss(student(xa, ta, ca), student, xa, ta, ca)
    assert float(loss.detach()) == 0.0  # right after the snapshot the network is the snapshot
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = student(xa, ta, ca)
    loss = ph.anchor.loss(out, student, xa, ta, ca)
    assert float(loss) > 1e-6
    loss.backward()  # the gradient reaches the trainable weights (the snapshot is a constant)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)
    assert isinstance(ca, Condition) and len(xa) == 3 * n


def test_anchored_run_resumes_mid_phase_exactly(tmp_path):
    """6 steps straight == 3 + resume, with the anchor on (its snapshot is read back from the run folder)."""
    from safetensors.torch import load_file

    from fewstep.api import distill
    from fewstep.config import load_config

    def run(name, *over):
        cfg = load_config(str(ROOT / "configs" / "gmm_dmd2.yaml"), [
            "train.tracker=none", f"output_dir={tmp_path}/{name}", "teacher.path=gmm:line4", "train.batch_size=32",
            "student.steps=2", "objective.phase_steps=2", "objective.critic_steps=1", "objective.anchor_weight=1",
            *over])
        return distill(cfg, log=lambda *a: None)

    run("straight", "train.max_steps=6", "train.checkpoint_every=3")
    run("resumed", "train.max_steps=3", "train.checkpoint_every=3")
    assert (tmp_path / "resumed" / "anchor" / "phase1.safetensors").is_file()
    run("resumed", "train.max_steps=6", "train.checkpoint_every=3")
    sa = load_file(str(tmp_path / "straight" / "student" / "student.safetensors"))
    sb = load_file(str(tmp_path / "resumed" / "student" / "student.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_reset_warmup_ramps_the_students_lr_after_each_phase_start(tmp_path):
    """objective.reset_warmup_steps: after a phase start that cleared the student's Adam state, its lr ramps from
    lr / W to lr over W steps; the critic's is untouched, and nothing ramps without the reset or in phase 0."""
    from fewstep.api import build
    from fewstep.config import load_config
    from fewstep.trainer import Trainer

    obj, _ = _dmd2(phase_steps=10, student_opt_reset=True, reset_warmup_steps=4)
    assert [obj.lr_factor("student", s) for s in range(10)] == [1.0] * 10
    assert [obj.lr_factor("student", s) for s in range(10, 15)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [obj.lr_factor("student", s) for s in (30, 31)] == [0.25, 0.5]
    assert obj.lr_factor("critic", 10) == 1.0
    assert _dmd2(phase_steps=10, student_opt_reset=False, reset_warmup_steps=4)[0].lr_factor("student", 10) == 1.0
    default, teacher = _dmd2(phase_steps=10)  # null: a fifth of the phase
    assert [default.lr_factor("student", s) for s in (10, 11, 12)] == [0.5, 1.0, 1.0]
    from fewstep.objectives.phased_dmd import PhasedDMD, PhasedDMDConfig

    sep = PhasedDMD(PhasedDMDConfig(phase_steps=10), teacher, 2)  # a new expert's state is fresh: it ramps too
    assert sep.reset_groups(10) == ["critic"] and [sep.lr_factor("student", s) for s in (9, 10, 11)] == [1.0, 0.5, 1.0]
    off = PhasedDMD(PhasedDMDConfig(phase_steps=10, reset_warmup_steps=0), teacher, 2)
    assert off.lr_factor("student", 10) == 1.0
    cfg = load_config(str(ROOT / "configs" / "gmm_dmd2.yaml"), [
        "train.tracker=none", f"output_dir={tmp_path}", "teacher.path=gmm:line4", "train.batch_size=16",
        "student.steps=2", "objective.phase_steps=2", "objective.critic_steps=1", "objective.student_opt_reset=true",
        "objective.reset_warmup_steps=4", "train.max_steps=4", "train.progress=none", "objective.lr_decay=constant"])
    teacher, data, o = build(cfg)
    tr = Trainer(cfg, teacher, o, data, tmp_path, log=lambda *a: None)
    lrs = []
    for step in range(4):
        tr.step = step
        logs = tr.train_step()
        lrs.append(float(logs["student/lr"]))
        assert tr._raw_opts["student"].param_groups[0]["lr"] == cfg.train.lr  # the factor is for that update only
        assert float(logs["critic/lr"]) == cfg.train.lr
    assert lrs == [cfg.train.lr, cfg.train.lr, cfg.train.lr / 4, cfg.train.lr / 2]
    tr.end()


def test_lr_decay_cosine_over_the_run_and_within_each_phase(tmp_path):
    """objective.lr_decay=cosine: a 1-step student's (and critic's) lr falls as a half cosine from train.lr to
    lr_decay_min x train.lr over train.max_steps; phased exits restart the cosine at each phase, times the reset ramp;
    constant (default) leaves it at 1.  Through the trainer the update's lr is the factor's, for that update only."""
    import math

    import pytest

    from fewstep.api import build
    from fewstep.config import load_config
    from fewstep.trainer import Trainer

    one, _ = _dmd2(steps=1, lr_decay="cosine", lr_decay_min=0.1)
    one.set_max_steps(100)
    assert one.lr_factor("student", 0) == 1.0 and one.lr_factor("critic", 0) == 1.0
    assert one.lr_factor("critic", 50) == pytest.approx(0.55)
    assert one.lr_factor("student", 100) == pytest.approx(0.1) and one.lr_factor("student", 150) == pytest.approx(0.1)
    assert one.lr_factor("student", 25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    plain, _ = _dmd2(steps=1)
    plain.set_max_steps(100)
    assert {plain.lr_factor(g, s) for g in ("student", "critic") for s in (0, 50, 99)} == {1.0}
    ph, _ = _dmd2(steps=2, phase_steps=10, lr_decay="cosine", lr_decay_min=0.0, reset_warmup_steps=4)
    assert ph.lr_factor("critic", 5) == pytest.approx(0.5) and ph.lr_factor("critic", 15) == pytest.approx(0.5)
    assert ph.lr_factor("student", 10) == pytest.approx(0.25)  # phase 1's first step: ramp 1/4 x cosine 1
    assert ph.lr_factor("student", 15) == pytest.approx(0.5)  # ramp done, half-way down the cosine
    for bad, msg in (({"lr_decay": "linear"}, "objective.lr_decay must be one of constant, cosine; got 'linear'"),
                     ({"lr_decay_min": 2.0}, "objective.lr_decay_min must lie in [0, 1]")):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            _dmd2(steps=1, **bad)
    cfg = load_config(str(ROOT / "configs" / "gmm_dmd2.yaml"), [
        "train.tracker=none", f"output_dir={tmp_path}", "teacher.path=gmm:line4", "train.batch_size=16",
        "objective.critic_steps=1", "objective.lr_decay=cosine", "objective.lr_decay_min=0.2", "train.max_steps=4",
        "train.progress=none"])
    teacher, data, o = build(cfg)
    tr = Trainer(cfg, teacher, o, data, tmp_path, log=lambda *a: None)
    for step in range(4):
        tr.step = step
        logs = tr.train_step()
        want = cfg.train.lr * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * step / 4)))
        assert float(logs["student/lr"]) == pytest.approx(want) and float(logs["critic/lr"]) == pytest.approx(want)
        assert tr._raw_opts["critic"].param_groups[0]["lr"] == cfg.train.lr
    tr.end()
