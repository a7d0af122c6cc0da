#!/usr/bin/env python
"""Multi-step DMD2 ablation: which backward-simulation exit rule keeps every exit on the data distribution.

For each (rule, student steps, mixture) it distills configs/gmm_dmd2.yaml with ``fewstep.api.distill`` on the
same budget and reports energy distance to the true mixture (and its ratio to the teacher's 100-step ODE), modes
covered, the within-mode spread of the final samples (1.0 = right, < 1 collapsed) and the spread of *every exit's*
x0 output (exit k: the student's x0 after k + 1 steps of its own sampler, the state it is trained at).  Prints a
Markdown table and writes JSON::

    python tools/multistep_ablation.py                               # all rules x {2, 4} steps x 3 mixtures
    python tools/multistep_ablation.py --rules dmd2 per_exit --steps 2 --mixtures uneq6 --train-steps 4000
    python tools/multistep_ablation.py --jobs 2 --reuse              # two runs at a time; keep finished rows
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ["dmd2", "last", "per_exit"]  # objective.backward_simulation values
MIXTURES = ["uneq6", "skew3", "ring8"]
STEPS = [2, 4]


def exit_spreads(teacher, objective, student, n: int = 5000, seed: int = 123) -> list[float]:
    """Within-mode spread (fewstep.toy.spread_ratio) of each exit's x0 in the student's own K-step rollout."""
    import torch

    from fewstep.toy import spread_ratio

    g = torch.Generator().manual_seed(seed)
    cond = teacher.sample_conditions(n, g)
    x = torch.randn((n, *teacher.sample_shape), generator=g)
    out = []
    with torch.no_grad():
        for i, ti in enumerate(objective.times):
            x0 = student(x, torch.full((n,), float(ti)), cond)
            out.append(spread_ratio(x0, teacher.mixture))
            if i + 1 < len(objective.times):
                t = torch.full((n,), float(objective.times[i + 1]))
                x = teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    return out


def run_one(rule: str, steps: int, mixture: str, train_steps: int, seed: int, out: str, reuse: bool = False) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from fewstep.api import distill, load_run
    from fewstep.config import load_config
    from fewstep.export import load_toy_student

    name = f"{rule}-{steps}step-{mixture}"
    run_dir = Path(out) / name
    if reuse and (run_dir / "row.json").is_file():  # a finished row of an earlier call with the same budget
        row = json.loads((run_dir / "row.json").read_text())
        if row["train_steps"] == train_steps and row["seed"] == seed:
            return row
    cfg = load_config(str(ROOT / "configs" / "gmm_dmd2.yaml"), [
        f"teacher.path=gmm:{mixture}", f"student.steps={steps}", f"objective.backward_simulation={rule}",
        f"train.max_steps={train_steps}", f"train.checkpoint_every={train_steps}", f"train.seed={seed}",
        "train.tracker=none", "train.resume=false", f"output_dir={run_dir}"])
    t0 = time.time()
    m = distill(cfg, log=lambda *a: None)
    secs = time.time() - t0
    ev = m["eval"]
    _, teacher, _, objective = load_run(str(run_dir))
    student = load_toy_student(teacher, run_dir / "student", objective)  # phased students need the objective
    row = {"name": name, "rule": rule, "steps": steps, "mixture": mixture, "train_steps": m["steps"], "seed": seed,
            "energy_distance": ev["student"]["energy_distance"],
            "teacher_energy_distance": ev["teacher"]["energy_distance"], "energy_ratio": ev["energy_ratio"],
            "modes": f"{ev['student']['modes_covered']}/{ev['student']['num_modes']}",
            "all_modes": ev["student"]["modes_covered"] == ev["student"]["num_modes"],
            "spread": ev["student"]["spread"], "teacher_spread": ev["teacher"]["spread"],
            "exit_spreads": exit_spreads(teacher, objective, student), "train_seconds": round(secs, 1)}
    (run_dir / "row.json").write_text(json.dumps(row, indent=2))
    return row


def passes(r: dict) -> bool:
    """The multi-step acceptance band: all modes, energy <= 1.5x the teacher ODE's, spread in [0.9, 1.1]."""
    return r["all_modes"] and r["energy_ratio"] <= 1.5 and 0.9 <= r["spread"] <= 1.1


def table(rows: list[dict]) -> str:
    out = ["| rule | steps | mixture | energy dist. | teacher ODE | / teacher | modes | spread | per-exit spread | pass |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ex = " / ".join(f"{s:.2f}" for s in r["exit_spreads"])
        out.append(f"| {r['rule']} | {r['steps']} | {r['mixture']} | {r['energy_distance']:.4f} | "
                   f"{r['teacher_energy_distance']:.4f} | {r['energy_ratio']:.2f} | {r['modes']} | {r['spread']:.2f} | "
                   f"{ex} | {'yes' if passes(r) else 'no'} |")
    if rows:
        out.append(f"\n{rows[0]['train_steps']} training steps per run (configs/gmm_dmd2.yaml, batch 256), seed "
                   f"{rows[0]['seed']}; pass = all modes, energy <= 1.5x the teacher's 100-step ODE, spread 0.9-1.1.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", nargs="+", default=RULES, help="objective.backward_simulation values")
    ap.add_argument("--steps", nargs="+", type=int, default=STEPS, help="student steps")
    ap.add_argument("--mixtures", nargs="+", default=MIXTURES, help="built-in GMM teachers")
    ap.add_argument("--train-steps", type=int, default=10000, help="training steps per run (same for all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes)")
    ap.add_argument("--reuse", action="store_true", help="keep rows already finished in --out (same budget and seed)")
    ap.add_argument("--out", default="runs/multistep_ablation", help="folder for runs, ablation.json and ablation.md")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(r, s, m) for m in args.mixtures for s in args.steps for r in args.rules]
    common = (args.train_steps, args.seed, str(out), args.reuse)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            rows = list(ex.map(run_one, *zip(*[(*j, *common) for j in jobs])))
    else:
        rows = []
        for j in jobs:
            print(f"[ablation] {'-'.join(map(str, j))} ...", flush=True)
            rows.append(run_one(*j, *common))
    md = table(rows)
    print(md)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    (out / "ablation.md").write_text(md + "\n")
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
