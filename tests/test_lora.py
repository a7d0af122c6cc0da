"""LoRA students (peft): trained as adapters, exported merged and as a LoRA file for load_lora_weights."""
import torch

from conftest import run_cli_here


def test_lora_student_export(tiny_pipelines, prompts_file, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    run = tmp_path / "run"
    r = run_cli_here("distill", "configs/sd15_dmd2.yaml", f"teacher.path={tiny_pipelines['sd15']}",
                     "teacher.dtype=float32", f"data.prompts={prompts_file}", "student.lora_rank=4",
                     "objective.critic_steps=1", "train.max_steps=3", "train.batch_size=2", "train.lr=1e-2",
                     "train.mixed_precision=no", f"output_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = run / "pipeline"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    merged = DiffusionPipeline.from_pretrained(str(out)).unet
    base = DiffusionPipeline.from_pretrained(tiny_pipelines["sd15"])
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        y_base = base.unet(x, 999, encoder_hidden_states=e).sample
        base.load_lora_weights(str(out / "lora"))
        y_lora = base.unet(x, 999, encoder_hidden_states=e).sample
        y_merged = merged(x, 999, encoder_hidden_states=e).sample
    assert (y_lora - y_base).abs().max() > 1e-4  # the adapter learned something
    assert torch.allclose(y_lora, y_merged, atol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_lora_on_gmm_is_rejected(tmp_path):
    r = run_cli_here("distill", "configs/gmm_dmd2.yaml", "student.lora_rank=4", f"output_dir={tmp_path}/run")
    assert r.returncode != 0 and "lora_rank" in r.stderr and "Traceback" not in r.stderr
