#!/usr/bin/env python
"""Peak memory and step time of DMD2 on the real SDXL-base UNet architecture (random weights, nothing downloaded).

    python tools/memory_bench.py --make-teacher runs/sdxl_arch          # the pipeline folder (once; ~5 GB on disk)
    python tools/memory_bench.py --teacher runs/sdxl_arch --dry-run     # the estimates only
    ulimit -v 20000000; python tools/memory_bench.py --teacher runs/sdxl_arch --json runs/memory_bench.json

The teacher: ``UNet2DConditionModel`` from ``configs/arch/sdxl_base_unet.json`` (SDXL-base 1.0's published config,
2.567 B weights) in bfloat16 with ``sample_size = resolution / 8`` (UNet teachers take their size from it), SDXL's
VAE architecture, and two one-layer CLIP text encoders of SDXL's widths (768 and 1280, pooled 1280): the UNet sees
exactly SDXL's inputs (``--real-encoders``: CLIP-L and OpenCLIP-bigG depths, 0.8 B weights more).

Each variant runs in a child process (``configs/sdxl_dmd2_lora.yaml``, teacher bfloat16, batch 1, ``--steps``
optimisation steps, ``train.mixed_precision=bf16``): peak memory (CPU: the child's peak resident set, ``ru_maxrss``;
GPU: ``torch.cuda.max_memory_allocated``) after the build and after each step, the time of each step, and the
estimate of :mod:`fewstep.memory` beside it.  A variant that runs out of memory reports the error (run the tool under
``ulimit -v`` to cap it).  Prints a table and writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCH = ROOT / "configs" / "arch" / "sdxl_base_unet.json"
CONFIG = ROOT / "configs" / "sdxl_dmd2_lora.yaml"
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      use_karras_sigmas=False)
# (name, overrides): the student and critic layouts compared
VARIANTS = {
    "full student + full critic": ["student.lora_rank=0", "objective.critic_lora_rank=0"],
    "LoRA student + full critic (own copies)": ["student.share_base=false"],
    "shared base: LoRA student + full critic": ["student.share_base=true", "objective.critic_lora_rank=0"],
    "shared base: full student + LoRA critic": ["student.lora_rank=0", "objective.critic_lora_rank=64",
                                                "objective.critic_lora_alpha=8"],
    "shared base: LoRA student + LoRA critic": [],
}
GB = 1e9


def make_teacher(out: Path, resolution: int, real_encoders: bool) -> Path:
    """Write the SDXL-architecture pipeline (bfloat16, random init) to ``out``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fewstep.testing import make_tokenizer

    t0 = time.time()
    cfg = json.loads(ARCH.read_text())
    cfg["sample_size"] = resolution // 8
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: never a float32 copy of the 2.6 B weights
    try:
        unet = UNet2DConditionModel.from_config(cfg).eval()
        vae = AutoencoderKL(**SDXL_VAE).eval()
        with tempfile.TemporaryDirectory() as d:
            tok, tok2 = make_tokenizer(d), make_tokenizer(d)
        encoders = []
        for hidden, layers, heads, act, proj_cls in ((768, 12, 12, "quick_gelu", CLIPTextModel),
                                                     (1280, 32, 20, "gelu", CLIPTextModelWithProjection)):
            encoders.append(proj_cls(CLIPTextConfig(
                vocab_size=49408 if real_encoders else len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                projection_dim=hidden, num_hidden_layers=layers if real_encoders else 1, num_attention_heads=heads,
                max_position_embeddings=77, hidden_act=act, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval())
    finally:
        torch.set_default_dtype(torch.float32)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(str(out), safe_serialization=True, max_shard_size="1GB")
    n = sum(p.numel() for p in unet.parameters())
    print(f"wrote {out}: UNet {n / 1e9:.3f} B weights (bf16), {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def _overrides(teacher: Path, prompts: Path, out: Path, resolution: int, steps: int, extra: list[str]) -> list[str]:
    return [f"teacher.path={teacher}", "teacher.dtype=bfloat16", f"data.prompts={prompts}",
            f"data.resolution={resolution}", "train.batch_size=1", f"train.max_steps={steps}", "train.tracker=none",
            "train.progress=none", "train.mixed_precision=bf16", f"output_dir={out}", *extra]


def meta_source(resolution: int, real_encoders: bool) -> tuple:
    """:func:`fewstep.memory.folder_source`'s tuple for the pipeline ``make_teacher`` writes, from models built on the
    meta device (no weights, no teacher folder)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = {**json.loads(ARCH.read_text()), "sample_size": resolution // 8}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
        vae = AutoencoderKL(**SDXL_VAE)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    vocab, layers = (49408, (12, 32)) if real_encoders else (200, (1, 1))  # the tiny tokenizer: ~200 tokens
    enc = {f"text_encoder{s}": (vocab + 77) * h + n * 12 * h * h + 2 * h + h * h
           for s, h, n in (("", 768, layers[0]), ("_2", 1280, layers[1]))}
    return shapes, {"vae": sum(p.numel() for p in vae.parameters()), **enc}, cfg, 8


def estimate_variant(teacher, overrides: list[str], cpu: bool, source=None) -> dict:
    from fewstep.config import load_config
    from fewstep.memory import estimate_config

    return estimate_config(load_config(str(CONFIG), overrides), cpu=cpu, source=source)


def child(spec: dict) -> dict:
    """One variant: build, ``steps`` optimisation steps; peak memory after each phase."""
    import torch

    cuda = torch.cuda.is_available()

    def peak() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / GB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB

    rec = {"phases": {}, "step_seconds": []}
    t0 = time.time()
    phase = "build"
    try:
        from fewstep.api import build
        from fewstep.config import load_config
        from fewstep.trainer import Trainer

        cfg = load_config(str(CONFIG), spec["overrides"])
        teacher, data, objective = build(cfg)
        trainer = Trainer(cfg, teacher, objective, data, Path(cfg.output_dir), log=lambda *a: None)
        rec["phases"]["built"] = peak()
        phase = "preparation"  # as fit() does before its first step: prompts encoded, text encoders freed, ...
        objective.setup(trainer.run_dir, trainer.acc, data)
        trainer._prepare_real("none")
        rec["phases"]["prepared"] = peak()
        rec["build_seconds"] = time.time() - t0
        rec["trainable"] = {g: sum(p.numel() for p in m.parameters() if p.requires_grad)
                            for g, m in objective.networks().items()}
        for step in range(spec["steps"]):
            phase = f"step {step}"
            t = time.time()
            trainer.step = step
            trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            rec["step_seconds"].append(time.time() - t)
            rec["phases"][f"step {step}"] = peak()
            rec["groups"] = rec.get("groups", []) + [objective.plan(step)]
    except (MemoryError, RuntimeError) as e:  # out of memory: under ulimit -v a MemoryError or "can't allocate"
        rec["error"] = f"in {phase}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    rec["peak_gb"] = peak()
    rec["device"] = "cuda" if cuda else "cpu"
    return rec


def run_variant(name: str, overrides: list[str], args, prompts: Path) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec = {"overrides": _overrides(args.teacher, prompts, Path(d) / "run", args.resolution, args.steps, overrides),
                "steps": args.steps}
        f = Path(d) / "spec.json"
        f.write_text(json.dumps(spec))
        t = time.time()
        r = subprocess.run([sys.executable, __file__, "--child", str(f)], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")})
        rec = None
        for line in reversed(r.stdout.strip().splitlines()):
            if line.startswith("{"):
                rec = json.loads(line)
                break
        if rec is None:  # killed (the OOM killer) or crashed before it could report
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
            rec = {"error": f"exit {r.returncode}: {tail}", "phases": {}, "step_seconds": []}
        rec["wall_seconds"] = time.time() - t
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-teacher", type=Path, help="write the SDXL-architecture pipeline here and exit")
    ap.add_argument("--teacher", type=Path, help="the pipeline folder (--make-teacher); built into a temp dir if unset")
    ap.add_argument("--real-encoders", action="store_true", help="--make-teacher: SDXL's encoder depths (0.8 B more)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="optimisation steps per variant")
    ap.add_argument("--variants", default="all", help="comma-separated names or indices (0-based) of VARIANTS")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra config override for every variant (repeatable), e.g. student.lora_rank=16")
    ap.add_argument("--dry-run", action="store_true", help="print the estimates only")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child.read_text()))))
        return 0
    if args.make_teacher:
        make_teacher(args.make_teacher, args.resolution, args.real_encoders)
        return 0
    names = list(VARIANTS)
    if args.variants != "all":
        names = [names[int(v)] if v.strip().isdigit() else v.strip() for v in args.variants.split(",")]
    tmp = tempfile.TemporaryDirectory()
    source = None
    if args.teacher is None and args.dry_run:  # estimates from the architecture alone, nothing built or loaded
        source = meta_source(args.resolution, args.real_encoders)
        args.teacher = Path(tmp.name) / "teacher"
    elif args.teacher is None:
        args.teacher = make_teacher(Path(tmp.name) / "teacher", args.resolution, args.real_encoders)
    prompts = Path(tmp.name) / "prompts.txt"
    prompts.write_text("a photo of a cat\nan astronaut riding a horse on the moon\n")
    import shutil

    cpu = shutil.which("nvidia-smi") is None
    rows = []
    for name in names:
        ov = VARIANTS[name] + args.set
        est = estimate_variant(args.teacher, _overrides(args.teacher, prompts, Path(tmp.name) / "run", args.resolution,
                                                        args.steps, ov), cpu, source)
        row = {"variant": name, "overrides": ov, "estimate_gb": est["total"] / GB if est else None,
               "estimate_parts_gb": {k: v / GB for k, v in est["parts"].items()} if est else None}
        if not args.dry_run:
            print(f"running: {name} ...", file=sys.stderr, flush=True)
            row.update(run_variant(name, ov, args, prompts))
        rows.append(row)
        print(_row_line(row), file=sys.stderr, flush=True)
    print(render(rows, args, cpu))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        args.json.write_text(json.dumps({"device": "cpu" if cpu else "cuda", "resolution": args.resolution,
                                         "steps": args.steps, "teacher": str(args.teacher),
                                         "address_space_limit_bytes": None if limit == resource.RLIM_INFINITY else limit,
                                         "rows": rows}, indent=2))
    return 0


def _row_line(row: dict) -> str:
    peak = f"{row['peak_gb']:.2f} GB" if row.get("peak_gb") is not None else "-"
    est = f"{row['estimate_gb']:.2f} GB" if row.get("estimate_gb") is not None else "-"
    steps = ", ".join(f"{s:.1f}" for s in row.get("step_seconds", []))
    err = f"  ERROR {row['error']}" if row.get("error") else ""
    return f"{row['variant']}: peak {peak}, estimate {est}, step s [{steps}]{err}"


def render(rows: list[dict], args, cpu: bool) -> str:
    what = "peak RSS" if cpu else "CUDA max allocated"
    head = f"| variant | estimate | {what} | step times (s) | trainable weights | result |"
    lines = [f"DMD2 on the SDXL-base UNet ({'CPU' if cpu else 'GPU'}), {args.resolution}^2, batch 1, "
             f"{args.steps} steps, bf16 base", "", head, "|" + "---|" * 6]
    for r in rows:
        est = f"{r['estimate_gb']:.2f} GB" if r.get("estimate_gb") is not None else "-"
        peak = f"{r['peak_gb']:.2f} GB" if r.get("peak_gb") is not None and "phases" in r else "-"
        steps = ", ".join(f"{s:.1f}" for s in r.get("step_seconds", [])) or "-"
        train = ", ".join(f"{g} {n / 1e6:.0f} M" for g, n in r.get("trainable", {}).items()) or "-"
        res = r.get("error") or ("ok" if not args.dry_run else "(dry run)")
        lines.append(f"| {r['variant']} | {est} | {peak} | {steps} | {train} | {res} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
