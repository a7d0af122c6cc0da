"""One frozen base, many adapters (student.share_base): the teacher, a LoRA student and a LoRA critic on one UNet.

Tiny SDXL-shaped pipelines, in-process: the LoRA target list against an SDXL-shaped UNet, the config's layouts, the
teacher's output unchanged by adapters (bit for bit), gradients reaching each adapter only through its own loss,
gradient checkpointing recomputing with the adapter of the forward, and a short DMD2 run that trains, resumes
exactly and exports the merged student and the load_lora_weights file."""
import copy

import pytest
import torch

from fewstep.lora import LORA_TARGETS

# the DMD2 and diffusers LCM-LoRA SDXL reference scripts' target modules
REFERENCE_TARGETS = {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"}


def _build(tiny, prompts, *overrides, run=None):
    from fewstep.api import build
    from fewstep.config import load_config

    cfg = load_config("configs/sdxl_dmd2_lora.yaml", [
        f"teacher.path={tiny['sdxl']}", "teacher.dtype=float32", f"data.prompts={prompts}", "student.lora_rank=4",
        "student.lora_alpha=4", "student.steps=1", "train.batch_size=2", "train.tracker=none", "train.progress=none",
        f"output_dir={run or 'runs/unused'}", *overrides])
    return build(cfg)


def _perturb(*modules, seed=0):
    """Non-zero LoRA B matrices (a trained adapter), so that an adapter changes its network's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_targets_are_the_references_and_each_matches_an_sdxl_unet():
    from diffusers import UNet2DConditionModel

    from fewstep.lora import add_adapter, tuner_layers
    from fewstep.testing import tiny_sdxl_components

    assert set(LORA_TARGETS) == REFERENCE_TARGETS
    unet = tiny_sdxl_components()["unet"]
    assert isinstance(unet, UNet2DConditionModel) and unet.config.addition_embed_type == "text_time"
    names = [n for n, _ in unet.named_modules()]
    matched = {t: [n for n in names if n == t or n.endswith("." + t)] for t in LORA_TARGETS}
    assert all(matched.values()), [t for t, m in matched.items() if not m]
    add_adapter(unet, "student", 4, 4, LORA_TARGETS)
    layers = tuner_layers(unet)
    assert set(layers) == {n for m in matched.values() for n in m}
    kinds = {type(layers[n].base_layer).__name__ for n in layers}
    assert kinds == {"Linear", "Conv2d"}
    for frozen_part in ("conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_1"):
        assert frozen_part not in layers


def test_config_layouts(tiny_pipelines, prompts_file):
    from fewstep.config import ConfigError

    # LoRA student: student and critic are adapters on the teacher's own UNet
    teacher, _, obj = _build(tiny_pipelines, prompts_file)
    base = teacher.pipe.unet
    assert obj.student.shared_base and obj.critic.denoiser.shared_base and obj.student.net is base
    assert list(base.peft_config) == ["student", "critic"]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in obj.student.parameters())
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    n_lora = sum(p.numel() for p in obj.student.parameters())
    assert n_lora == sum(p.numel() for n, p in base.named_parameters() if ".student." in n)
    assert sum(p.numel() for p in obj.critic.parameters()) == n_lora  # the critic inherits rank and alpha
    assert set(obj.student.state_dict()) == set(obj.critic.denoiser.state_dict())  # adapter weights only
    # LoRA student + full critic: a float32 copy without adapters beside the shared base
    teacher, _, obj = _build(tiny_pipelines, prompts_file, "objective.critic_lora_rank=0")
    assert obj.student.shared_base and not obj.critic.denoiser.shared_base
    assert not any("lora" in n for n, _ in obj.critic.named_parameters())
    assert obj.critic.denoiser.net is not teacher.pipe.unet
    # full student + LoRA critic (rank 2, alpha = rank)
    teacher, _, obj = _build(tiny_pipelines, prompts_file, "student.lora_rank=0", "objective.critic_lora_rank=2")
    assert not obj.student.shared_base and obj.critic.denoiser.shared_base
    assert teacher.critic_lora == (2, 2) and list(teacher.pipe.unet.peft_config) == ["critic"]
    assert not any("lora" in n for n, _ in obj.student.named_parameters())
    # share_base=false: today's layout, a LoRA on a float32 copy of its own and a full critic
    teacher, _, obj = _build(tiny_pipelines, prompts_file, "student.share_base=false")
    assert not obj.student.shared_base and list(obj.student.net.peft_config) == ["default"]
    assert not getattr(teacher.pipe.unet, "peft_config", None) and not teacher.denoiser.shared_base
    with pytest.raises(ConfigError, match="share_base=true needs"):
        _build(tiny_pipelines, prompts_file, "student.lora_rank=0", "student.share_base=true")
    with pytest.raises(ConfigError, match="critic_lora_rank must be >= 0"):
        _build(tiny_pipelines, prompts_file, "objective.critic_lora_rank=-1")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_teacher_output_is_unchanged_by_adapters(tiny_pipelines, prompts_file, dtype):
    from fewstep.teachers.load import load_diffusers_teacher

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([0.3, 0.9])
    before_teacher = load_diffusers_teacher(tiny_pipelines["sdxl"], dtype=dtype)
    cond = before_teacher.conditions_for_prompts(["a photo of a cat", "a red dog"])
    with torch.no_grad():
        before = before_teacher(x, t, cond, guidance_scale=3.0)
    teacher, _, obj = _build(tiny_pipelines, prompts_file, f"teacher.dtype={dtype}")
    assert next(teacher.pipe.unet.parameters()).dtype == getattr(torch, dtype)  # the base stays in the teacher dtype
    _perturb(obj.student, obj.critic)
    with torch.no_grad():
        after = teacher(x, t, cond, guidance_scale=3.0)
        student = obj.student(x, t, cond)
        critic = obj.critic(x, t, cond)
        again = teacher(x, t, cond, guidance_scale=3.0)
    assert torch.equal(before, after) and torch.equal(before, again)
    plain = before_teacher.denoiser
    with torch.no_grad():
        ref = plain(x, t, cond)
    assert (student - ref).abs().max() > 1e-3 and (critic - ref).abs().max() > 1e-3
    assert (student - critic).abs().max() > 1e-3


def test_gradients_reach_each_adapter_only_through_its_own_loss(tiny_pipelines, prompts_file):
    """Student loss (DM + GAN generator term through the frozen critic): the student adapter only.  Critic loss (DSM +
    discriminator): the critic adapter and the GAN head only.  The shared base never gets a gradient."""
    from fewstep.objectives.base import Batch
    from fewstep.objectives.dmd import DMD2, DMD2Config

    from fewstep.teachers.load import load_diffusers_teacher

    teacher = load_diffusers_teacher(tiny_pipelines["sdxl"])  # gan_weight > 0 without data.images: built by hand
    teacher.student_lora = teacher.critic_lora = (4, 4)
    teacher.share_base = True
    obj = DMD2(DMD2Config(gan_weight=0.5, critic_steps=1), teacher, 1)
    _perturb(obj.student, obj.critic)
    nets = obj.networks()
    cond = teacher.conditions_for_prompts(["a photo of a cat", "a red dog"])
    real = torch.randn(2, 4, 16, 16)

    def batch(seed, shared=None):
        return Batch(size=2, cond=cond, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                     real=real, real_cond=cond, shared=shared)

    def grads(module):
        return [p.grad for p in module.parameters()]

    obj.loss("student", batch(1), 0, nets).loss.backward()
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads(obj.student))
    assert all(gr is None for gr in grads(obj.critic))
    assert all(p.grad is None for n, p in teacher.pipe.unet.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in obj.critic.parameters())  # frozen only during the generator term
    obj.student.zero_grad(set_to_none=True)
    obj.loss("critic", batch(2), 0, nets).loss.backward()
    assert all(gr is not None for gr in grads(obj.critic.denoiser))
    assert all(p.grad is not None for m in (obj.critic.head.blocks, obj.critic.head.out) for p in m.parameters())
    assert all(gr is None for gr in grads(obj.student))
    assert all(p.grad is None for n, p in teacher.pipe.unet.named_parameters() if "lora_" not in n)


def test_gradient_checkpointing_recomputes_with_the_adapter_of_the_forward(tiny_pipelines, prompts_file):
    """With several adapters on one base, the backward's recomputation must see the forward's adapter (after the
    forward, the teacher and the critic run with others): fewstep.lora.enable_gradient_checkpointing."""
    from fewstep.lora import enable_gradient_checkpointing

    teacher, _, obj = _build(tiny_pipelines, prompts_file)
    _perturb(obj.student, obj.critic)
    cond = teacher.conditions_for_prompts(["a photo of a cat", "a red dog"])
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([0.5, 0.8])

    def student_grads():
        obj.student.zero_grad(set_to_none=True)
        out = obj.student(x, t, cond)
        with torch.no_grad():  # other calls on the same base between the forward and the backward
            teacher(x, t, cond)
            obj.critic(x, t, cond)
        out.square().mean().backward()
        return [p.grad.clone() for p in obj.student.parameters()]

    ref = student_grads()
    enable_gradient_checkpointing(teacher.pipe.unet)
    got = student_grads()
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(ref, got))
    teacher.pipe.unet.enable_gradient_checkpointing()  # diffusers' own: the recomputation runs with adapters off
    from torch.utils.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):  # torch sees the recomputation differ from the forward
        student_grads()
    teacher.pipe.unet.disable_gradient_checkpointing()


def test_deepcopy_of_an_adapter_is_a_new_adapter_on_the_same_base(tiny_pipelines, prompts_file):
    teacher, _, obj = _build(tiny_pipelines, prompts_file)
    _perturb(obj.student)
    twin = copy.deepcopy(obj.student)
    assert twin.net is obj.student.net and twin.adapter != obj.student.adapter
    cond = teacher.conditions_for_prompts(["a photo of a cat"])
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(twin(x, 0.7, cond), obj.student(x, 0.7, cond))
        next(twin.parameters()).add_(1.0)
        assert not torch.equal(twin(x, 0.7, cond), obj.student(x, 0.7, cond))


def test_shared_base_dmd2_lora_trains_resumes_and_exports(tiny_pipelines, prompts_file, tmp_path):
    """4-step DMD2 (phased exits, one LoRA student + LoRA critic on the teacher's UNet, EMA): 4 steps straight == 2 +
    resume + 2, checkpoints hold adapters only, and the export is the merged student plus a LoRA file that
    load_lora_weights puts on the teacher with the same output (alpha != rank: the file carries its scale)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from fewstep.api import distill
    from fewstep.config import load_config

    def run(out, steps):
        cfg = load_config("configs/sdxl_dmd2_lora.yaml", [
            f"teacher.path={tiny_pipelines['sdxl']}", "teacher.dtype=float32", f"data.prompts={prompts_file}",
            "student.lora_rank=4", "student.lora_alpha=8", "objective.critic_steps=1", "objective.phase_steps=1",
            f"train.max_steps={steps}", "train.batch_size=1", "train.lr=1e-2", "train.mixed_precision=no",
            "train.checkpoint_every=2", "train.ema_decay=0.5", "train.tracker=none", "train.progress=none",
            f"output_dir={out}"])
        return distill(cfg, log=lambda *a: None)

    a, b = tmp_path / "straight", tmp_path / "resumed"
    run(a, 4)
    run(b, 2)
    run(b, 4)
    ck_a, ck_b = a / "checkpoints" / "checkpoint-0000004", b / "checkpoints" / "checkpoint-0000004"
    for f in ("model.safetensors", "model_1.safetensors"):  # student, critic: adapter weights only
        sa, sb = load_file(str(ck_a / f)), load_file(str(ck_b / f))
        assert sa.keys() == sb.keys() and all("lora_" in k for k in sa)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f
    pipe_dir = a / "pipeline"
    merged = DiffusionPipeline.from_pretrained(str(pipe_dir)).unet
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = DiffusionPipeline.from_pretrained(tiny_pipelines["sdxl"])
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g)
    kw = {"encoder_hidden_states": e, "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                                             "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}}
    with torch.no_grad():
        y_base = base.unet(x, 999, **kw).sample
        base.load_lora_weights(str(pipe_dir / "lora"))
        y_lora = base.unet(x, 999, **kw).sample
        y_merged = merged(x, 999, **kw).sample
    assert (y_lora - y_base).abs().max() > 1e-4  # the adapter learned something
    assert torch.allclose(y_lora, y_merged, atol=1e-4), float((y_lora - y_merged).abs().max())


def test_separate_phased_experts_are_adapters_exported_merged(tiny_pipelines, prompts_file, tmp_path):
    """phased_dmd experts=separate with a LoRA student on the shared base: one adapter per expert; each is exported
    as its own merged UNet, written shard by shard (equal to merging in memory)."""
    from diffusers import UNet2DConditionModel

    from fewstep.lora import plain_clone

    teacher, _, obj = _build(tiny_pipelines, prompts_file, "objective=phased_dmd", "objective.experts=separate",
                             "student.steps=2")
    names = [e.adapter for e in obj.student.experts]
    assert names == ["student", "student_1"] and obj.student.num_experts == 2
    assert list(teacher.pipe.unet.peft_config) == ["student", "student_1", "critic"]
    _perturb(*obj.student.experts)
    mods = obj.export_modules(obj.student)
    mods["expert_1"].save_pretrained(str(tmp_path / "expert_1"))
    got = UNet2DConditionModel.from_pretrained(str(tmp_path / "expert_1")).state_dict()
    want = plain_clone(teacher.pipe.unet, "student_1").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    base_conv1 = teacher.pipe.unet.down_blocks[0].resnets[0].conv1.base_layer.weight
    assert not torch.equal(got["down_blocks.0.resnets.0.conv1.weight"], base_conv1)  # the adapter is merged in


def test_merged_export_of_a_bf16_base_is_float32_and_keeps_a_small_update(tiny_pipelines, prompts_file, tmp_path):
    """save_merged on a bfloat16 shared base writes float32 ``W + B A`` (summed in float32): an update below bf16's
    resolution survives, where peft's in-dtype merge would round it away."""
    from safetensors.torch import load_file

    from fewstep.lora import save_merged, tuner_layers

    teacher, _, obj = _build(tiny_pipelines, prompts_file, "teacher.dtype=bfloat16")
    unet = teacher.pipe.unet
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in obj.student.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-4)  # a tiny trained update
    out = save_merged(unet, "student", tmp_path / "unet")
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    assert merged and all(v.dtype == torch.float32 for v in merged.values() if v.is_floating_point())
    lost = 0
    for path, layer in tuner_layers(unet).items():
        if "student" not in getattr(layer, "lora_A", {}):
            continue
        base = layer.base_layer.weight
        delta = layer.get_delta_weight("student").float()
        want = base.float() + delta
        torch.testing.assert_close(merged[f"{path}.weight"], want, rtol=0, atol=1e-7)
        lost += int((((base + delta.to(base.dtype)).float() == base.float()) & (delta != 0)).sum())
    assert lost > 0, "the update was large enough for bf16: the test would not see a rounding loss"


@pytest.mark.parametrize("critic_rank", [None, 0])
def test_phase_restart_holds_no_copy_of_the_unet(tiny_pipelines, prompts_file, critic_rank):
    """Phased DMD's critic restart between phases: a LoRA critic on the shared base zeroes its B (nothing held but
    markers); a full float32 critic reloads the teacher's own tensors (held by reference, not a second UNet).  Either
    way the restarted critic is the teacher again."""
    from fewstep.api import build
    from fewstep.config import load_config

    cfg = load_config("configs/sdxl_phased_dmd.yaml", [
        f"teacher.path={tiny_pipelines['sdxl']}", "teacher.dtype=float32", f"data.prompts={prompts_file}",
        "student.lora_rank=4", "student.lora_alpha=4", "objective.phase_steps=2", "train.batch_size=1",
        "train.tracker=none", "train.progress=none", "output_dir=runs/unused",
        *([] if critic_rank is None else [f"objective.critic_lora_rank={critic_rank}"])])
    teacher, _, obj = build(cfg)
    init = obj._critic_init
    assert init, "no restart state"
    teacher_ptrs = {p.data_ptr() for p in teacher.pipe.unet.parameters()}
    if critic_rank is None:
        assert all(v is None for v in init.values()) and all("lora_B" in k for k in init)
    else:
        assert all(v is not None and v.data_ptr() in teacher_ptrs for v in init.values())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in obj.critic.denoiser.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([0.3, 0.8])
    cond = teacher.conditions_for_prompts(["a photo of a cat", "a red dog"])
    with torch.no_grad():
        want = teacher.denoiser(x, t, cond)
        assert (obj.critic.denoiser(x, t, cond) - want).abs().max() > 1e-3  # moved off the teacher
        assert obj.reset_groups(2) == ["critic"]
        torch.testing.assert_close(obj.critic.denoiser(x, t, cond), want, rtol=0, atol=1e-5)
