"""A real-data benchmark that runs on a CPU: scikit-learn's 8x8 digits, upsampled to 16x16.

* **teacher**: a small class-conditional ``UNet2DModel`` (v-prediction, cosine schedule, 10% label
  dropout to the null class for CFG) trained by denoising score matching, saved as a
  :class:`~pipelines.class_conditional.ClassConditionalPipeline` folder with a DDIM scheduler.
* **classifier**: a small CNN (:class:`DigitsCNN`); its 64-d penultimate layer is the feature space of
  "digits-FID" (Fréchet distance to the 1,797 real digits) and of precision / recall / density / coverage
  (:mod:`fewstep.eval.diversity`; against ``1797 - num_images`` real digits, the other ``num_images`` real
  digits giving the real-data floor at the same sizes), and its predictions give class accuracy.
* **students**: one row per (label, config file, overrides) (:class:`StudentRow`); by default DMD2 1 and 4
  steps and Phased DMD 2 and 4 steps, a row whose config file does not exist being skipped with a message.

Both are trained with fixed seeds on first use and cached under ``$FEWSTEP_CACHE/digits`` (default
``~/.cache/fewstep/digits``); no weights ship with fewstep.  Images are stored as uint8 like every image
set FID sees, real ones included: ``round(255 * bilinear_upsample(pixel / 16))``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedules import VPDiscrete, diffusers_prediction

IMAGE_SIZE = 16
NUM_CLASSES = 10
CACHE_VERSION = 1  # bump when the data pipeline or a training recipe changes meaning
TEACHER_VERSION = 2  # 2: noising and targets through fewstep.schedules (VPDiscrete) instead of local formulas


def cache_root() -> Path:
    """``$FEWSTEP_CACHE/digits`` or ``~/.cache/fewstep/digits``."""
    base = os.environ.get("FEWSTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fewstep")
    return Path(base) / "digits"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# ---- data -----------------------------------------------------------------------------------------
def load_digits_uint8() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as uint8 ``(N, 1, 16, 16)`` and their labels ``(N,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), torch.from_numpy(d.target).long()


def train_test_split_idx(labels: Tensor, test_frac: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified, seeded split of indices (the classifier's held-out accuracy is measured on the test part)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * test_frac))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def to_rgb(x: Tensor) -> Tensor:
    """uint8 ``(N, 1, H, W)`` -> ``(N, 3, H, W)`` (what FID and the image files see)."""
    return x.repeat(1, 3, 1, 1)


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random +-1 px shifts (zero fill) and light noise on images in [0, 1]."""
    n = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=g)
    dy = torch.randint(0, 3, (n,), generator=g)
    rows = torch.arange(IMAGE_SIZE)[None, :] + dy[:, None]  # (n, H)
    cols = torch.arange(IMAGE_SIZE)[None, :] + dx[:, None]  # (n, W)
    out = pad[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]
    out = out + 0.05 * torch.rand((n, 1, 1, 1), generator=g) * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1)


# ---- the classifier (feature space of digits-FID) -------------------------------------------------
class DigitsCNN(nn.Module):
    """Grey 16x16 in [0, 1] -> 10 logits; ``features`` is the 64-d penultimate layer (before its ReLU)."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),  # 4x4
            nn.Flatten(), nn.Linear(2 * w * 16, feature_dim))
        self.head = nn.Sequential(nn.SiLU(), nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass
class ClassifierConfig:
    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 32
    feature_dim: int = 64


def train_classifier(cfg: ClassifierConfig = ClassifierConfig(), log: Callable = print) -> tuple[DigitsCNN, float]:
    """Train on the 80% split with shifts and noise; returns ``(net, held-out accuracy)``."""
    torch.manual_seed(cfg.seed)
    x8, y = load_digits_uint8()
    x = x8.float() / 255
    tr, te = train_test_split_idx(y, seed=cfg.seed)
    net = DigitsCNN(cfg.width, cfg.feature_dim)
    steps_per_epoch = (len(tr) + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    for ep in range(cfg.epochs):
        net.train()
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(net(_augment(x[b], g)), y[b], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(x[te]).argmax(1) == y[te]).float().mean())
    log(f"digits classifier: held-out accuracy {acc:.4f} ({len(te)} images)")
    return net, acc


def classifier_path(cfg: ClassifierConfig = ClassifierConfig()) -> Path:
    return cache_root() / f"classifier-v{CACHE_VERSION}-{_digest(asdict(cfg))}.safetensors"


def ensure_classifier(cfg: ClassifierConfig = ClassifierConfig(), log: Callable = print, force: bool = False) -> Path:
    """The cached classifier file (trained and saved on first use)."""
    from .features import save_feature_net

    path = classifier_path(cfg)
    if path.is_file() and not force:
        return path
    t0 = time.perf_counter()
    net, acc = train_classifier(cfg, log)
    tmp = path.with_suffix(".tmp")
    save_feature_net(net, tmp, "digits_cnn", {"width": cfg.width, "feature_dim": cfg.feature_dim},
                     input_size=IMAGE_SIZE, in_channels=1, input_range="0-1", num_classes=NUM_CLASSES,
                     extra={"test_accuracy": acc, "train_config": asdict(cfg)})
    tmp.replace(path)
    log(f"digits classifier trained in {time.perf_counter() - t0:.0f}s -> {path}")
    return path


def reference_stats_path(classifier: Path) -> Path:
    from .features import file_digest

    return cache_root() / f"ref-stats-{file_digest(classifier)}.npz"


def ensure_reference_stats(classifier: Path, log: Callable = print) -> Path:
    """digits-FID reference: the classifier's features of all 1,797 real digits, their statistics and the
    features themselves (for precision / recall / density / coverage), as a cached .npz."""
    from .features import load_feature_extractor
    from .fid import FeatureStats, load_stats_features

    path = reference_stats_path(classifier)
    if path.is_file() and load_stats_features(path) is not None:  # older caches hold no features: rewrite
        return path
    ext = load_feature_extractor(str(classifier))
    x, _ = load_digits_uint8()
    feats = ext(to_rgb(x))
    FeatureStats.from_features(feats, ext.name).save(path, features=feats)
    log(f"digits reference statistics -> {path}")
    return path


# ---- the teacher ----------------------------------------------------------------------------------
@dataclass
class TeacherConfig:
    seed: int = 0
    steps: int = 2000  # optimizer steps (~7 min on one free core)
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.995
    p_uncond: float = 0.1  # label dropout to the null class (classifier-free guidance)
    block_out_channels: tuple = (16, 32)
    layers_per_block: int = 1
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"


def build_unet(cfg: TeacherConfig):
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1)  # last index: the null class


def teacher_schedulers(cfg: TeacherConfig):
    """``(training DDPMScheduler, sampling DDIMScheduler)`` of one noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type)
    return DDPMScheduler(**common), DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True,
                                                  timestep_spacing="trailing")


def teacher_schedule(scheduler_config) -> "VPDiscrete":
    """The teacher's noise schedule as fewstep sees every discrete DDPM teacher (timestep k at t = (k+1)/N)."""
    return VPDiscrete.from_scheduler_config(scheduler_config)


def noised_and_target(schedule: "VPDiscrete", kind: str, x0: Tensor, noise: Tensor, timesteps: Tensor):
    """``(x_t, regression target)`` at integer ``timesteps``: the same ``add_noise``/``target`` the objectives use."""
    t = schedule.timestep_to_t(timesteps.to(torch.float64)).to(torch.float32)
    return schedule.add_noise(x0, noise, t), schedule.target(kind, x0, noise, t)


def train_teacher(cfg: TeacherConfig = TeacherConfig(), log: Callable = print, progress: bool = True):
    """Denoising training on all 1,797 digits (+-1 px shifts); returns the EMA network in a pipeline."""
    import copy

    from tqdm.auto import tqdm

    from pipelines.class_conditional import ClassConditionalPipeline

    torch.manual_seed(cfg.seed)
    x8, y = load_digits_uint8()
    x = x8.float() / 255
    unet = build_unet(cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    train_sched, sample_sched = teacher_schedulers(cfg)
    schedule, kind = teacher_schedule(train_sched.config), diffusers_prediction(cfg.prediction_type)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_at = lambda s: cfg.lr * min(1.0, (s + 1) / cfg.warmup) * (0.5 * (1 + np.cos(np.pi * s / cfg.steps)) * 0.9 + 0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    unet.train()
    t0 = time.perf_counter()
    losses = []
    for step in tqdm(range(cfg.steps), desc="digits teacher", disable=None if progress else True, leave=False):
        b = torch.randint(len(x), (cfg.batch_size,), generator=g)
        x0 = _augment(x[b], g) * 2 - 1
        labels = y[b].clone()
        labels[torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond] = NUM_CLASSES
        ts = torch.randint(0, schedule.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt, target = noised_and_target(schedule, kind, x0, noise, ts)
        loss = F.mse_loss(unet(xt, ts, class_labels=labels).sample, target)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if (step + 1) % 500 == 0:
            log(f"digits teacher step {step + 1}/{cfg.steps}: loss {np.mean(losses[-500:]):.4f}")
    log(f"digits teacher trained in {time.perf_counter() - t0:.0f}s ({cfg.steps} steps)")
    ema.eval()
    return ClassConditionalPipeline(unet=ema, scheduler=sample_sched)


def teacher_dir(cfg: TeacherConfig = TeacherConfig()) -> Path:
    return cache_root() / f"teacher-v{CACHE_VERSION}.{TEACHER_VERSION}-{_digest(asdict(cfg))}"


def ensure_teacher(cfg: TeacherConfig = TeacherConfig(), log: Callable = print, force: bool = False,
                   out: Optional[str] = None) -> Path:
    """The cached teacher pipeline folder (trained and saved on first use); ``out``: save there instead."""
    path = Path(out) if out else teacher_dir(cfg)
    if (path / "model_index.json").is_file() and not force:
        return path
    pipe = train_teacher(cfg, log)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "fewstep.json").write_text(json.dumps({
        "role": "teacher", "num_inference_steps": 50, "guidance_scale": 1.0,
        "trained_by": "fewstep.eval.digits.train_teacher (tools/train_toy_teacher.py)",
        "data": "scikit-learn load_digits, 8x8 -> 16x16 bilinear", "train_config": asdict(cfg)}, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    log(f"digits teacher -> {path}")
    return path


# ---- metrics --------------------------------------------------------------------------------------
from .features import class_accuracy  # noqa: E402,F401  (kept importable from here)


# ---- the benchmark --------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "digits_dmd2.yaml"


def data_floor(extractor, ref_stats: Path, n: int, seed: int = 0) -> float:
    """digits-FID of ``n`` real digits (a random subset) against the reference: the finite-sample floor."""
    from .fid import FeatureStats, frechet_distance

    x, _ = load_digits_uint8()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:min(n, len(x))]
    return frechet_distance(extractor(to_rgb(x[idx])), FeatureStats.load(ref_stats))


def diversity_split(extractor, n: int, seed: int = 0) -> tuple:
    """``(floor features, reference features)``: ``n`` random real digits and the other ``1797 - n``.

    Precision / recall / density / coverage depend on the two set sizes, so every row is scored against the
    same ``1797 - n`` real digits and the ``n`` held-out real digits, scored the same way, are the real-data
    floor at exactly the rows' sizes (a subset scored against all digits would find itself in the reference).
    """
    x, _ = load_digits_uint8()
    if not 1 <= n <= len(x) - 100:
        raise ValueError(f"the digits diversity split needs 1 <= num_images <= {len(x) - 100}, got {n}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).numpy()
    feats = extractor(to_rgb(x))
    return feats[idx[:n]], feats[idx[n:]]


@dataclass(frozen=True)
class StudentRow:
    """One student of the benchmark: table label, distillation config (relative to the repository root, or
    absolute) and dotted overrides (``student.steps=4``, ...)."""

    label: str
    config: str
    overrides: tuple = ()

    def config_path(self) -> Path:
        p = Path(self.config).expanduser()
        return p if p.is_absolute() else ROOT / p


DEFAULT_ROWS = (
    StudentRow("dmd2-1step", "configs/digits_dmd2.yaml", ("student.steps=1",)),
    # 4 steps: 500 steps (125 an exit) score better than 1,000 here (digits-FID, 3 sampling seeds: 3.32 vs 3.47)
    # + on-policy regression of each exit onto the teacher's ODE (objective.reg_online=1): recall 0.931 vs 0.924 without
    StudentRow("dmd2-4step", "configs/digits_dmd2.yaml",
               ("student.steps=4", "train.max_steps=500", "objective.reg_online=1")),
    StudentRow("phased_dmd-2step", "configs/digits_phased_dmd.yaml", ("student.steps=2",)),
    StudentRow("phased_dmd-4step", "configs/digits_phased_dmd.yaml", ("student.steps=4",)),
)


def parse_row(spec: str) -> StudentRow:
    """``"LABEL CONFIG [KEY=VALUE ...]"`` (whitespace-separated) -> :class:`StudentRow`."""
    from ..config import ConfigError

    parts = spec.split()
    if len(parts) < 2 or any("=" not in o for o in parts[2:]):
        raise ConfigError(f"a benchmark row is 'LABEL CONFIG [KEY=VALUE ...]', got {spec!r}")
    return StudentRow(parts[0], parts[1], tuple(parts[2:]))


def _one_thread_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _spawn(args: list, log_file: Path):
    """A one-thread Python subprocess (``python ARGS``) with stdout/stderr in ``log_file``."""
    import subprocess
    import sys

    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_file, "w")
    return subprocess.Popen([sys.executable, *args], stdout=fh, stderr=subprocess.STDOUT, env=_one_thread_env(),
                            cwd=str(ROOT)), fh


def _wait(proc, fh, what: str, log_file: Path) -> None:
    code = proc.wait()
    fh.close()
    if code != 0:
        tail = log_file.read_text().strip().splitlines()[-1:] if log_file.is_file() else []
        raise RuntimeError(f"{what} failed (exit {code}): {tail[0] if tail else ''} -- see {log_file}")


def ensure_teacher_and_classifier(teacher_cfg: TeacherConfig = TeacherConfig(), log: Callable = print,
                                  force: bool = False, out: Optional[str] = None, log_dir: Optional[Path] = None):
    """``(teacher folder, classifier file)``, training what is missing: the classifier in a second one-thread
    process while the teacher trains (one thread) in this one."""
    torch.set_num_threads(1)
    job = None
    log_file = Path(log_dir or cache_root()) / "classifier.log"
    if force or not classifier_path().is_file():
        job = _spawn(["-c", f"from fewstep.eval.digits import ensure_classifier; ensure_classifier(force={force})"],
                     log_file)
        log(f"training the digits classifier in a second process (log: {log_file})")
    teacher = ensure_teacher(teacher_cfg, log=log, force=force, out=out)
    if job:
        _wait(*job, "digits classifier training", log_file)
        log("\n".join(log_file.read_text().strip().splitlines()[-2:]))
    return teacher, ensure_classifier(log=log)


def run_benchmark(out_dir: str = "runs/bench_digits", student_steps: Optional[Sequence[int]] = None,
                  train_steps: Optional[int] = None, num_images: int = 1000,
                  teacher_steps=(1, 2, 4, 8, 16, 32, 50), config: Optional[str] = None,
                  overrides: Optional[list] = None, teacher_cfg: TeacherConfig = TeacherConfig(),
                  log: Callable = print, progress: bool = True, rows: Optional[Sequence[StudentRow]] = None,
                  jobs: int = 2, diversity: Optional[dict] = None, eval_seeds: int = 1,
                  reuse: bool = False) -> dict:
    """Teacher + classifier (cached), the students of ``rows``, then the comparison table (digits-FID,
    precision, recall, density, coverage, class accuracy, time per image; same seeds for every row);
    writes OUT/{compare.md,compare.png,compare.json,benchmark.json}.

    ``rows``: :class:`StudentRow` s (default :data:`DEFAULT_ROWS`); a row whose config file does not exist is
    skipped with a message.  ``student_steps`` (the older form): DMD2 rows of ``config`` (default
    ``configs/digits_dmd2.yaml``) at these step counts.  ``train_steps`` and ``overrides`` apply to every
    row; ``diversity``: keyword arguments of :func:`~fewstep.eval.diversity.diversity_vs_reference`.
    ``eval_seeds``: every row is sampled with seeds ``0..eval_seeds-1`` (``num_images`` each) and the table shows
    mean ± standard deviation (:func:`~fewstep.eval.compare.average_over_seeds`); 1: seed 0 only.
    ``reuse``: a row whose student this output folder already holds, trained with the same config and overrides
    (the config file's bytes included: ``OUT/LABEL/bench_row.json``), is scored again without retraining.

    CPU scheduling: every process uses one thread (PyTorch's intra-op threads lose badly on a shared
    CPU), and independent jobs run ``jobs`` (2) at a time -- classifier beside teacher, the students two
    by two -- so two cores are used without oversubscription.  The comparison runs alone (clean timings).
    """
    from .compare import MetricSuite, average_over_seeds, compare, markdown, write_outputs
    from .features import load_feature_extractor

    if rows is None:
        if student_steps is not None or config is not None:
            cfg_file = str(config or DEFAULT_CONFIG)
            rows = [StudentRow(f"dmd2-{k}step", cfg_file, (f"student.steps={k}",)) for k in (student_steps or (1, 4))]
        else:
            rows = DEFAULT_ROWS
    if int(eval_seeds) < 1:
        from ..config import ConfigError

        raise ConfigError(f"eval_seeds must be >= 1, got {eval_seeds}")
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        from ..config import ConfigError

        raise ConfigError(f"benchmark row labels must be unique, got {labels}")
    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    teacher, clf = ensure_teacher_and_classifier(teacher_cfg, log=log, log_dir=out / "logs")
    times["teacher_and_classifier_s"] = time.perf_counter() - t0
    ref = ensure_reference_stats(clf, log=log)
    skipped, todo = [], []
    for row in rows:
        if row.config_path().is_file():
            todo.append(row)
        else:
            msg = f"skipping row {row.label}: config {row.config} does not exist"
            log(msg)
            skipped.append({"label": row.label, "config": row.config, "reason": msg})
    t0 = time.perf_counter()
    running, students, names = [], [], []
    try:
        for row in todo:  # at most `jobs` distillations at a time, one thread each
            while len(running) >= max(1, jobs):
                _finish_first(running, times)
            run = out / row.label
            ov = [f"teacher.path={teacher}", *row.overrides, f"output_dir={run}", *(overrides or [])]
            if train_steps:
                ov.append(f"train.max_steps={train_steps}")
            spec = {"config": row.config, "config_sha256": hashlib.sha256(row.config_path().read_bytes()).hexdigest(),
                    "overrides": ov}
            spec_file = run / "bench_row.json"
            if reuse and (run / "pipeline" / "model_index.json").is_file() and spec_file.is_file() \
                    and json.loads(spec_file.read_text()) == spec:
                log(f"{row.label}: reusing the student trained earlier in {run} (same config and overrides)")
                students.append(str(run / "pipeline"))
                names.append(row.label)
                continue
            if run.exists():  # a student of another spec (or an unfinished one): train this row from scratch, never
                if not spec_file.is_file():  # resume checkpoints made under another config into it
                    raise ValueError(f"{run} exists and is not a digits-benchmark row folder (no bench_row.json); "
                                     f"pick another --out")
                shutil.rmtree(run)
            run.mkdir(parents=True, exist_ok=True)
            spec_file.write_text(json.dumps(spec, indent=1))
            log_file = out / "logs" / f"{row.label}.log"
            log(f"{row.label} student ({row.config} {' '.join(row.overrides)}) -> {run} (log: {log_file})")
            running.append((row.label, time.perf_counter(), log_file,
                            *_spawn(["-m", "fewstep", "distill", str(row.config_path()), *ov], log_file)))
            students.append(str(run / "pipeline"))
            names.append(row.label)
        while running:
            _finish_first(running, times)
    finally:  # a failed (or interrupted) row stops the others
        for _, _, _, proc, fh in running:
            proc.terminate()
            proc.wait()
            fh.close()
    times["students_s"] = time.perf_counter() - t0
    ext = load_feature_extractor(str(clf))
    div = dict(diversity or {})
    floor_feats, div_ref = diversity_split(ext, num_images)
    suite = MetricSuite(extractor=ext, ref=str(ref), fid_name="digits_fid", diversity=div, diversity_ref=div_ref)
    t0 = time.perf_counter()
    per_seed = []
    for seed in range(eval_seeds):
        if eval_seeds > 1:
            log(f"sampling seed {seed} ({seed + 1} of {eval_seeds})")
        per_seed.append(compare(str(teacher), students, suite, num_images, teacher_steps, seed=seed, batch_size=250,
                                student_names=names, log=log, progress=progress))
    res = per_seed[0] if eval_seeds == 1 else average_over_seeds(per_seed)
    times["eval_s"] = time.perf_counter() - t0
    res["rows_spec"] = [{"label": r.label, "config": r.config, "overrides": list(r.overrides)} for r in todo]
    res["skipped"] = skipped
    res["data_floor_digits_fid"] = data_floor(ext, ref, num_images)
    from .diversity import diversity_vs_reference

    res["data_floor_diversity"] = diversity_vs_reference(floor_feats, div_ref, **div)
    res["floor"] = {"digits_fid": res["data_floor_digits_fid"], "label": f"{num_images} real digits"}
    t50 = next((r for r in res["rows"] if r["model"] == "teacher" and r["steps"] == max(teacher_steps)), None)
    s1 = next((r for r in res["rows"] if r["model"] == "dmd2-1step"), None)
    if t50 and s1:
        res["goal"] = {"dmd2_1step_over_teacher_50step": s1["digits_fid"] / t50["digits_fid"], "target": 1.2,
                       "met": s1["digits_fid"] <= 1.2 * t50["digits_fid"]}
    res["timings"] = times
    res["classifier"] = str(clf)
    paths = write_outputs(res, out)
    fl = res["data_floor_diversity"]
    md = markdown(res) + (f"\nReal-data floor: {num_images} real digits vs the reference, digits-FID "
                          f"{res['data_floor_digits_fid']:.4f}; precision / recall / density / coverage of every "
                          f"row are measured against {len(div_ref)} real digits, and the other {num_images} "
                          f"real digits score precision {fl['precision']:.4f}, recall {fl['recall']:.4f}, "
                          f"density {fl['density']:.4f}, coverage {fl['coverage']:.4f}.\n")
    if "goal" in res:
        g = res["goal"]
        md += (f"Goal (DMD2 1-step within 1.2x of the teacher's {max(teacher_steps)}-step digits-FID): ratio "
               f"{g['dmd2_1step_over_teacher_50step']:.2f} -> {'met' if g['met'] else 'NOT met'}.\n")
    for sk in skipped:
        md += f"Skipped: {sk['reason']}.\n"
    (out / "compare.md").write_text(md)
    (out / "benchmark.json").write_text(json.dumps(res, indent=2, default=str))
    res["markdown"] = md
    res["paths"] = paths
    return res


def _finish_first(running: list, times: dict) -> None:
    """Wait for the first of ``running`` (label, start, log, proc, fh) jobs to end; record its time."""
    while True:
        for i, (label, start, log_file, proc, fh) in enumerate(running):
            if proc.poll() is not None:
                running.pop(i)
                _wait(proc, fh, f"{label} distillation", log_file)
                times[f"{label}_s"] = time.perf_counter() - start
                return
        time.sleep(1.0)
