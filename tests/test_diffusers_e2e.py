"""Tiny SDXL / SD1.5 / DDPM teachers: distill with dmd2 4-step (``fewstep distill``, in-process), export, reload all
three in one fresh process, compare."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli_here

CHECK = r"""
import json, sys, torch
from diffusers import DiffusionPipeline
from fewstep.api import load_run
from fewstep.export import check_roundtrip
results = {}
for run, family in zip(sys.argv[1::2], sys.argv[2::2]):
    pipe = DiffusionPipeline.from_pretrained(run + "/pipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    out = {"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
           "timesteps": pipe.scheduler.timesteps.tolist()}
    kw = {"num_inference_steps": 4, "output_type": "np"}
    if family == "ddpm":
        img = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), **kw).images
    else:
        img = pipe("a red dog", guidance_scale=0.0, generator=torch.Generator().manual_seed(0), **kw).images
    out["image_shape"] = list(img.shape)
    out["finite"] = bool(torch.isfinite(torch.as_tensor(img)).all())
    cfg, teacher, data, obj = load_run(run)
    student = obj.student
    student.net = type(student.net).from_pretrained(run + "/pipeline/unet")
    out["max_diff"] = check_roundtrip(run + "/pipeline", obj, teacher, student, ["a red dog", "a photo of a cat"]
                                      if family != "ddpm" else None)
    results[family] = out
print("RESULT " + json.dumps(results))
"""

FAMILIES = [("sdxl", "StableDiffusionXLPipeline"), ("sd15", "StableDiffusionPipeline"), ("ddpm", "DDPMPipeline")]


@pytest.fixture(scope="module")
def roundtrips(tiny_pipelines, prompts_file, tmp_path_factory):
    """``fewstep distill`` for each family in this process (3 steps), then one fresh process loads every export with
    the stock API (the fresh process is the point: no fewstep state carried over)."""
    root = tmp_path_factory.mktemp("e2e")
    for family, _ in FAMILIES:
        cfg = "configs/sdxl_dmd2.yaml" if family == "sdxl" else "configs/sd15_dmd2.yaml"
        args = ["distill", cfg, f"teacher.path={tiny_pipelines[family]}", "teacher.dtype=float32", "student.steps=4",
                "objective.gan_weight=0", "data.images=null", "train.max_steps=3", "train.batch_size=2",
                "train.mixed_precision=no", "train.checkpoint_every=2", "train.sample_every=0",
                f"output_dir={root / family}", "teacher.guidance_scale=3"]
        args.append(f"data.prompts={prompts_file}" if family != "ddpm" else "data.prompts=null")
        r = run_cli_here(*args)
        assert r.returncode == 0, r.stderr[-3000:]
    argv = [a for family, _ in FAMILIES for a in (str(root / family), family)]
    p = subprocess.run([sys.executable, "-c", CHECK, *argv], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return root, json.loads(p.stdout.split("RESULT ", 1)[1])


@pytest.mark.parametrize("family,cls", FAMILIES)
def test_distill_export_roundtrip(family, cls, roundtrips):
    root, results = roundtrips
    run = root / family
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    assert (run / "pipeline" / "README.md").read_text().count("num_inference_steps=4") >= 1
    assert list((run / "checkpoints").glob("checkpoint-*"))
    assert list((run / "logs").rglob("events.out.tfevents*"))
    # a fresh process loads the folder with the stock API
    res = results[family]
    assert res["class"] == cls
    assert res["scheduler"] == "LCMScheduler"
    assert res["timesteps"] == [999, 749, 499, 249]
    assert res["finite"]
    assert res["image_shape"][0] == 1 and res["image_shape"][-1] == 3
    assert res["max_diff"] < 1e-3, res
