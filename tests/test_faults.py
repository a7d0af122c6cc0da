"""Preemption and write faults: SIGTERM mid-run (one process and torchrun), disk full at a checkpoint, a failed
export over a good one, unreadable images with data.on_bad_image=skip, and the one-line input errors."""
import errno
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch_failure

GMM = ["configs/gmm_dmd2.yaml", "train.batch_size=64", "train.tracker=none", "train.log_every=1",
       "objective.critic_steps=2", "train.ema_decay=0"]  # EMA off: its import (diffusers) costs each process ~7 s here
STOP_LINE = re.compile(r"^fewstep: stopped by (SIG\w+) after step (\d+); checkpoint: (\S+); run the same command to resume$")


def _env(**kw):
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    e.update(kw)
    return e


def _distill(out, *overrides, log=None):
    """In-process run (no interpreter start-up): the same code path as ``fewstep distill``."""
    from fewstep.api import distill
    from fewstep.config import load_config

    return distill(load_config(GMM[0], [*GMM[1:], *overrides, f"output_dir={out}"]), log=log or (lambda *a: None))


def _cli(out, *overrides):
    return [sys.executable, "-m", "fewstep", "distill", *GMM, *overrides, f"output_dir={out}"]


def _same_student(a: Path, b: Path):
    sa, sb = load_file(str(a / "student" / "student.safetensors")), load_file(str(b / "student" / "student.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _no_tmp(run: Path):
    left = [str(p) for p in run.rglob(".tmp-*")]
    assert not left, left


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


def _stop_line(stderr: str):
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [l for l in stderr.splitlines() if l.startswith("fewstep: stopped")]
    assert len(lines) == 1, stderr[-3000:]
    m = STOP_LINE.match(lines[0])
    assert m, lines[0]
    return m.group(1), int(m.group(2)), Path(m.group(3))


def test_sigterm_checkpoints_and_rerun_is_exact(tmp_path):
    """SIGTERM (and a second signal while stopping) mid-run: the step finishes, a checkpoint is written, exit 143;
    the same command again ends with the weights of an uninterrupted run."""
    steps = ["train.max_steps=40", "train.checkpoint_every=1000"]
    a = tmp_path / "straight"
    _distill(a, *steps)

    b = tmp_path / "stopped"
    p = subprocess.Popen(_cli(b, *steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=_env(FEWSTEP_STEP_SLEEP="0.1"))
    _wait_for(b / "config.yaml", p)  # written just before training starts
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)  # a second signal while stopping changes nothing
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    name, step, ck = _stop_line(err)
    assert name == "SIGTERM" and 0 < step < 40, err[-2000:]
    assert ck == b / "checkpoints" / f"checkpoint-{step:07d}"
    assert [c.name for c in (b / "checkpoints").iterdir()] == [ck.name]
    assert (ck / "fewstep_state.json").is_file() and not (b / "student").exists()
    _no_tmp(b)

    logs = []
    _distill(b, *steps, log=logs.append)
    assert any(f"resumed from {ck}" in l for l in logs), logs
    _same_student(a, b)


def _torchrun(out, *overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fewstep", "distill", *GMM, *overrides, f"output_dir={out}"]


def test_torchrun_signal_on_one_rank_stops_all_at_one_step(tmp_path):
    """torchrun, 2 CPU processes: SIGTERM to rank 1 only; both ranks stop after the same step (agreed by the
    per-step all-reduce), one checkpoint is written, and the rerun ends with the weights of an uninterrupted run."""
    import psutil

    steps = ["train.max_steps=12", "train.checkpoint_every=1000", "train.batch_size=32"]
    a, b = tmp_path / "straight", tmp_path / "stopped"
    r = subprocess.run(_torchrun(a, *steps), capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, launch_failure(r)
    p = subprocess.Popen(_torchrun(b, *steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=_env(FEWSTEP_STEP_SLEEP="0.3"))
    try:
        _wait_for(b / "config.yaml", p)
        time.sleep(1.0)
        ranks = {int(c.environ().get("RANK", -1)): c for c in psutil.Process(p.pid).children(recursive=True)
                 if "fewstep" in " ".join(c.cmdline())}
        assert set(ranks) == {0, 1}, ranks
        ranks[1].send_signal(signal.SIGTERM)
        for proc in ranks.values():
            proc.wait(120)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert re.search(r"exitcode\s*: 143 \(pid", err), err[-3000:]  # rank 0 (torchrun's summary): 128 + SIGTERM
    # both ranks exit 143 themselves: neither lingers in teardown until torchrun kills it (-15), nor aborts there (-6)
    assert len(re.findall(r"exitcode\s*: 143 \(pid", err)) == 2 and "terminate called" not in err, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("fewstep: stopped")]
    assert len(lines) == 1, err[-3000:]  # printed by rank 0, which never saw the signal itself
    m = STOP_LINE.match(lines[0])
    assert m and m.group(1) == "SIGTERM", lines[0]
    step = int(m.group(2))
    assert 0 < step < 12
    ck = b / "checkpoints" / f"checkpoint-{step:07d}"
    assert [c.name for c in (b / "checkpoints").iterdir()] == [ck.name]
    assert sorted(f.name for f in ck.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    _no_tmp(b)

    r = subprocess.run(_torchrun(b, *steps), capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, launch_failure(r)
    assert f"resumed from {ck} at step {step}" in r.stdout + r.stderr
    _same_student(a, b)


def _limit_file_size(n):
    def fn():
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ: EFBIG
    return fn


def test_disk_full_at_second_checkpoint(tmp_path):
    """A file-size cap that the 2nd checkpoint's optimizer file exceeds: one line naming the path and the reason,
    no traceback, no temp folder, the 1st checkpoint intact, and a rerun with room resumes and finishes."""
    run = tmp_path / "run"
    steps = ["train.checkpoint_every=2"]
    _distill(run, "train.max_steps=2", *steps)  # checkpoint-0000002 (model ~150 KB, optimizer ~310 KB)
    r = subprocess.run(_cli(run, "train.max_steps=6", *steps), capture_output=True, text=True, cwd=ROOT,
                       env=_env(), timeout=300, preexec_fn=_limit_file_size(200_000))
    assert r.returncode == 74, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("fewstep: error:")]
    assert len(err) == 1, r.stderr[-3000:]
    ck2, ck4 = run / "checkpoints" / "checkpoint-0000002", run / "checkpoints" / "checkpoint-0000004"
    assert f"cannot write checkpoint {ck4}" in err[0] and "File too large" in err[0], err[0]
    assert "free on" in err[0] and f"last good checkpoint: {ck2}" in err[0], err[0]
    _no_tmp(run)
    from fewstep.trainer import list_checkpoints

    assert list_checkpoints(run) == [ck2]
    (run / "checkpoints" / ".tmp-checkpoint-0000009").mkdir()  # as a crash would leave it: cleaned at start
    logs = []
    m = _distill(run, "train.max_steps=6", *steps, log=logs.append)
    assert m["steps"] == 6 and any(f"resumed from {ck2}" in l for l in logs), logs
    _no_tmp(run)


def test_write_failure_message():
    from fewstep.export import WriteError, write_failure

    e = write_failure(OSError(errno.ENOSPC, "No space left on device", "/x/y"), Path("/tmp/run/pipeline"), "export ")
    assert isinstance(e, WriteError) and e.errno == errno.ENOSPC
    assert str(e).startswith("cannot write export /tmp/run/pipeline: No space left on device") and "free on" in str(e)
    assert "\n" not in str(e)
    e = write_failure(RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"), "/tmp/a")
    assert e is not None and "Disk quota exceeded" in str(e)
    assert write_failure(ValueError("a bug, not a write"), "/tmp/a") is None


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    from fewstep.api import build
    from fewstep.config import load_config
    from fewstep.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("ddpm")
    path = save_tiny_pipeline("ddpm", str(root / "teacher"))
    cfg = load_config("configs/sd15_dmd2.yaml", [f"teacher.path={path}", "teacher.dtype=float32", "data.prompts=null",
                                                 "data.images=null", "objective.gan_weight=0", "student.steps=2"])
    teacher, data, objective = build(cfg)
    return root, path, teacher, objective


def test_failed_export_keeps_the_old_export(ddpm_run):
    """Export over an existing export, with a write that fails midway: the old export is still there and loads."""
    from diffusers import DiffusionPipeline
    from fewstep.export import WriteError, export_pipeline

    root, _, teacher, objective = ddpm_run
    out = root / "exported"
    student = objective.student
    export_pipeline(teacher, student, objective, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with torch.no_grad():
        for prm in student.parameters():
            prm.add_(1.0)  # a different student, so a half-overwritten folder would show
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the UNet weights do not fit
    try:
        with pytest.raises(WriteError, match=rf"cannot write export {re.escape(str(out))}: File too large"):
            export_pipeline(teacher, student, objective, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not list(root.glob(".tmp-*"))
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "DDPMPipeline"
    export_pipeline(teacher, student, objective, out)  # with room: replaced, and the new weights are in place
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} != before
    assert not list(root.glob(".tmp-*"))


def test_truncated_teacher_weights_one_line(ddpm_run, tmp_path):
    import shutil

    from fewstep.config import TeacherConfig
    from fewstep.api import load_teacher
    from fewstep.teachers.unet import TeacherLoadError

    _, path, _, _ = ddpm_run
    bad = tmp_path / "teacher"
    shutil.copytree(path, bad)
    w = next((bad / "unet").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(TeacherLoadError) as e:
        load_teacher(TeacherConfig(path=str(bad), dtype="float32"))
    assert w.name in str(e.value) or "unet" in str(e.value), str(e.value)
    assert "\n" not in str(e.value).strip()


def _image_folder(tmp_path, good=3):
    import numpy as np
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"good{i}.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "cut.png")
    data = (d / "cut.png").read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])  # truncated PNG: opens, fails to decode
    (d / "notes.jpg").write_text("this is not a JPEG\n")
    return d


def test_on_bad_image_skip_and_error(tmp_path, capsys):
    from fewstep.config import ConfigError, load_config
    from fewstep.data import DataError, DataSource, load_images

    d = _image_folder(tmp_path)
    files = DataSource(images=str(d), on_bad_image="skip", min_images=2).image_files()
    assert [f.name for f in files] == ["good0.png", "good1.png", "good2.png"]
    err = capsys.readouterr().err
    assert "cut.png" in err and "notes.jpg" in err and "skipped 2 of 5 images" in err, err
    assert load_images(files, 16).shape == (3, 3, 16, 16)
    with pytest.raises(DataError, match="only 3 readable images.*one batch"):
        DataSource(images=str(d), on_bad_image="skip", min_images=4).image_files()
    files = DataSource(images=str(d)).image_files()  # default "error": as before, the first bad file stops it
    assert len(files) == 5
    with pytest.raises(DataError, match="unreadable image .*(cut.png|notes.jpg)"):
        load_images(files, 16)
    with pytest.raises(ConfigError, match="data.on_bad_image must be one of error, skip"):
        load_config(GMM[0], ["data.on_bad_image=ignore"])
    cfg = load_config(GMM[0], ["data.on_bad_image=skip", "train.batch_size=8"])
    from fewstep.api import build

    assert build(cfg)[1].on_bad_image == "skip" and build(cfg)[1].min_images == 8


def test_bad_prompt_files_one_line(tmp_path):
    from fewstep.data import DataError, read_prompts

    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81binary")
    for name, msg in [("empty.txt", "has no prompts"), ("bin.txt", "cannot read prompt file")]:
        with pytest.raises(DataError, match=msg) as e:
            read_prompts(str(tmp_path / name))
        assert name in str(e.value) and "\n" not in str(e.value)
