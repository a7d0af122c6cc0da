"""Library entry points behind the CLI: build a run from a config, train, export, evaluate."""
from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .conditions import Condition
from .config import ConfigError, config_to_dict, dump_config
from .data import DataError, DataSource
from .objectives.base import get_objective, known_objectives


# ---- building blocks --------------------------------------------------------------------------
def load_teacher(tcfg):
    """``gmm:NAME`` / ``gmm:FILE.json`` analytic teachers, else a diffusers pipeline (hub id or folder)."""
    path = tcfg.path
    if not path:
        raise ConfigError("teacher.path is required (a hub id, a local diffusers pipeline folder, or gmm:NAME)")
    from .teachers.load import load_teacher as _load

    return _load(path, tcfg.guidance_scale, tcfg.dtype, tcfg.revision, tcfg.variant, schedule=tcfg.schedule)


def build_objective_config(name: str, values: dict):
    """Validate ``objective.*`` keys against the objective's config dataclass (one-line errors)."""
    try:
        cls = get_objective(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    kw = {}
    for key, val in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean 'objective.{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key 'objective.{key}' for objective {name!r}{hint}")
        default = fields[key].default
        if isinstance(default, bool) and not isinstance(val, bool):
            raise ConfigError(f"objective.{key} must be true or false, got {val!r}")
        if isinstance(default, float) and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(val, (int, float)):
            raise ConfigError(f"objective.{key} must be a number, got {val!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and isinstance(val, float):
            if val != int(val):
                raise ConfigError(f"objective.{key} must be an integer, got {val!r}")
            val = int(val)
        kw[key] = val
    kw["name"] = name
    return cls, cls.Config(**kw)


def build(cfg):
    """Teacher, data source and objective for a config (validated; one-line errors)."""
    obj_values = dict(cfg.objective)
    name = obj_values.pop("name", None)
    if not name:
        raise ConfigError(f"objective.name is required; known objectives: {', '.join(known_objectives())}")
    obj_cls, obj_cfg = build_objective_config(name, obj_values)  # validate before the (slow) teacher load
    teacher = load_teacher(cfg.teacher)
    if cfg.data.resolution and hasattr(teacher, "set_resolution"):  # flow transformers (Flux has no fixed size)
        try:
            teacher.set_resolution(cfg.data.resolution)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    images = cfg.data.images
    if obj_cls.data_free and images:  # never hand a data-free objective an image source
        print(f"fewstep: warning: objective {name!r} is data-free: data.images={images} is unused", file=sys.stderr)
        images = None
    data = DataSource(cfg.data.prompts, images, on_bad_image=cfg.data.on_bad_image, min_images=cfg.train.batch_size)
    if getattr(teacher, "text_conditioned", False) and not cfg.data.prompts and not obj_cls.data_free:
        raise ConfigError(f"teacher {cfg.teacher.path} is text-conditioned: set data.prompts to a text file, one prompt a line")
    if cfg.data.prompts and not Path(cfg.data.prompts).is_file():
        raise ConfigError(f"data.prompts file not found: {cfg.data.prompts}")
    gan = getattr(obj_cfg, "gan_weight", 0) > 0
    if (gan or obj_cls.needs_real_data) and teacher.family != "gmm":
        if not cfg.data.images:
            what = f"objective.gan_weight={obj_cfg.gan_weight}" if gan else f"objective {name!r}"
            raise ConfigError(f"{what} needs real images: set data.images to a folder")
        if not Path(cfg.data.images).is_dir():
            raise ConfigError(f"data.images folder not found: {cfg.data.images}")
    if cfg.student.lora_rank > 0:
        if not hasattr(teacher, "student_lora"):
            raise ConfigError(f"student.lora_rank={cfg.student.lora_rank}: LoRA students need a diffusers UNet teacher, "
                              f"not {cfg.teacher.path}")
        teacher.student_lora = (cfg.student.lora_rank, cfg.student.lora_alpha or cfg.student.lora_rank)
    torch.manual_seed(cfg.train.seed)  # network initialisation (heads, toy residuals) is part of the config
    try:
        objective = obj_cls(obj_cfg, teacher, cfg.student.steps)
        objective.set_max_steps(cfg.train.max_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return teacher, data, objective


# ---- evaluation on known answers --------------------------------------------------------------
@torch.no_grad()
def evaluate_toy(teacher, objective, student, n: int = 5000, seed: int = 123, ode_steps: int = 100) -> dict:
    """Teacher ODE vs student on a GMM: energy distance to the true mixture, modes, NFE, time per 1k samples."""
    from .sampling import ode_sample
    from .toy import energy_distance, mode_stats

    mix = teacher.mixture
    g = torch.Generator().manual_seed(seed)
    data, _ = mix.sample(n, g)
    cond = teacher.sample_conditions(n, g)
    noise = torch.randn((n, *teacher.sample_shape), generator=g)
    dev = teacher.device
    gs = teacher.guidance_scale
    t0 = time.perf_counter()
    x_t = ode_sample(teacher, noise.to(dev), cond.to(dev), ode_steps, guidance_scale=gs).cpu()
    t_teacher = time.perf_counter() - t0
    student = student.to(dev).eval()
    t0 = time.perf_counter()
    x_s = objective.sample(student, noise.to(dev), cond.to(dev), generator=torch.Generator().manual_seed(seed + 1)).cpu()
    t_student = time.perf_counter() - t0
    cfg_mult = 1 if gs in (None, 1.0) else 2
    spacing = mix.nearest_mode_spacing()
    res = {
        "teacher": {"sampler": f"DDIM ODE, {ode_steps} steps", "nfe": ode_steps * cfg_mult,
                    "energy_distance": energy_distance(x_t, data.float()), **mode_stats(x_t, mix),
                    "sec_per_1k": t_teacher * 1000 / n},
        "student": {"sampler": f"{objective.name}, {objective.steps} step(s)", "nfe": objective.steps,
                    "energy_distance": energy_distance(x_s, data.float()), **mode_stats(x_s, mix),
                    "sec_per_1k": t_student * 1000 / n},
        "endpoint_error": float((x_s - x_t).norm(dim=1).mean()),
        "nearest_mode_spacing": spacing,
        "num_samples": n,
    }
    res["energy_ratio"] = res["student"]["energy_distance"] / max(res["teacher"]["energy_distance"], 1e-12)
    if hasattr(objective, "tracking_errors"):  # flow maps: the jump f(z, d) vs the teacher's ODE from the same noise
        m = min(n, 2000)
        res["flow_map_tracking"] = objective.tracking_errors(student, noise[:m].to(dev), cond[:m].to(dev))
    res["_samples"] = {"data": data.float(), "teacher": x_t, "student": x_s}
    return res


def toy_table(res: dict) -> str:
    rows = [("", "sampler", "NFE", "energy dist.", "modes", "in-mode", "spread", "s / 1k samples")]
    for k in ("teacher", "student"):
        r = res[k]
        rows.append((k, r["sampler"], str(r["nfe"]), f"{r['energy_distance']:.4f}",
                     f"{r['modes_covered']}/{r['num_modes']}", f"{r['in_mode_frac']:.2f}", f"{r['spread']:.2f}",
                     f"{r['sec_per_1k']:.4f}"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
    out = [fmt(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows[1:]]
    out.append(f"student/teacher energy ratio {res['energy_ratio']:.2f}; mean endpoint error vs the teacher ODE "
               f"of the same noise {res['endpoint_error']:.3f} (nearest-mode spacing {res['nearest_mode_spacing']:.2f})")
    if "flow_map_tracking" in res:
        out.append("flow map f(z, d) vs the teacher ODE from the same noise, mean error: " + ", ".join(
            f"d={d}: {e:.4f}" for d, e in res["flow_map_tracking"].items()))
    return "\n".join(out)


# ---- sample grids -----------------------------------------------------------------------------
def make_sampler_hook(teacher, objective, run_dir: Path, n: int = 8, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    fixed_noise = torch.randn((n if teacher.family != "gmm" else 1000, *teacher.sample_shape), generator=g)
    cond_cache = {}

    def hook(trainer, step):
        dev = trainer.device
        if "cond" not in cond_cache:
            cond_cache["cond"] = teacher.sample_conditions(len(fixed_noise), torch.Generator().manual_seed(seed), trainer.data)
        student = trainer.plain["student"]
        was = student.training
        student.eval()
        with torch.no_grad():
            x = objective.sample(student, fixed_noise.to(dev), cond_cache["cond"].to(dev),
                                 generator=torch.Generator().manual_seed(seed))
        student.train(was)
        from .export import atomic_file

        with atomic_file(run_dir / "samples" / f"step_{step:07d}.png", "sample grid ") as tmp:  # no half-written grid
            if teacher.family == "gmm":
                from .toy import scatter_panels

                scatter_panels({f"student, step {step}": x.cpu()}, str(tmp))
            else:
                from torchvision.utils import save_image

                save_image(teacher.to_images(x).cpu(), str(tmp), nrow=4)
        # matplotlib figures are reference cycles that Python's oldest GC generation frees late in a process holding
        # a large model graph: without this, RSS grew ~0.4 MB per grid (tools/rss_trend.py --sample-every 20)
        gc.collect()

    return hook


# ---- the whole run ----------------------------------------------------------------------------
def distill(cfg, log=print) -> dict:
    """Train per ``cfg``; export the student; write ``metrics.json``. Returns the metrics."""
    from .trainer import Trainer

    run_dir = Path(cfg.output_dir)
    teacher, data, objective = build(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, teacher, objective, data, run_dir, log=log)
    if trainer.acc.is_main_process:
        dump_config(cfg, run_dir / "config.yaml")
    hook = make_sampler_hook(teacher, objective, run_dir)
    fit = trainer.fit(on_sample=hook)
    metrics: dict = {"objective": objective.name, "student_steps": objective.steps,
                     "num_processes": trainer.acc.num_processes, **fit}
    if trainer.acc.is_main_process:
        hook(trainer, trainer.step)
        student = trainer.final_student()
        student.eval()
        if teacher.family == "gmm":
            from .export import save_toy_student
            from .toy import scatter_panels

            save_toy_student(student, objective, teacher, run_dir / "student")
            res = evaluate_toy(teacher, objective, student)
            samples = res.pop("_samples")
            metrics["eval"] = res
            from .export import atomic_file

            with atomic_file(run_dir / "samples.png", "sample plot ") as tmp:
                scatter_panels(
                    {"data (true mixture)": samples["data"], f"teacher ODE ({res['teacher']['nfe']} NFE)": samples["teacher"],
                     f"student ({objective.steps} step)": samples["student"]}, str(tmp))
            metrics["plot"] = str(run_dir / "samples.png")
            metrics["table"] = toy_table(res)
        else:
            from .export import export_pipeline

            out = export_pipeline(teacher, student, objective, run_dir / "pipeline", config_to_dict(cfg))
            metrics["pipeline"] = str(out)
        metrics["history_tail"] = trainer.history[-5:]
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    trainer.end()
    return metrics


def load_run(run_dir: str):
    """Config, teacher, objective and final student of a finished run (for ``sample`` / ``export``)."""
    from .config import load_config

    rd = Path(run_dir)
    if not (rd / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a fewstep run folder (no config.yaml)")
    cfg = load_config(str(rd / "config.yaml"))
    teacher, data, objective = build(cfg)
    return cfg, teacher, data, objective
