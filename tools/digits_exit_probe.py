#!/usr/bin/env python
"""Which step of a multi-step digits student moves its metrics: hand off to the teacher after k student steps.

    python tools/digits_exit_probe.py runs/bench_digits/dmd2-4step            # a benchmark row (or its pipeline/)
    python tools/digits_exit_probe.py STUDENT --eval-seeds 5 --out probe.json

Row k (k = 0..K) runs the student's first k steps, then the teacher's own DDIM (``--teacher-steps``, default 50)
from the student's next timestep to the end (``fewstep.eval.handoff``): k = 0 is the teacher alone, k = K the student
alone.  Every row is scored as the digits benchmark scores (digits-FID, precision / recall, density / coverage,
class accuracy; the same labels, seeds and real-digit split), mean ± std over sampling seeds.  The teacher and
classifier come from the benchmark's cache (``tools/train_toy_teacher.py``); the student's ``fewstep.json`` names its
step count and teacher.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("digits_fid", "precision", "recall", "density", "coverage", "class_accuracy")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("student", help="an exported digits student (a folder with fewstep.json), or a run holding pipeline/")
    p.add_argument("--teacher", default=None, help="teacher pipeline folder (default: the student's fewstep.json, "
                                                   "else the cached digits teacher)")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher DDIM steps over the whole range (default 50)")
    p.add_argument("--eval-seeds", type=int, default=3, help="sampling seeds 0..N-1 (default 3)")
    p.add_argument("--num-images", type=int, default=1000, help="images per row and seed (default 1000)")
    p.add_argument("--k-pr", type=int, default=3, help="neighbours for precision/recall (default 3)")
    p.add_argument("--k-dc", type=int, default=5, help="neighbours for density/coverage (default 5)")
    p.add_argument("--out", default=None, help="JSON file (default: STUDENT/exit_probe.json)")
    args = p.parse_args(argv)
    if args.eval_seeds < 1:
        sys.exit(f"--eval-seeds must be >= 1, got {args.eval_seeds}")
    student_dir = Path(args.student)
    if not (student_dir / "fewstep.json").is_file() and (student_dir / "pipeline" / "fewstep.json").is_file():
        student_dir = student_dir / "pipeline"
    meta_file = student_dir / "fewstep.json"
    if not meta_file.is_file():
        sys.exit(f"{args.student}: not an exported fewstep student (no fewstep.json there or in pipeline/)")
    meta = json.loads(meta_file.read_text())
    steps = int(meta["num_inference_steps"])
    if meta.get("pipeline_class") not in ("ClassConditionalPipeline", "PhasedClassConditionalPipeline") \
            or meta.get("scheduler") != "DDIMScheduler":
        sys.exit(f"{student_dir}: the probe takes multi-step digits students on a DDIM grid ((Phased)ClassConditionalPipeline"
                 f" + DDIMScheduler: phased_dmd, or dmd2 with objective.transition=ddim); got {meta.get('pipeline_class')}"
                 f" + {meta.get('scheduler')}")
    if args.teacher_steps < 1 or 1000 % args.teacher_steps or 1000 % steps:
        sys.exit(f"--teacher-steps and the student's {steps} steps must divide 1000 (diffusers' DDIM grid), "
                 f"got --teacher-steps {args.teacher_steps}")

    import numpy as np
    import torch

    from fewstep.eval import digits
    from fewstep.eval.compare import MetricSuite
    from fewstep.eval.features import load_feature_extractor
    from fewstep.eval.generate import Generated
    from fewstep.eval.handoff import handoff_sample
    from pipelines import load_pipeline
    from pipelines.class_conditional import ClassConditionalPipeline

    torch.set_num_threads(1)
    teacher_dir, clf = digits.ensure_teacher_and_classifier()
    if args.teacher:
        teacher_dir = args.teacher
    elif meta.get("teacher") and Path(meta["teacher"]).is_dir():
        teacher_dir = meta["teacher"]
    ref = digits.ensure_reference_stats(clf)
    student = load_pipeline(str(student_dir))
    teacher = ClassConditionalPipeline.from_pretrained(str(teacher_dir))
    ext = load_feature_extractor(str(clf))
    _, div_ref = digits.diversity_split(ext, args.num_images)
    suite = MetricSuite(extractor=ext, ref=str(ref), fid_name="digits_fid",
                        diversity={"k_pr": args.k_pr, "k_dc": args.k_dc}, diversity_ref=div_ref)
    suite.prepare()
    labels = torch.arange(args.num_images) % student.num_classes  # the benchmark's labels and per-image seeds
    shape = (1, student.unet.config.in_channels, student.unet.config.sample_size, student.unet.config.sample_size)
    rows = []
    for k in range(steps + 1):
        label = ("teacher only" if k == 0 else "student only" if k == steps
                 else f"student steps 1-{k}, then the teacher" if k > 1 else "student step 1, then the teacher")
        per_seed = []
        for seed in range(args.eval_seeds):
            chunks = []
            for start in range(0, args.num_images, 250):
                idx = range(start, min(start + 250, args.num_images))
                noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in idx])
                chunks.append(handoff_sample(student, teacher, k, noise, labels[list(idx)].tolist(),
                                             student_steps=steps, teacher_steps=args.teacher_steps))
            u8 = (torch.cat(chunks) * 255).round().to(torch.uint8)
            u8 = u8.repeat(1, 3, 1, 1) if u8.shape[1] == 1 else u8[:, :3]
            r = suite(Generated(u8, [], {}, 0.0, labels=labels))
            per_seed.append({m: float(r[m]) for m in METRICS if m in r})
        row = {"k": k, "row": label}
        for m in per_seed[0]:
            vals = [s[m] for s in per_seed]
            row[m], row[m + "_std"] = float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        rows.append(row)
        print(f"k={k} ({label}): " + ", ".join(f"{m} {row[m]:.4f}" for m in METRICS if m in row), flush=True)
    head = "| k | row | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for r in rows:
        lines.append(f"| {r['k']} | {r['row']} | " + " | ".join(
            f"{r[m]:.3f} ± {r[m + '_std']:.3f}" if m in r else "-" for m in METRICS) + " |")
    print("\n".join(lines))
    out = Path(args.out) if args.out else student_dir / "exit_probe.json"
    out.write_text(json.dumps({"student": str(student_dir), "teacher": str(teacher_dir), "student_steps": steps,
                               "teacher_steps": args.teacher_steps, "eval_seeds": args.eval_seeds,
                               "num_images": args.num_images, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
