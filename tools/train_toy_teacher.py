#!/usr/bin/env python
"""Train (once) the digits teacher and classifier of the CPU benchmark; print where they are cached.

    python tools/train_toy_teacher.py                 # ~/.cache/fewstep/digits (or $FEWSTEP_CACHE/digits)
    python tools/train_toy_teacher.py --out my_teacher --steps 2000 --force

The teacher is a ClassConditionalPipeline folder (load it with
``from pipelines.class_conditional import ClassConditionalPipeline``); the classifier a safetensors
feature network for ``fewstep eval fid --feature-extractor``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from fewstep.eval import digits

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="teacher folder (default: the cache)")
    p.add_argument("--steps", type=int, default=None, help=f"teacher optimizer steps (default {digits.TeacherConfig.steps})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    args = p.parse_args(argv)
    cfg = digits.TeacherConfig(seed=args.seed)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    teacher, clf = digits.ensure_teacher_and_classifier(cfg, force=args.force, out=args.out)
    ref = digits.ensure_reference_stats(clf)
    print(f"teacher:    {teacher}")
    print(f"classifier: {clf}   (fewstep eval fid --feature-extractor {clf})")
    print(f"reference:  {ref}   (fewstep eval fid --ref {ref})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
