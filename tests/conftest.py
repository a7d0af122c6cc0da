import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Tiny SD1.5-, SDXL- and DDPM-shaped pipelines saved once per session (built from config, offline)."""
    from fewstep.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, str(root / k)) for k in ("sd15", "sdxl", "ddpm")}


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a photo of a cat\na red dog\nan astronaut riding a horse\nblue flowers in a field\n")
    return str(p)


def free_port() -> int:
    """A TCP port free on this machine now, for one multi-process launch's rendezvous (two launches at once, from two
    pytest workers, would otherwise both take torch's default 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_failure(r) -> str:
    """What a failed multi-process launch printed that explains it: each rank's first error lines (the launcher's
    summary at the end only names the signal), then the tail."""
    text = r.stdout + r.stderr
    keys = ("Traceback", "Error", "error:", "terminate called", "what():", "Abort", "Signal")
    first = [ln for ln in text.splitlines() if any(k in ln for k in keys)][:40]
    return "first error lines:\n" + "\n".join(first) + "\n---- tail ----\n" + text[-3000:]


def run_cli(*args, timeout=600, env=None, cwd=None):
    """Run ``python -m fewstep ARGS`` in a fresh process; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "fewstep", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd or ROOT)


def run_cli_here(*args):
    """``fewstep ARGS`` in this process (``fewstep.cli.main``): for checks of the CLI's messages and exit codes that do
    not need a fresh interpreter (each fresh one pays ~10 s of torch/diffusers imports).  Returns a CompletedProcess;
    an exception that escapes ``main`` (a traceback, from a fresh process) fails the test."""
    import contextlib
    import io

    from fewstep.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["fewstep", *map(str, args)], code or 0, out.getvalue(), err.getvalue())


def assert_same_students(run_a, run_b):
    """The exported GMM students (``RUN/student/student.safetensors``) of two runs are equal, bit for bit."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(r) / "student" / "student.safetensors")) for r in (run_a, run_b))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
