#!/usr/bin/env python
"""The CPU digits benchmark: teacher (1..50 steps) vs DMD2 1- and 4-step students, digits-FID and class accuracy.

    python tools/digits_benchmark.py                       # runs/bench_digits/{compare.md,compare.png,benchmark.json}
    python tools/digits_benchmark.py --train-steps 300 --num-images 500    # a quicker, rougher run

Teacher and classifier are trained once and cached ($FEWSTEP_CACHE or ~/.cache/fewstep).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from fewstep.eval.digits import run_benchmark

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_digits")
    p.add_argument("--students", default="1,4", help="student step counts (default 1,4)")
    p.add_argument("--train-steps", type=int, default=None, help="DMD2 steps (default: configs/digits_dmd2.yaml)")
    p.add_argument("--num-images", type=int, default=1000, help="images per row (default 1000)")
    p.add_argument("--config", default=None, help="DMD2 config (default configs/digits_dmd2.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the DMD2 runs, e.g. train.lr=2e-4")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run_benchmark(args.out, [int(s) for s in args.students.split(",")], args.train_steps, args.num_images,
                        config=args.config, overrides=args.overrides)
    print(res["markdown"])
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items())
          + f", total {time.perf_counter() - t0:.0f}")
    print(f"wrote {args.out}/compare.md, compare.png, compare.json, benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
