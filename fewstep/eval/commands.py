"""``fewstep eval fid | clip | compare``: argument definitions and handlers (imported lazily by fewstep.cli).

Errors are raised as one-line ConfigError / DataError / ValueError; ``fewstep.cli.main`` prints them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_FID_IMAGES = 5000


def add_eval_parser(sub) -> argparse.ArgumentParser:
    ev = sub.add_parser("eval", help="FID / CLIP score of a pipeline or image folder; teacher-vs-student tables")
    es = ev.add_subparsers(dest="eval_cmd", required=True)

    f = es.add_parser("fid", help="FID of a pipeline's images (or an image folder) against a reference")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--pipeline", help="diffusers pipeline folder (or hub id) to generate images with")
    src.add_argument("--images", help="score an existing folder of images instead")
    f.add_argument("--ref", help="reference: a folder of images or a .npz statistics file")
    _generation_args(f, default_n=None, n_help="images to generate (default 5000) or, with --images, to score (default all)")
    _fid_args(f)
    _diversity_args(f)
    f.add_argument("--save-ref-stats", default=None, metavar="FILE.npz",
                   help="write the reference statistics (when --ref is a folder) for reuse; with --diversity "
                        "they hold the reference's features too")
    f.add_argument("--save-stats", default=None, metavar="FILE.npz", help="write the scored set's statistics")
    f.add_argument("--json", default=None, help="result JSON (default OUT/fid.json when generating)")

    c = es.add_parser("clip", help="CLIP score of a pipeline's images (or an image folder) against their prompts")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--pipeline", help="diffusers pipeline folder (or hub id)")
    src.add_argument("--images", help="score a folder written by `fewstep eval` (prompts from its manifest.json), "
                                      "or any folder whose sorted images match --prompts line by line")
    c.add_argument("--clip", help="CLIP model: hub id (e.g. openai/clip-vit-large-patch14) or local folder")
    _generation_args(c, default_n=None)
    c.add_argument("--json", default=None, help="result JSON (default OUT/clip.json when generating)")

    m = es.add_parser("compare", help="teacher at 1..50 steps vs students: metric vs NFE (JSON, Markdown, PNG)")
    m.add_argument("--teacher", help="teacher pipeline folder")
    m.add_argument("--student", action="append", default=[], help="student pipeline folder (repeatable)")
    m.add_argument("--teacher-steps", default="1,2,4,8,16,32,50", help="comma-separated (default 1,2,4,8,16,32,50)")
    m.add_argument("--teacher-guidance", type=float, default=None, help="teacher CFG scale (default: recommended)")
    m.add_argument("--ref", help="FID reference: image folder or .npz statistics")
    m.add_argument("--clip", default=None, help="also report CLIP score with this CLIP model")
    _generation_args(m, default_n=1000, steps=False)
    _fid_args(m)
    _diversity_args(m)
    return ev


def _generation_args(p, default_n, steps: bool = True, n_help: str = "") -> None:
    p.add_argument("--prompts", default=None, help="prompt file: .txt one a line, COCO captions .json, .jsonl or .csv")
    p.add_argument("--num-images", type=int, default=default_n,
                   help=n_help or f"images to generate/score (default {default_n if default_n else 'one per prompt'})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i (recorded in manifest.json)")
    if steps:
        p.add_argument("--steps", type=int, default=None, help="override the recommended num_inference_steps")
        p.add_argument("--guidance-scale", type=float, default=None, help="override the recommended guidance_scale")
    p.add_argument("--out", default=None, help="folder for the generated images / outputs")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _fid_args(p) -> None:
    p.add_argument("--feature-extractor", default=None, metavar="PATH",
                   help="local TorchScript / safetensors feature network (offline) instead of the standard Inception")
    p.add_argument("--backend", default="clean-fid", choices=["clean-fid", "torchmetrics"],
                   help="Frechet distance (and default Inception) from clean-fid or torchmetrics")
    p.add_argument("--ref-resize", type=int, default=None, metavar="N",
                   help="center-crop and resize reference images to N x N (photos of mixed sizes)")


# fewstep.eval.diversity's DEFAULT_K_PR, DEFAULT_K_DC, DEFAULT_MAX_REF (not imported: the parser is built
# for every fewstep command and must not import torch)
DEFAULT_K_PR, DEFAULT_K_DC, DEFAULT_MAX_REF = 3, 5, 10000


def _diversity_args(p) -> None:
    p.add_argument("--diversity", action="store_true",
                   help="also precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020) "
                        "in the same features; needs the reference's features (an image folder, or a .npz "
                        "written with --diversity --save-ref-stats)")
    p.add_argument("--k-pr", type=int, default=DEFAULT_K_PR, metavar="K",
                   help=f"neighbours for precision/recall (default {DEFAULT_K_PR})")
    p.add_argument("--k-dc", type=int, default=DEFAULT_K_DC, metavar="K",
                   help=f"neighbours for density/coverage (default {DEFAULT_K_DC})")
    p.add_argument("--diversity-max-ref", type=int, default=DEFAULT_MAX_REF, metavar="N",
                   help=f"use at most N reference features (a seeded random subset; default {DEFAULT_MAX_REF})")


def _diversity_opts(args):
    """Keyword arguments for fewstep.eval.diversity.diversity_vs_reference, or None without --diversity."""
    if not args.diversity:
        return None
    from ..config import ConfigError

    for name in ("k_pr", "k_dc", "diversity_max_ref"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    n = args.num_images or (DEFAULT_FID_IMAGES if getattr(args, "pipeline", None) else None)
    if n is not None and n <= args.k_pr:  # fail before generating
        raise ConfigError(f"--diversity with --k-pr {args.k_pr} needs more than {args.k_pr} images, "
                          f"got --num-images {n}")
    return {"k_pr": args.k_pr, "k_dc": args.k_dc, "max_ref": args.diversity_max_ref}


def format_diversity(r: dict) -> str:
    """One line: precision, recall, density, coverage and their k."""
    d = r["diversity"]
    return (f"precision {r['precision']:.4f}  recall {r['recall']:.4f}  (k={d['k_pr']})  density {r['density']:.4f}  "
            f"coverage {r['coverage']:.4f}  (k={d['k_dc']}; {d['num_images']} images vs {d['num_ref']} reference)")


# ---- handlers -------------------------------------------------------------------------------------
def run(args) -> int:
    return {"fid": cmd_fid, "clip": cmd_clip, "compare": cmd_compare}[args.eval_cmd](args)


def _device(args) -> str:
    from .generate import default_device

    return args.device or default_device()


def _prompts(path, required: bool):
    from ..data import read_prompts

    if path is None:
        if required:
            from ..config import ConfigError

            raise ConfigError("--prompts FILE is required (one caption a line, or a COCO captions JSON)")
        return None
    return read_prompts(path, one_per_image=True)


def _generate(args, default_out: str, n=None):
    """Generate with the pipeline's recommended settings (overridable); returns the Generated set and out folder."""
    from .generate import generate, open_pipeline, pipeline_kind, recommended

    pipe = open_pipeline(args.pipeline, _device(args))
    kind = pipeline_kind(pipe)
    prompts = _prompts(args.prompts, required=kind == "text")
    rec = recommended(args.pipeline)
    steps = args.steps or rec["num_inference_steps"]
    guidance = args.guidance_scale if args.guidance_scale is not None else rec["guidance_scale"]
    out = Path(args.out or Path("runs") / "eval" / f"{Path(args.pipeline).name or 'pipeline'}-{default_out}")
    n = n or args.num_images or DEFAULT_FID_IMAGES
    gen = generate(pipe, n, prompts=prompts, num_inference_steps=steps, guidance_scale=guidance,
                   batch_size=args.batch_size, seed=args.seed, out_dir=str(out), progress=not args.quiet)
    return gen, out


def _write(result: dict, path) -> None:
    from .fid import write_json

    if path:
        write_json(result, path)
        print(f"wrote {path}")


def cmd_fid(args) -> int:
    from ..data import DataError
    from .features import load_feature_extractor
    from .fid import fid, reference

    if not args.ref:
        raise DataError("--ref is required: a folder of reference images or a .npz statistics file")
    div = _diversity_opts(args)
    ext = load_feature_extractor(args.feature_extractor, args.backend, _device(args))
    if not args.pipeline and not args.images and not args.save_ref_stats:
        raise DataError("nothing to score: pass --pipeline DIR or --images DIR (or --save-ref-stats FILE.npz "
                        "to only precompute the reference statistics)")
    # the reference first: a bad --ref fails before any image is generated
    ref_feats, stats = reference(args.ref, ext, resize=args.ref_resize, save_stats=args.save_ref_stats,
                                 progress=not args.quiet, save_features=div is not None)
    if not args.pipeline and not args.images:
        print(f"wrote reference statistics of {stats.num_images} images ({ext.name}) to {args.save_ref_stats}")
        return 0
    ref_cache = {(str(args.ref), ext.name, args.ref_resize): (ref_feats, stats)}
    if div is not None:  # a .npz without features fails here, before any image is generated
        from .diversity import reference_features

        ref_cache[(str(args.ref), ext.name, args.ref_resize, "features")] = reference_features(args.ref, ref_feats)
    json_path = args.json
    extra = {}
    if args.pipeline:
        gen, out = _generate(args, "fid")
        images = gen.images
        json_path = json_path or str(out / "fid.json")
        extra = {"pipeline": args.pipeline, "images_dir": str(out), "generation": gen.settings,
                 "sec_per_image": gen.sec_per_image, "seeds": f"{args.seed}..{args.seed + len(images) - 1}"}
    else:
        images = args.images
        extra = {"images": args.images}
    limit = None if args.pipeline else args.num_images
    result = fid(images, args.ref, ext, args.backend, limit=limit, ref_resize=args.ref_resize,
                 save_stats=args.save_stats, progress=not args.quiet, ref_cache=ref_cache, diversity=div)
    result.update(extra)
    print(f"FID {result['fid']:.4f}  ({result['num_images']} images vs {result['num_ref_images']} reference; "
          f"features: {result['feature_extractor']}; backend: {result['backend']})")
    if div is not None:
        print(format_diversity(result))
    if "note" in result:
        print(f"note: {result['note']}")
    _write(result, json_path)
    return 0


def cmd_clip(args) -> int:
    from ..data import DataError, list_images, load_images_uint8
    from .clip import CLIPScorer
    from .generate import read_manifest

    if not args.clip:
        raise DataError("--clip is required: a CLIP model hub id (e.g. openai/clip-vit-large-patch14) or a local folder")
    scorer = CLIPScorer(args.clip, _device(args))  # load first: a bad model fails before any generation
    json_path = args.json
    if args.pipeline:
        prompts = _prompts(args.prompts, required=True)
        gen, out = _generate(args, "clip", n=args.num_images or len(prompts))
        images, prompts = gen.images, gen.prompts
        if prompts is None:
            raise DataError(f"{args.pipeline} is not a text-to-image pipeline: CLIP score needs prompts")
        json_path = json_path or str(out / "clip.json")
        extra = {"pipeline": args.pipeline, "images_dir": str(out), "generation": gen.settings}
    elif args.images:
        files = list_images(args.images)
        manifest = read_manifest(args.images)
        if manifest and all("prompt" in r and "file" in r for r in manifest["images"]):
            recs = manifest["images"]
            files = [Path(args.images) / r["file"] for r in recs]
            prompts = [r["prompt"] for r in recs]
        else:
            prompts = _prompts(args.prompts, required=True)
            if len(prompts) < len(files):
                raise DataError(f"{args.images} has {len(files)} images but {args.prompts} only {len(prompts)} prompts")
            prompts = prompts[:len(files)]
        if args.num_images:
            files, prompts = files[:args.num_images], prompts[:args.num_images]
        images = load_images_uint8(files)
        extra = {"images": args.images}
    else:
        raise DataError("nothing to score: pass --pipeline DIR or --images DIR")
    result = {**scorer(images, prompts), **extra}
    print(f"CLIP score {result['clip_score']:.4f}  ({result['num_images']} images; model {args.clip})")
    _write(result, json_path)
    return 0


def cmd_compare(args) -> int:
    from ..config import ConfigError
    from ..data import DataError
    from .compare import MetricSuite, compare, markdown

    if not args.teacher:
        raise ConfigError("--teacher DIR is required")
    if not args.ref and not args.clip:
        raise DataError("no metric: pass --ref (FID reference folder or .npz) and/or --clip MODEL")
    try:
        steps = [int(s) for s in args.teacher_steps.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--teacher-steps must be comma-separated integers, got {args.teacher_steps!r}") from None
    if not steps or min(steps) < 1:
        raise ConfigError(f"--teacher-steps must be positive integers, got {args.teacher_steps!r}")
    dev = _device(args)
    div = _diversity_opts(args)
    if div is not None and not args.ref:
        raise DataError("--diversity needs --ref (an image folder, or a .npz written with --diversity --save-ref-stats)")
    suite = MetricSuite(backend=args.backend, diversity=div)
    if args.ref:
        from .features import load_feature_extractor

        suite.extractor = load_feature_extractor(args.feature_extractor, args.backend, dev)
        suite.ref = args.ref
    if args.clip:
        from .clip import CLIPScorer

        suite.clip = CLIPScorer(args.clip, dev)
    prompts = _prompts(args.prompts, required=False)
    out = args.out or "runs/compare"
    res = compare(args.teacher, args.student, suite, args.num_images, steps, args.teacher_guidance, prompts,
                  args.seed, args.batch_size, dev, out, progress=not args.quiet)
    print(markdown(res))
    print(f"wrote {out}/compare.json, compare.md, compare.png")
    return 0
