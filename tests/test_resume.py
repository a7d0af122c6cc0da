"""Exact resume: 20 steps straight == 10 + kill -9 + the same command again (CPU)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli_here

ARGS = ["configs/gmm_dmd2.yaml", "train.max_steps=20", "train.checkpoint_every=5", "train.batch_size=2048",
        "train.log_every=1", "train.tracker=none", "objective.critic_steps=2", "train.ema_decay=0.9"]


def _cmd(out):
    return [sys.executable, "-m", "fewstep", "distill", *ARGS, f"output_dir={out}"]


def _student(run: Path):
    return load_file(str(run / "student" / "student.safetensors"))


def test_kill_and_resume_is_exact(tmp_path):
    env = dict(os.environ, FEWSTEP_STEP_SLEEP="0.15")  # slow the steps down so the kill lands mid-run
    a = tmp_path / "straight"
    assert run_cli_here("distill", *ARGS, f"output_dir={a}").returncode == 0  # no kill: in-process, full speed

    b = tmp_path / "killed"
    p = subprocess.Popen(_cmd(b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    target = b / "checkpoints" / "checkpoint-0000010"
    t0 = time.time()
    while not target.exists() and time.time() - t0 < 300 and p.poll() is None:
        time.sleep(0.01)
    assert target.exists(), "checkpoint 10 never appeared"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (b / "student").exists(), "the run finished before it was killed"
    r = run_cli_here("distill", *ARGS, f"output_dir={b}")  # the same command again (in-process: nothing to kill)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    sa, sb = _student(a), _student(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
