"""Student -> a diffusers pipeline folder that ``DiffusionPipeline.from_pretrained`` loads as-is.

The folder uses the teacher's own pipeline class and a stock scheduler configured so the default call
``pipe(prompt, num_inference_steps=K, guidance_scale=0)`` reproduces the training-time sampler, plus a
model card.  Analytic (GMM) students are saved as ``student.safetensors`` + ``student.json`` instead.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _scheduler_from_spec(teacher_scheduler, spec: dict):
    import diffusers

    import inspect

    cls = getattr(diffusers, spec["scheduler"])
    accepted = set(inspect.signature(cls.__init__).parameters)
    base = {k: v for k, v in teacher_scheduler.config.items() if k in accepted}
    return cls.from_config({**base, **spec.get("scheduler_config", {})})


def export_pipeline(teacher, student, objective, out_dir, run_config: dict | None = None) -> Path:
    """Write ``out_dir`` (a diffusers pipeline folder) for a diffusers-teacher student."""
    out = Path(out_dir)
    spec = objective.export_spec()
    pipe = teacher.pipe
    scheduler = _scheduler_from_spec(pipe.scheduler, spec)
    unet = getattr(student, "net", student)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(unet, "peft_config", None):  # LoRA student: a LoRA file for load_lora_weights, and merged weights
        import copy

        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        type(pipe).save_lora_weights(str(out / "lora"), unet_lora_layers=lora_sd, safe_serialization=True)
        unet = copy.deepcopy(unet)
        unet.fuse_lora()
        unet.unload_lora()
    components = dict(pipe.components)
    components["unet"] = unet
    components["scheduler"] = scheduler
    new = type(pipe)(**components)
    out.mkdir(parents=True, exist_ok=True)
    new.save_pretrained(str(out), safe_serialization=True)
    (out / "fewstep.json").write_text(json.dumps({
        "objective": objective.name, "student_steps": objective.steps,
        "num_inference_steps": spec["num_inference_steps"], "guidance_scale": spec["guidance_scale"],
        "teacher": teacher.source, "pipeline_class": type(pipe).__name__, "scheduler": spec["scheduler"],
    }, indent=2))
    (out / "README.md").write_text(model_card(teacher, objective, spec, run_config))
    return out


def model_card(teacher, objective, spec: dict, run_config: dict | None) -> str:
    import yaml

    k, g = spec["num_inference_steps"], spec["guidance_scale"]
    if teacher.family in ("sd15", "sdxl"):
        call = f'pipe("a photo of a cat", num_inference_steps={k}, guidance_scale={g})'
    else:
        call = f"pipe(batch_size=4, num_inference_steps={k})"
    lines = [
        "---", "library_name: diffusers", "tags: [fewstep, distillation, " + objective.name + "]", "---", "",
        f"# {objective.name.upper()} {k}-step student of `{teacher.source}`", "",
        f"Distilled with [fewstep](https://pypi.org/project/fewstep/) objective `{objective.name}` into a "
        f"{k}-step student. Pipeline class: `{type(teacher.pipe).__name__}`; scheduler: `{spec['scheduler']}` "
        f"configured with `{spec.get('scheduler_config', {})}`.", "",
        "## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
        "pipe = DiffusionPipeline.from_pretrained(\"PATH_TO_THIS_FOLDER\")",
        f"image = {call}.images[0]", "```", "",
        f"Recommended: `num_inference_steps={k}`, `guidance_scale={g}` (guidance is distilled in; "
        "a higher value would run the teacher-style CFG on the student).", "",
    ]
    if run_config:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def save_toy_student(student, objective, teacher, out_dir) -> Path:
    """Analytic-teacher students: weights as safetensors and a JSON description."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(sd, str(out / "student.safetensors"))
    (out / "student.json").write_text(json.dumps({
        "objective": objective.name, "student_steps": objective.steps, "times": objective.times,
        "teacher": teacher.describe(), "mixture": teacher.mixture.to_json(),
    }, indent=2))
    return out


def load_toy_student(teacher, out_dir):
    from safetensors.torch import load_file

    student = teacher.new_network("student")
    sd = load_file(str(Path(out_dir) / "student.safetensors"))
    student.load_state_dict(sd)
    student.eval()
    return student


def check_roundtrip(out_dir, objective, teacher, student, cond_prompts=None, seed: int = 0, atol: float = 1e-3) -> float:
    """Max abs difference between the exported pipeline's default call and the in-training sampler (latents)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out_dir))
    spec = objective.export_spec()
    g1 = torch.Generator().manual_seed(seed)
    if teacher.family in ("sd15", "sdxl"):
        prompts = cond_prompts or ["a photo of a cat"]
        lat = pipe(prompts, num_inference_steps=spec["num_inference_steps"], guidance_scale=spec["guidance_scale"],
                   generator=g1, output_type="latent").images
        cond = teacher.conditions_for_prompts(prompts)
    else:
        lat = pipe(batch_size=1, num_inference_steps=spec["num_inference_steps"], generator=g1, output_type="np").images
        lat = torch.as_tensor(lat).permute(0, 3, 1, 2) * 2 - 1
        cond = teacher.sample_conditions(1, torch.Generator().manual_seed(0))
    g2 = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(lat), *teacher.sample_shape), generator=g2)
    with torch.no_grad():
        ref = objective.sample(student, noise, cond, generator=g2)
    if teacher.family not in ("sd15", "sdxl"):
        ref = ref.clamp(-1, 1)
    return float((torch.as_tensor(lat).float() - ref.float()).abs().max())
