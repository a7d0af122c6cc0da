#!/usr/bin/env python
"""Known-answer benchmark on the built-in Gaussian mixtures: prints a Markdown table and writes JSON.

Each row distills the exact GMM teacher with one objective/setting on the same budget and reports the
student's energy distance to the true mixture (the teacher's 100-step ODE is the reference floor),
modes covered, in-mode fraction, within-mode spread (1.0 = right, < 1 collapsed), endpoint error vs the teacher
ODE of the same noise, NFE and time.

    python tools/benchmark.py                    # the default suite (DMD2: TTUR ablation, 1/2/4 steps; DMD)
    python tools/benchmark.py --only flow_map-1step flow_map-1step-predictor-only flow_map-1step-corrector-only
    python tools/benchmark.py --steps 4000 --only dmd2-1step dmd2-2step
    python tools/benchmark.py --only consistency-1step slam-2step boot-1step

A row is a list of overrides on configs/gmm_dmd2.yaml, or ``(config file, overrides)`` to start from another
config (configs/gmm_<objective>.yaml).  ``--steps`` gives every row the same budget; without it each row keeps
its config's ``train.max_steps``.  Consistency/SLAM rows also report the consistency function's error at
mid-trajectory, ``|f(x_0.5, 0.5) - ODE endpoint|`` on the teacher's own path, which is what a 2-step sampler's
second step rests on, and the footnote gives the 2-step re-noising floor (a perfect consistency function).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLOW_MAP = ["objective.name=flow_map", "objective.critic_steps=1"]  # configs/gmm_flow_map.yaml's objective
SUITE = {
    # name: overrides on configs/gmm_dmd2.yaml
    "dmd2-1step": [],
    "dmd2-1step-critic1": ["objective.critic_steps=1"],
    # multi-step: the default exit rule (phased: exits one after another), per-exit critics, the published DMD2
    # rule (random exit, one shared critic) and training only the last exit; on uneq6 (unequal weights/stds) as
    # well, where the shared critic lets the exits collapse within modes (tools/multistep_ablation.py: full grid)
    "dmd2-2step": ["student.steps=2"],
    "dmd2-2step-per-exit": ["student.steps=2", "objective.backward_simulation=per_exit"],
    "dmd2-4step-per-exit": ["student.steps=4", "objective.backward_simulation=per_exit"],
    "dmd2-2step-recipe": ["student.steps=2", "objective.backward_simulation=dmd2"],
    "dmd2-2step-last": ["student.steps=2", "objective.backward_simulation=last"],
    "dmd2-4step": ["student.steps=4"],
    "dmd2-4step-recipe": ["student.steps=4", "objective.backward_simulation=dmd2"],
    "dmd2-4step-last": ["student.steps=4", "objective.backward_simulation=last"],
    "dmd2-2step-uneq6": ["teacher.path=gmm:uneq6", "student.steps=2"],
    "dmd2-2step-recipe-uneq6": ["teacher.path=gmm:uneq6", "student.steps=2", "objective.backward_simulation=dmd2"],
    "dmd2-4step-uneq6": ["teacher.path=gmm:uneq6", "student.steps=4"],
    "dmd2-4step-recipe-uneq6": ["teacher.path=gmm:uneq6", "student.steps=4", "objective.backward_simulation=dmd2"],
    "dmd-1step": ["objective.name=dmd", "objective.critic_steps=1", "objective.reg_pairs=2048",
                  "objective.reg_ode_steps=100"],
    # flow teacher (rectified flow, velocity): DMD2 unchanged, and data-free flow maps with their ablations
    "dmd2-flow-1step": ["teacher.schedule=flow"],
    "flow_map-1step": ["teacher.schedule=flow", *FLOW_MAP],
    "flow_map-1step-predictor-only": ["teacher.schedule=flow", *FLOW_MAP, "objective.corrector_fraction=0"],
    "flow_map-1step-corrector-only": ["teacher.schedule=flow", *FLOW_MAP, "objective.corrector_fraction=1"],
    "flow_map-4step": ["teacher.schedule=flow", *FLOW_MAP, "student.steps=4"],
    # Phased DMD (separate experts, DDIM transitions, DM times inside each phase), and its ablations
    "phased_dmd-2step": ("gmm_phased_dmd.yaml", ["student.steps=2"]),
    "phased_dmd-4step": ("gmm_phased_dmd.yaml", ["student.steps=4"]),
    "phased_dmd-4step-uneq6": ("gmm_phased_dmd.yaml", ["student.steps=4", "teacher.path=gmm:uneq6"]),
    "phased_dmd-4step-uneq6-dm-above": ("gmm_phased_dmd.yaml", ["student.steps=4", "teacher.path=gmm:uneq6",
                                                                "objective.dm_times=above"]),
    "phased_dmd-4step-uneq6-shared": ("gmm_phased_dmd.yaml", ["student.steps=4", "teacher.path=gmm:uneq6",
                                                              "objective.experts=shared"]),
    "phased_dmd-4step-flow": ("gmm_phased_dmd.yaml", ["student.steps=4", "teacher.schedule=flow"]),
    # trajectory objectives, each from its own config: consistency (LCM), SLAM, BOOT (data-free)
    "consistency-1step": ("gmm_consistency.yaml", []),
    "consistency-2step": ("gmm_consistency.yaml", ["student.steps=2"]),
    "consistency-4step": ("gmm_consistency.yaml", ["student.steps=4"]),
    "consistency-2step-fixed-w": ("gmm_consistency.yaml", ["student.steps=2", "objective.guidance_embedding=false"]),
    "slam-1step": ("gmm_slam.yaml", ["student.steps=1"]),
    "slam-1step-start": ("gmm_slam.yaml", ["student.steps=1", "objective.subpath_time=start",
                                           "objective.loss_weight=none"]),
    "slam-1step-uniform": ("gmm_slam.yaml", ["student.steps=1", "objective.gamma_power=1"]),  # the first default
    "slam-1step-p3": ("gmm_slam.yaml", ["student.steps=1", "objective.gamma_power=3"]),  # the second default
    "slam-1step-paper": ("gmm_slam.yaml", ["student.steps=1", "objective.subpath_time=start",  # SLAM's code
                                           "objective.subpath_x0=paper", "objective.loss_weight=none"]),
    "slam-2step": ("gmm_slam.yaml", ["student.steps=2"]),
    "slam-4step": ("gmm_slam.yaml", ["student.steps=4"]),
    "boot-1step": ("gmm_boot.yaml", []),
    "boot-1step-delta-weighting": ("gmm_boot.yaml", ["objective.weighting=delta"]),
}
BASE_CONFIG = "gmm_dmd2.yaml"


def _row(spec) -> tuple[str, list[str]]:
    """``(config file, overrides)`` of a SUITE entry."""
    return (spec[0], list(spec[1])) if isinstance(spec, tuple) else (BASE_CONFIG, list(spec))


def consistency_error(teacher, objective, student, t: float = 0.5, n: int = 2000, seed: int = 321) -> dict:
    """Mean ``|f(x_t, t) - x_0|`` along the teacher's 100-step ODE path, and the 2-step re-noising floor."""
    import torch

    from fewstep.sampling import ode_sample

    g = torch.Generator().manual_seed(seed)
    cond = teacher.sample_conditions(n, g)
    noise = torch.randn((n, *teacher.sample_shape), generator=g)
    gs = teacher.guidance_scale
    with torch.no_grad():
        x0, path, ts = ode_sample(teacher, noise, cond, 100, guidance_scale=gs, return_path=True)
        i = min(range(len(ts)), key=lambda k: abs(ts[k] - t))
        slot = objective.with_slot(cond, objective.slot_for_sampling(n, noise.device))
        f = objective.consistency(student.eval(), path[i], torch.full((n,), ts[i]), slot)
        # a perfect consistency function, sampled in 2 steps: the ODE endpoint, re-noised to t, solved again
        t2 = objective.grid_times(2)[1]
        x_t2 = teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((n,), t2))
        x2 = ode_sample(teacher, x_t2, cond, max(2, round(100 * t2)), guidance_scale=gs, t_max=t2)
    return {"f_error": float((f - x0).norm(dim=1).mean()), "t": ts[i],
            "two_step_floor": float((x2 - x0).norm(dim=1).mean())}


def run(name: str, spec, steps, seed: int, out: Path) -> dict:
    from fewstep.api import distill
    from fewstep.config import load_config

    config, overrides = _row(spec)
    budget = [f"train.max_steps={steps}", f"train.checkpoint_every={steps}"] if steps else \
        ["train.checkpoint_every=100000000"]  # the config's own max_steps (a checkpoint is written at the end)
    cfg = load_config(str(ROOT / "configs" / config),
                      [*overrides, *budget, f"train.seed={seed}", "train.tracker=none",
                       "train.resume=false", f"output_dir={out / name}"])
    t0 = time.time()
    m = distill(cfg, log=lambda *a: None)
    ev = m["eval"]
    extra = {}
    if cfg.objective.get("name") in ("consistency", "slam"):
        from fewstep.api import load_run
        from fewstep.export import load_toy_student

        _, teacher, _, objective = load_run(str(out / name))
        extra["consistency"] = consistency_error(teacher, objective, load_toy_student(teacher, out / name / "student"))
    return {"name": name, "config": config, "overrides": overrides, "train_steps": m["steps"], "seed": seed, **extra,
            "train_seconds": round(time.time() - t0, 1),
            "student_nfe": ev["student"]["nfe"], "energy_distance": ev["student"]["energy_distance"],
            "teacher_energy_distance": ev["teacher"]["energy_distance"], "energy_ratio": ev["energy_ratio"],
            "modes": f"{ev['student']['modes_covered']}/{ev['student']['num_modes']}",
            "in_mode_frac": ev["student"]["in_mode_frac"], "spread": ev["student"]["spread"],
            "endpoint_error": ev["endpoint_error"],
            "flow_map_tracking": ev.get("flow_map_tracking")}


def table(rows: list[dict]) -> str:
    head = ("| run | NFE | train steps | energy dist. | teacher ODE | / teacher ODE | modes | in-mode | spread "
            "| endpoint err. | train s |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['student_nfe']} | {r['train_steps']} | {r['energy_distance']:.4f} | "
                   f"{r['teacher_energy_distance']:.4f} | {r['energy_ratio']:.2f} | {r['modes']} | "
                   f"{r['in_mode_frac']:.3f} | {r.get('spread', float('nan')):.2f} | {r['endpoint_error']:.3f} | "
                   f"{r['train_seconds']} |")
    if rows:
        out.append(f"\nteacher: DDIM ODE 100 steps, energy distance {rows[0]['teacher_energy_distance']:.4f} "
                   "(the sampling floor at 5,000 samples)")
    cm = [r for r in rows if r.get("consistency")]
    if cm:  # consistency / SLAM: the consistency function mid-trajectory, and what 2 steps can reach at best
        out.append("\n| run | consistency error at t = 0.5 | 2-step re-noising floor |\n|---|---|---|")
        for r in cm:
            c = r["consistency"]
            out.append(f"| {r['name']} | {c['f_error']:.4f} | {c['two_step_floor']:.4f} |")
    tracked = [r for r in rows if r.get("flow_map_tracking")]
    if tracked:  # flow maps: the jump f(z, d) from noise vs the teacher's ODE (200 Euler steps) to t = 1 - d
        out.append("\n| run | f(z, d) error, d = 0.25 | d = 0.5 | d = 1 |\n|---|---|---|---|")
        for r in tracked:
            e = r["flow_map_tracking"]
            out.append(f"| {r['name']} | {e['0.25']:.4f} | {e['0.5']:.4f} | {e['1']:.4f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per run (the same budget for all); default: each row's config max_steps")
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
