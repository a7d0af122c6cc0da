"""The OmegaConf schema layer: objective configs checked like every section, fewstep's rules on top of OmegaConf's."""
import pytest

from fewstep.api import build_objective_config
from fewstep.config import ConfigError, load_config, structured
from fewstep.objectives.dmd import DMD2Config


def error_of(fn, *args, **kw):
    with pytest.raises(ConfigError) as exc:
        fn(*args, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_objective_config_is_an_omegaconf_schema():
    cls, cfg = build_objective_config("dmd2", {"critic_steps": 1e1, "min_t": 0, "guidance_scale": 3})
    assert type(cfg) is DMD2Config and cfg.name == "dmd2"
    assert cfg.critic_steps == 10 and type(cfg.critic_steps) is int
    assert type(cfg.min_t) is float and cfg.guidance_scale == 3.0 and type(cfg.guidance_scale) is float


@pytest.mark.parametrize("values, expected", [
    ({"critic_step": 3}, "unknown config key 'objective.critic_step' for objective 'dmd2'; "
                         "did you mean 'objective.critic_steps'?"),
    ({"critic_steps": 2.5}, "objective.critic_steps must be an integer, got 2.5 (float)"),
    ({"critic_steps": True}, "objective.critic_steps must be an integer, got True (bool)"),
    ({"guidance_scale": "abc"}, "objective.guidance_scale must be a number or null, got 'abc' (str)"),
    ({"backward_simulation": 3}, "objective.backward_simulation must be a string, got 3 (int); quote it in YAML"),
    ({"min_t": None}, "objective.min_t must be a number, got None (NoneType)"),
])
def test_objective_config_errors(values, expected):
    assert error_of(build_objective_config, "dmd2", values) == expected


def test_objective_boolean_and_unknown_name():
    assert "objective.guidance_embedding must be a boolean" in error_of(
        build_objective_config, "consistency", {"guidance_embedding": "yes"})
    assert "known objectives" in error_of(build_objective_config, "dmd3", {})


def test_strict_scalars_and_sections():
    assert error_of(load_config, None, ["train.resume=1"]) == "train.resume must be a boolean (true/false), got 1 (int)"
    assert "quote it in YAML" in error_of(load_config, None, ["teacher.revision=3"])
    assert error_of(load_config, None, ["objective=5"]) == "config section 'objective' must be a mapping, got 5"
    assert "train.lr must be a number, got {'x': 1} (dict)" == error_of(load_config, None, ["train.lr.x=1"])


def test_override_values():
    # text that is not YAML on its own stays a string; an empty value is ""; the objective name shorthand
    assert load_config(None, ["teacher.path=@x"]).teacher.path == "@x"
    assert "got '[1, 2'" in error_of(load_config, None, ["train.max_steps=[1, 2"])
    assert error_of(load_config, None, ["data.prompts="]) == "data.prompts must be a path or null, got ''"
    assert load_config(None, ["objective=sid", "objective.x=1"]).objective == {"name": "sid", "x": 1}
    assert load_config(None, ["train=null"]).train == load_config(None).train
    assert error_of(load_config, None, ["train..lr=1"]) == "override 'train..lr=1' has no valid dotted key: 'train..lr'"


def test_file_shorthand_and_top_level_scalar(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("objective: consistency\ntrain: {max_steps: 1e3}\n")
    cfg = load_config(str(p), ["objective.skip=10"])
    assert cfg.objective == {"name": "consistency", "skip": 10} and cfg.train.max_steps == 1000
    p.write_text("5\n")
    assert "must be a mapping of sections" in error_of(load_config, str(p)) and "int" in error_of(load_config, str(p))


def test_interpolation_resolves():
    assert load_config(None, ["output_dir=runs/${objective.name}"]).output_dir == "runs/dmd2"
    assert error_of(load_config, None, ["teacher.path=${nope}"]).startswith("teacher.path: ")


def test_structured_prefix_for_any_dataclass():
    assert structured(DMD2Config, {"max_t": 1}).max_t == 1.0
    assert error_of(structured, DMD2Config, {"max_tt": 1}, prefix="x.") == \
        "unknown config key 'x.max_tt'; did you mean 'x.max_t'?"
