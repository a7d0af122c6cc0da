"""Class-conditional pipeline, digits data/classifier plumbing, DMD2 export round trip, compare; the slow benchmark."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random digits-shaped teacher (1x16x16, 10 classes + null, v-prediction, DDIM trailing), small widths."""
    from fewstep.eval.digits import TeacherConfig, build_unet, teacher_schedulers
    from pipelines.class_conditional import ClassConditionalPipeline

    cfg = TeacherConfig(block_out_channels=(16, 32))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("digits") / "teacher"
    ClassConditionalPipeline(unet=build_unet(cfg).eval(), scheduler=teacher_schedulers(cfg)[1]).save_pretrained(str(path))
    (path / "fewstep.json").write_text(json.dumps({"num_inference_steps": 50, "guidance_scale": 1.0}))
    return str(path)


def test_class_conditional_pipeline(tiny_teacher):
    from pipelines import load_pipeline
    from pipelines.class_conditional import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(tiny_teacher)
    pipe.set_progress_bar_config(disable=True)
    assert type(load_pipeline(tiny_teacher)) is ClassConditionalPipeline and pipe.num_classes == 10
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    a = pipe(class_labels=[3, 7, -1], num_inference_steps=3, generator=gens(), output_type="np").images
    assert a.shape == (3, 16, 16, 1) and a.min() >= 0 and a.max() <= 1
    b = pipe(class_labels=[3, 7, -1], num_inference_steps=3, generator=gens(), output_type="np", guidance_scale=3).images
    assert abs(a[2] - b[2]).max() < 1e-5  # the null class is unaffected by guidance
    assert abs(a[0] - b[0]).max() > 1e-4  # a real class is guided
    # CFG by hand on one denoising step: uncond + s * (cond - uncond) in the prediction space
    unet = pipe.unet
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        c = unet(x, 999, class_labels=torch.tensor([3])).sample
        u = unet(x, 999, class_labels=torch.tensor([10])).sample
    assert not torch.allclose(c, u)
    assert len(pipe(batch_size=12, num_inference_steps=1).images) == 12  # balanced labels when none are given
    with pytest.raises(ValueError, match="class labels must be in 0..9"):
        pipe(class_labels=[10], num_inference_steps=1)


def test_custom_pipeline_loads_without_fewstep(tiny_teacher, tmp_path):
    """The folder carries class_conditional.py: stock diffusers loads it with trust_remote_code."""
    code = ("import sys; from diffusers import DiffusionPipeline\n"
            "p = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline='class_conditional', trust_remote_code=True)\n"
            "p.set_progress_bar_config(disable=True)\n"
            "print(type(p).__name__, p(class_labels=[1, 2], num_inference_steps=2, output_type='np').images.shape)")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, tiny_teacher], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=300)  # cwd outside the repo: fewstep's pipelines/ not importable
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "ClassConditionalPipeline" and "(2, 16, 16, 1)" in r.stdout


def test_digits_data_and_classifier_file(tmp_path):
    from fewstep.eval.digits import DigitsCNN, load_digits_uint8, train_test_split_idx
    from fewstep.eval.features import load_feature_extractor, save_feature_net

    x, y = load_digits_uint8()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.uint8 and int(x.max()) == 255
    tr, te = train_test_split_idx(y)
    assert len(set(tr.tolist()) & set(te.tolist())) == 0 and len(tr) + len(te) == 1797
    assert torch.equal(train_test_split_idx(y)[1], te)  # deterministic
    torch.manual_seed(0)
    save_feature_net(DigitsCNN(), tmp_path / "c.safetensors", "digits_cnn", {}, input_size=16, in_channels=1,
                     num_classes=10)
    ext = load_feature_extractor(str(tmp_path / "c.safetensors"))
    assert ext(x[:4].repeat(1, 3, 1, 1)).shape == (4, 64) and ext.num_classes == 10


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_teacher_noising_is_the_schedule_and_matches_diffusers(prediction_type):
    """The digits teacher trains on fewstep's VPDiscrete (the schedule every objective uses), which agrees
    with diffusers' DDPMScheduler at every integer timestep, ends included."""
    from fewstep.eval.digits import TeacherConfig, noised_and_target, teacher_schedule, teacher_schedulers

    train, _ = teacher_schedulers(TeacherConfig(prediction_type=prediction_type))
    sched = teacher_schedule(train.config)
    ts = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (30,))])
    x0, eps = torch.randn(len(ts), 1, 4, 4), torch.randn(len(ts), 1, 4, 4)
    xt, target = noised_and_target(sched, "v" if prediction_type == "v_prediction" else "eps", x0, eps, ts)
    torch.testing.assert_close(xt, train.add_noise(x0, eps, ts), atol=1e-6, rtol=0)
    want = train.get_velocity(x0, eps, ts) if prediction_type == "v_prediction" else eps
    torch.testing.assert_close(target, want, atol=1e-6, rtol=0)


def test_cache_dir_env(monkeypatch, tmp_path):
    from fewstep.eval import digits

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    assert digits.cache_root() == tmp_path / "digits"
    assert digits.teacher_dir().parent == tmp_path / "digits"
    monkeypatch.delenv("FEWSTEP_CACHE")
    assert digits.cache_root() == Path.home() / ".cache" / "fewstep" / "digits"


SMALL_REG = ("objective.reg_pairs=8", "objective.reg_ode_steps=4")  # the configs' regression cache, test-sized


@pytest.fixture(scope="module")
def dmd2_run(tiny_teacher, tmp_path_factory):
    from fewstep.api import distill
    from fewstep.config import load_config

    run = tmp_path_factory.mktemp("dmd2") / "run"
    cfg = load_config(str(ROOT / "configs" / "digits_dmd2.yaml"),
                      [f"teacher.path={tiny_teacher}", "student.steps=4", "train.max_steps=2", "train.batch_size=4",
                       "train.checkpoint_every=2", *SMALL_REG, f"output_dir={run}"])
    m = distill(cfg, log=lambda *a: None)
    return run, m


def test_dmd2_student_exports_with_the_custom_class(dmd2_run):
    from fewstep.api import load_run
    from fewstep.export import check_roundtrip

    run, m = dmd2_run
    pipe_dir = run / "pipeline"
    assert m["pipeline"] == str(pipe_dir)
    index = json.loads((pipe_dir / "model_index.json").read_text())
    # the digits recipe moves between its exits by DDIM steps (objective.transition=ddim): a stock DDIMScheduler
    assert index["_class_name"] == "ClassConditionalPipeline" and index["scheduler"][1] == "DDIMScheduler"
    assert (pipe_dir / "class_conditional.py").is_file()
    assert "ClassConditionalPipeline.from_pretrained" in (pipe_dir / "README.md").read_text()
    cfg, teacher, data, obj = load_run(str(run))
    student = obj.student
    student.net = type(student.net).from_pretrained(str(pipe_dir / "unet"))
    assert check_roundtrip(str(pipe_dir), obj, teacher, student) < 1e-3


def test_handoff_ends_are_the_two_pipelines(dmd2_run, tiny_teacher):
    """tools/digits_exit_probe.py's sampler: k = K is the exported student's own call, k = 0 the teacher's own call
    (same noise, each with its own scheduler's clipping); in between, the student's first k steps then the teacher."""
    from fewstep.eval.handoff import handoff_plan, handoff_sample
    from pipelines.class_conditional import ClassConditionalPipeline

    run, _ = dmd2_run
    student = ClassConditionalPipeline.from_pretrained(str(run / "pipeline"))
    teacher = ClassConditionalPipeline.from_pretrained(tiny_teacher)
    for p in (student, teacher):
        p.set_progress_bar_config(disable=True)
    assert student.scheduler.config.clip_sample != teacher.scheduler.config.clip_sample  # each step uses its own
    labels = [0, 3, 7, 9]
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(len(labels))]
    noise = torch.cat([torch.randn(1, 1, 16, 16, generator=g) for g in gens()])
    own = lambda pipe, n: pipe(class_labels=labels, num_inference_steps=n, generator=gens(), output_type="pt").images
    ends = {k: handoff_sample(student, teacher, k, noise, labels, student_steps=4, teacher_steps=5) for k in (0, 2, 4)}
    assert (ends[4] - own(student, 4)).abs().max() < 1e-5
    assert (ends[0] - own(teacher, 5)).abs().max() < 1e-5
    assert (ends[2] - ends[4]).abs().max() > 1e-3 and (ends[2] - ends[0]).abs().max() > 1e-3
    # the hand-off: the student's grid first, then the teacher from the student's next timestep down its own grid
    assert handoff_plan([999, 749, 499, 249], [999, 799, 599, 399, 199], 2) == [
        ("student", 999), ("student", 749), ("teacher", 499), ("teacher", 399), ("teacher", 199)]
    with pytest.raises(ValueError, match="the hand-off step k must be in 0..4 .* got 5"):
        handoff_sample(student, teacher, 5, noise, labels, student_steps=4)
    with pytest.raises(ValueError, match="teacher_steps: DDIM steps must divide the 1000 training timesteps .* got 6"):
        handoff_sample(student, teacher, 1, noise, labels, student_steps=4, teacher_steps=6)
    # a Phased DMD student with separate experts: each step goes to the expert of its phase, as in the pipeline's call
    import copy

    from pipelines.phased_class_conditional import PhasedClassConditionalPipeline

    expert = copy.deepcopy(student.unet)
    with torch.no_grad():
        for w in expert.parameters():
            w.mul_(0.9)
    phased = PhasedClassConditionalPipeline(unet=student.unet, scheduler=student.scheduler, expert_1=expert,
                                            expert_timesteps=[999, 499])
    phased.set_progress_bar_config(disable=True)
    both = handoff_sample(phased, teacher, 2, noise, labels, student_steps=2)
    assert (both - own(phased, 2)).abs().max() < 1e-5
    assert (both - handoff_sample(student, teacher, 2, noise, labels, student_steps=2)).abs().max() > 1e-3


def test_compare_table_files(dmd2_run, tiny_teacher, tmp_path):
    from fewstep.eval.compare import MetricSuite, compare
    from fewstep.eval.digits import DigitsCNN, load_digits_uint8, to_rgb
    from fewstep.eval.features import load_feature_extractor, save_feature_net
    from fewstep.eval.fid import FeatureStats

    torch.manual_seed(0)
    save_feature_net(DigitsCNN(width=8, feature_dim=8), tmp_path / "c.safetensors", "digits_cnn",
                     {"width": 8, "feature_dim": 8}, input_size=16, in_channels=1, num_classes=10)
    ext = load_feature_extractor(str(tmp_path / "c.safetensors"))
    x, _ = load_digits_uint8()
    feats = ext(to_rgb(x[:200]))
    FeatureStats.from_features(feats, ext.name).save(tmp_path / "ref.npz", features=feats)
    suite = MetricSuite(extractor=ext, ref=str(tmp_path / "ref.npz"), fid_name="digits_fid", diversity={})
    res = compare(tiny_teacher, [str(dmd2_run[0] / "pipeline")], suite, num_images=12, teacher_steps=(1, 2),
                  batch_size=8, out_dir=str(tmp_path / "cmp"), log=lambda *a: None, progress=False)
    rows = res["rows"]
    assert [(r["model"], r["steps"], r["nfe"]) for r in rows] == [("teacher", 1, 1), ("teacher", 2, 2),
                                                                  ("dmd2-4step", 4, 4)]
    assert all({"digits_fid", "precision", "recall", "density", "coverage", "class_accuracy", "sec_per_image"}
               <= set(r) for r in rows)
    assert all(0 <= r["precision"] <= 1 and 0 <= r["coverage"] <= 1 for r in rows)
    assert rows[0]["diversity"]["num_ref"] == 200 and rows[0]["diversity"]["num_images"] == 12
    assert res["main_metric"] == "digits_fid" and len(res["speedups"]) == 1
    for f in ("compare.json", "compare.md", "compare.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| dmd2-4step | 4 | 4 |" in md and "| digits-FID | precision | recall | density | coverage |" in md
    assert "k=3 nearest neighbours" in md


def test_benchmark_rows_and_skips(tiny_teacher, tmp_path, monkeypatch):
    """run_benchmark on a tiny teacher and random classifier: a (label, config, overrides) row is distilled
    and scored with digits-FID, precision/recall/density/coverage; a row with a missing config is skipped."""
    from fewstep.eval import digits
    from fewstep.eval.digits import DigitsCNN, StudentRow, parse_row
    from fewstep.eval.features import save_feature_net

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    clf = tmp_path / "clf.safetensors"
    save_feature_net(DigitsCNN(width=8, feature_dim=8), clf, "digits_cnn", {"width": 8, "feature_dim": 8},
                     input_size=16, in_channels=1, num_classes=10)
    monkeypatch.setattr(digits, "ensure_teacher_and_classifier", lambda *a, **k: (tiny_teacher, clf))
    rows = [parse_row("tiny-2step configs/digits_dmd2.yaml student.steps=2 train.batch_size=4 " + " ".join(SMALL_REG)),
            StudentRow("later-2step", "configs/does_not_exist_yet.yaml", ("student.steps=2",))]
    logs = []
    res = digits.run_benchmark(str(tmp_path / "bench"), train_steps=2, num_images=12, teacher_steps=(1,),
                               rows=rows, log=logs.append, progress=False)
    assert [(r["model"], r["steps"]) for r in res["rows"]] == [("teacher", 1), ("tiny-2step", 2)]
    assert all({"digits_fid", "precision", "recall", "density", "coverage", "class_accuracy"} <= set(r)
               for r in res["rows"])
    assert [s["label"] for s in res["skipped"]] == ["later-2step"]
    assert any("skipping row later-2step: config configs/does_not_exist_yet.yaml does not exist" in l for l in logs)
    assert "Skipped: skipping row later-2step" in res["markdown"] and "recall" in res["markdown"]
    assert set(res["data_floor_diversity"]) >= {"precision", "recall", "density", "coverage"}
    saved = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert saved["rows_spec"][0]["overrides"] == ["student.steps=2", "train.batch_size=4", *SMALL_REG]
    assert "tiny-2step_s" in saved["timings"]
    with pytest.raises(Exception, match="LABEL CONFIG"):
        parse_row("only-a-label")
    # the same student scored again over 2 sampling seeds without retraining: seed 0 reproduces the first table's
    # numbers, and each row is the mean of its seeds with their spread
    logs.clear()
    res2 = digits.run_benchmark(str(tmp_path / "bench"), train_steps=2, num_images=12, teacher_steps=(1,),
                                rows=rows[:1], log=logs.append, progress=False, eval_seeds=2, reuse=True)
    assert any("tiny-2step: reusing the student trained earlier" in l for l in logs)
    assert "tiny-2step_s" not in res2["timings"]
    for r, r1 in zip(res2["rows"], res["rows"]):
        vals = r["digits_fid_seeds"]
        assert len(vals) == 2 and vals[0] == pytest.approx(r1["digits_fid"], rel=1e-6)
        assert r["digits_fid"] == pytest.approx(sum(vals) / 2)
        assert r["digits_fid_std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
        assert vals[0] != vals[1]  # a second seed draws other images
    assert "±" in res2["markdown"] and "over 2 sampling seeds (0, 1)" in res2["markdown"]
    # a changed row spec is trained again, not reused: here the same config path with other contents
    cfg = tmp_path / "digits_dmd2.yaml"
    cfg.write_text((ROOT / "configs" / "digits_dmd2.yaml").read_text())
    row = StudentRow("copy", str(cfg), ("student.steps=1", "train.batch_size=4", *SMALL_REG))

    def reused():
        logs.clear()
        digits.run_benchmark(str(tmp_path / "bench"), train_steps=2, num_images=12, teacher_steps=(1,), rows=[row],
                             log=logs.append, progress=False, reuse=True)
        return any("copy: reusing" in l for l in logs)
    assert not reused() and reused()
    cfg.write_text(cfg.read_text() + "\n# edited\n")
    assert not reused()  # ... and from scratch: not resumed from the checkpoints of the earlier spec
    assert "resumed from" not in (tmp_path / "bench" / "logs" / "copy.log").read_text()
    with pytest.raises(Exception, match="eval_seeds must be >= 1, got 0"):
        digits.run_benchmark(str(tmp_path / "bench"), rows=rows[:1], eval_seeds=0)


def test_default_rows():
    from fewstep.eval.digits import DEFAULT_ROWS

    assert [r.label for r in DEFAULT_ROWS] == ["dmd2-1step", "dmd2-4step", "phased_dmd-2step", "phased_dmd-4step"]
    assert DEFAULT_ROWS[0].config_path().is_file()  # configs/digits_dmd2.yaml


def test_cli_compare_errors(capsys):
    from fewstep.cli import main

    assert main(["eval", "compare", "--ref", "x.npz"]) == 2
    assert "--teacher DIR is required" in capsys.readouterr().err
    assert main(["eval", "compare", "--teacher", "t", "--ref", "x.npz", "--teacher-steps", "1,a"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["eval", "compare", "--teacher", "t", "--clip", "c", "--diversity"]) == 2
    assert "--diversity needs --ref" in capsys.readouterr().err
    assert main(["eval", "compare", "--teacher", "t", "--ref", "x.npz", "--diversity", "--num-images", "3"]) == 2
    assert "needs more than 3 images, got --num-images 3" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_benchmark():
    """Teacher (cached) at 1..50 steps vs DMD2 1/4-step and Phased DMD 2/4-step students (rows whose config is
    missing are skipped); digits-FID, precision, recall, density, coverage, class accuracy; `make bench-digits`."""
    from fewstep.eval.digits import run_benchmark

    out = os.environ.get("FEWSTEP_BENCH_OUT", str(ROOT / "runs" / "bench_digits"))
    res = run_benchmark(out)
    print("\n" + res["markdown"])
    print("timings (s):", {k: round(v) for k, v in res["timings"].items()})
    rows = {(r["model"], r["steps"]): r for r in res["rows"]}
    t50, t1 = rows[("teacher", 50)], rows[("teacher", 1)]
    s1, s4 = rows[("dmd2-1step", 1)], rows[("dmd2-4step", 4)]
    assert t50["class_accuracy"] > 0.9
    assert s1["digits_fid"] < 0.25 * t1["digits_fid"]  # far better than the teacher at the same NFE
    assert s1["class_accuracy"] > 0.9 and s4["class_accuracy"] > 0.9
    assert s1["digits_fid"] <= 1.2 * t50["digits_fid"], res["goal"]  # the goal
    p4 = rows[("phased_dmd-4step", 4)]
    assert p4["digits_fid"] <= 1.1 * t50["digits_fid"]  # issue 8: a 4-step student within 1.1x of the teacher
    assert all({"precision", "recall", "density", "coverage"} <= set(r) for r in res["rows"])
    assert t50["recall"] > 0.5 and t50["coverage"] > 2 * t1["coverage"]  # 1 DDIM step is blurred onto a few modes
