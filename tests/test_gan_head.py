"""DMD2's GAN head (strided conv + GroupNorm + SiLU blocks down to 1x1, float32) and the DMD regression pairs on a
text-conditioned teacher."""
import numpy as np
import pytest
import torch
from torch import nn

from fewstep.objectives.critics import GANHead, halvings
from fewstep.teachers.unet import bottleneck_side


def _convs(head):
    return [m for m in head.modules() if isinstance(m, nn.Conv2d)]


def test_head_shape_on_sdxl_bottleneck():
    """SDXL at 1024^2: 128x128 latents, 3 down blocks -> a 32x32x1280 mid-block map -> 5 halving blocks + 1x1 conv."""
    side = bottleneck_side(128, 3)
    assert side == 32 and bottleneck_side(64, 4) == 8  # SD1.5 at 512^2: 8x8
    with torch.device("meta"):  # SDXL's width without allocating it
        head = GANHead(1280, side)
        logits = head(torch.empty(3, 1280, side, side))
    assert logits.shape == (3,)
    assert len(head.blocks) == 5
    for block in head.blocks:
        conv, norm, act = block
        assert (conv.kernel_size, conv.stride, conv.padding) == ((4, 4), (2, 2), (1, 1))
        assert conv.in_channels == conv.out_channels == 1280
        assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 32 and isinstance(act, nn.SiLU)
    assert (head.out.kernel_size, head.out.in_channels, head.out.out_channels) == ((1, 1), 1280, 1)
    assert len(_convs(head)) == 6


@pytest.mark.parametrize("size,blocks", [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (8, 3), (12, 3), (16, 4), (24, 4)])
def test_head_reaches_one_by_one(size, blocks):
    assert halvings(size) == blocks
    head = GANHead(8, size)
    assert len(head.blocks) == blocks
    seen = []
    head.out.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    assert head(torch.randn(2, 8, size, size)).shape == (2,)
    assert seen == [(2, 1, 1, 1)]  # the map is 1x1 when it reaches the logit conv: no pooling


def test_head_rejects_other_map_size():
    with pytest.raises(ValueError, match=r"built for 8x8 bottleneck maps, got features of shape \(2, 8, 16, 16\)"):
        GANHead(8, 8)(torch.randn(2, 8, 16, 16))
    with pytest.raises(ValueError, match="size must be >= 0"):
        GANHead(8, -1)


def test_vector_head_keeps_its_mlp():
    """GMM teachers have no map: the MLP head, with its former parameter names, one logit per sample."""
    head = GANHead(16)
    assert set(head.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "out.weight", "out.bias"}
    assert head(torch.randn(5, 16)).shape == (5,)


def test_head_runs_in_float32_under_bf16_autocast():
    head = GANHead(16, 8)
    dtypes = []
    for m in head.modules():
        if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.SiLU)):
            m.register_forward_hook(lambda m, i, o: dtypes.append((type(m).__name__, i[0].dtype, o.dtype)))
    feats = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nn.Conv2d(16, 16, 1)(feats.float()).dtype == torch.bfloat16  # autocast is really on here
        logits = head(feats)
    assert len(dtypes) == 3 * 3 + 1
    assert all(i == o == torch.float32 for _, i, o in dtypes), dtypes
    assert logits.dtype == torch.float32
    logits.sum().backward()
    assert feats.grad is not None and all(p.grad.dtype == torch.float32 for p in head.parameters())


def test_tiny_sdxl_teacher_declares_its_bottleneck(tiny_pipelines):
    """teacher.feature_size is the critic's real mid-block map, at the pipeline's size and after set_resolution."""
    from fewstep.objectives.critics import Critic
    from fewstep.teachers.load import load_teacher

    teacher = load_teacher(tiny_pipelines["sdxl"], 1.0, "float32")
    for pixels in (None, 64):
        if pixels:
            teacher.set_resolution(pixels)
        c, s = teacher.feature_channels, teacher.feature_size
        critic = Critic(teacher.new_network("critic"), GANHead(c, s))
        cond = teacher.encode_prompts(["a red dog", "a cat"])
        x = torch.randn(2, *teacher.sample_shape)
        _, _, feats = critic.denoiser(x, torch.full((2,), 0.5), cond, return_native=True, return_features=True)
        assert feats.shape[1:] == (c, s, s)
        _, logits = critic(x, torch.full((2,), 0.5), cond, with_logits=True)
        assert logits.shape == (2,) and len(critic.head.blocks) == halvings(s)
    assert teacher.feature_size == 2 * bottleneck_side(16, 2)  # 64 px: twice the default 32 px


def _images(folder, n=3):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def _sdxl_run(tiny_pipelines, prompts_file, out, *overrides, log=None):
    from fewstep.api import distill
    from fewstep.config import load_config

    cfg = load_config("configs/sdxl_dmd2.yaml", [
        f"teacher.path={tiny_pipelines['sdxl']}", "teacher.dtype=float32", f"data.prompts={prompts_file}",
        "train.batch_size=2", "train.sample_every=0", "train.tracker=none", "train.gradient_checkpointing=false",
        "train.log_every=1", "train.lr_warmup_steps=0", "train.lr=1e-4", f"output_dir={out}", *overrides])
    return distill(cfg, log=(lambda *a: None) if log is None else log)


def test_tiny_sdxl_gan_run_resumes_exactly(tiny_pipelines, prompts_file, tmp_path):
    """DMD2 + GAN on tiny SDXL under bf16 autocast: both GAN terms logged and finite, the checkpoint holds the conv
    head, and 2 steps + resume to 4 equals 4 steps straight (student and critic with its head)."""
    from safetensors.torch import load_file

    args = [f"data.images={_images(tmp_path / 'images')}", "objective.gan_weight=0.01", "objective.critic_steps=2",
            "student.steps=1", "train.mixed_precision=bf16", "train.checkpoint_every=2"]
    m = _sdxl_run(tiny_pipelines, prompts_file, tmp_path / "a", *args, "train.max_steps=4")
    keys = set().union(*[h.keys() for h in m["history_tail"]])
    assert {"critic/loss_gan_d", "critic/logits_real", "student/loss_gan_g"} <= keys, keys
    assert all(np.isfinite(v) for h in m["history_tail"] for v in h.values() if isinstance(v, float))
    _sdxl_run(tiny_pipelines, prompts_file, tmp_path / "b", *args, "train.max_steps=2")
    lines = []
    _sdxl_run(tiny_pipelines, prompts_file, tmp_path / "b", *args, "train.max_steps=4", log=lines.append)
    assert any("resumed from" in str(x) and "checkpoint-0000002" in str(x) for x in lines), lines

    def ck(run, name):
        return load_file(str(tmp_path / run / "checkpoints" / "checkpoint-0000004" / name))

    critic_a, critic_b = ck("a", "model_1.safetensors"), ck("b", "model_1.safetensors")
    head = sorted(k for k in critic_a if k.startswith("head."))
    assert head == sorted(["head.blocks.0.0.weight", "head.blocks.0.0.bias", "head.blocks.0.1.weight",
                           "head.blocks.0.1.bias", "head.blocks.1.0.weight", "head.blocks.1.0.bias",
                           "head.blocks.1.1.weight", "head.blocks.1.1.bias", "head.blocks.2.0.weight",
                           "head.blocks.2.0.bias", "head.blocks.2.1.weight", "head.blocks.2.1.bias",
                           "head.out.weight", "head.out.bias"])  # 8x8 bottleneck: 3 blocks
    assert critic_a["head.out.weight"].dtype == torch.float32
    for a, b in ((critic_a, critic_b), (ck("a", "model.safetensors"), ck("b", "model.safetensors"))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(str(tmp_path / "a" / "checkpoints" / "checkpoint-0000002" / "model_1.safetensors"))
    assert all(not torch.equal(before[k], critic_a[k]) for k in head)  # every head parameter trains


def test_dmd_regression_pairs_use_data_prompts(tiny_pipelines, tmp_path):
    """objective=dmd (reg_weight > 0) on a text-conditioned teacher: the start-up ODE pairs take their conditions from
    data.prompts, and a 2-step run trains with the regression term."""
    from safetensors.torch import load_file

    from fewstep.teachers.load import load_teacher

    prompts = ["a photo of a cat", "blue flowers in a field"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts) + "\n")
    m = _sdxl_run(tiny_pipelines, pf, tmp_path / "run", "objective.name=dmd", "objective.reg_weight=0.25",
                  "objective.reg_pairs=6", "objective.reg_ode_steps=2", "objective.gan_weight=0", "data.images=null",
                  "student.steps=1", "train.max_steps=2", "train.mixed_precision=no")
    assert m["objective"] == "dmd"
    assert any("student/loss_reg_mse" in h and np.isfinite(h["student/loss_reg_mse"]) for h in m["history_tail"])
    pairs = load_file(str(tmp_path / "run" / "regression_pairs.safetensors"))
    assert pairs["path.0"].shape[0] == pairs["path.1"].shape[0] == pairs["cond.prompt_embeds"].shape[0] == 6
    teacher = load_teacher(tiny_pipelines["sdxl"], 1.0, "float32")
    enc = teacher.encode_prompts(prompts)
    used = set()
    for pe in pairs["cond.prompt_embeds"]:
        match = [i for i in range(len(prompts)) if torch.allclose(pe, enc.prompt_embeds[i], atol=1e-5)]
        assert len(match) == 1, "a cached pair's condition is not the encoding of a data.prompts line"
        used.add(match[0])
    assert used == {0, 1}
    assert not torch.allclose(enc.prompt_embeds[0], teacher.encode_prompts([""]).prompt_embeds[0])
