"""Run configuration: dataclasses as OmegaConf structured configs, read from YAML with dotted overrides (OmegaConf
dotlist items, YAML values), validated: OmegaConf checks keys and types (:func:`structured`); fewstep adds no string or
boolean conversion from other types, integral numbers (``1e3``) as integers, range checks and one-line ConfigErrors
(key, value, what was expected or the nearest key).  ``objective``: a dict checked against its objective's Config."""

from __future__ import annotations

import json
import math
import os
from contextlib import suppress
from dataclasses import asdict, dataclass, field, is_dataclass
from difflib import get_close_matches
from functools import reduce
from typing import Any, Optional, Sequence, get_args, get_type_hints

import yaml
from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

class ConfigError(ValueError):
    def __init__(self, message: str):  # a one-line, user-facing problem: whitespace (newlines too) collapsed
        super().__init__(" ".join(str(message).split()))


@dataclass
class TeacherConfig:
    path: str = "gmm:ring8"  # hub id or local diffusers pipeline folder, or gmm:NAME / gmm:FILE.json
    guidance_scale: float = 1.0  # diffusers (Ho) form; 1 = no guidance
    schedule: str = "vp"  # for gmm teachers: "vp" or "flow"
    dtype: str = "float32"  # weights dtype for diffusers teachers: float32, float16, bfloat16
    revision: Optional[str] = None
    variant: Optional[str] = None


@dataclass
class StudentConfig:
    steps: int = 1  # 1..4 sampling steps
    lora_rank: int = 0  # 0 = full fine-tune
    lora_alpha: Optional[float] = None
    share_base: Optional[bool] = None  # LoRA nets as adapters on the teacher's frozen network; null: auto (a LoRA)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 64  # per process, per micro-batch
    lr: float = 1e-4
    seed: int = 0
    mixed_precision: str = "no"  # no, fp16, bf16
    grad_accum: int = 1
    max_grad_norm: float = 10.0  # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0  # linear warm-up from 0 to lr over this many optimizer steps of each group
    optimizer: str = "adamw"  # adamw (torch, fused where it can), adamw8bit (bitsandbytes: 8-bit states, CPU and GPU)
    gradient_checkpointing: bool = False  # recompute diffusers UNet/transformer activations in backward (less memory)
    ema_decay: float = 0.0  # 0 disables EMA of the student
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: only at the end
    log_every: int = 10
    resume: bool = True  # resume from the newest checkpoint in output_dir
    tracker: str = "tensorboard"  # tensorboard or none
    save_on_signal: bool = True  # SIGTERM/SIGINT/SIGUSR1: finish the step, write a checkpoint, exit 128 + signal
    progress: str = "auto"  # auto (a bar on a terminal, else lines), bar (tqdm), lines (a plain line now and then), none


@dataclass
class DataConfig:
    prompts: Optional[str] = None  # text file, one prompt a line
    images: Optional[str] = None  # folder of images (GAN / consistency terms)
    resolution: Optional[int] = None  # None: from the teacher's own config
    on_bad_image: str = "error"  # error: stop at an unreadable image; skip: leave it out (each one logged)
    cache: str = "auto"  # encoded prompts/latents: memory, disk (shards in cache_dir), auto (disk if > cache_memory_mb)
    cache_dir: Optional[str] = None  # null: OUTPUT_DIR/cache
    cache_memory_mb: float = 1024.0  # data.cache=auto: the largest cache kept in memory
    free_text_encoders: bool = True  # drop the text encoders once every prompt is cached (exports still carry them)
    free_vae: bool = True  # drop the VAE once image latents are cached; reloaded for sample grids, written at export


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: dict = field(default_factory=lambda: {"name": "dmd2"})  # {"name": ..., objective keys}
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/fewstep"


def _unknown_key(dotted: str, keys: list[str], scope: str) -> ConfigError:
    top, sections = list(dict.fromkeys(k.split(".")[0] for k in keys)), {k.rpartition(".")[0] for k in keys}
    sec, _, leaf = dotted.rpartition(".")
    guess = sec if sec in sections else next(iter(get_close_matches(sec, list(sections), 1, 0.6)), None)
    own = top if guess == "" else [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == guess]
    hint = next((k for k in keys if k.rpartition(".")[2] == leaf), None)  # train.resolution -> data.resolution
    hint = hint or next((f"{guess}.{m}".lstrip(".") for m in get_close_matches(leaf, own, 1, 0.6)), None)
    where = f"valid keys in {sec!r}: {', '.join(own)}" if sec and sec in sections else \
        f"valid top-level keys: {', '.join(top)}"
    return ConfigError(f"unknown config key {dotted!r}{scope}; " + (f"did you mean {hint!r}?" if hint else where))


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    value = OmegaConf.to_container(value) if isinstance(value, Container) else value
    base = next(a for a in get_args(tp) if a is not type(None)) if type(None) in get_args(tp) else tp
    what = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    quote = "; quote it in YAML" if base is str and type(value) in (int, float) else ""
    return ConfigError(f"{key} must be {what.get(base, 'a valid value')}{' or null' * (base is not tp)}, "
                       f"got {value!r:.80} ({type(value).__name__}){quote}")


def _fit(schema: type, raw: dict, prefix: str) -> dict:
    hints, out = get_type_hints(schema), {}
    for key, value in raw.items():
        dotted, tp = f"{prefix}{key}", hints.get(key)
        if dotted in ("train.mixed_precision", "train.tracker") and (value is False or value is None):
            value = "no" if dotted == "train.mixed_precision" else "none"  # YAML 1.1 reads `no` as false
        base = next((a for a in get_args(tp) if a is not type(None)), tp)
        if is_dataclass(tp) or base is dict:  # a section; null: its defaults; `objective: NAME`: {name: NAME}
            value = {"name": value} if isinstance(value, str) and base is dict else {} if value is None else value
            if not isinstance(value, dict):
                raise ConfigError(f"config section {dotted!r} must be a mapping, got {value!r:.80}")
            value = _fit(tp, value, dotted + ".") if is_dataclass(tp) else value
        elif base is int and isinstance(value, (float, str)):
            with suppress(ValueError):  # OmegaConf reports it
                value = int(float(value)) if float(value).is_integer() else value
        elif base in (str, bool) and value is not None and not isinstance(value, (base, dict, list)):
            raise _type_error(dotted, value, tp)
        out[key] = value
    return out


def structured(schema: type, raw: dict, prefix: str = "", scope: str = "") -> Any:
    """``raw`` merged by OmegaConf onto dataclass ``schema``: its instance; error keys under ``prefix``."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), _fit(schema, raw, prefix)))
    except ConfigKeyError as e:
        key, node = str(e.full_key), raw.get(e.full_key) if not prefix else None
        key += f".{next(iter(node))}" if isinstance(node, dict) and node else ""  # trian: {lr: 1} -> trian.lr
        keys = flatten(OmegaConf.to_container(OmegaConf.structured(schema)), prefix.rstrip("."))
        raise _unknown_key(prefix + key, list(keys), scope) from None
    except ValidationError as e:
        tp = reduce(lambda t, k: get_type_hints(t).get(k) if is_dataclass(t) else None, e.full_key.split("."), schema)
        raise _type_error(f"{prefix}{e.full_key}", e.value, tp) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{prefix}{e.full_key}: {str(e.msg).splitlines()[0]}") from None


def config_from_dict(d: Optional[dict]) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    d = config_to_dict(d) if isinstance(d, Config) else {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a mapping of sections, got {d!r:.80} ({type(d).__name__})")
    return validate_config(structured(Config, d))


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (``None``: all defaults), merge in the ``key=value`` overrides, build and validate."""
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"config {'path is not a file' if os.path.exists(path) else 'file not found'}: {path}")
    try:
        cfg = OmegaConf.create() if path is None else OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        raise ConfigError(f"malformed YAML in {path}: {getattr(e, 'problem', None) or e}"
                          f"{f' (line {mark.line + 1})' if mark else ''}") from None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, or a scalar ("Invalid loaded object type: int")
        if not str(e).startswith("Invalid loaded object type"):
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        cfg = str(e).rpartition(": ")[2]
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"top level of {path} must be a mapping of sections (teacher, student, objective, train, "
                          f"data, output_dir), got {cfg if isinstance(cfg, str) else 'list'}")
    for item in [overrides] if isinstance(overrides, str) else overrides or ():
        key, sep, text = (part.strip() for part in str(item).partition("="))
        if not sep or "" in key.split("."):
            why = "must look like key=value" if not (sep and key) else f"has no valid dotted key: {key!r}"
            raise ConfigError(f"override {item!r} {why}")
        if key.startswith("objective.") and isinstance(cfg.get("objective"), str):
            cfg.objective = {"name": cfg.objective}  # the `objective: NAME` shorthand
        try:  # an OmegaConf dotlist item; an empty value, or one that is not YAML on its own: the string
            try:
                new = OmegaConf.from_dotlist([f"{key}={text or json.dumps(text)}"])
            except yaml.YAMLError:
                new = OmegaConf.from_dotlist([f"{key}={json.dumps(text)}"])
            cfg = OmegaConf.merge(cfg, new)
        except (OmegaConfBaseException, TypeError, ValueError) as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    return config_from_dict(OmegaConf.to_container(cfg))


_GE0, _GE1, _UNIT = (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1"), (lambda v: 0 <= v < 1, "in [0, 1)")
_PATH, _RES = (lambda v: v != "", "a path or null"), (lambda v: v is None or v >= 1, "a positive integer or null")
_FIN0 = (lambda v: math.isfinite(v) and v >= 0, ">= 0")
_RULES: dict[str, tuple] = {  # dotted key -> (test, what it must be), or the allowed values
    "teacher.path": (bool, "non-empty (a hub id, a pipeline folder or gmm:NAME)"),
    "teacher.guidance_scale": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (1 = no guidance)"),
    "teacher.schedule": ("vp", "flow"), "teacher.dtype": ("float32", "float16", "bfloat16"),
    "student.steps": (lambda v: 1 <= v <= 4, "between 1 and 4"),
    "student.lora_alpha": (lambda v: v is None or (math.isfinite(v) and v > 0), "> 0 or null"),
    **dict.fromkeys([f"train.{k}" for k in ("max_steps", "batch_size", "grad_accum", "checkpoint_every",
                                            "keep_checkpoints", "log_every")], _GE1),
    **dict.fromkeys(("train.sample_every", "train.lr_warmup_steps", "student.lora_rank"), _GE0),
    "train.lr": (lambda v: math.isfinite(v) and v > 0, "a positive number"),
    "train.seed": (lambda v: 0 <= v < 2**32, "between 0 and 2**32 - 1"),
    "train.mixed_precision": ("no", "fp16", "bf16"), "train.tracker": ("tensorboard", "none"),
    "train.optimizer": ("adamw", "adamw8bit"), "train.weight_decay": _FIN0, "data.resolution": _RES,
    "data.cache_memory_mb": (_FIN0[0], "a number of megabytes >= 0"), "data.cache": ("auto", "memory", "disk"),
    "train.max_grad_norm": (lambda v: math.isfinite(v) and v >= 0, ">= 0 (0 disables clipping)"),
    **dict.fromkeys(("train.adam_beta1", "train.adam_beta2", "train.ema_decay"), _UNIT),
    "data.on_bad_image": ("error", "skip"), "data.cache_dir": _PATH, "data.prompts": _PATH, "data.images": _PATH,
    "output_dir": (bool, "non-empty"), "objective.name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}


def validate_config(cfg: Config) -> Config:
    """Check value ranges (:data:`_RULES`); raises a one-line :class:`ConfigError` on the first problem."""
    for key, rule in _RULES.items():
        sec, _, leaf = key.rpartition(".")
        value = cfg.objective.get(leaf) if sec == "objective" else getattr(getattr(cfg, sec) if sec else cfg, leaf)
        test, expected = rule if callable(rule[0]) else (rule.__contains__, f"one of {', '.join(rule)}")
        if not test(value):
            v = str(value).lower().removeprefix("torch.")  # fp16, bf16, torch.float16 ... -> the name we take
            alias = _DTYPE_ALIASES.get(v, v if v in rule else None) if key == "teacher.dtype" else None
            raise ConfigError(f"{key} must be {expected}, got {value!r:.80}" + (f"; did you mean {alias!r}?" * bool(alias)))
    return cfg


config_to_dict = asdict  # the resolved config (or any dataclass) as a plain, YAML-safe dict, sections in order


def dump_config(cfg: Config, path: str) -> str:
    """Write the resolved config as YAML (readable; loads back equal), atomically. Returns the path."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(tmp := f"{os.fspath(path)}.tmp{os.getpid()}", "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, default_flow_style=False, allow_unicode=True)
    os.replace(tmp, path)
    return os.fspath(path)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping or dataclass -> ``{"a.b.c": int, float, str or bool (None: "null", others: their str)}``."""
    out: dict[str, Any] = {}
    for key, value in (config_to_dict(d) if is_dataclass(d) and not isinstance(d, type) else d).items():
        name = f"{prefix}.{key}" if prefix else str(key)
        scalar = "null" if value is None else value if isinstance(value, (int, float, str, bool)) else str(value)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: scalar})
    return out
