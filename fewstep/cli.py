"""``fewstep distill | export | sample | demo | eval``.

Every user-facing failure (bad config, missing files, divergence, corrupt checkpoint, a failed write) prints one
line ``fewstep: error: ...`` and exits non-zero, never a traceback.  ``FEWSTEP_DEBUG=1`` shows tracebacks.

Exit codes: 0 done; 1 training failed (non-finite loss, unreadable checkpoint); 2 bad input (config, data, teacher);
74 a write failed (disk full, quota, file-size limit, permissions: EX_IOERR); 128 + N stopped by signal N after
writing a checkpoint (130 SIGINT, 138 SIGUSR1, 143 SIGTERM; ``train.save_on_signal``): run the same command to resume.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

EXIT_WRITE = 74  # a write failed (sysexits EX_IOERR)

DEMO_OVERRIDES = [
    "teacher.path=gmm:ring8", "teacher.guidance_scale=1", "student.steps=1", "objective.name=dmd2",
    "objective.critic_steps=5", "objective.lr_decay=cosine", "train.max_steps=10000", "train.batch_size=256", "train.lr=1e-3",
    "train.adam_beta1=0", "train.ema_decay=0.98", "train.checkpoint_every=2500", "train.log_every=50", "train.seed=0",
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description="Distill diffusion/flow teachers into 1-4 step students.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("distill", help="train a student from a YAML config")
    d.add_argument("config", help="YAML config (configs/<teacher>_<objective>.yaml)")
    d.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 teacher.guidance_scale=8")
    d.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    e = sub.add_parser("export", help="write a run's student as a diffusers pipeline folder")
    e.add_argument("run_dir")
    e.add_argument("--out", default=None, help="output folder (default RUN_DIR/pipeline)")
    s = sub.add_parser("sample", help="sample a run (GMM: .npy) or an exported pipeline (image grid)")
    s.add_argument("path", help="run folder or exported pipeline folder")
    s.add_argument("--prompt", action="append", default=None, help="prompt (repeatable)")
    s.add_argument("--num-samples", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class", dest="class_label", type=int, default=None, help="GMM class (default: by mixture weight)")
    s.add_argument("--steps", type=int, default=None, help="override the recommended number of steps")
    s.add_argument("--out", required=True, help="output .npy (GMM runs) or .png (pipelines)")
    m = sub.add_parser("demo", help="distill a built-in 2-D Gaussian mixture into a 1-step DMD2 student")
    m.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    m.add_argument("overrides", nargs="*", help="extra dotted overrides")
    from .eval.commands import add_eval_parser

    add_eval_parser(sub)  # eval fid | clip | compare
    return p


def cmd_distill(args) -> int:
    from .config import config_to_dict, load_config
    import yaml

    if not Path(args.config).is_file():
        from .config import ConfigError

        raise ConfigError(f"config file not found: {args.config}")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
        from .memory import estimate_config, table

        est = estimate_config(cfg)  # local (or cached) UNet teachers: read from the safetensors headers, nothing loaded
        if est is not None:
            where = "CPU resident set" if "process (torch, libraries)" in est["parts"] else "GPU allocated"
            print("\n".join("# " + line for line in table(est, f"estimated peak memory per device ({where}, "
                                                               f"teacher in {est['dtype']}):").splitlines()))
        return 0
    from .api import distill

    metrics = distill(cfg)
    _report(metrics, cfg.output_dir)
    return 0


def _report(metrics: dict, run_dir) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    if "table" in metrics:
        print(metrics["table"])
        print(f"scatter plot: {metrics['plot']}")
    if "pipeline" in metrics:
        print(f"exported pipeline: {metrics['pipeline']}  (DiffusionPipeline.from_pretrained(...))")
    print(f"run folder: {run_dir}  (config.yaml, checkpoints/, logs/, samples/, metrics.json)")


def cmd_demo(args) -> int:
    from .api import distill
    from .config import load_config

    cfg = load_config(None, DEMO_OVERRIDES + [f"output_dir={args.out}", "train.resume=false"] + list(args.overrides))
    out = Path(cfg.output_dir)
    if (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    print(f"fewstep demo: distilling the built-in 8-mode Gaussian mixture (exact analytic teacher) into a "
          f"1-step DMD2 student; {cfg.train.max_steps} steps on the CPU ...")
    metrics = distill(cfg)
    _report(metrics, cfg.output_dir)
    return 0


def cmd_export(args) -> int:
    from .api import load_run
    from .config import ConfigError, config_to_dict
    from .export import export_pipeline

    cfg, teacher, data, objective = load_run(args.run_dir)
    if not teacher.exports_pipeline:
        raise ConfigError(f"{teacher.family.upper()} students are not diffusers pipelines; "
                          "sample them with `fewstep sample RUN_DIR --out x.npy`")
    out = Path(args.out or Path(args.run_dir) / "pipeline")
    src = Path(args.run_dir) / "pipeline"
    student = objective.student
    if (src / "unet").is_dir():
        cls = type(student.net)
        student.net = cls.from_pretrained(str(src / "unet"))
    else:
        from .trainer import list_checkpoints
        from safetensors.torch import load_file

        cks = list_checkpoints(Path(args.run_dir))
        if not cks:
            raise ConfigError(f"{args.run_dir} has neither an exported pipeline nor a checkpoint")
        student.load_state_dict(load_file(str(cks[-1] / "model.safetensors")))
        print(f"exporting the (non-EMA) student weights of {cks[-1]}")
    if out.resolve() != src.resolve():
        export_pipeline(teacher, student, objective, out, config_to_dict(cfg))
    print(f"exported pipeline: {out}")
    return 0


def cmd_sample(args) -> int:
    import torch

    path = Path(args.path)
    if (path / "model_index.json").is_file():
        return _sample_pipeline(args, path)
    from .api import load_run
    from .config import ConfigError

    cfg, teacher, data, objective = load_run(str(path))
    if teacher.exports_pipeline:
        if (path / "pipeline" / "model_index.json").is_file():
            return _sample_pipeline(args, path / "pipeline")
        raise ConfigError(f"{path} has no exported pipeline; run `fewstep export {path}` first")
    student = teacher.load_student(path / teacher.student_folder, objective)
    n = args.num_samples or 1000
    if n < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {n}")
    g = torch.Generator().manual_seed(args.seed)
    if args.class_label is None:
        cond = teacher.sample_conditions(n, g)
    else:
        from .conditions import Condition

        k = teacher.num_classes
        if not 0 <= args.class_label < k:
            raise ConfigError(f"--class must be in 0..{k - 1}, got {args.class_label}")
        cond = Condition(class_labels=torch.full((n,), args.class_label, dtype=torch.long))
    noise = torch.randn((n, *teacher.sample_shape), generator=g)
    with torch.no_grad():
        x = objective.sample(student, noise, cond, num_steps=args.steps, generator=g)
    import numpy as np

    from .export import atomic_file

    out = args.out if str(args.out).endswith(".npy") else f"{args.out}.npy"  # np.save's own naming
    with atomic_file(out) as tmp, open(tmp, "wb") as f:
        np.save(f, x.numpy())
    print(f"wrote {n} samples to {args.out}")
    return 0


def _sample_pipeline(args, path: Path) -> int:
    import torch
    from pipelines import load_pipeline
    from torchvision.utils import save_image

    info = json.loads((path / "fewstep.json").read_text()) if (path / "fewstep.json").is_file() else {}
    pipe = load_pipeline(str(path))  # stock classes, or fewstep's own (pipelines/)
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps or info.get("num_inference_steps", 4)
    n = args.num_samples or 4
    g = torch.Generator().manual_seed(args.seed)
    if hasattr(pipe, "text_encoder"):
        prompts = args.prompt or ["a photo of a cat"]
        prompts = (prompts * n)[: max(n, len(prompts))]
        imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=info.get("guidance_scale", 0.0),
                    generator=g, output_type="pt").images
    else:
        imgs = pipe(batch_size=n, num_inference_steps=steps, generator=g, output_type="np").images
        imgs = torch.as_tensor(imgs).permute(0, 3, 1, 2)
    from .export import atomic_file

    with atomic_file(args.out) as tmp:
        save_image(torch.as_tensor(imgs).float(), str(tmp), nrow=min(4, len(imgs)))
    print(f"wrote a grid of {len(imgs)} images to {args.out} ({steps} steps)")
    return 0


def cmd_eval(args) -> int:
    from .eval.commands import run

    return run(args)


def _leave_now(code: int) -> None:
    """A stopped rank of a multi-process run exits at once, skipping the interpreter's teardown: its checkpoint is on
    disk and its process group destroyed, but gloo's worker threads can still abort that teardown ("terminate called
    without an active exception", SIGABRT instead of 128 + N; seen once in CI), and a scheduler reads the exit code."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def main(argv=None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after an option (``distill cfg.yaml --dry-run a.b=1``)
        if args.cmd in ("distill", "demo") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the exception classes only: torch, diffusers and the trainer are imported by the command that needs them
    from .config import ConfigError
    from .errors import CheckpointError, DataError, Preempted, TeacherLoadError, TrainingDiverged, WriteError

    handlers = {"distill": cmd_distill, "export": cmd_export, "sample": cmd_sample, "demo": cmd_demo,
                "eval": cmd_eval}
    try:
        return handlers[args.cmd](args)
    except (ConfigError, DataError, TeacherLoadError, CheckpointError, TrainingDiverged, FileNotFoundError,
            ValueError, KeyError) as e:
        if os.environ.get("FEWSTEP_DEBUG"):
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"fewstep: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, DataError, TeacherLoadError, FileNotFoundError)) else 1
    except WriteError as e:
        if os.environ.get("FEWSTEP_DEBUG"):
            raise
        print(f"fewstep: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_WRITE
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"fewstep: {e}", file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _leave_now(e.exit_code)
        return e.exit_code
    except OSError as e:  # any other failed write (metrics.json, config.yaml): one line too
        from .export import write_failure

        err = write_failure(e, e.filename or "a file")
        if err is None or os.environ.get("FEWSTEP_DEBUG"):
            raise
        print(f"fewstep: error: {err}", file=sys.stderr)
        return EXIT_WRITE
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
