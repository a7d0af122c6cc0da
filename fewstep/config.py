"""Run configuration: typed dataclasses, YAML loading, dotted CLI overrides, validation.

A run is described by one YAML file with the sections ``teacher``, ``student``,
``objective``, ``train`` and ``data`` plus the top-level ``output_dir``::

    teacher: {path: "gmm:ring8", schedule: vp}
    student: {steps: 2}
    objective: {name: dmd2, critic_steps: 5}
    train: {max_steps: 2000, lr: 1e-4}
    output_dir: runs/ring8

Command-line overrides use dotted keys (``train.lr=5e-7``, ``data.prompts=null``,
``objective.critic_steps=10``, ``output_dir=runs/x``); their values are parsed as
YAML so numbers, booleans, ``null`` and lists get their types.

Numbers in exponent form without a dot (``1e-4``) are floats here, unlike plain
PyYAML (YAML 1.1), which reads them as strings.

Every problem is reported as a :class:`ConfigError` whose message is one line,
naming the dotted key, the offending value and what was expected.

``objective`` is kept as a plain ``dict`` (``{"name": ..., **objective keys}``);
the objective itself validates its keys.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

__all__ = [
    "ConfigError",
    "TeacherConfig",
    "StudentConfig",
    "TrainConfig",
    "DataConfig",
    "Config",
    "SECTIONS",
    "valid_keys",
    "load_config",
    "read_yaml",
    "parse_yaml_value",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "validate_config",
    "flatten",
]


class ConfigError(ValueError):
    """One-line, user-facing config problem."""

    def __init__(self, message: str):
        # Guarantee a single line whatever was interpolated into the message.
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------------------------
# Dataclasses
# ---------------------------------------------------------------------------------------------


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


def _default_objective() -> dict:
    return {"name": "dmd2"}


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: dict = field(default_factory=_default_objective)  # {"name": ..., objective keys}
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/fewstep"


# Typed sections (the objective section is a free-form dict).
SECTIONS: dict[str, type] = {
    "teacher": TeacherConfig,
    "student": StudentConfig,
    "train": TrainConfig,
    "data": DataConfig,
}
_TOP_LEVEL = ["teacher", "student", "objective", "train", "data", "output_dir"]

MIXED_PRECISION = ("no", "fp16", "bf16")
TEACHER_DTYPES = ("float32", "float16", "bfloat16")
SCHEDULES = ("vp", "flow")
TRACKERS = ("tensorboard", "none")
ON_BAD_IMAGE = ("error", "skip")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "float": "float32", "torch.float32": "float32", "torch.float16": "float16",
                  "torch.bfloat16": "bfloat16"}


def _section_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def valid_keys() -> list[str]:
    """All valid dotted keys of the typed sections, plus ``objective.name`` and ``output_dir``."""
    keys: list[str] = []
    for name in _TOP_LEVEL:
        if name in SECTIONS:
            keys += [f"{name}.{k}" for k in _section_fields(SECTIONS[name])]
        elif name == "objective":
            keys.append("objective.name")
        else:
            keys.append(name)
    return keys


# ---------------------------------------------------------------------------------------------
# YAML with floats in exponent form (1e-4) resolved as floats
# ---------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` / ``5E+3`` / ``.5e-2`` as floats (YAML 1.2 style)."""


_EXP_FLOAT = r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+"
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(rf"^(?:{_EXP_FLOAT})$"), list("-+0123456789.")
)
# A string that plain yaml.safe_load left as a string but that is clearly a number.
_NUMERIC_STR = re.compile(rf"^\s*(?:{_EXP_FLOAT}|[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))\s*$")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    return f"{problem}{where}"


def read_yaml(path: str) -> Any:
    """Parse a YAML file (safe loader, exponent floats); errors are one-line ConfigErrors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"config path is not a file: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {path}: {_yaml_problem(e)}") from None


def parse_yaml_value(text: str) -> Any:
    """Type an override value the way YAML would (``1e-4`` a float, ``null`` None, ``[1,2]`` a list).

    Text that is not valid YAML on its own is kept as a plain string.
    """
    if text.strip() == "":
        return ""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError:
        return text


# ---------------------------------------------------------------------------------------------
# Unknown-key suggestions
# ---------------------------------------------------------------------------------------------


def _suggest(dotted: str) -> Optional[str]:
    parts = dotted.split(".")
    sections = list(SECTIONS) + ["objective"]
    if len(parts) == 1:
        match = difflib.get_close_matches(dotted, _TOP_LEVEL, n=1, cutoff=0.6)
        return match[0] if match else None
    section, leaf = parts[0], ".".join(parts[1:])
    if section not in sections:
        guess = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
        if not guess:
            match = difflib.get_close_matches(dotted, valid_keys(), n=1, cutoff=0.75)
            return match[0] if match else None
        section = guess[0]
        if section == "objective":
            return f"objective.{leaf}"
    if section == "objective":
        return None
    own = _section_fields(SECTIONS[section])
    if len(parts) == 2 and leaf in own:
        return f"{section}.{leaf}"
    # the same key in another section (train.resolution -> data.resolution)
    if len(parts) == 2:
        for other, cls in SECTIONS.items():
            if other != section and leaf in _section_fields(cls):
                return f"{other}.{leaf}"
    match = difflib.get_close_matches(parts[1], own, n=1, cutoff=0.6)
    if match:
        return f"{section}.{match[0]}"
    match = difflib.get_close_matches(dotted, valid_keys(), n=1, cutoff=0.75)
    return match[0] if match else None


def _unknown_key(dotted: str) -> ConfigError:
    hint = _suggest(dotted)
    if hint is not None and hint != dotted:
        return ConfigError(f"unknown config key {dotted!r}; did you mean {hint!r}?")
    section = dotted.split(".")[0]
    if section in SECTIONS:
        keys = ", ".join(_section_fields(SECTIONS[section]))
        return ConfigError(f"unknown config key {dotted!r}; valid keys in '{section}': {keys}")
    return ConfigError(f"unknown config key {dotted!r}; valid top-level keys: {', '.join(_TOP_LEVEL)}")


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def _as_section(raw: dict, name: str) -> dict:
    """The mutable raw mapping of section ``name`` (created when absent or null)."""
    current = raw.get(name)
    if current is None:
        current = {}
    elif name == "objective" and isinstance(current, str):
        current = {"name": current}
    elif not isinstance(current, dict):
        raise ConfigError(f"config section '{name}' must be a mapping, got {_short(current)}")
    raw[name] = current
    return current


def apply_overrides(raw: Optional[dict], overrides: Sequence[str]) -> dict:
    """Return a copy of the raw config mapping with ``key=value`` overrides applied."""
    if isinstance(overrides, str):
        overrides = [overrides]
    raw = {} if raw is None else copy.deepcopy(raw)
    for item in overrides:
        item = str(item)
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        parts = key.split(".")
        if any(p == "" for p in parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a valid dotted key")
        value = parse_yaml_value(text.strip())
        head = parts[0]
        if head not in _TOP_LEVEL:
            raise _unknown_key(key)
        if head == "output_dir":
            if len(parts) > 1:
                raise _unknown_key(key)
            raw["output_dir"] = value
        elif len(parts) == 1:
            # a whole section: merge a mapping, or the objective's name shorthand
            if head == "objective" and isinstance(value, str):
                raw["objective"] = {"name": value}
            elif isinstance(value, dict):
                _as_section(raw, head).update(value)
            else:
                raise ConfigError(f"override {item!r}: section '{head}' needs a mapping, got {_short(value)}")
        elif head == "objective":
            node = _as_section(raw, "objective")
            for i, p in enumerate(parts[1:-1], start=1):
                nxt = node.get(p)
                if nxt is None:
                    nxt = node[p] = {}
                elif not isinstance(nxt, dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])!r} is not a mapping")
                node = nxt
            node[parts[-1]] = value
        else:
            if len(parts) != 2 or parts[1] not in _section_fields(SECTIONS[head]):
                raise _unknown_key(key)
            _as_section(raw, head)[parts[1]] = value
    return raw


# ---------------------------------------------------------------------------------------------
# Building typed dataclasses
# ---------------------------------------------------------------------------------------------


def _type_error(key: str, value: Any, expected: str, hint: str = "") -> ConfigError:
    return ConfigError(f"{key} must be {expected}, got {_short(value)} ({type(value).__name__}){hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        inner = args[0] if len(args) == 1 else Any
        try:
            return _coerce(key, value, inner)
        except ConfigError:
            raise _type_error(key, value, f"{_type_name(inner)} or null", _str_hint(inner, value)) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, "a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise _type_error(key, value, "an integer")
        if isinstance(value, int):
            return value
        num = value
        if isinstance(value, str) and _NUMERIC_STR.match(value):
            num = float(value)
        if isinstance(num, float) and math.isfinite(num) and num.is_integer():
            return int(num)
        raise _type_error(key, value, "an integer")
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, value, "a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _NUMERIC_STR.match(value):
            return float(value)
        raise _type_error(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, "a string", _str_hint(tp, value))
    return value


def _str_hint(tp: Any, value: Any) -> str:
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return "; quote it in YAML"
    return ""


def _type_name(tp: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, "a value")


def _normalize(section: str, key: str, value: Any) -> Any:
    """Forgive YAML 1.1 readings of a few words (``no`` is False, ``none`` tracker as null)."""
    if section == "train" and key == "mixed_precision" and value is False:
        return "no"
    if section == "train" and key == "tracker" and (value is None or value is False):
        return "none"
    return value


def _build_section(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        return cls()
    if isinstance(raw, cls):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{name}' must be a mapping, got {_short(raw)}")
    hints = typing.get_type_hints(cls)
    names = _section_fields(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in names:
            raise _unknown_key(dotted)
        kwargs[key] = _coerce(dotted, _normalize(name, key, value), hints[key])
    return cls(**kwargs)


def _build_objective(raw: Any) -> dict:
    if raw is None:
        return _default_objective()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section 'objective' must be a mapping with a 'name', got {_short(raw)}")
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"objective keys must be strings, got {_short(key)}")
    out = _default_objective()
    out.update(copy.deepcopy(raw))
    return out


def config_from_dict(d: Optional[dict]) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    if d is None:
        d = {}
    if isinstance(d, Config):
        d = config_to_dict(d)
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a mapping of sections, got {_short(d)} ({type(d).__name__})")
    for key, value in d.items():
        if key not in _TOP_LEVEL:
            skey = str(key)
            if isinstance(value, dict) and value and skey not in SECTIONS:
                first = next(iter(value))
                raise _unknown_key(f"{skey}.{first}")
            raise _unknown_key(skey)
    kwargs: dict[str, Any] = {name: _build_section(name, d.get(name)) for name in SECTIONS}
    kwargs["objective"] = _build_objective(d.get("objective"))
    if "output_dir" in d:
        kwargs["output_dir"] = _coerce("output_dir", d["output_dir"], str)
    cfg = Config(**kwargs)
    validate_config(cfg)
    return cfg


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (``None``: all defaults), apply dotted overrides, build and validate."""
    raw: Any = None
    if path is not None:
        path = os.fspath(path)
        raw = read_yaml(path)
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(
                f"top level of {path} must be a mapping of sections (teacher, student, objective, train, "
                f"data, output_dir), got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or ())
    return config_from_dict(raw)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _one_of(key: str, value: Any, allowed: Sequence[str], aliases: Optional[dict] = None) -> None:
    if value in allowed:
        return
    hint = ""
    if aliases and isinstance(value, str) and value.lower() in aliases:
        hint = f"; did you mean {aliases[value.lower()]!r}?"
    raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {_short(value)}{hint}")


def _at_least(key: str, value: Any, low: float) -> None:
    if not value >= low:
        raise ConfigError(f"{key} must be >= {low}, got {_short(value)}")


def _in_unit(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key} must be in [0, 1), got {_short(value)}")


def validate_config(cfg: Config) -> Config:
    """Check value ranges; raises a one-line :class:`ConfigError` on the first problem."""
    t, s, tr, d = cfg.teacher, cfg.student, cfg.train, cfg.data

    if not t.path:
        raise ConfigError("teacher.path must not be empty (a hub id, a pipeline folder or gmm:NAME)")
    if not math.isfinite(t.guidance_scale) or t.guidance_scale < 0:
        raise ConfigError(f"teacher.guidance_scale must be a finite number >= 0 (1 = no guidance), "
                          f"got {_short(t.guidance_scale)}")
    _one_of("teacher.schedule", t.schedule, SCHEDULES)
    _one_of("teacher.dtype", t.dtype, TEACHER_DTYPES, _DTYPE_ALIASES)

    if not 1 <= s.steps <= 4:
        raise ConfigError(f"student.steps must be between 1 and 4, got {_short(s.steps)}")
    _at_least("student.lora_rank", s.lora_rank, 0)
    if s.lora_alpha is not None and not (math.isfinite(s.lora_alpha) and s.lora_alpha > 0):
        raise ConfigError(f"student.lora_alpha must be > 0 or null, got {_short(s.lora_alpha)}")

    for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
        _at_least(f"train.{key}", getattr(tr, key), 1)
    _at_least("train.sample_every", tr.sample_every, 0)
    if not (math.isfinite(tr.lr) and tr.lr > 0):
        raise ConfigError(f"train.lr must be a positive number, got {_short(tr.lr)}")
    if not 0 <= tr.seed < 2**32:
        raise ConfigError(f"train.seed must be between 0 and 2**32 - 1, got {_short(tr.seed)}")
    _one_of("train.mixed_precision", tr.mixed_precision, MIXED_PRECISION)
    if not (math.isfinite(tr.max_grad_norm) and tr.max_grad_norm >= 0):
        raise ConfigError(f"train.max_grad_norm must be >= 0 (0 disables clipping), got {_short(tr.max_grad_norm)}")
    _in_unit("train.adam_beta1", tr.adam_beta1)
    _in_unit("train.adam_beta2", tr.adam_beta2)
    if not (math.isfinite(tr.weight_decay) and tr.weight_decay >= 0):
        raise ConfigError(f"train.weight_decay must be >= 0, got {_short(tr.weight_decay)}")
    _in_unit("train.ema_decay", tr.ema_decay)
    _one_of("train.tracker", tr.tracker, TRACKERS)

    for key in ("prompts", "images"):
        if getattr(d, key) == "":
            raise ConfigError(f"data.{key} must be a path or null, got ''")
    if d.resolution is not None and d.resolution < 1:
        raise ConfigError(f"data.resolution must be a positive integer or null, got {_short(d.resolution)}")
    _one_of("data.on_bad_image", d.on_bad_image, ON_BAD_IMAGE)

    name = cfg.objective.get("name") if isinstance(cfg.objective, dict) else None
    if not isinstance(cfg.objective, dict):
        raise ConfigError(f"objective must be a mapping with a 'name', got {_short(cfg.objective)}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"objective.name must be a non-empty string, got {_short(name)}")
    if not cfg.output_dir:
        raise ConfigError("output_dir must not be empty")
    return cfg


# ---------------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as a plain, YAML-safe dict (sections in their usual order)."""
    return {
        "teacher": dataclasses.asdict(cfg.teacher),
        "student": dataclasses.asdict(cfg.student),
        "objective": _plain(copy.deepcopy(cfg.objective)),
        "train": dataclasses.asdict(cfg.train),
        "data": dataclasses.asdict(cfg.data),
        "output_dir": cfg.output_dir,
    }


def dump_config(cfg: Config, path: str) -> str:
    """Write the resolved config as YAML (readable; loads back equal). Returns the path."""
    path = os.fspath(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


_SCALARS = (int, float, str, bool)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": scalar}`` for tracker hyper-parameters.

    ints, floats, strings and booleans are kept; ``None`` becomes ``"null"`` and other values
    (lists, ...) their ``str``. A :class:`Config` (or any dataclass) is accepted as well.
    """
    if isinstance(d, Config):
        d = config_to_dict(d)
    elif dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif value is None:
            out[name] = "null"
        elif isinstance(value, _SCALARS):
            out[name] = value
        else:
            out[name] = str(value)
    return out
