"""Student -> a diffusers pipeline folder that ``DiffusionPipeline.from_pretrained`` loads as-is.

The folder uses the teacher's own pipeline class and a stock scheduler configured so the default call
``pipe(prompt, num_inference_steps=K, guidance_scale=0)`` reproduces the training-time sampler, plus a
model card.  Where no stock pipeline can (multi-jump flow maps), ``export_spec()["pipeline_class"]`` names
a class of ``pipelines/`` (a subclass of the teacher's), and the folder carries its code.  Teachers that are not
pipelines (the analytic GMM) save their students themselves (``Teacher.save_student``); this module imports nothing
from fewstep but its error classes and ``fewstep.lora`` (a LoRA student is written merged one shard at a time, beside
its ``load_lora_weights`` file).

Every folder is written atomically (``atomic_dir``): into ``.tmp-NAME-PID`` beside the target, fsynced, renamed into
place; an existing export is renamed aside and deleted only once the new one is in place.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import WriteError  # noqa: F401  (defined there: importable without torch)
from .lora import lora_adapter, merged_placeholder

# ---- safe writes --------------------------------------------------------------------------------
# Every folder fewstep writes (checkpoints, exports, the toy student) is written into a ``.tmp-*`` folder beside
# its target, fsynced, and renamed into place; a failed write removes the temp folder and names the path, the
# reason and the free space in one line (WriteError).

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EPERM, errno.EIO}
TMP_PREFIX = ".tmp-"
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # Rust I/O errors (safetensors): "... (os error 27)"
_CUT_SHORT = ("unexpected pos", "iostream error", "PytorchStreamWriter failed")  # torch.save's zip writer


def _errno_of(exc: BaseException):
    """The errno behind a failed write (OSError, safetensors' Rust I/O error text), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        m = _OS_ERROR_IN_TEXT.search(str(exc))
        if m:
            return int(m.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def _free_space(path: Path) -> str:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return ""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if free >= div:
            return f"{free / div:.1f} {unit} free on {p}"
    return f"{free} bytes free on {p}"


def _file_size_limit():
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, OSError, ValueError):
        return None


def _cause_of_cut_short(written, path):
    """The errno a write that ended without one (torch.save's zip writer) most likely hit, judged from what it left."""
    limit = _file_size_limit()
    if written is not None and limit is not None:
        root = Path(written)
        files = [root] if root.is_file() else (list(root.rglob("*")) if root.is_dir() else [])
        if any(f.is_file() and f.stat().st_size >= limit for f in files):
            return errno.EFBIG
    try:
        p = Path(path).absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        if shutil.disk_usage(p).free < (1 << 20):
            return errno.ENOSPC
    except OSError:
        pass
    return None


def write_failure(exc: BaseException, path, what: str = "", written=None) -> "WriteError | None":
    """A one-line WriteError for ``exc`` when it is a failed write (ENOSPC, EDQUOT, EFBIG, EACCES, ...), else None.

    ``written``: the temp file/folder the write went to (still there), to tell a file-size limit from a full disk
    when the writer gave no errno."""
    if isinstance(exc, WriteError):
        return exc
    code = _errno_of(exc)
    text = " ".join(str(e) for e in (exc, exc.__context__) if e is not None)
    if code is None and any(s in text for s in _CUT_SHORT):
        code = _cause_of_cut_short(written, path)
        if code is None:
            code = -1
    if code == -1:
        reason = "the write was cut short (disk full, quota or a file-size limit)"
        code = None
    elif code in WRITE_ERRNOS:
        reason = os.strerror(code)
    else:
        return None
    extra = []
    limit = _file_size_limit()
    if limit is not None and code in (errno.EFBIG, None):
        extra.append(f"file-size limit (ulimit -f) is {limit} bytes")
    free = _free_space(Path(path))
    if free:
        extra.append(free)
    return WriteError(f"cannot write {what}{path}: {reason}" + (f"; {'; '.join(extra)}" if extra else ""), code)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then each folder (deepest first), so a renamed folder is complete on disk."""
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(d)
        for f in files:
            _fsync(Path(d) / f)
    for d in reversed(dirs):
        _fsync(Path(d))


def _old_name(target: Path) -> Path:
    return target.parent / f"{TMP_PREFIX}{target.name}-old"


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the complete folder ``tmp`` to ``target``; an existing ``target`` is renamed aside first and deleted
    only after the new one is in place (a crash in between leaves ``.tmp-NAME-old``, restored at the next start)."""
    old = _old_name(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
    else:
        os.rename(tmp, target)
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(parent: Path, name: str = "") -> list[Path]:
    """Remove ``.tmp-NAME*`` folders/files left in ``parent`` by a crash; a ``.tmp-NAME-old`` whose target is gone is
    renamed back (the crash fell between the two renames of ``replace_dir``).  Returns what was removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for p in sorted(parent.glob(f"{TMP_PREFIX}{name}*")):
        if p.is_dir() and p.name.endswith("-old"):
            target = parent / p.name[len(TMP_PREFIX):-len("-old")]
            if not target.exists():
                os.rename(p, target)
                continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_dir(target, what: str = "export "):
    """Yield a temp folder beside ``target``; on success fsync it and rename it to ``target`` (replacing an old one
    only now).  On failure remove it, keep ``target`` as it was, and raise a one-line WriteError for write faults."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target.parent, target.name + "-")
        tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise (write_failure(e, target, what) or e) from None
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException as e:
        err = write_failure(e, target, what, written=tmp) if isinstance(e, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            raise err from None
        raise


@contextmanager
def atomic_file(target, what: str = ""):
    """Yield a temp path beside ``target`` (same suffix, so writers that pick the format by extension work); on
    success rename it to ``target``.  On failure remove it and raise a one-line WriteError for write faults."""
    target = Path(target)
    tmp = target.parent / f"{TMP_PREFIX}{target.stem}-{os.getpid()}{target.suffix}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, target)
    except BaseException as e:
        err = write_failure(e, target, what, written=tmp) if isinstance(e, Exception) else None
        tmp.unlink(missing_ok=True)
        if err is not None:
            raise err from None
        raise


def _scheduler_from_spec(teacher_scheduler, spec: dict):
    import diffusers

    import inspect

    cls = getattr(diffusers, spec["scheduler"])
    accepted = set(inspect.signature(cls.__init__).parameters)
    base = {k: v for k, v in teacher_scheduler.config.items() if k in accepted}
    return cls.from_config({**base, **spec.get("scheduler_config", {})})


def _pipeline_class(pipe, spec: dict):
    """The teacher's pipeline class, or the ``pipelines/`` class the objective's export spec names."""
    name = spec.get("pipeline_class")
    if not name:
        return type(pipe)
    import importlib

    from pipelines import CUSTOM_PIPELINES

    return getattr(importlib.import_module(CUSTOM_PIPELINES[name]), name)


def _call_kwargs(teacher) -> dict:
    """Extra arguments of the recommended call (e.g. Flux's trained resolution)."""
    return teacher.call_kwargs()


def export_pipeline(teacher, student, objective, out_dir, run_config: dict | None = None) -> Path:
    """Write ``out_dir`` (a diffusers pipeline folder) for a diffusers-teacher student.

    Atomic: written into ``.tmp-NAME-PID`` beside ``out_dir`` and renamed into place when complete; an existing
    export is replaced only then.  A failed write raises a one-line WriteError and leaves ``out_dir`` as it was."""
    target = Path(out_dir)
    with atomic_dir(target) as tmp:
        _write_pipeline(teacher, student, objective, tmp, run_config)
    return target


def _write_pipeline(teacher, student, objective, out: Path, run_config: dict | None) -> None:
    spec = objective.export_spec()
    pipe = teacher.pipe
    scheduler = _scheduler_from_spec(pipe.scheduler, spec)
    unet = getattr(student, "net", student)
    adapter = lora_adapter(student) if getattr(unet, "peft_config", None) else None
    if adapter is not None:  # LoRA student: a LoRA file for load_lora_weights, and merged weights
        from peft.utils import get_peft_model_state_dict

        # peft's key format, which load_lora_weights reads as it is (diffusers' older format, convert_state_dict_to_
        # diffusers, renames attention keys only: a file with conv/ff targets too then loads without its attention)
        lora_sd = get_peft_model_state_dict(unet, adapter_name=adapter)
        # with the adapter's LoraConfig (rank, alpha, targets) as metadata: without it load_lora_weights takes
        # alpha = rank, which scales a LoRA trained with another alpha (the DMD2 recipe: 64, 8) by rank / alpha
        type(pipe).save_lora_weights(str(out / "lora"), unet_lora_layers=lora_sd, safe_serialization=True,
                                     unet_lora_adapter_metadata=unet.peft_config[adapter].to_dict())
        # merged tensor by tensor as the pipeline is saved (the network may be the teacher's own, other adapters on it)
        unet = merged_placeholder(unet, adapter)
    components = dict(pipe.components)
    components["transformer" if "transformer" in components else "unet"] = unet
    components["scheduler"] = scheduler
    components.update(objective.export_modules(student))
    cls = _pipeline_class(pipe, spec)
    new = cls(**components)
    out.mkdir(parents=True, exist_ok=True)
    new.save_pretrained(str(out), safe_serialization=True)
    teacher.save_freed_components(out)  # text encoders freed after prompt caching (data.free_text_encoders)
    (out / "fewstep.json").write_text(json.dumps({
        "objective": objective.name, "student_steps": objective.steps,
        "num_inference_steps": spec["num_inference_steps"], "guidance_scale": spec["guidance_scale"],
        "teacher": teacher.source, "pipeline_class": cls.__name__, "scheduler": spec["scheduler"],
        "call_kwargs": _call_kwargs(teacher),
        # fewstep's own pipeline class: pipelines.load_pipeline(folder), or diffusers alone with
        # DiffusionPipeline.from_pretrained(folder, custom_pipeline=<this>, trust_remote_code=True)
        "custom_pipeline": spec.get("pipeline_module"),
    }, indent=2))
    (out / "README.md").write_text(model_card(teacher, objective, spec, run_config))


def model_card(teacher, objective, spec: dict, run_config: dict | None) -> str:
    import yaml

    k, g = spec["num_inference_steps"], spec["guidance_scale"]
    extra = "".join(f", {a}={b!r}" for a, b in _call_kwargs(teacher).items())
    if teacher.text_conditioned:
        call = f'pipe("a photo of a cat", num_inference_steps={k}, guidance_scale={g}{extra})'
    else:
        call = f"pipe(batch_size=4, num_inference_steps={k})"
    cls_name = spec.get("pipeline_class") or type(teacher.pipe).__name__
    usage = getattr(type(teacher.pipe), "model_card_usage", None)  # a pipelines/ class used by the teacher itself
    if usage is not None and not spec.get("pipeline_class"):
        load, call = usage(k, g)
    elif spec.get("pipeline_class"):
        module = spec["pipeline_module"]
        load = ["from pipelines import load_pipeline  # ships with fewstep", "",
                "pipe = load_pipeline(\"PATH_TO_THIS_FOLDER\")",
                f"# without fewstep: DiffusionPipeline.from_pretrained(PATH, custom_pipeline=\"{module}\", "
                "trust_remote_code=True)"]
    else:
        load = ["from diffusers import DiffusionPipeline", "",
                "pipe = DiffusionPipeline.from_pretrained(\"PATH_TO_THIS_FOLDER\")"]
    lines = [
        "---", "library_name: diffusers", "tags: [fewstep, distillation, " + objective.name + "]", "---", "",
        f"# {objective.name.upper()} {k}-step student of `{teacher.source}`", "",
        f"Distilled with [fewstep](https://pypi.org/project/fewstep/) objective `{objective.name}` into a "
        f"{k}-step student. Pipeline class: `{cls_name}`; scheduler: `{spec['scheduler']}` "
        f"configured with `{_shown(spec.get('scheduler_config', {}))}`.", "",
        "## Use", "", "```python", *load,
        f"image = {call}.images[0]", "```", "",
        f"Recommended: `num_inference_steps={k}`, `guidance_scale={g}`. " + spec.get(
            "guidance_note", _default_guidance_note(teacher)), "",
    ]
    if spec.get("card_note"):  # e.g. a 1-step student conditioned at another timestep than the top one
        lines += [spec["card_note"], ""]
    if spec.get("scheduler_config", {}).get("stochastic_sampling"):
        lines += ["The scheduler re-noises between steps (as the student was trained) with torch's global generator "
                  "(diffusers' flow pipelines do not pass `generator` to it): call `torch.manual_seed(...)` before "
                  "the pipeline for a reproducible image.", ""]
    if run_config:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _shown(config: dict) -> dict:
    """A scheduler config for the model card, long lists (``trained_betas``) shortened to their length."""
    return {k: f"<{len(v)} values>" if isinstance(v, (list, tuple)) and len(v) > 8 else v for k, v in config.items()}


def _default_guidance_note(teacher) -> str:
    if teacher.embedded_guidance is not None:  # Flux (guidance-distilled)
        return "guidance_scale is the value of Flux's guidance embedding the student was trained with."
    return "Guidance is distilled in; a higher value would run the teacher-style CFG on the student."


def save_toy_student(student, objective, teacher, out_dir) -> Path:
    """Old name of ``teacher.save_student`` for students in the teacher's own format (the analytic GMM's)."""
    teacher.save_student(student, objective, out_dir)
    return Path(out_dir)


def load_toy_student(teacher, out_dir, objective=None):
    """Old name of ``teacher.load_student`` (the analytic GMM's ``student.safetensors`` + ``student.json``)."""
    return teacher.load_student(out_dir, objective)


def check_roundtrip(out_dir, objective, teacher, student, cond_prompts=None, seed: int = 0, atol: float = 1e-3,
                    guidance_scale=None) -> float:
    """Max abs difference between the exported pipeline's default call and the in-training sampler (latents).

    ``guidance_scale``: call the pipeline with this scale instead of the recommended one and sample the student
    with the same scale (students with a guidance embedding).
    """
    from pipelines import load_pipeline

    pipe = load_pipeline(str(out_dir))
    pipe.set_progress_bar_config(disable=True)
    spec = objective.export_spec()
    g1 = torch.Generator().manual_seed(seed)
    # diffusers' flow pipelines draw a stochastic scheduler's noise from torch's global generator
    renoise = spec.get("scheduler_config", {}).get("stochastic_sampling", False)
    if renoise:
        torch.manual_seed(seed + 1)
    if teacher.text_conditioned:
        prompts = cond_prompts or ["a photo of a cat"]
        kw = _call_kwargs(teacher)
        gs = spec["guidance_scale"] if guidance_scale is None else guidance_scale
        lat = pipe(prompts, num_inference_steps=spec["num_inference_steps"], guidance_scale=gs,
                   generator=g1, output_type="latent", **kw).images
        if lat.ndim == 3:  # Flux returns packed latents
            lat = type(pipe)._unpack_latents(lat, kw["height"], kw["width"], pipe.vae_scale_factor)
        cond = teacher.conditions_for_prompts(prompts)
    else:
        cond = teacher.sample_conditions(1, torch.Generator().manual_seed(0))
        kw = {"batch_size": 1} if cond.class_labels is None else {"class_labels": cond.class_labels.tolist()}
        lat = pipe(num_inference_steps=spec["num_inference_steps"], generator=g1, output_type="np", **kw).images
        lat = torch.as_tensor(lat).permute(0, 3, 1, 2) * 2 - 1
    g2 = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(lat), *teacher.sample_shape), generator=g2)
    if renoise:
        g2 = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        ref = objective.sample(student, noise, cond, generator=g2, **extra)
    if not teacher.text_conditioned:
        ref = ref.clamp(-1, 1)
    return float((torch.as_tensor(lat).float() - ref.float()).abs().max())
