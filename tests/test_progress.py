"""train.progress: a tqdm bar on a terminal, bounded plain lines in logs, or nothing."""
import io

import pytest

from fewstep.config import ConfigError, load_config
from fewstep.trainer import progress_mode

FAST = ["train.batch_size=32", "train.checkpoint_every=100000", "train.tracker=none", "train.log_every=1",
        "objective.critic_steps=1"]


def _run(tmp_path, capsys, progress, steps=200):
    from fewstep.api import distill

    cfg = load_config("configs/gmm_dmd2.yaml", FAST + [f"train.max_steps={steps}", f"train.progress={progress}",
                                                       f"output_dir={tmp_path / progress}"])
    capsys.readouterr()
    distill(cfg, log=lambda *a: None)
    return capsys.readouterr().err


def test_lines_are_bounded_and_plain(tmp_path, capsys):
    err = _run(tmp_path, capsys, "lines")
    assert "\r" not in err  # no carriage-return bar refreshes
    lines = [l for l in err.splitlines() if l.startswith("dmd2: step ")]
    # log_every=1 but at most one line per 1% of max_steps (plus the last step): ~100, not 200
    assert 50 <= len(lines) <= 101, len(lines)
    assert lines[-1].startswith("dmd2: step 200/200 (100%)") and "steps/s" in lines[-1]
    assert "critic/loss" in lines[-1] and "student/loss" in lines[-1]


def test_none_writes_nothing(tmp_path, capsys):
    err = _run(tmp_path, capsys, "none", steps=20)
    assert "dmd2" not in err and "\r" not in err and "it/s" not in err


def test_auto_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_mode("auto", io.StringIO()) == "lines"
    assert progress_mode("auto", Tty()) == "bar"
    assert progress_mode("none") == "none"


def test_bad_value_is_a_one_line_error(tmp_path, capsys):
    from fewstep.cli import main

    with pytest.raises(ConfigError, match="train.progress must be one of auto, bar, lines, none"):
        progress_mode("fancy")
    rc = main(["distill", "configs/gmm_dmd2.yaml", "train.progress=fancy", f"output_dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["fewstep: error: train.progress must be one of auto, bar, lines, none, got 'fancy'"]
