"""Sharded training (fewstep.sharding): FSDP2 on 2 CPU processes over gloo through the shipped accelerate config,
exact resume with the optimizer state in the checkpoint, the export gathered whole; DeepSpeed's one-line errors."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port, launch_failure

FSDP_YAML = ROOT / "configs" / "accelerate" / "fsdp.yaml"
GMM = ["configs/gmm_dmd2.yaml", "train.batch_size=32", "train.tracker=none", "train.log_every=1",
       "objective.critic_steps=2", "train.max_steps=4", "train.checkpoint_every=2"]  # EMA on (the config's 0.98)


def _env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return e


def _launch(out, *args, wrap=("--fsdp_transformer_layer_cls_to_wrap", "Linear")):
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml`` with 2 CPU processes (``wrap``: each FSDP
    unit one Linear layer, so the GMM networks are sharded in nested units as a UNet's blocks are)."""
    # a free port of its own: the config's static rendezvous would otherwise take 29500, which another launch on this
    # machine (a second pytest worker, a user's run) may hold or be about to take
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_YAML), "--num_processes", "2",
           "--main_process_port", str(free_port()), *wrap, "-m", "fewstep", "distill", *args, f"output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    if r.returncode and "(SIGABRT)" in r.stderr:
        # once (CI, session 5, a loaded 2-core machine): rank 1 died by SIGABRT, the kept log tail naming only the
        # signal; the run is started again from nothing (a deterministic fault fails that second launch as well)
        import warnings

        warnings.warn("an FSDP launch died by SIGABRT; launched once more from nothing:\n"
                      + launch_failure(r)[:2000])
        shutil.rmtree(out, ignore_errors=True)
        cmd[cmd.index("--main_process_port") + 1] = str(free_port())
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert r.returncode == 0, launch_failure(r)
    return r


def _dcp(folder: Path) -> dict:
    """A sharded (torch.distributed.checkpoint) folder read back whole, flattened to ``{dotted key: value}``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = folder.parent.parent / f"{folder.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(dst))
    out = {}

    def walk(x, key):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = x
    walk(torch.load(dst, weights_only=False), "")
    return out


def _equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    _launch(out, *GMM)
    return out


def test_fsdp_cpu_checkpoint_keeps_optimizer_state_and_export_is_whole(straight):
    """The checkpoint holds each network and its AdamW moments as shards of both processes; the exported student is
    the whole network, equal to the EMA written in the checkpoint."""
    import json

    assert json.loads((straight / "metrics.json").read_text())["num_processes"] == 2
    ck = straight / "checkpoints" / "checkpoint-0000004"
    for name in ("pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1"):
        assert sorted(p.name for p in (ck / name).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], name
    from fewstep.teachers.gmm import ResidualMLP

    trained = [f"net.residual.{n}" for n, _ in ResidualMLP(2, 8).named_parameters()]  # the student's, in order
    assert set(trained) < {k.split(".", 1)[1] for k in _dcp(ck / "pytorch_model_fsdp_0")}
    for i, n_steps in ((0, 2), (1, 4)):  # student: steps 0 and 2 (critic_steps=2); critic: every step
        opt = _dcp(ck / f"optimizer_{i}")
        moments = {k for k in opt if k.endswith(".exp_avg_sq")}
        assert len(moments) == len(trained), sorted(moments)
        assert all(opt[k].shape == opt[k.replace("exp_avg_sq", "exp_avg")].shape for k in moments)
        assert sum(float(opt[k].abs().sum()) for k in moments) > 0  # real moments, not a fresh optimizer's
        assert {float(v) for k, v in opt.items() if k.endswith(".step")} == {float(n_steps)}
    ema = torch.load(ck / "custom_checkpoint_0.pkl", weights_only=False)["shadow_params"]
    assert len(ema) == len(trained) and all(type(s) is torch.Tensor for s in ema)  # gathered whole, not shards
    exported = load_file(str(straight / "student" / "student.safetensors"))
    for name, shadow in zip(trained, ema):
        assert torch.equal(exported[name], shadow), name


@pytest.mark.slow  # a second 2-process run (~25 s on 2 shared cores, on top of the fixture's)
def test_fsdp_cpu_resume_is_exact(straight, tmp_path):
    """4 steps straight == its step-2 checkpoint resumed for 2 more: students, critics, AdamW moments and EMA equal."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-0000002", resumed / "checkpoints" / "checkpoint-0000002")
    r = _launch(resumed, *GMM)
    assert "resumed from" in r.stdout + r.stderr and "at step 2" in r.stdout + r.stderr
    a, b = straight / "checkpoints" / "checkpoint-0000004", resumed / "checkpoints" / "checkpoint-0000004"
    for name in ("pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1"):
        _equal(_dcp(a / name), _dcp(b / name))
    ea = torch.load(a / "custom_checkpoint_0.pkl", weights_only=False)
    eb = torch.load(b / "custom_checkpoint_0.pkl", weights_only=False)
    assert ea["optimization_step"] == eb["optimization_step"] == 2
    for x, y in zip(ea["shadow_params"], eb["shadow_params"]):
        assert torch.equal(x, y)
    _equal(load_file(str(straight / "student" / "student.safetensors")),
           load_file(str(resumed / "student" / "student.safetensors")))


@pytest.mark.slow  # ~65 s: a tiny SD1.5 teacher, 2 processes
def test_fsdp_cpu_diffusers_student_exports_whole(tiny_pipelines, prompts_file, tmp_path):
    """A UNet student and critic sharded by their own diffusers blocks (the shipped config, no class list), 4-step
    DMD2 (the critic restarts between phases), a sample grid mid-run: the exported UNet is the whole trained one."""
    from diffusers import UNet2DConditionModel

    run = tmp_path / "run"
    _launch(run, "configs/sd15_dmd2.yaml", f"teacher.path={tiny_pipelines['sd15']}", "teacher.dtype=float32",
            "student.steps=4", "objective.gan_weight=0", "data.images=null", "train.max_steps=3", "train.batch_size=2",
            "train.mixed_precision=no", "train.checkpoint_every=2", "train.sample_every=2", "train.tracker=none",
            f"data.prompts={prompts_file}", "train.ema_decay=0", wrap=())
    assert (run / "samples" / "step_0000002.png").is_file()
    trained = {k.split(".net.", 1)[1]: v for k, v in _dcp(run / "checkpoints" / "checkpoint-0000003"
                                                          / "pytorch_model_fsdp_0").items() if ".net." in k}
    unet = UNet2DConditionModel.from_pretrained(run / "pipeline" / "unet")
    teacher = UNet2DConditionModel.from_pretrained(Path(tiny_pipelines["sd15"]) / "unet")
    got, ref = unet.state_dict(), teacher.state_dict()
    assert got.keys() == ref.keys() and all(got[k].shape == ref[k].shape for k in got)
    assert any(not torch.equal(got[k], ref[k]) for k in got)  # trained
    for k in got:
        assert torch.equal(got[k], trained[k]), k


# ---- in-process checks: the launch errors and the wrap classes --------------------------------
def _distill(tmp_path, *overrides, config=GMM[0]):
    from fewstep.api import distill
    from fewstep.config import load_config

    over = [o for o in GMM[1:] if config == GMM[0] or not o.startswith("objective.")]
    return distill(load_config(config, [*over, *overrides, f"output_dir={tmp_path / 'run'}"]), log=lambda *a: None)


def test_deepspeed_errors_are_one_line(tmp_path, monkeypatch):
    import importlib.util

    from fewstep.config import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "deepspeed" else real_find(name, *a, **k))
    with pytest.raises(ConfigError, match=r"^deepspeed is not installed: pip install deepspeed$"):
        _distill(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object() if name == "deepspeed" else real_find(name, *a, **k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"DeepSpeed needs CUDA GPUs"):
        _distill(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError) as e:
        _distill(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "'dmd2' trains 2 (student, critic)" in msg and "configs/accelerate/fsdp.yaml" in msg
    with pytest.raises(ConfigError, match=r"train.grad_accum=2 with DeepSpeed"):
        _distill(tmp_path, "train.grad_accum=2", config="configs/gmm_consistency.yaml")  # one network: allowed
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_version_1_and_shared_networks_are_refused(monkeypatch):
    from torch import nn

    from fewstep.config import ConfigError
    from fewstep.sharding import check_launch

    class Obj:
        name = "x"

        def __init__(self, nets):
            self.nets = nets

        def networks(self):
            return self.nets

    base = nn.Linear(2, 2)
    shared = Obj({"student": nn.Sequential(base, nn.Linear(2, 2)), "critic": nn.Sequential(base)})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match=r"^FSDP_VERSION=1 .*set fsdp_version: 2"):
        check_launch(shared, None)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match=r"^networks 'student' and 'critic' share parameters"):
        check_launch(shared, None)
    check_launch(Obj({"student": nn.Linear(2, 2), "critic": nn.Linear(2, 2)}), None)  # separate networks: fine


def test_wrap_classes_per_network_and_meta_frame():
    """Each network gets its own diffusers block classes (a GMM MLP none); the export frame costs no memory."""
    from torch import nn

    from diffusers import UNet2DConditionModel

    from fewstep.sharding import block_classes, meta_copy

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4)
    wrapper = nn.ModuleDict({"net": unet, "head": nn.Linear(2, 2)})  # as fewstep's Denoiser holds its UNet
    got = block_classes(wrapper, None)
    assert set(got) == set(type(unet)._no_split_modules) and {"ResnetBlock2D", "BasicTransformerBlock"} <= set(got)
    assert block_classes(wrapper, ["Linear", "NoSuchBlock"]) == ["Linear"]
    assert block_classes(nn.Sequential(nn.Linear(2, 2)), None) == []
    frame = meta_copy(wrapper)
    assert all(p.device.type == "meta" for p in frame.parameters())
    assert all(p.device.type == "cpu" for p in wrapper.parameters())
    assert [n for n, _ in frame.named_parameters()] == [n for n, _ in wrapper.named_parameters()]
