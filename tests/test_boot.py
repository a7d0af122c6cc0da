"""BOOT: the bootstrapped target is an exact teacher DDIM step, no data source is ever opened, one-step quality on the
8-mode mixture against the exact teacher, errors, and the tiny-SDXL export round trip."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli_here
from test_consistency import CHECK, _build, _cfg, _distill, _init_endpoint_error


def test_signal_step_is_an_exact_ddim_step(tmp_path):
    """With the true signal y_t, the bootstrapped target y_t + delta (D_T - y_t) is the teacher DDIM step's signal."""
    from fewstep.conditions import Condition
    from fewstep.sampling import ode_sample

    teacher, _, obj = _build("configs/gmm_boot.yaml", tmp_path)
    sched = teacher.schedule
    eps = torch.randn(64, 2)
    cond = Condition(class_labels=torch.arange(64) % 8)
    _, path, ts = ode_sample(teacher, eps, cond, obj.grid, return_path=True)  # the 50-step DDIM path from eps
    for i in (0, 10, 30, obj.grid - 1):
        t, s = torch.full((64,), ts[i]), torch.full((64,), ts[i + 1])
        y_t = (path[i] - sched.sigma(t)[:, None] * eps) / sched.alpha(t)[:, None].clamp_min(1e-12)
        if i == 0:
            assert torch.allclose(obj.boundary(eps), y_t.nan_to_num(0.0), atol=1e-6)
            y_t = obj.boundary(eps)
        x_t = sched.alpha(t)[:, None] * y_t + sched.sigma(t)[:, None] * eps
        delta = 1 - sched.sigma(s) * sched.alpha(t) / (sched.alpha(s) * sched.sigma(t))
        y_s = y_t + delta[:, None] * (teacher(x_t, t, cond) - y_t)
        ref = path[i + 1] if ts[i + 1] == 0 else (path[i + 1] - sched.sigma(s)[:, None] * eps) / sched.alpha(s)[:, None]
        assert torch.allclose(y_s, ref, atol=1e-4), i


def test_one_step_sample_is_the_network_at_its_noisiest_step(tmp_path):
    """g(eps, 0) is the student network queried at t = 1 on eps (what a stock 1-step LCMScheduler call computes)."""
    from fewstep.conditions import Condition

    teacher, _, obj = _build("configs/gmm_boot.yaml", tmp_path)
    with torch.no_grad():
        for p in obj.student.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    eps = torch.randn(16, 2)
    cond = Condition(class_labels=torch.arange(16) % 8)
    with torch.no_grad():
        assert torch.allclose(obj.sample(obj.student, eps, cond), obj.student(eps, torch.ones(16), cond), atol=1e-6)
        assert obj.sample(obj.student, eps, cond).abs().max() > 0


class _Refuse:
    def __init__(self, what):
        self.what = what

    def __call__(self, *a, **k):
        raise AssertionError(f"a data-free objective touched {self.what}")


def test_boot_opens_no_data(tmp_path, monkeypatch, capsys):
    """Acceptance: data-free. data.images is refused with a warning, and training reads no data source at all."""
    from fewstep.api import build
    from fewstep.data import DataSource
    from fewstep.teachers.gmm import GMMTeacher
    from fewstep.trainer import Trainer

    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(b"not an image")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    cfg = _cfg("configs/gmm_boot.yaml", tmp_path, f"data.images={images}", f"data.prompts={prompts}",
               "train.max_steps=5", "train.batch_size=32", "train.checkpoint_every=5")
    teacher, data, obj = build(cfg)
    err = capsys.readouterr().err
    assert "data-free" in err and str(images) in err
    assert data.images_path is None  # the image folder is not even handed over
    monkeypatch.setattr(GMMTeacher, "real_samples", _Refuse("real samples"))
    monkeypatch.setattr(DataSource, "image_files", _Refuse("data.images"))
    spy = DataSource(str(prompts), str(images))  # a source that *could* read images and prompts
    torch.set_num_threads(1)
    trainer = Trainer(cfg, teacher, obj, spy, tmp_path / "run")
    trainer.fit()
    assert trainer.step == 5
    assert spy.opened == [] and data.opened == []


def test_boot_warns_on_images_from_the_cli(tmp_path):
    r = run_cli_here("distill", "configs/gmm_boot.yaml", f"data.images={tmp_path}", "train.max_steps=2",
                     "train.checkpoint_every=2", "train.tracker=none", f"output_dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-2000:]
    warn = [l for l in r.stderr.splitlines() if l.startswith("fewstep: warning:")]
    assert len(warn) == 1 and "data-free" in warn[0] and "data.images" in warn[0]


@pytest.mark.parametrize("overrides,needles", [
    (["student.steps=2"], ["student.steps=1", "one-step"]),
    (["objective.skip=7"], ["objective.skip=7", "1000"]),
    (["objective.weighting=snr"], ["objective.weighting"]),
])
def test_bad_boot_config_is_one_line_error(tmp_path, overrides, needles):
    from fewstep.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _build("configs/gmm_boot.yaml", tmp_path, *overrides)
    assert "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_boot_one_step_lands_on_the_teacher_ode_endpoint(tmp_path):
    """Acceptance: endpoint error < 0.25 x mode spacing, from a student that starts at zero (no data seen)."""
    m = _distill("configs/gmm_boot.yaml", tmp_path, "train.max_steps=3000")
    ev = m["eval"]
    init = _init_endpoint_error(tmp_path, "configs/gmm_boot.yaml")
    assert init > 1.5  # the residual MLP starts at 0: nothing is known before bootstrapping
    assert ev["endpoint_error"] < 0.25 * ev["nearest_mode_spacing"], m["table"]
    assert ev["student"]["modes_covered"] == 8 and ev["student"]["nfe"] == 1


@pytest.mark.slow
def test_boot_delta_weighting_also_converges(tmp_path):
    m = _distill("configs/gmm_boot.yaml", tmp_path, "objective.weighting=delta", "train.max_steps=6000")
    assert m["eval"]["endpoint_error"] < 0.25 * m["eval"]["nearest_mode_spacing"], m["table"]


def test_sdxl_boot_export_roundtrip(tiny_pipelines, prompts_file, tmp_path):
    """One-step export: pipe(prompt, num_inference_steps=1, guidance_scale=0) == the training sampler, same noise;
    trained with no image folder at all."""
    run = tmp_path / "run"
    r = run_cli_here("distill", "configs/sdxl_boot.yaml", f"teacher.path={tiny_pipelines['sdxl']}",
                     "teacher.dtype=float32", "train.max_steps=3", "train.batch_size=2", "train.mixed_precision=no",
                     "train.checkpoint_every=2", "train.sample_every=0", "train.lr=1e-3", f"data.prompts={prompts_file}",
                     f"output_dir={run}")  # in-process; the export is reloaded in a fresh process below
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.run([sys.executable, "-c", CHECK, str(run)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])[str(run)]  # (test_consistency's CHECK: results by run)
    assert res["class"] == "StableDiffusionXLPipeline" and res["scheduler"] == "LCMScheduler"
    assert res["timesteps"] == [999] and res["info"]["num_inference_steps"] == 1
    assert res["max_diff"] < 1e-3, res
