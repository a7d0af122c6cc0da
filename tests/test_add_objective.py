"""Adding an objective touches only its own file, its config and its test (docs/ARCHITECTURE.md).

Here all three live in this file: a toy objective that regresses a 1-step student onto the teacher's one-step
(DDIM) x0 from pure noise, registered by name, configured by a YAML written to ``tmp_path``, and trained and
exported through the ordinary ``fewstep.api.distill`` path: no trainer, export, CLI or config change.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewstep.objectives import LossOutput, Objective, register
from fewstep.objectives.base import ObjectiveConfig


# ---- the objective file (fewstep/objectives/NAME.py in a real addition) --------------------------
@dataclass
class ToyRegressConfig(ObjectiveConfig):
    weight: float = 1.0  # scale of the regression loss


@register
class ToyRegress(Objective):
    """Regress the 1-step student onto the teacher's one-step DDIM x0: ``|student(z, 1) - teacher(z, 1)|^2``."""

    name = "toy_regress"
    Config = ToyRegressConfig

    def __init__(self, config, teacher, student_steps):
        super().__init__(config, teacher, student_steps)
        self.student = teacher.new_network("student")

    def networks(self):
        return {"student": self.student}

    def plan(self, step):
        return ["student"]

    def loss(self, group, batch, step, nets):
        z = batch.randn((batch.size, *self.teacher.sample_shape))
        t = torch.full((batch.size,), float(self.times[0]), device=batch.device)
        with torch.no_grad():
            target = self.teacher(z, t, batch.cond)
        mse = F.mse_loss(nets["student"](z, t, batch.cond).float(), target.float())
        return LossOutput(self.config.weight * mse, {"mse": mse.detach().item()})


# ---- its config (configs/gmm_NAME.yaml in a real addition) ---------------------------------------
CONFIG = """\
teacher: {path: "gmm:ring8", guidance_scale: 1}
student: {steps: 1}
objective: {name: toy_regress, weight: 2.0}
train: {max_steps: 6, batch_size: 32, lr: 1.0e-3, log_every: 2, checkpoint_every: 3, tracker: none, progress: none}
"""


# ---- its test --------------------------------------------------------------------------------------
def test_toy_objective_trains_and_exports_through_the_normal_path(tmp_path):
    from fewstep.api import distill, load_run
    from fewstep.config import load_config

    (tmp_path / "toy.yaml").write_text(CONFIG)
    cfg = load_config(str(tmp_path / "toy.yaml"), [f"output_dir={tmp_path / 'run'}"])
    m = distill(cfg, log=lambda *a: None)
    assert m["objective"] == "toy_regress" and m["steps"] == 6 and m["student_steps"] == 1
    assert [r["step"] for r in m["history_tail"]] == [2, 4, 6]
    assert all("student/mse" in r and "student/grad_norm" in r for r in m["history_tail"])
    assert m["eval"]["student"]["nfe"] == 1 and m["eval"]["student"]["sampler"] == "toy_regress, 1 step(s)"
    # exported (the analytic teacher's own format) and loadable again from the run folder
    _, teacher, _, objective = load_run(str(tmp_path / "run"))
    assert objective.config.weight == 2.0
    student = teacher.load_student(tmp_path / "run" / teacher.student_folder, objective)
    with torch.no_grad():
        x = objective.sample(student, torch.randn(16, *teacher.sample_shape), teacher.sample_conditions(16, torch.Generator()))
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    assert (tmp_path / "run" / "samples.png").is_file() and (tmp_path / "run" / "checkpoints").is_dir()
