"""Memory features of issue 9 that are config keys of the trainer: ``train.optimizer=adamw8bit`` (bitsandbytes'
8-bit AdamW, CPU kernels included) and ``train.gradient_checkpointing``.

Fast: tiny GMM runs and one tiny SDXL-shaped shared-base step, in-process."""
import importlib.util

import pytest
import torch

from fewstep.config import ConfigError

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def _trainer(tmp_path, name, config="configs/gmm_dmd2.yaml", overrides=()):
    from fewstep.api import build
    from fewstep.config import load_config
    from fewstep.trainer import Trainer

    cfg = load_config(config, ["train.batch_size=64", "train.tracker=none", "train.progress=none",
                               "train.log_every=1", f"output_dir={tmp_path / name}", *overrides])
    teacher, data, objective = build(cfg)
    return Trainer(cfg, teacher, objective, data, tmp_path / name, log=lambda *a: None)


def _params(tr) -> dict:
    return {f"{g}.{k}": v.detach().clone() for g, m in tr.plain.items() for k, v in m.state_dict().items()}


@needs_bnb
def test_adamw8bit_keeps_8bit_moments_and_resumes_exactly(tmp_path):
    """The student's and critic's moments are uint8 (2 bytes a weight, not 8), the run learns (the DM loss moves the
    student), and 4 steps straight == 2 + resume + 2, bit for bit (the quantised state round-trips)."""
    opts = ["train.optimizer=adamw8bit", "train.lr=1e-3", "objective.critic_steps=1", "train.checkpoint_every=2",
            "objective.lr_decay=constant"]  # a cosine schedule depends on max_steps, which differs between the runs
    straight = _trainer(tmp_path, "a", overrides=[*opts, "train.max_steps=4"])
    start = _params(straight)
    fit = straight.fit()
    assert fit["optimizer"]["name"].startswith("AdamW8bit")
    opt = straight._step_opt["student"]
    big = [p for g in opt.param_groups for p in g["params"] if p.numel() >= 4096]
    assert big, "the GMM student has no tensor large enough for 8-bit moments"
    for p in big:
        st = opt.state[p]
        assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
    end = _params(straight)
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("student."))

    first = _trainer(tmp_path, "b", overrides=[*opts, "train.max_steps=2"])
    first.fit()
    resumed = _trainer(tmp_path, "b", overrides=[*opts, "train.max_steps=4"])
    lines = []
    resumed.log = lambda *a: lines.append(" ".join(map(str, a)))
    resumed.fit()
    assert any(line.startswith("resumed from") and "step 2" in line for line in lines), lines
    got = _params(resumed)
    for k in end:
        assert torch.equal(end[k], got[k]), k


def test_adamw8bit_without_bitsandbytes_is_a_one_line_config_error(tmp_path, monkeypatch):
    from fewstep.api import build
    from fewstep.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = load_config("configs/gmm_dmd2.yaml", ["train.optimizer=adamw8bit", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        build(cfg)
    assert "bitsandbytes" in str(e.value) and "\n" not in str(e.value)


def test_unknown_optimizer_is_rejected_at_load():
    from fewstep.config import load_config

    with pytest.raises(ConfigError, match="train.optimizer.*adamw8bit"):
        load_config("configs/gmm_dmd2.yaml", ["train.optimizer=sgd"])


def test_gradient_checkpointing_on_a_shared_base_gives_the_same_step(tiny_pipelines, prompts_file, tmp_path):
    """``train.gradient_checkpointing=true`` switches it on for the shared UNet (reached through the teacher), and one
    DMD2 step (student + critic adapters) ends at the same weights as without it."""
    common = [f"teacher.path={tiny_pipelines['sdxl']}", "teacher.dtype=float32", f"data.prompts={prompts_file}",
              "student.lora_rank=4", "student.steps=1", "train.batch_size=1", "train.max_steps=1",
              "objective.critic_steps=1", "train.lr=1e-2", "train.mixed_precision=no", "train.lr_warmup_steps=0"]
    runs = {}
    for flag in (False, True):
        tr = _trainer(tmp_path, f"gc{flag}", "configs/sdxl_dmd2_lora.yaml",
                      [*common, f"train.gradient_checkpointing={str(flag).lower()}"])
        unet = tr.teacher.pipe.unet
        assert unet.is_gradient_checkpointing is flag
        tr.fit()
        runs[flag] = _params(tr)
    a, b = runs[False], runs[True]
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    moved = [k for k in a if "lora_B" in k and a[k].abs().sum() > 0]
    assert moved, "no adapter was trained"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_checkpointing_with_a_frozen_critic_in_the_student_loss(tiny_pipelines, prompts_file, tmp_path):
    """Full student and critic, GAN term on (the student's loss runs through the critic frozen; by backward time it is
    trainable again): the recomputation must run as the forward did, and one step matches the run without it."""
    import numpy as np
    from PIL import Image

    imgs = tmp_path / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / f"img_{i}.png")
    common = [f"teacher.path={tiny_pipelines['sdxl']}", "teacher.dtype=float32", f"data.prompts={prompts_file}",
              f"data.images={imgs}", "objective.gan_weight=0.01", "objective.critic_steps=1", "student.steps=1",
              "train.batch_size=2", "train.max_steps=1", "train.lr=1e-3", "train.lr_warmup_steps=0",
              "train.mixed_precision=no"]
    runs = {}
    for flag in (False, True):
        tr = _trainer(tmp_path, f"gan{flag}", "configs/sdxl_dmd2.yaml",
                      [*common, f"train.gradient_checkpointing={str(flag).lower()}"])
        assert tr.plain["student"].net.is_gradient_checkpointing is flag
        tr.fit()
        runs[flag] = _params(tr)
    a, b = runs[False], runs[True]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
