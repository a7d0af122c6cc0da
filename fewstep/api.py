"""Library entry points behind the CLI: build a run from a config, train, export, evaluate."""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from .conditions import Condition
from .config import ConfigError, config_to_dict, dump_config, structured
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
    """The objective class registered as ``name`` and its ``Config`` from the ``objective.*`` keys, checked like every
    other section: the ``Config`` dataclass is the OmegaConf schema (:func:`fewstep.config.structured`)."""
    try:
        cls = get_objective(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    return cls, structured(cls.Config, {**values, "name": name}, prefix="objective.", scope=f" for objective {name!r}")


def build(cfg):
    """Teacher, data source and objective for a config (validated; one-line errors)."""
    obj_values = dict(cfg.objective)
    name = obj_values.pop("name", None)
    if not name:
        raise ConfigError(f"objective.name is required; known objectives: {', '.join(known_objectives())}")
    obj_cls, obj_cfg = build_objective_config(name, obj_values)  # validate before the (slow) teacher load
    from .progress import progress_mode

    progress_mode(cfg.train.progress)  # likewise
    if cfg.train.optimizer == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'fewstep[memory]' "
                              "(or pip install bitsandbytes)")
    teacher = load_teacher(cfg.teacher)
    if cfg.data.resolution:  # diffusers teachers (UNet latents and SDXL time ids, SD3/Flux); the analytic GMM ignores it
        try:
            teacher.set_resolution(cfg.data.resolution)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    images = cfg.data.images
    if obj_cls.data_free and images:  # never hand a data-free objective an image source
        print(f"fewstep: warning: objective {name!r} is data-free: data.images={images} is unused", file=sys.stderr)
        images = None
    data = DataSource(cfg.data.prompts, images, on_bad_image=cfg.data.on_bad_image, min_images=cfg.train.batch_size,
                      cache=cfg.data.cache, cache_dir=cfg.data.cache_dir or str(Path(cfg.output_dir) / "cache"),
                      cache_memory_mb=cfg.data.cache_memory_mb, free_text_encoders=cfg.data.free_text_encoders,
                      free_vae=cfg.data.free_vae)
    if teacher.text_conditioned and not cfg.data.prompts and not obj_cls.data_free:
        raise ConfigError(f"teacher {cfg.teacher.path} is text-conditioned: set data.prompts to a text file, one prompt a line")
    if cfg.data.prompts and not Path(cfg.data.prompts).is_file():
        raise ConfigError(f"data.prompts file not found: {cfg.data.prompts}")
    gan = getattr(obj_cfg, "gan_weight", 0) > 0
    if (gan or obj_cls.needs_real_data) and teacher.needs_image_folder:
        if not cfg.data.images:
            what = f"objective.gan_weight={obj_cfg.gan_weight}" if gan else f"objective {name!r}"
            raise ConfigError(f"{what} needs real images: set data.images to a folder")
        if not Path(cfg.data.images).is_dir():
            raise ConfigError(f"data.images folder not found: {cfg.data.images}")
    if cfg.student.lora_rank > 0:
        if not teacher.supports_lora:
            raise ConfigError(f"student.lora_rank={cfg.student.lora_rank}: LoRA students need a diffusers UNet teacher, "
                              f"not {cfg.teacher.path}")
        teacher.student_lora = (cfg.student.lora_rank, cfg.student.lora_alpha or cfg.student.lora_rank)
    teacher.share_base, teacher.critic_lora = resolve_adapters(cfg, obj_cls, obj_cfg, teacher)
    torch.manual_seed(cfg.train.seed)  # network initialisation (heads, toy residuals) is part of the config
    try:
        objective = obj_cls(obj_cfg, teacher, cfg.student.steps)
        objective.set_max_steps(cfg.train.max_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.gradient_checkpointing:
        from .lora import checkpoint_networks

        if not checkpoint_networks(teacher.denoiser, *objective.networks().values()):
            print(f"fewstep: warning: train.gradient_checkpointing=true: no network of {cfg.teacher.path} supports "
                  "it (diffusers UNets and transformers do); ignored", file=sys.stderr)
    return teacher, data, objective


def resolve_adapters(cfg, obj_cls, obj_cfg, teacher) -> tuple[bool, Optional[tuple]]:
    """``(share_base, critic_lora)`` from ``student.share_base`` and ``objective.critic_lora_rank/alpha``.

    ``share_base`` null (auto): on when the student or the critic is a LoRA and the objective supports adapters on
    the teacher's network.  ``critic_lora_rank`` null: the student's LoRA when the base is shared, else a full critic;
    0: a full critic; > 0: a LoRA critic of that rank (on the shared base, or on a copy of its own)."""
    share = cfg.student.share_base
    rank = getattr(obj_cfg, "critic_lora_rank", None)
    alpha = getattr(obj_cfg, "critic_lora_alpha", None)
    if rank is not None and rank < 0:
        raise ConfigError(f"objective.critic_lora_rank must be >= 0 or null, got {rank}")
    if alpha is not None and not alpha > 0:
        raise ConfigError(f"objective.critic_lora_alpha must be > 0 or null, got {alpha}")
    if rank and not teacher.supports_lora:
        raise ConfigError(f"objective.critic_lora_rank={rank}: LoRA critics need a diffusers UNet teacher, "
                          f"not {cfg.teacher.path}")
    student = teacher.student_lora
    if share is None:
        share = bool(obj_cls.shares_base and teacher.supports_lora and (student or rank))
    elif share and not obj_cls.shares_base:
        raise ConfigError(f"student.share_base=true: objective {obj_cls.name!r} keeps networks of its own "
                          f"(adapters on the teacher's network: dmd, dmd2, phased_dmd)")
    if rank is None:
        critic = student if share else None
    else:
        critic = (rank, alpha or rank) if rank > 0 else None
    if share and not (student or critic):
        raise ConfigError("student.share_base=true needs a LoRA to share the teacher's network with: "
                          "student.lora_rank > 0 or objective.critic_lora_rank > 0")
    return bool(share), critic


# ---- evaluation on known answers (thin wrappers: the analytic teacher owns them) ------------------
def evaluate_toy(teacher, objective, student, n: int = 5000, seed: int = 123, ode_steps: int = 100) -> dict:
    """Teacher ODE vs student on a GMM (:func:`fewstep.teachers.gmm.evaluate_toy`), through ``teacher.evaluate``."""
    return teacher.evaluate(objective, student, n=n, seed=seed, ode_steps=ode_steps)


def toy_table(res: dict) -> str:
    """:func:`fewstep.teachers.gmm.toy_table`: ``evaluate_toy``'s result as a table."""
    from .teachers.gmm import toy_table as _table

    return _table(res)


# ---- sample grids -----------------------------------------------------------------------------
def make_sampler_hook(teacher, objective, run_dir: Path, n: Optional[int] = None, seed: int = 7):
    """``hook(trainer, step)``: the student's samples of fixed noise as ``samples/step_STEP.png`` (``n``: how many;
    default the teacher's ``panel_samples``)."""
    g = torch.Generator().manual_seed(seed)
    fixed_noise = torch.randn((n or teacher.panel_samples, *teacher.sample_shape), generator=g)
    cond_cache = {}

    def hook(trainer, step):
        dev = trainer.device
        if "cond" not in cond_cache:
            cond_cache["cond"] = teacher.sample_conditions(len(fixed_noise), torch.Generator().manual_seed(seed), trainer.data)
        student = trainer.sample_student()  # under FSDP: the gathered, unsharded copy
        was = student.training
        student.eval()
        with torch.no_grad():
            x = objective.sample(student, fixed_noise.to(dev), cond_cache["cond"].to(dev),
                                 generator=torch.Generator().manual_seed(seed))
        student.train(was)
        from .export import atomic_file

        with atomic_file(run_dir / "samples" / f"step_{step:07d}.png", "sample grid ") as tmp:  # no half-written grid
            teacher.write_panel(x, tmp, f"student, step {step}")
        # matplotlib figures are reference cycles that Python's oldest GC generation frees late in a process holding
        # a large model graph: without this, RSS grew ~0.4 MB per grid (tools/rss_trend.py --sample-every 20)
        gc.collect()

    return hook


# ---- the whole run ----------------------------------------------------------------------------
def _warn_changed_config(run_dir: Path, cfg, log) -> None:
    """A run that will resume from checkpoints trained under another config says which keys changed (it continues:
    extending ``train.max_steps`` is a normal resume; a new ``output_dir`` trains from scratch)."""
    from .config import flatten, load_config
    from .trainer import list_checkpoints

    prev = run_dir / "config.yaml"
    if not (cfg.train.resume and prev.is_file() and list_checkpoints(run_dir)):
        return

    def resolved(c) -> dict:  # the objective's keys with its defaults filled in
        flat = {k: v for k, v in flatten(c).items() if not k.startswith("objective.")}
        obj = dict(c.objective)
        flat.update(flatten(build_objective_config(obj.pop("name", "dmd2"), obj)[1], "objective"))
        return flat

    try:
        old = resolved(load_config(str(prev)))
    except Exception:  # an unreadable or older-format config: nothing to compare against
        return
    new = resolved(cfg)
    changed = [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted(set(old) | set(new))
               if k != "output_dir" and old.get(k) != new.get(k)]
    if changed:
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        log(f"fewstep: warning: resuming {run_dir}, whose checkpoints were trained under another config: "
            f"{'; '.join(changed[:8])}{more} (a new output_dir trains from scratch)")


def distill(cfg, log=print) -> dict:
    """Train per ``cfg``; export the student; write ``metrics.json``. Returns the metrics."""
    from .trainer import Trainer

    run_dir = Path(cfg.output_dir)
    teacher, data, objective = build(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, teacher, objective, data, run_dir, log=log)
    if trainer.acc.is_main_process:
        _warn_changed_config(run_dir, cfg, log)
        dump_config(cfg, run_dir / "config.yaml")
    hook = make_sampler_hook(teacher, objective, run_dir)
    fit = trainer.fit(on_sample=hook)
    for opt in trainer.optims.values():  # trained and checkpointed: the export needs no optimizer state or gradients
        getattr(opt, "optimizer", opt).state.clear()
    for m in trainer.plain.values():
        m.zero_grad(set_to_none=True)
    if teacher.exports_pipeline:  # the critic (and any other trained network) is checkpointed and not exported
        _drop_weights(n for g, n in objective.networks().items() if g != "student")
    from .memory import release_unused

    release_unused()  # what training held goes back to the OS before the export allocates its shards
    metrics: dict = {"objective": objective.name, "student_steps": objective.steps,
                     "num_processes": trainer.acc.num_processes, **fit}
    # under FSDP a collective (every process gathers its shards; the main process gets the whole student)
    student = trainer.final_student() if trainer.fsdp or trainer.acc.is_main_process else None
    if trainer.acc.is_main_process:
        hook(trainer, trainer.step)
        student.eval()
        folder = run_dir / teacher.student_folder  # pipeline/ (diffusers) or student/ (the analytic teacher's)
        metrics.update(teacher.save_student(student, objective, folder, config_to_dict(cfg)))
        metrics.update(teacher.evaluate_run(objective, student, run_dir))  # known-answer metrics, where there are any
        metrics["history_tail"] = trainer.history[-5:]
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    trainer.end()
    return metrics


def _drop_weights(networks) -> None:
    """Free the storage of every parameter these networks register (after training: the final checkpoint holds
    them).  An adapter on the shared base registers only its own weights, so the base stays; for an SDXL-size LoRA
    critic that is 0.8 GB, for a full one 10 GB, that the export's writes would otherwise stack on."""
    for net in networks:
        for p in net.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def load_run(run_dir: str):
    """Config, teacher, objective and final student of a finished run (for ``sample`` / ``export``)."""
    from .config import load_config

    rd = Path(run_dir)
    if not (rd / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a fewstep run folder (no config.yaml)")
    cfg = load_config(str(rd / "config.yaml"))
    teacher, data, objective = build(cfg)
    return cfg, teacher, data, objective
