#!/usr/bin/env python
"""Host-memory (RSS) trend over a long run: fails when RSS grows with the step count (a leak).

Runs the GMM demo config (configs/gmm_dmd2.yaml) and a tiny SDXL-shaped DMD2 run (fewstep.testing's tiny
pipeline, as in tests/test_diffusers_e2e.py) for many steps through the real trainer loop (checkpoints and sample
grids included), each in its own process, samples the resident set size (VmRSS, /proc/self/status) after every
``--every`` steps, drops the warm-up (allocator and cache growth), and fits a least-squares line to the rest.

    python tools/rss_trend.py                                   # gmm 3000 steps, sdxl 300 steps
    python tools/rss_trend.py --gmm-steps 20000 --sdxl-steps 2000 --json rss.json
    python tools/rss_trend.py --only gmm --tolerance-mb 4

It prints a table (RSS at start/end of the measured window, peaks of its first and last quarter, slope in MB per
1000 steps, growth over the window, projection to ``--horizon`` steps) and writes JSON (``--json``; default
``rss_trend.json``).  Exit status 1 when a run grows: its fitted growth over the measured window exceeds
``--tolerance-mb`` and the last quarter's peak is above the first quarter's by more than half of that.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    """Resident set size of this process, MB (VmRSS; psutil where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _config(name: str, steps: int, work: Path, ckpt_every: int, sample_every: int):
    from fewstep.config import load_config

    common = [f"train.max_steps={steps}", "train.tracker=none", f"train.checkpoint_every={ckpt_every or steps}",
              f"train.sample_every={sample_every}", "train.log_every=10", "train.resume=false",
              f"output_dir={work / 'run'}"]
    if name == "gmm":
        return load_config("configs/gmm_dmd2.yaml", common)
    if name == "sdxl":
        from fewstep.testing import save_tiny_pipeline

        teacher = save_tiny_pipeline("sdxl", str(work / "teacher"))
        prompts = work / "prompts.txt"
        prompts.write_text("a photo of a cat\na red dog\nan astronaut riding a horse\nblue flowers in a field\n")
        return load_config("configs/sdxl_dmd2.yaml", [
            f"teacher.path={teacher}", "teacher.dtype=float32", "teacher.guidance_scale=3", "student.steps=4",
            "objective.gan_weight=0", "data.images=null", f"data.prompts={prompts}", "train.batch_size=2",
            "train.mixed_precision=no", *common])
    raise SystemExit(f"unknown run {name!r} (gmm, sdxl)")


def child(name: str, steps: int, every: int, out: str, ckpt_every: int, sample_every: int) -> None:
    """One run in this process: the real ``Trainer.fit`` loop, RSS sampled after every ``every`` steps."""
    import torch

    from fewstep.api import build, make_sampler_hook
    from fewstep.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    with tempfile.TemporaryDirectory(prefix=f"rss-{name}-") as tmp:
        work = Path(tmp)
        cfg = _config(name, steps, work, ckpt_every, sample_every)
        teacher, data, objective = build(cfg)
        trainer = Trainer(cfg, teacher, objective, data, work / "run", log=lambda *a: None)
        samples = {"step": [], "rss_mb": []}
        step_fn = trainer.train_step
        t0 = time.time()

        def measured_step():
            logs = step_fn()
            s = trainer.step + 1  # the step being completed
            if s % every == 0 or s == 1:
                samples["step"].append(s)
                samples["rss_mb"].append(rss_mb())
            return logs

        trainer.train_step = measured_step  # the instance attribute shadows the method inside fit()
        trainer.fit(on_sample=make_sampler_hook(teacher, objective, work / "run"))
        samples.update(name=name, steps=steps, seconds=time.time() - t0, rss_start_mb=samples["rss_mb"][0])
        trainer.end()
    Path(out).write_text(json.dumps(samples))


def analyse(res: dict, warmup: float, tolerance_mb: float, horizon: int) -> dict:
    """Least-squares slope of RSS over the samples after the warm-up; peaks of the first and last quarter."""
    steps, rss = res["step"], res["rss_mb"]
    k = min(int(len(steps) * warmup), max(len(steps) - 4, 0))
    xs, ys = steps[k:], rss[k:]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var  # MB per step
    window = xs[-1] - xs[0]
    q = max(1, n // 4)
    first_peak, last_peak = max(ys[:q]), max(ys[-q:])
    growth = slope * window
    growing = growth > tolerance_mb and last_peak - first_peak > tolerance_mb / 2
    return {"name": res["name"], "steps": res["steps"], "samples": n, "measured_from_step": xs[0],
            "rss_first_mb": ys[0], "rss_last_mb": ys[-1], "peak_first_quarter_mb": first_peak,
            "peak_last_quarter_mb": last_peak, "slope_mb_per_1k_steps": slope * 1000,
            "growth_over_window_mb": growth, f"projected_growth_{horizon}_steps_mb": slope * horizon,
            "seconds": res["seconds"], "growing": growing}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gmm-steps", type=int, default=3000)
    p.add_argument("--sdxl-steps", type=int, default=300)
    p.add_argument("--only", choices=["gmm", "sdxl"], action="append", help="run only these (repeatable)")
    p.add_argument("--samples", type=int, default=60, help="RSS samples per run (default 60)")
    p.add_argument("--warmup", type=float, default=0.25, help="fraction of samples dropped as warm-up (default 0.25)")
    p.add_argument("--tolerance-mb", type=float, default=8.0, help="allowed growth over the measured window (MB)")
    p.add_argument("--horizon", type=int, default=100_000, help="steps to project the fitted slope to (report only)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="default: steps / 5 (0: only at the end)")
    p.add_argument("--sample-every", type=int, default=None, help="sample grids; default: steps / 5 (0: none)")
    p.add_argument("--json", default="rss_trend.json", help="write the samples and the fits here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--every", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.steps, a.every, a.out, a.checkpoint_every, a.sample_every)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = {"gmm": a.gmm_steps, "sdxl": a.sdxl_steps}
    results, fits = {}, []
    for name in a.only or list(runs):
        steps = runs[name]
        every = max(1, steps // a.samples)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        print(f"running {name}: {steps} steps, RSS every {every} steps ...", file=sys.stderr, flush=True)
        ck = max(1, steps // 5) if a.checkpoint_every is None else a.checkpoint_every
        sa = max(1, steps // 5) if a.sample_every is None else a.sample_every
        r = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps), "--every", str(every),
                            "--out", out, "--checkpoint-every", str(ck), "--sample-every", str(sa)], cwd=ROOT)
        if r.returncode != 0:
            print(f"rss_trend: the {name} run failed (exit {r.returncode})", file=sys.stderr)
            return 2
        results[name] = json.loads(Path(out).read_text())
        os.unlink(out)
        fits.append(analyse(results[name], a.warmup, a.tolerance_mb, a.horizon))
    hk = f"projected_growth_{a.horizon}_steps_mb"
    rows = [("run", "steps", "RSS start", "RSS end", "peak Q1", "peak Q4", "MB / 1k steps", "growth", f"@{a.horizon}",
             "verdict")]
    for f in fits:
        rows.append((f["name"], str(f["steps"]), f"{f['rss_first_mb']:.1f}", f"{f['rss_last_mb']:.1f}",
                     f"{f['peak_first_quarter_mb']:.1f}", f"{f['peak_last_quarter_mb']:.1f}",
                     f"{f['slope_mb_per_1k_steps']:+.3f}", f"{f['growth_over_window_mb']:+.2f}", f"{f[hk]:+.0f}",
                     "GROWING" if f["growing"] else "flat"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
    print("\n".join([fmt(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows[1:]]))
    print(f"RSS in MB, measured after the first {a.warmup:.0%} of samples; 'growth' = fitted slope x measured window; "
          f"growing = growth > {a.tolerance_mb} MB and the last quarter's peak > the first's by > {a.tolerance_mb / 2} MB")
    Path(a.json).write_text(json.dumps({"fits": fits, "samples": results,
                                        "settings": {"warmup": a.warmup, "tolerance_mb": a.tolerance_mb,
                                                     "horizon": a.horizon}}, indent=2))
    print(f"wrote {a.json}")
    return 1 if any(f["growing"] for f in fits) else 0


if __name__ == "__main__":
    sys.exit(main())
