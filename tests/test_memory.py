"""The memory estimate (fewstep.memory, ``fewstep distill --dry-run``, tools/memory_bench.py): exact LoRA sizes from
safetensors headers, the layouts' relations, a dry run that prints it without importing torch, and the bench tool's
estimates from the SDXL-base architecture alone.  The measurements themselves: tools/memory_bench.py (not a test)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli


def test_lora_size_from_headers_is_peft_s(tiny_pipelines):
    from fewstep.lora import LORA_TARGETS, add_adapter
    from fewstep.memory import lora_numel, numel, safetensors_shapes
    from fewstep.testing import tiny_sdxl_components

    shapes = safetensors_shapes(f"{tiny_pipelines['sdxl']}/unet")
    unet = tiny_sdxl_components()["unet"]
    assert numel(shapes) == sum(p.numel() for p in unet.parameters())
    add_adapter(unet, "a", 8, 8, LORA_TARGETS)
    assert lora_numel(shapes, LORA_TARGETS, 8) == sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


def test_layouts_order_and_bytes_per_weight():
    from fewstep.memory import estimate

    unet = {"down_blocks.0.resnets.0.conv1.weight": (64, 64, 3, 3), "mid_block.attentions.0.proj_in.weight": (64, 64)}
    kw = dict(dtype="bfloat16", cpu=False, lora_rank=4, critic_rank=4, targets=["conv1", "proj_in"], batch=1,
              latent_hw=(8, 8), mixed=False)
    full = estimate(unet, {}, student="full", critic="full", **kw)
    own = estimate(unet, {}, student="lora", critic="full", **kw)
    shared = estimate(unet, {}, student="shared", critic="shared", **kw)
    p = 64 * 64 * 9 + 64 * 64
    assert full["params"] == p and full["parts"]["student adam"] == 8 * p
    assert full["parts"]["gradients (one group at a time)"] == 4 * p
    assert full["parts"]["teacher denoiser"] == 2 * p
    assert own["parts"]["student weights"] == 4 * p + 4 * own["student_lora_params"]
    assert shared["parts"]["student weights"] == 4 * shared["student_lora_params"]
    assert shared["total"] < own["total"] < full["total"]
    assert estimate(unet, {}, student="full", critic="full", **{**kw, "dtype": "float16", "cpu": True})["dtype"] == \
        "float32"  # float16 teachers load as float32 on a CPU


def test_dry_run_prints_the_estimate_without_torch(tiny_pipelines, prompts_file):
    code = ("import contextlib, io, json, sys\n"
            "from fewstep.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            f"    main(['distill', 'configs/sdxl_dmd2_lora.yaml', 'teacher.path={tiny_pipelines['sdxl']}',\n"
            f"          'data.prompts={prompts_file}', '--dry-run'])\n"
            "print(json.dumps({'out': buf.getvalue(), 'mods': [m for m in ('torch', 'diffusers') if m in sys.modules]}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["mods"] == []
    lines = [x for x in got["out"].splitlines() if x.startswith("#")]
    assert lines[0].startswith("# estimated peak memory per device")
    assert any("student adam" in x for x in lines) and lines[-1].split()[1] == "total"
    import yaml

    assert yaml.safe_load(got["out"])["student"]["lora_rank"] == 64  # still the resolved config, as YAML


def test_dry_run_without_a_local_teacher_prints_only_the_config(tmp_path):
    r = run_cli("distill", "configs/gmm_dmd2.yaml", "--dry-run", f"output_dir={tmp_path}/run")
    assert r.returncode == 0 and "estimated peak memory" not in r.stdout


@pytest.mark.slow
def test_bench_dry_run_estimates_the_sdxl_base_architecture(tmp_path):
    """The bench tool's estimates from configs/arch/sdxl_base_unet.json alone (meta device: nothing allocated)."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "tools/memory_bench.py", "--dry-run", "--json", str(out)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    shared = rows["shared base: LoRA student + LoRA critic"]["estimate_parts_gb"]
    assert shared["teacher denoiser"] == pytest.approx(2 * 2_567_463_684 / 1e9)  # SDXL-base's UNet, bfloat16
    assert shared["student weights"] == pytest.approx(4 * 196_751_360 / 1e9)  # rank 64 on the reference targets
    assert rows["full student + full critic"]["estimate_gb"] > rows["shared base: LoRA student + LoRA critic"]["estimate_gb"]
