import dataclasses

import pytest
import yaml

from fewstep.config import (
    Config,
    ConfigError,
    DataConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    flatten,
    load_config,
)


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    msg = str(exc.value)
    assert "\n" not in msg
    assert isinstance(exc.value, ValueError)
    return msg


# ---- defaults ----------------------------------------------------------------------------------


def test_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.teacher == TeacherConfig()
    assert cfg.teacher.path == "gmm:ring8" and cfg.teacher.schedule == "vp"
    assert cfg.student == StudentConfig(steps=1, lora_rank=0, lora_alpha=None)
    assert cfg.objective == {"name": "dmd2"}
    assert cfg.train == TrainConfig()
    assert cfg.train.lr == 1e-4 and cfg.train.mixed_precision == "no" and cfg.train.resume is True
    assert cfg.data == DataConfig()
    assert cfg.output_dir == "runs/fewstep"
    # nested defaults are not shared between instances
    a, b = Config(), Config()
    a.objective["x"] = 1
    a.train.lr = 1.0
    assert b.objective == {"name": "dmd2"} and b.train.lr == 1e-4


def test_empty_file_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "train:\n", "b.yaml")) == Config()


# ---- YAML + overrides ----------------------------------------------------------------------------


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, """
teacher:
  path: gmm:ring8
  schedule: flow
  guidance_scale: 3
student:
  steps: 2
  lora_rank: 4
  lora_alpha: 8
objective:
  name: dmd2
  critic_steps: 5
train:
  lr: 1e-4
  max_steps: 100
  mixed_precision: no
  max_grad_norm: 1
data:
  prompts: prompts.txt
  resolution: 64
output_dir: runs/x
""")
    cfg = load_config(path, [
        "train.lr=5e-7",
        "train.max_steps=20",
        "data.prompts=null",
        "objective.critic_steps=10",
        "objective.gan.weight=1e-3",
        "train.resume=false",
        "train.tracker=none",
        "teacher.revision=main",
        "output_dir=runs/y",
    ])
    assert cfg.train.lr == 5e-7 and type(cfg.train.lr) is float
    assert cfg.train.max_steps == 20 and type(cfg.train.max_steps) is int
    assert cfg.data.prompts is None
    assert cfg.data.resolution == 64
    assert cfg.objective == {"name": "dmd2", "critic_steps": 10, "gan": {"weight": 1e-3}}
    assert type(cfg.objective["gan"]["weight"]) is float
    assert cfg.train.resume is False and cfg.train.tracker == "none"
    assert cfg.teacher.revision == "main" and cfg.teacher.schedule == "flow"
    # ints accepted (and converted) for float fields
    assert cfg.teacher.guidance_scale == 3.0 and type(cfg.teacher.guidance_scale) is float
    assert type(cfg.student.lora_alpha) is float and cfg.student.lora_alpha == 8.0
    assert type(cfg.train.max_grad_norm) is float
    # YAML 1.1 reads `no` as false; mixed_precision keeps meaning "no"
    assert cfg.train.mixed_precision == "no"
    assert cfg.output_dir == "runs/y"
    assert cfg.student.steps == 2 and cfg.student.lora_rank == 4


def test_exponent_floats_in_file(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 2E-5, weight_decay: 1e-2}\nobjective: {name: sid, eps: 1e-8}\n"))
    assert cfg.train.lr == 2e-5 and cfg.train.weight_decay == 1e-2
    assert cfg.objective["eps"] == 1e-8 and type(cfg.objective["eps"]) is float


def test_override_value_types():
    cfg = load_config(None, ["objective.betas=[1, 2]", "objective.flag=true", "train.mixed_precision=bf16",
                             "objective.name=sid", "data.resolution=null", "train.lr=3"])
    assert cfg.objective == {"name": "sid", "betas": [1, 2], "flag": True}
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.train.lr == 3.0 and type(cfg.train.lr) is float
    # a value containing '=' keeps everything after the first '='
    assert load_config(None, ["teacher.path=a=b"]).teacher.path == "a=b"


def test_config_from_dict_accepts_string_floats():
    # e.g. a dict read with plain yaml.safe_load elsewhere
    cfg = config_from_dict(yaml.safe_load("train: {lr: 1e-4, max_steps: 1e3}"))
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int


# ---- round trip -----------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=5e-7", "student.steps=4", "objective.critic_steps=10",
                             "objective.nested.a=[1, 2.5]", "teacher.variant=fp16", "data.images=imgs",
                             "train.ema_decay=0.999", "output_dir=runs/rt"])
    out = tmp_path / "sub" / "config.yaml"
    dump_config(cfg, str(out))
    text = out.read_text()
    assert text.index("teacher:") < text.index("student:") < text.index("train:")  # not sorted
    assert load_config(str(out)) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert load_config(None) == config_from_dict(config_to_dict(Config()))


def test_flatten():
    flat = flatten(config_to_dict(load_config(None, ["objective.gan.weight=0.5"])))
    assert flat["train.lr"] == 1e-4
    assert flat["teacher.path"] == "gmm:ring8"
    assert flat["objective.gan.weight"] == 0.5
    assert flat["output_dir"] == "runs/fewstep"
    assert flat["data.prompts"] == "null"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert flatten({"a": {"b": [1, 2]}}, prefix="hp") == {"hp.a.b": "[1, 2]"}


# ---- errors ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert error_of(path) == f"config file not found: {path}"


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1\n  max_steps: [1, 2\n")
    msg = error_of(path)
    assert msg.startswith(f"malformed YAML in {path}: ")
    assert "(line " in msg


def test_malformed_yaml_line_number(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1\n   bad: : x\n")
    msg = error_of(path)
    assert msg.startswith(f"malformed YAML in {path}: ") and "(line 3)" in msg


def test_top_level_not_mapping(tmp_path):
    msg = error_of(write(tmp_path, "- a\n- b\n"))
    assert "mapping" in msg and "list" in msg


def test_section_not_mapping(tmp_path):
    msg = error_of(write(tmp_path, "train: 5\n"))
    assert "'train'" in msg and "mapping" in msg and "5" in msg


def test_unknown_key_suggestion(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  max_step: 10\n"))
    assert msg == "unknown config key 'train.max_step'; did you mean 'train.max_steps'?"
    msg = error_of(None, ["train.max_step=10"])
    assert msg == "unknown config key 'train.max_step'; did you mean 'train.max_steps'?"
    msg = error_of(None, ["trian.lr=1"])
    assert "'trian.lr'" in msg and "did you mean 'train.lr'?" in msg
    msg = error_of(write(tmp_path, "trian:\n  lr: 1\n", "b.yaml"))
    assert "'trian.lr'" in msg and "did you mean 'train.lr'?" in msg
    msg = error_of(None, ["train.resolution=64"])
    assert "did you mean 'data.resolution'?" in msg
    msg = error_of(None, ["output=runs/x"])
    assert "did you mean 'output_dir'?" in msg


def test_unknown_key_lists_section_keys():
    msg = error_of(None, ["train.zzzz=1"])
    assert msg.startswith("unknown config key 'train.zzzz'; valid keys in 'train': ")
    assert "max_steps" in msg and "mixed_precision" in msg
    msg = error_of(None, ["qqqq.zzzz=1"])
    assert "'qqqq.zzzz'" in msg and "teacher" in msg and "output_dir" in msg


def test_override_without_equals():
    assert error_of(None, ["foo"]) == "override 'foo' must look like key=value"
    assert "must look like key=value" in error_of(None, ["=3"])


def test_student_steps_range():
    assert error_of(None, ["student.steps=7"]) == "student.steps must be between 1 and 4, got 7"
    assert "got 0" in error_of(None, ["student.steps=0"])


def test_wrong_types():
    msg = error_of(None, ["train.max_steps=abc"])
    assert "train.max_steps" in msg and "'abc'" in msg and "integer" in msg
    msg = error_of(None, ["train.max_steps=2.5"])
    assert "train.max_steps" in msg and "2.5" in msg and "integer" in msg
    msg = error_of(None, ["train.lr=fast"])
    assert "train.lr" in msg and "'fast'" in msg and "number" in msg
    msg = error_of(None, ["train.resume=maybe"])
    assert "train.resume" in msg and "'maybe'" in msg and "boolean" in msg
    msg = error_of(None, ["train.max_steps=true"])
    assert "train.max_steps" in msg and "True" in msg and "integer" in msg
    msg = error_of(None, ["data.resolution=big"])
    assert "data.resolution" in msg and "'big'" in msg and "or null" in msg
    msg = error_of(None, ["teacher.path=[1, 2]"])
    assert "teacher.path" in msg and "[1, 2]" in msg and "string" in msg
    msg = error_of(None, ["train.seed=null"])
    assert "train.seed" in msg and "None" in msg
    msg = error_of(None, ["output_dir=3"])
    assert "output_dir" in msg and "3" in msg and "string" in msg


@pytest.mark.parametrize("override, needles", [
    ("train.mixed_precision=fp32", ["train.mixed_precision", "'fp32'", "no, fp16, bf16"]),
    ("teacher.dtype=fp16", ["teacher.dtype", "'fp16'", "float32, float16, bfloat16", "'float16'"]),
    ("teacher.dtype=int8", ["teacher.dtype", "'int8'", "float32, float16, bfloat16"]),
    ("train.grad_accum=0", ["train.grad_accum", ">= 1", "0"]),
    ("train.batch_size=0", ["train.batch_size", ">= 1", "0"]),
    ("train.max_steps=-5", ["train.max_steps", ">= 1", "-5"]),
    ("train.lr=0", ["train.lr", "positive", "0"]),
    ("train.lr=-1e-4", ["train.lr", "positive", "-0.0001"]),
    ("train.checkpoint_every=0", ["train.checkpoint_every", ">= 1", "0"]),
    ("teacher.schedule=edm", ["teacher.schedule", "'edm'", "vp, flow"]),
    ("train.tracker=wandbx", ["train.tracker", "'wandbx'", "tensorboard"]),
    ("train.ema_decay=1.5", ["train.ema_decay", "1.5"]),
    ("objective.name=null", ["objective.name", "None"]),
])
def test_value_errors(override, needles):
    msg = error_of(None, [override])
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_messages_are_one_line_even_with_newlines_in_values():
    msg = error_of(None, ["train.lr=\"a\nb\""])
    assert "train.lr" in msg


def test_dataclass_fields_match_api():
    assert [f.name for f in dataclasses.fields(Config)] == [
        "teacher", "student", "objective", "train", "data", "output_dir"]
