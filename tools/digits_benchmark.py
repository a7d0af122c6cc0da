#!/usr/bin/env python
"""The CPU digits benchmark: teacher (1..50 steps) vs DMD2 and Phased DMD students, same seeds; digits-FID,
precision, recall, density, coverage (the digits classifier's features), class accuracy, ms per image.

    python tools/digits_benchmark.py                       # runs/bench_digits/{compare.md,compare.png,benchmark.json}
    python tools/digits_benchmark.py --only dmd2-1step,dmd2-4step --train-steps 300 --num-images 500   # quicker
    python tools/digits_benchmark.py --row "pdmd-2 configs/digits_phased_dmd.yaml student.steps=2" --row ...
    python tools/digits_benchmark.py --reuse --eval-seeds 5     # the same students, scored over 5 sampling seeds

Default rows (label, config, overrides): dmd2-1step and dmd2-4step (configs/digits_dmd2.yaml),
phased_dmd-2step and phased_dmd-4step (configs/digits_phased_dmd.yaml); a row whose config file does not
exist is skipped with a message.  Teacher and classifier are trained once and cached ($FEWSTEP_CACHE or
~/.cache/fewstep).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ints(text: str, flag: str) -> list:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        sys.exit(f"{flag} must be comma-separated positive integers, got {text!r}")
    return vals


def main(argv=None) -> int:
    from fewstep.eval.digits import DEFAULT_ROWS, parse_row, run_benchmark

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_digits")
    p.add_argument("--row", action="append", default=[], metavar="'LABEL CONFIG [KEY=VALUE ...]'",
                   help="a student row (repeatable); replaces the default rows")
    p.add_argument("--only", default=None, metavar="LABELS",
                   help="comma-separated labels of the default rows to run: "
                        + ", ".join(r.label for r in DEFAULT_ROWS))
    p.add_argument("--students", default=None,
                   help="older form: DMD2 student step counts (e.g. 1,4) from --config, instead of the default rows")
    p.add_argument("--config", default=None, help="DMD2 config for --students (default configs/digits_dmd2.yaml)")
    p.add_argument("--train-steps", type=int, default=None, help="distillation steps of every row (default: each config's)")
    p.add_argument("--num-images", type=int, default=1000, help="images per row (default 1000)")
    p.add_argument("--teacher-steps", default="1,2,4,8,16,32,50", help="teacher rows (default 1,2,4,8,16,32,50)")
    p.add_argument("--jobs", type=int, default=2, help="distillations run side by side, one thread each (default 2)")
    p.add_argument("--eval-seeds", type=int, default=1,
                   help="sample every row with seeds 0..N-1 and show mean ± std (default 1; the README tables use 5)")
    p.add_argument("--reuse", action="store_true",
                   help="score students already trained in --out with the same config and overrides, without retraining")
    p.add_argument("--k-pr", type=int, default=3, help="neighbours for precision/recall (default 3)")
    p.add_argument("--k-dc", type=int, default=5, help="neighbours for density/coverage (default 5)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every row, e.g. train.lr=2e-4")
    args = p.parse_args(argv)
    if args.eval_seeds < 1:
        sys.exit(f"--eval-seeds must be >= 1, got {args.eval_seeds}")
    if sum(map(bool, (args.row, args.only, args.students))) > 1:
        sys.exit("pass only one of --row, --only and --students")
    rows = None
    if args.row:
        rows = [parse_row(r) for r in args.row]
    elif args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        known = {r.label: r for r in DEFAULT_ROWS}
        unknown = [w for w in want if w not in known]
        if unknown:
            sys.exit(f"--only: unknown row {', '.join(unknown)}; default rows: {', '.join(known)}")
        rows = [known[w] for w in want]
    students = _ints(args.students, "--students") if args.students else None
    t0 = time.perf_counter()
    res = run_benchmark(args.out, students, args.train_steps, args.num_images,
                        teacher_steps=_ints(args.teacher_steps, "--teacher-steps"), config=args.config,
                        overrides=args.overrides, rows=rows, jobs=args.jobs,
                        diversity={"k_pr": args.k_pr, "k_dc": args.k_dc}, eval_seeds=args.eval_seeds,
                        reuse=args.reuse)
    print(res["markdown"])
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items())
          + f", total {time.perf_counter() - t0:.0f}")
    print(f"wrote {args.out}/compare.md, compare.png, compare.json, benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
