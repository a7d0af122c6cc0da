"""Hand-off sampling: a multi-step student's first ``k`` steps, then its teacher's own sampler the rest of the way.

Which of a student's steps moves a metric?  Score the hand-offs ``k = 0..K``: ``k = 0`` is the teacher alone,
``k = K`` the student alone, and the change from ``k - 1`` to ``k`` is what the student's ``k``-th step does
compared with the teacher's steps over the same stretch of noise (``tools/digits_exit_probe.py``).

Scope: UNet pipelines with a DDIM scheduler (``eta = 0``) and an optional class label -- the digits benchmark's
``ClassConditionalPipeline`` (teacher: DDIM, the student: its exported DDIM grid) and the Phased DMD students'
``PhasedClassConditionalPipeline`` (the expert of each timestep's phase), conditional branch only
(guidance 1, as the benchmark samples).  Each step is taken with its own pipeline's scheduler settings
(prediction type, clipping), exactly as diffusers' ``DDIMScheduler.step`` takes it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def ddim_timesteps(scheduler, steps: int, who: str = "the scheduler") -> list[int]:
    """The scheduler's own timesteps for ``steps`` inference steps (its spacing), as ints.  ``steps`` must divide the
    training timesteps: otherwise diffusers' DDIM steps from ``t`` to ``t - N // steps``, off its own grid."""
    n = scheduler.config.num_train_timesteps
    if steps < 1 or n % steps:
        raise ValueError(f"{who}: DDIM steps must divide the {n} training timesteps (diffusers' DDIM otherwise leaves "
                         f"its own grid), got {steps}")
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def ddim_move(scheduler, model_output: Tensor, t: int, prev: int, x: Tensor) -> Tensor:
    """diffusers' ``DDIMScheduler.step`` (eta 0) from timestep ``t`` to an explicit ``prev`` (< 0: to the end)."""
    c = scheduler.config
    ac = scheduler.alphas_cumprod.to(x.dtype)
    a_t = ac[t]
    a_prev = ac[prev] if prev >= 0 else scheduler.final_alpha_cumprod.to(x.dtype)
    b_t = 1 - a_t
    if c.prediction_type == "epsilon":
        x0, eps = (x - b_t.sqrt() * model_output) / a_t.sqrt(), model_output
    elif c.prediction_type == "v_prediction":
        x0, eps = a_t.sqrt() * x - b_t.sqrt() * model_output, a_t.sqrt() * model_output + b_t.sqrt() * x
    elif c.prediction_type == "sample":
        x0 = model_output
        eps = (x - a_t.sqrt() * x0) / b_t.sqrt()
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {c.prediction_type!r}")
    if c.get("thresholding", False):
        x0 = scheduler._threshold_sample(x0)
    elif c.get("clip_sample", False):
        x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def handoff_plan(student_steps: Sequence[int], teacher_steps: Sequence[int], k: int) -> list[tuple[str, int]]:
    """``[("student" | "teacher", timestep), ...]``: the student's first ``k`` timesteps, then the teacher from the
    student's next timestep down its own grid (``k = 0``: the teacher's grid alone; ``k = K``: the student's)."""
    K = len(student_steps)
    if not 0 <= k <= K:
        raise ValueError(f"the hand-off step k must be in 0..{K} (the student's steps), got {k}")
    if k == 0:
        return [("teacher", t) for t in teacher_steps]
    plan = [("student", t) for t in student_steps[:k]]
    if k < K:
        start = student_steps[k]
        plan += [("teacher", start)] + [("teacher", t) for t in teacher_steps if t < start]
    return plan


@torch.no_grad()
def handoff_sample(student, teacher, k: int, noise: Tensor, class_labels: Optional[Sequence[int]] = None,
                   student_steps: Optional[int] = None, teacher_steps: int = 50) -> Tensor:
    """Images in [0, 1] ``(N, C, H, W)``: ``student``'s first ``k`` of its ``student_steps`` steps (an exported
    student's ``num_inference_steps``, in its ``fewstep.json``), then ``teacher``'s DDIM grid of ``teacher_steps``
    below that point.  ``noise``: the initial latents ``(N, C, H, W)``, as the pipelines draw them."""
    if student_steps is None:
        raise ValueError("student_steps: pass the student's step count (its fewstep.json num_inference_steps)")
    nets = {"student": student, "teacher": teacher}
    grids = {"student": ddim_timesteps(student.scheduler, student_steps, "student_steps"),
             "teacher": ddim_timesteps(teacher.scheduler, teacher_steps, "teacher_steps")}
    plan = handoff_plan(grids["student"], grids["teacher"], k)
    kw = {}
    if class_labels is not None:
        kw["class_labels"] = torch.as_tensor(list(class_labels), dtype=torch.long, device=noise.device)
    x = noise
    for i, (who, t) in enumerate(plan):
        pipe = nets[who]
        net = pipe.experts()[pipe.expert_index(t)] if hasattr(pipe, "expert_index") else pipe.unet  # Phased experts
        out = net(x.to(net.dtype), t, **kw).sample.to(x.dtype)
        prev = plan[i + 1][1] if i + 1 < len(plan) else -1
        x = ddim_move(pipe.scheduler, out, t, prev, x)
    return (x.float() / 2 + 0.5).clamp(0, 1)
