"""Trainer features on small runs: mixed precision, accumulation, EMA, GAN head with real images, export/sample CLI."""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli, run_cli_here


def _distill(tmp_path, *overrides, name="run"):
    from fewstep.api import distill
    from fewstep.config import load_config

    cfg = load_config("configs/gmm_dmd2.yaml", ["train.tracker=none", f"output_dir={tmp_path}/{name}",
                                                "train.batch_size=64", *overrides])
    return distill(cfg, log=lambda *a: None)


def test_bf16_accumulation_ema_gan_run(tmp_path):
    m = _distill(tmp_path, "train.max_steps=12", "train.mixed_precision=bf16", "train.grad_accum=2",
                 "train.ema_decay=0.9", "objective.gan_weight=0.01", "objective.critic_steps=2", "train.log_every=1")
    keys = set().union(*[h.keys() for h in m["history_tail"]])
    for k in ("critic/loss_gan_d", "critic/logits_real", "student/loss_gan_g", "student/loss_dm",
              "student/x0_gap_teacher_critic", "critic/grad_norm", "student/grad_norm"):
        assert k in keys, (k, keys)
    assert all(np.isfinite(v) for h in m["history_tail"] for v in h.values() if isinstance(v, float))


def test_plan_is_two_time_scale():
    from fewstep.objectives.dmd import DMD2, DMD2Config
    from fewstep.teachers.gmm import GMMTeacher, load_mixture

    obj = DMD2(DMD2Config(critic_steps=5), GMMTeacher(load_mixture("ring8")), 1)
    plans = [obj.plan(s) for s in range(10)]
    assert sum("student" in p for p in plans) == 2 and all("critic" in p for p in plans)


def test_dm_gradient_points_from_fake_to_real():
    """The DM loss gradient w.r.t. x is (D_fake - D_real)/norm / numel: descending moves x toward D_real."""
    from fewstep.losses import dm_loss

    x = torch.zeros(2, 3, requires_grad=True)
    real = torch.ones(2, 3)
    fake = torch.zeros(2, 3)
    loss, grad = dm_loss(x, real, fake)
    loss.backward()
    assert torch.allclose(x.grad, -torch.ones(2, 3) / 6)  # norm = mean|x - real| = 1


def test_gan_with_images_and_sample_export_cli(tiny_pipelines, prompts_file, tmp_path):
    from PIL import Image

    imgs = tmp_path / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a_photo_of_a_cat", "a_red_dog", "blue_flowers"]):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(imgs / f"{name}.png")
    run = tmp_path / "run"
    r = run_cli_here("distill", "configs/sd15_dmd2.yaml", f"teacher.path={tiny_pipelines['sd15']}",
                     "teacher.dtype=float32", f"data.prompts={prompts_file}", f"data.images={imgs}",
                     "objective.gan_weight=0.01", "objective.critic_steps=1", "student.steps=2", "train.max_steps=2",
                     "train.batch_size=2", "train.log_every=1", "train.sample_every=1", "train.mixed_precision=no",
                     f"output_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    hist = json.loads((run / "metrics.json").read_text())["history_tail"]
    assert any("critic/loss_gan_d" in h for h in hist)
    assert (run / "samples" / "step_0000001.png").is_file()
    out = tmp_path / "exported"
    r = run_cli_here("export", run, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    # a fresh process loads the export (distill and export above ran in this one)
    r = run_cli("sample", out, "--prompt", "a red dog", "--num-samples", "2", "--out", tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr[-2000:]
    im = Image.open(tmp_path / "grid.png")
    assert im.size[0] > 32 and im.size[1] >= 32


def test_bad_image_folder(tiny_pipelines, prompts_file, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli_here("distill", "configs/sd15_dmd2.yaml", f"teacher.path={tiny_pipelines['sd15']}",
                     f"data.prompts={prompts_file}", f"data.images={tmp_path / 'empty'}", "objective.gan_weight=0.01",
                     "train.max_steps=1", "train.batch_size=1", f"output_dir={tmp_path}/run")
    assert r.returncode != 0 and "has no images" in r.stderr and "Traceback" not in r.stderr
