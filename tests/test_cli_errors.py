"""Bad input: one line on stderr naming the problem, non-zero exit, no traceback."""
import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, run_cli_here


def _one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout[-2000:]
    err = [l for l in r.stderr.strip().splitlines() if l.startswith("fewstep: error:")]
    assert err, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def test_missing_teacher_path(tmp_path):
    r = run_cli_here("distill", "configs/gmm_dmd2.yaml", f"teacher.path={tmp_path}/nope", f"output_dir={tmp_path}/run")
    _one_line_error(r, "nope")


def test_teacher_folder_without_model_index(tmp_path):
    r = run_cli_here("distill", "configs/gmm_dmd2.yaml", f"teacher.path={tmp_path}", f"output_dir={tmp_path}/run")
    _one_line_error(r, "model_index.json")


def test_unknown_objective_lists_known(tmp_path):
    r = run_cli_here("distill", "configs/gmm_dmd2.yaml", "objective.name=dmd3", f"output_dir={tmp_path}/run")
    line = _one_line_error(r, "dmd3", "dmd2", "dmd")


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("teacher:\n  path: gmm:ring8\n train: [1, 2\n")
    _one_line_error(run_cli("distill", p), "malformed YAML", "line")


def test_missing_config_file(tmp_path):
    _one_line_error(run_cli("distill", tmp_path / "nope.yaml"), "not found")


def test_unknown_key_suggests_nearest(tmp_path):
    r = run_cli_here("distill", "configs/gmm_dmd2.yaml", "train.max_step=3", f"output_dir={tmp_path}/run")
    _one_line_error(r, "train.max_step", "train.max_steps")
    r = run_cli_here("distill", "configs/gmm_dmd2.yaml", "objective.critic_step=3", f"output_dir={tmp_path}/run")
    _one_line_error(r, "objective.critic_step", "objective.critic_steps")


def test_student_steps_out_of_range(tmp_path):
    r = run_cli("distill", "configs/gmm_dmd2.yaml", "student.steps=7", f"output_dir={tmp_path}/run")
    _one_line_error(r, "student.steps", "7")


def test_gan_needs_images(tiny_pipelines, prompts_file, tmp_path):
    r = run_cli_here("distill", "configs/sd15_dmd2.yaml", f"teacher.path={tiny_pipelines['sd15']}", "teacher.dtype=float32",
                     f"data.prompts={prompts_file}", "objective.gan_weight=0.01", "data.images=null",
                     f"output_dir={tmp_path}/run")
    _one_line_error(r, "gan_weight", "data.images")


def test_text_teacher_needs_prompts(tiny_pipelines, tmp_path):
    r = run_cli_here("distill", "configs/sd15_dmd2.yaml", f"teacher.path={tiny_pipelines['sd15']}", "data.prompts=null",
                     f"output_dir={tmp_path}/run")
    _one_line_error(r, "data.prompts")


def test_corrupt_checkpoint_on_resume(tmp_path):
    run = tmp_path / "run"
    base = ["distill", "configs/gmm_dmd2.yaml", "train.max_steps=4", "train.checkpoint_every=2",
            "train.batch_size=32", f"output_dir={run}"]
    assert run_cli_here(*base).returncode == 0  # the run to corrupt: in-process; the resume below is a fresh one
    ck = sorted((run / "checkpoints").glob("checkpoint-*"))[-1]
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    r = run_cli(*base[:2], "train.max_steps=6", *base[3:])
    _one_line_error(r, "checkpoint", ck.name)


def test_dry_run_prints_resolved_config(tmp_path):
    r = run_cli("distill", "configs/gmm_dmd2.yaml", "train.lr=5e-7", "--dry-run", f"output_dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr
    assert "lr: 5.0e-07" in r.stdout and "critic_steps: 5" in r.stdout
    assert not (tmp_path / "run").exists()


def test_nan_stops_with_last_good_checkpoint(tmp_path):
    """A loss that turns NaN stops the run with a clear message; the last checkpoint is finite and loadable."""
    from fewstep.api import distill
    from fewstep.config import load_config
    from fewstep.objectives.base import register
    from fewstep.objectives.dmd import DMD2, DMD2Config
    from fewstep.trainer import TrainingDiverged, list_checkpoints
    from dataclasses import dataclass
    from safetensors.torch import load_file

    @dataclass
    class Cfg(DMD2Config):
        name: str = "dmd2_nan_test"
        nan_at: int = 7

    @register
    class NaNAt(DMD2):
        name = "dmd2_nan_test"
        Config = Cfg

        def loss(self, group, batch, step, nets):
            out = super().loss(group, batch, step, nets)
            if step >= self.config.nan_at:
                out.loss = out.loss * float("nan")
            return out

    cfg = load_config("configs/gmm_dmd2.yaml", ["objective.name=dmd2_nan_test", "train.max_steps=20",
                                                 "train.checkpoint_every=5", "train.batch_size=32",
                                                 "train.tracker=none", f"output_dir={tmp_path}/run"])
    with pytest.raises(TrainingDiverged, match="step 7.*last good checkpoint.*checkpoint-0000005"):
        distill(cfg)
    cks = list_checkpoints(tmp_path / "run")
    assert [c.name for c in cks] == ["checkpoint-0000005"]
    sd = load_file(str(cks[-1] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values())
