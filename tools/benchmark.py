#!/usr/bin/env python
"""Known-answer benchmark on the built-in Gaussian mixtures: prints a Markdown table and writes JSON.

Each row distills the exact GMM teacher with one objective/setting on the same budget and reports the
student's energy distance to the true mixture (the teacher's 100-step ODE is the reference floor),
modes covered, in-mode fraction, endpoint error vs the teacher ODE of the same noise, NFE and time.

    python tools/benchmark.py                    # the default suite (DMD2: TTUR ablation, 1/2/4 steps; DMD)
    python tools/benchmark.py --steps 4000 --only dmd2-1step dmd2-2step
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUITE = {
    # name: overrides on configs/gmm_dmd2.yaml
    "dmd2-1step": [],
    "dmd2-1step-critic1": ["objective.critic_steps=1"],
    "dmd2-2step": ["student.steps=2"],
    "dmd2-2step-last": ["student.steps=2", "objective.backward_simulation=last"],
    "dmd2-4step": ["student.steps=4"],
    "dmd2-4step-last": ["student.steps=4", "objective.backward_simulation=last"],
    "dmd-1step": ["objective.name=dmd", "objective.critic_steps=1", "objective.reg_pairs=2048",
                  "objective.reg_ode_steps=100"],
}


def run(name: str, overrides: list[str], steps: int, seed: int, out: Path) -> dict:
    from fewstep.api import distill
    from fewstep.config import load_config

    cfg = load_config(str(ROOT / "configs" / "gmm_dmd2.yaml"),
                      [*overrides, f"train.max_steps={steps}", f"train.seed={seed}", "train.tracker=none",
                       "train.resume=false", f"train.checkpoint_every={steps}", f"output_dir={out / name}"])
    t0 = time.time()
    m = distill(cfg, log=lambda *a: None)
    ev = m["eval"]
    return {"name": name, "overrides": overrides, "train_steps": steps, "seed": seed,
            "train_seconds": round(time.time() - t0, 1),
            "student_nfe": ev["student"]["nfe"], "energy_distance": ev["student"]["energy_distance"],
            "teacher_energy_distance": ev["teacher"]["energy_distance"], "energy_ratio": ev["energy_ratio"],
            "modes": f"{ev['student']['modes_covered']}/{ev['student']['num_modes']}",
            "in_mode_frac": ev["student"]["in_mode_frac"], "endpoint_error": ev["endpoint_error"]}


def table(rows: list[dict]) -> str:
    head = "| run | NFE | train steps | energy dist. | / teacher ODE | modes | in-mode | endpoint err. | train s |"
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['student_nfe']} | {r['train_steps']} | {r['energy_distance']:.4f} | "
                   f"{r['energy_ratio']:.2f} | {r['modes']} | {r['in_mode_frac']:.3f} | {r['endpoint_error']:.3f} | "
                   f"{r['train_seconds']} |")
    if rows:
        out.append(f"\nteacher: DDIM ODE 100 steps, energy distance {rows[0]['teacher_energy_distance']:.4f} "
                   "(the sampling floor at 5,000 samples)")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10000, help="training steps per run (same budget for all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {list(SUITE)}")
    ap.add_argument("--out", default="runs/benchmark", help="folder for runs, benchmark.json and benchmark.md")
    args = ap.parse_args(argv)
    names = args.only or list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        ap.error(f"unknown run(s) {unknown}; choose from {list(SUITE)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in names:
        print(f"[benchmark] {n} ...", flush=True)
        rows.append(run(n, SUITE[n], args.steps, args.seed, out))
    md = table(rows)
    print(md)
    (out / "benchmark.json").write_text(json.dumps(rows, indent=2))
    (out / "benchmark.md").write_text(md + "\n")
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
