#!/usr/bin/env python
"""What one training step costs, per objective: s/step, network passes, optimizer time, time to first step, peak RSS.

    python tools/step_bench.py                        # every objective on the built-in mid-size SDXL-shaped UNet
    python tools/step_bench.py --bare                 # + a plain torch loop making the same passes: overhead column
    python tools/step_bench.py --teacher demo --bare  # the GMM demo config (`fewstep demo`)
    python tools/step_bench.py --teacher gmm          # every configs/gmm_*.yaml objective
    python tools/step_bench.py --size small --resolution 128 --objectives dmd2 consistency   # quicker
    python tools/step_bench.py --startup              # `fewstep --help`, `distill --dry-run`, demo / SDXL first step
    PYTHONPATH=/path/to/other/checkout python tools/step_bench.py ...   # another version of fewstep, same table

Teacher ``unet`` (default): an SDXL-shaped ``StableDiffusionXLPipeline`` built from configs with random weights
(``--size``: tiny = fewstep.testing's, small ~2M, mid ~31M (default), large ~200M UNet parameters; tiny CLIP text
encoders; a small VAE with the usual scale 8, so ``--resolution`` 256 gives 32x32 latents), saved once under
``--work`` and loaded the way a run loads a teacher.  Each objective starts from its ``configs/sdxl_<name>.yaml`` (the
recipe: GAN term, LoRA, guidance ...) with the teacher, data (``--images`` random images, a few prompts), batch size,
float32 and ``--student-steps`` overridden.  ``--teacher PATH``: any diffusers UNet pipeline folder.

Each row runs in its own process: ``--warmup`` steps, then ``--rounds`` windows of ``--steps`` timed steps through
``Trainer.fit`` (time from one step's start to the next: the loop's own bookkeeping counts), on the device accelerate
picks; with ``--bare`` each window is replayed bare right after it, so both see the same machine load.  Columns:

* ``s/step``: the best window's mean (for TTUR objectives use a multiple of ``objective.critic_steps``); ``cpu``:
  the same in process CPU time (CPU device only), which other processes on a shared machine disturb far less
  than wall time (run with ``OMP_NUM_THREADS=1`` so that it is one core's work).
* ``fwd``, ``bwd``: network passes per step (every call of a network: teacher, student, critic, EMA target; a CFG
  call is one pass at twice the batch) and those that build a graph which is then backpropagated.
* ``opt ms``: optimizer ``step`` time per step (all groups).
* ``1st step``: the first step's own duration; ``to 1st step``: process start to the end of the first step.
* ``RSS``: peak resident memory of the process (MB) after the timed steps.
* ``--bare``: the recorded passes of each window replayed in a plain loop (same inputs, a squared-output loss
  on every graph-building pass, ``loss.backward()``, one torch AdamW per group: fused where it works, else foreach),
  and ``overhead`` = s/step over bare s/step - 1 (CPU time on a CPU device): everything the trainer and objective
  add (noise, batches, schedule glue, loss terms, clipping, EMA, logging, accelerate).

Writes JSON (``--json``, default ``step_bench.json``).  This is a measuring script, not a test: numbers depend on the
machine and its load (reported in the JSON); compare two versions by running both in the same conditions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))  # appended: a PYTHONPATH checkout of fewstep comes first

UNET_ROWS = {  # objective -> (base config, extra overrides)
    "dmd2": ("sdxl_dmd2.yaml", []),
    # dmd is left out: its regression pairs (DMD.setup) draw conditions without the prompt file (text teachers)
    "phased_dmd": ("sdxl_phased_dmd.yaml", ["objective.phase_steps=1"]),  # from step 1 on: the last phase
    "consistency": ("sdxl_consistency.yaml", []),
    "slam": ("sdxl_slam.yaml", []),
    "boot": ("sdxl_boot.yaml", []),
}
GMM_ROWS = {
    "dmd2": ("gmm_dmd2.yaml", []), "dmd": ("gmm_dmd2.yaml", ["objective.name=dmd", "objective.critic_steps=1"]),
    "phased_dmd": ("gmm_phased_dmd.yaml", ["objective.phase_steps=1"]), "consistency": ("gmm_consistency.yaml", []),
    "slam": ("gmm_slam.yaml", []), "boot": ("gmm_boot.yaml", []), "flow_map": ("gmm_flow_map.yaml", []),
}
SIZES = {  # SDXL-shaped UNet2DConditionModel: (block_out_channels, layers_per_block, transformer layers per block)
    "tiny": ((32, 64), 1, (1, 1)),
    "small": ((32, 64, 128), 1, (1, 1, 1)),
    "mid": ((64, 128, 256), 2, (1, 1, 2)),
    "large": ((128, 256, 512), 2, (1, 2, 4)),
}
PROMPTS = ["a photo of a cat", "a red dog", "a blue cat on a dog", "the photo of a red cat", "a dog in the photo",
           "an blue dog with a cat", "a cat and a dog", "the red photo"]


def fewstep_root() -> Path:
    """The checkout of fewstep that is imported (PYTHONPATH first): its configs/ are the ones used."""
    import fewstep

    return Path(fewstep.__file__).resolve().parents[1]


def rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# ---- the built-in teacher -----------------------------------------------------------------------------------------
def build_unet_teacher(size: str, resolution: int, work: Path) -> Path:
    """An SDXL-shaped pipeline with random weights, saved once under ``work`` (reused when present)."""
    path = work / f"teacher-sdxl-{size}-{resolution}"
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from fewstep import testing

    if resolution % 8:
        raise SystemExit(f"--resolution must be a multiple of 8, got {resolution}")
    seed = 0
    ch, lpb, tl = SIZES[size]
    tdim, proj = 32, 32  # micro-conditioning embedding; pooled text projection (tiny CLIP)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",),
        block_out_channels=ch, layers_per_block=lpb, norm_num_groups=min(32, ch[0] // 2),
        attention_head_dim=tuple(max(1, c // 64) for c in ch), use_linear_projection=True,
        transformer_layers_per_block=tl, cross_attention_dim=64, addition_embed_type="text_time",
        addition_time_embed_dim=tdim, projection_class_embeddings_input_dim=6 * tdim + proj).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64),
                        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=resolution).eval()
    tok, tok2 = testing._tokenizer(), testing._tokenizer()
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, scheduler=EulerDiscreteScheduler(**testing._sd_scheduler_kwargs(), interpolation_type="linear"),
        text_encoder=testing._text_encoder(tok, seed, with_projection=False), tokenizer=tok,
        text_encoder_2=testing._text_encoder(tok2, seed + 1, with_projection=True), tokenizer_2=tok2,
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(path)
    return path


def write_data(work: Path, n_images: int, resolution: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    images = work / f"images-{n_images}-{resolution}"
    if not images.is_dir() or len(list(images.glob("*.png"))) != n_images:
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n_images):
            yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
            base = np.stack([xx, yy, (xx + yy) / 2], -1) * rng.uniform(0.3, 1.0, 3)
            img = np.clip(base + rng.normal(0, 0.15, base.shape), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(images / f"{PROMPTS[i % len(PROMPTS)].replace(' ', '_')}_{i}.png")
    return prompts, images


# ---- rows ---------------------------------------------------------------------------------------------------------
def row_specs(args, root: Path, work: Path) -> list[dict]:
    """One dict per objective: config file (or None), overrides."""
    steps = args.steps if args.steps is not None else (250 if args.teacher in ("demo", "gmm") else 5)
    warmup = args.warmup if args.warmup is not None else (20 if args.teacher in ("demo", "gmm") else 2)
    rounds = args.rounds if args.rounds is not None else (4 if args.teacher in ("demo", "gmm") else 2)
    common = [f"train.max_steps={warmup + rounds * steps + 1}", "train.checkpoint_every=1000000000", "train.sample_every=0",
              "train.tracker=none", "train.progress=none", "train.resume=false", "train.seed=0"]
    specs = []
    if args.teacher == "demo":
        from fewstep.cli import DEMO_OVERRIDES

        for name in args.objectives or ["dmd2"]:
            extra = [] if name == "dmd2" else [f"objective.name={name}"]
            specs.append({"name": f"demo/{name}", "config": None, "overrides": [*DEMO_OVERRIDES, *extra, *common]})
    elif args.teacher == "gmm":
        for name in args.objectives or list(GMM_ROWS):
            cfg, extra = GMM_ROWS[name]
            specs.append({"name": f"gmm/{name}", "config": str(root / "configs" / cfg), "overrides": [*extra, *common]})
    else:
        teacher = build_unet_teacher(args.size, args.resolution, work) if args.teacher == "unet" else Path(args.teacher)
        prompts, images = write_data(work, args.images, args.resolution)
        for name in args.objectives or list(UNET_ROWS):
            cfg, extra = UNET_ROWS[name]
            s = max(2, args.student_steps) if name == "phased_dmd" else args.student_steps
            specs.append({"name": name, "config": str(root / "configs" / cfg), "overrides": [
                *extra, f"teacher.path={teacher}", "teacher.dtype=float32", f"train.mixed_precision={args.mixed_precision}",
                f"data.prompts={prompts}", f"data.images={images}", f"train.batch_size={args.batch_size}",
                f"student.steps={s}", *common]})
    for s in specs:
        s.update(steps=steps, warmup=warmup, rounds=rounds, bare=args.bare)
        s["overrides"] = [*s["overrides"], *args.set]
    return specs


def run_row(spec: dict, work: Path, root: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="row-", dir=work))
    spec = {**spec, "overrides": [*spec["overrides"], f"output_dir={out / 'run'}"], "result": str(out / "result.json")}
    (out / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, FEWSTEP_BENCH_T0=repr(time.time()))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(out / "spec.json")], cwd=root,
                       env=env, capture_output=True, text=True)
    if r.returncode != 0 or not Path(spec["result"]).is_file():
        tail = (r.stderr or r.stdout).strip().splitlines()[-15:]
        return {"name": spec["name"], "error": "\n".join(tail)}
    return json.loads(Path(spec["result"]).read_text())


# ---- the child: one objective, instrumented -----------------------------------------------------------------------
class Recorder:
    """Counts (and, in the timed window, keeps) every network call: Denoiser.net_call of the teacher and of every
    Denoiser inside the trained groups and the objective's state modules; the current group comes from loss()."""

    def __init__(self, keep: bool):
        self.on = False
        self.keep = keep  # keep the calls' inputs (for the bare replay)
        self.steps: list = []  # timed steps: [[group, [micro: [(net_call, args, grad, name)]]], ...]
        self.calls = {}

    def start_step(self):
        if self.on and self.keep:
            self.steps.append([])

    def take(self) -> list:
        """The recorded steps so far (and forget them)."""
        out, self.steps = self.steps, []
        return out

    def start_loss(self, group):
        if self.on and self.keep:
            st = self.steps[-1]
            if not st or st[-1][0] != group:
                st.append([group, []])
            st[-1][1].append([])

    def wrap(self, den, name):
        orig = den.net_call

        def net_call(x_t, t, cond, _orig=orig, _den=den, _name=name):
            out = _orig(x_t, t, cond)
            if self.on:
                import torch

                grad = bool(torch.is_grad_enabled() and getattr(out, "requires_grad", False))
                c = self.calls.setdefault(_name, [0, 0])
                c[0] += 1
                c[1] += grad
                if self.steps and self.steps[-1]:
                    self.steps[-1][-1][1][-1].append((_orig, (x_t.detach(), t.detach(), cond), grad, _name))
            return out

        den.net_call = net_call


def _denoisers(module):
    from fewstep.teachers.base import Denoiser

    return [m for m in module.modules() if isinstance(m, Denoiser)] if module is not None else []


def _sync():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def child(spec_path: str) -> int:
    t0 = float(os.environ.get("FEWSTEP_BENCH_T0", time.time()))
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from fewstep.api import build
    from fewstep.config import load_config
    from fewstep.trainer import Trainer

    cfg = load_config(spec["config"], spec["overrides"])
    teacher, data, objective = build(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, teacher, objective, data, run_dir, log=lambda *a: None)
    rec = Recorder(keep=bool(spec.get("bare")))
    rec.wrap(teacher.denoiser, "teacher")
    for g, m in objective.networks().items():
        for d in _denoisers(m):
            rec.wrap(d, g)
    for n, m in objective.state_modules().items():
        for d in _denoisers(m):
            rec.wrap(d, "target" if "target" in n else n)
    orig_loss = objective.loss

    def loss(group, *a, **k):
        rec.start_loss(group)
        return orig_loss(group, *a, **k)

    objective.loss = loss
    opt_ms = []  # optimizer step times in the timed window (ms)
    cuda = trainer.device.type == "cuda"
    for opt in trainer.optims.values():
        inner = getattr(opt, "optimizer", opt)
        step_fn = inner.step

        def timed_step(*a, _f=step_fn, **k):
            if not rec.on:
                return _f(*a, **k)
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                out = _f(*a, **k)
                e1.record()
                opt_ms.append((e0, e1))
            else:
                s = time.perf_counter()
                out = _f(*a, **k)
                opt_ms.append((time.perf_counter() - s) * 1000)
            return out

        inner.step = timed_step
    first = {}
    warmup, steps, rounds = spec["warmup"], spec["steps"], spec["rounds"]
    windows, bare_s, counter = [], [], [0]
    orig_step = trainer.train_step

    def train_step():
        i = counter[0]
        counter[0] += 1
        k, r = divmod(i - warmup, steps)
        if i >= warmup and r == 0 and k > 0:  # a window ends: its time, then its bare replay
            _sync()
            windows[-1][1] = time.perf_counter()
            windows[-1][3] = time.process_time()
            if spec.get("bare"):
                bare_s.append(bare(rec.take(), trainer, warm=not bare_s))
        if i >= warmup and r == 0 and k < rounds:
            _sync()
            windows.append([time.perf_counter(), None, time.process_time(), None])
        rec.on = warmup <= i < warmup + rounds * steps
        rec.start_step()
        s = time.perf_counter()
        out = orig_step()
        if i == 0:
            _sync()
            first["to_first_step_s"] = time.time() - t0
            first["first_step_s"] = time.perf_counter() - s
        return out

    trainer.train_step = train_step
    trainer.fit()
    rec.on = False
    rss = rss_peak_mb()
    per_window = [(w[1] - w[0]) / steps for w in windows]
    cpu_window = [(w[3] - w[2]) / steps for w in windows]
    s_per_step = min(per_window)
    steps = steps * rounds  # the per-step averages below are over every timed step
    if cuda:
        torch.cuda.synchronize()
        opt_total = sum(a.elapsed_time(b) for a, b in opt_ms)
    else:
        opt_total = sum(opt_ms)
    fwd = sum(c[0] for c in rec.calls.values()) / steps
    bwd = sum(c[1] for c in rec.calls.values()) / steps
    impl = getattr(trainer, "optim_impl", None)
    if impl is None:  # an older fewstep: torch's default
        impl = {n: ("fused" if g.get("fused") else "foreach" if g.get("foreach") else "default")
                for n, o in trainer.optims.items() for g in getattr(o, "optimizer", o).param_groups[:1]}
    params = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in objective.networks().items()}
    res = {"name": spec["name"], "objective": objective.name, "s_per_step": s_per_step,
           "fwd_per_step": fwd, "bwd_per_step": bwd,
           "passes": {k: {"fwd": v[0] / steps, "bwd": v[1] / steps} for k, v in rec.calls.items()},
           "optimizer_ms_per_step": opt_total / steps, "optimizer_impl": impl, **first, "peak_rss_mb": rss,
           "s_per_step_windows": per_window, "cpu_s_per_step": min(cpu_window), "cpu_s_per_step_windows": cpu_window,
           "steps": steps, "rounds": rounds, "warmup": warmup,
           "device": str(trainer.device), "threads": torch.get_num_threads(),
           "trainable_params": params, "batch_size": cfg.train.batch_size, "student_steps": cfg.student.steps}
    if bare_s:
        res.update(bare_s_per_step=min(b[0] for b in bare_s), bare_cpu_s_per_step=min(b[1] for b in bare_s),
                   bare_windows=bare_s)
    trainer.end()
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


_BARE_OPTS: dict = {}


def bare(recorded: list, trainer, warm: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the ``recorded`` steps replayed in a plain torch loop (see the module doc)."""
    import torch

    opts = _BARE_OPTS
    for g, m in trainer.plain.items():
        if g in opts:
            continue
        params = [p for p in m.parameters() if p.requires_grad]
        for kw in ({"fused": True}, {"foreach": True}, {}):
            try:
                opt = torch.optim.AdamW(params, lr=1e-12, **kw)
                break
            except (RuntimeError, ValueError):
                continue
        opts[g] = opt

    def one_step(step):
        for group, micros in step:
            opt = opts[group]
            opt.zero_grad(set_to_none=True)
            for passes in micros:
                loss = None
                for fn, (x, t, cond), grad, _ in passes:
                    with torch.set_grad_enabled(grad):
                        out = fn(x, t, cond)
                    if grad:
                        term = out.float().square().mean()
                        loss = term if loss is None else loss + term
                if loss is not None:
                    loss.backward()
            opt.step()

    if warm:
        one_step(recorded[0])  # the optimizers' state allocation
    _sync()
    s, c = time.perf_counter(), time.process_time()
    for step in recorded:
        one_step(step)
    _sync()
    return (time.perf_counter() - s) / len(recorded), (time.process_time() - c) / len(recorded)


# ---- startup ------------------------------------------------------------------------------------------------------
_PROBE = r"""
import json, sys, time
t0 = float(sys.argv[1])
argv = sys.argv[2:]
from fewstep.cli import main
try:
    main(argv)
except SystemExit:
    pass
print("PROBE " + json.dumps({"s": time.time() - t0, "torch": "torch" in sys.modules,
                             "diffusers": "diffusers" in sys.modules}), file=sys.stderr)
"""
_FIRST = r"""
import json, os, sys, time
t0 = float(sys.argv[1])
import fewstep.trainer as T
orig = T.Trainer.train_step
def first(self):
    s = time.perf_counter()
    out = orig(self)
    print("PROBE " + json.dumps({"s": time.time() - t0, "first_step_s": time.perf_counter() - s,
                                 "dynamo": "torch._dynamo" in sys.modules, "diffusers": "diffusers" in sys.modules}),
          file=sys.stderr, flush=True)
    os._exit(0)
T.Trainer.train_step = first
from fewstep.cli import main
main(sys.argv[2:])
"""


def _probe(code: str, argv: list, root: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", code, repr(time.time()), *argv], cwd=root, capture_output=True,
                       text=True)
    for line in r.stderr.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"error": "\n".join(r.stderr.strip().splitlines()[-5:])}


def startup(args, root: Path, work: Path) -> dict:
    script = Path(sys.executable).parent / "fewstep"
    out = {}
    if script.is_file():  # the console script, as a user types it (PYTHONPATH still picks the checkout)
        times = []
        for _ in range(args.repeat):
            s = time.time()
            subprocess.run([str(script), "--help"], cwd=root, capture_output=True)
            times.append(time.time() - s)
        out["fewstep --help (console script) s"] = statistics.median(times)
    for label, argv in (("--help", ["--help"]),
                        ("distill --dry-run", ["distill", str(root / "configs" / "gmm_dmd2.yaml"), "--dry-run"])):
        runs = [_probe(_PROBE, argv, root) for _ in range(args.repeat)]
        out[label] = {"s": statistics.median(r.get("s", float("nan")) for r in runs), **runs[-1]}
    runs = [_probe(_FIRST, ["demo", "--out", str(work / "demo")], root) for _ in range(args.repeat)]
    out["demo: to first step"] = {"s": statistics.median(r.get("s", float("nan")) for r in runs), **runs[-1]}
    teacher = build_unet_teacher(args.size, args.resolution, work) if args.teacher == "unet" else Path(args.teacher)
    prompts, images = write_data(work, args.images, args.resolution)
    argv = ["distill", str(root / "configs" / "sdxl_dmd2.yaml"), f"teacher.path={teacher}", "teacher.dtype=float32",
            f"train.mixed_precision={args.mixed_precision}", f"data.prompts={prompts}", f"data.images={images}",
            f"train.batch_size={args.batch_size}", "student.steps=1", "train.tracker=none", "train.progress=none",
            "train.resume=false", f"output_dir={work / 'sdxl-run'}"]
    runs = [_probe(_FIRST, argv, root) for _ in range(args.repeat)]
    out["sdxl dmd2: to first step"] = {"s": statistics.median(r.get("s", float("nan")) for r in runs), **runs[-1]}
    return out


# ---- output -------------------------------------------------------------------------------------------------------
def table(rows: list[dict], with_bare: bool) -> str:
    head = "| objective | s/step | cpu s/step |" + (" bare s/step | bare cpu | overhead |" if with_bare else "") + \
        " fwd | bwd | opt ms | optimizer | 1st step s | to 1st step s | RSS MB |"
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | error: {r['error'].splitlines()[-1][:100]} |")
            continue
        impl = sorted(set(r["optimizer_impl"].values()))
        cpu = r["device"] == "cpu"
        cells = [r["name"], f"{r['s_per_step']:.4g}", f"{r['cpu_s_per_step']:.4g}" if cpu else ""]
        if with_bare:
            b, bc = r.get("bare_s_per_step"), r.get("bare_cpu_s_per_step")
            over = (r["cpu_s_per_step"] / bc if cpu else r["s_per_step"] / b) - 1 if b else None
            cells += [f"{b:.4g}", f"{bc:.4g}" if cpu else "", f"{100 * over:+.1f}%"] if b else ["", "", ""]
        cells += [f"{r['fwd_per_step']:.2f}", f"{r['bwd_per_step']:.2f}", f"{r['optimizer_ms_per_step']:.1f}",
                  "/".join(impl), f"{r['first_step_s']:.2f}", f"{r['to_first_step_s']:.1f}", f"{r['peak_rss_mb']:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="unet", help="unet (built-in SDXL-shaped), demo (the GMM demo config), gmm "
                    "(configs/gmm_*.yaml), or a diffusers UNet pipeline folder")
    ap.add_argument("--objectives", nargs="*", default=None, help=f"subset of {list(UNET_ROWS)} (gmm: {list(GMM_ROWS)})")
    ap.add_argument("--size", default="mid", choices=list(SIZES), help="built-in UNet size (default mid, ~31M)")
    ap.add_argument("--resolution", type=int, default=256, help="image size of the built-in teacher (latents / 8)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--student-steps", type=int, default=1, help="student.steps (phased_dmd: at least 2)")
    ap.add_argument("--mixed-precision", default="no", help="train.mixed_precision (no, fp16, bf16)")
    ap.add_argument("--images", type=int, default=32, help="random images in the data folder (VAE-encoded at start)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per window (default 5; GMM 250)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; GMM 20)")
    ap.add_argument("--rounds", type=int, default=None, help="timed windows; the best counts (default 2; GMM 4)")
    ap.add_argument("--bare", action="store_true", help="also a plain torch loop with the same passes (overhead)")
    ap.add_argument("--startup", action="store_true", help="only startup times: --help, --dry-run, first steps")
    ap.add_argument("--repeat", type=int, default=3, help="--startup: runs per measurement (median)")
    ap.add_argument("--work", default=None, help="folder for the built teacher, data and runs (default: a temp dir)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every row (repeatable), e.g. train.gradient_checkpointing=false")
    ap.add_argument("--json", default="step_bench.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    root = fewstep_root()
    work = Path(args.work or tempfile.mkdtemp(prefix="step_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    meta = {"fewstep": str(root), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_start": loadavg(),
            "argv": sys.argv[1:]}
    if args.startup:
        res = startup(args, root, work)
        meta["loadavg_end"] = loadavg()
        for k, v in res.items():
            print(f"{k}: {json.dumps(v)}")
        Path(args.json).write_text(json.dumps({"meta": meta, "startup": res}, indent=2))
        print(f"wrote {args.json}")
        return 0
    rows = []
    for spec in row_specs(args, root, work):
        print(f"[step_bench] {spec['name']} ...", file=sys.stderr, flush=True)
        rows.append(run_row(spec, work, root))
    meta["loadavg_end"] = loadavg()
    print(table(rows, args.bare))
    print(f"\nfewstep: {root}; load average {meta['loadavg_start']} -> {meta['loadavg_end']}")
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
