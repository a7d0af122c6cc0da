"""Quality vs cost: a teacher at 1..50 steps and students at their own steps, on the same seeds, one table.

Every row generates the same ``num_images`` (image ``i`` from seed ``seed + i``, same prompt or class),
then scores them with one :class:`MetricSuite` (FID against a reference, optionally precision / recall /
density / coverage in the same features, class accuracy when the feature network is a classifier and the
pipeline class-conditional, CLIP score when a CLIP model is given).  NFE counts network evaluations per
image (x2 per step under classifier-free guidance).
Outputs ``compare.json``, ``compare.md`` and ``compare.png`` (metric vs NFE, log-x).
"""
from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .generate import Generated, generate, open_pipeline, pipeline_kind, recommended

DEFAULT_TEACHER_STEPS = (1, 2, 4, 8, 16, 32, 50)
DIVERSITY_COLUMNS = ("precision", "recall", "density", "coverage")  # = fewstep.eval.diversity.DIVERSITY_KEYS
COLUMNS = ("digits_fid", "fid", *DIVERSITY_COLUMNS, "class_accuracy", "clip_score")  # table order


@dataclass
class MetricSuite:
    """What every row is scored with; unset parts are skipped."""

    extractor: object = None  # FeatureExtractor for FID (and class accuracy when it is a classifier)
    ref: Optional[str] = None  # reference folder or .npz
    backend: str = "clean-fid"
    clip: object = None  # CLIPScorer
    fid_name: str = "fid"  # key of the FID column (e.g. "digits_fid")
    diversity: Optional[dict] = None  # precision/recall/density/coverage: diversity_vs_reference kwargs ({} = defaults)
    diversity_ref: object = None  # (N, D) reference features for those (default: the FID reference's own)
    _ref_cache: dict = field(default_factory=dict)

    def prepare(self) -> None:
        """Load / featurise the reference now, so a bad reference fails before any image is generated."""
        if self.extractor is not None and self.ref:
            from .fid import reference

            key = (str(self.ref), self.extractor.name, None)
            if key not in self._ref_cache:
                self._ref_cache[key] = reference(str(self.ref), self.extractor, progress=False)
            if self.diversity is not None and (*key, "features") not in self._ref_cache:
                from .diversity import reference_features

                self._ref_cache[(*key, "features")] = (
                    self.diversity_ref if self.diversity_ref is not None
                    else reference_features(str(self.ref), self._ref_cache[key][0]))

    def __call__(self, gen: Generated) -> dict:
        from .fid import fid

        out = {}
        if self.extractor is not None and self.ref:
            r = fid(gen.images, self.ref, self.extractor, self.backend, progress=False, ref_cache=self._ref_cache,
                    diversity=self.diversity)
            out[self.fid_name] = r["fid"]
            out.update({k: r[k] for k in (*DIVERSITY_COLUMNS, "diversity") if k in r})
            out["feature_extractor"] = r["feature_extractor"]
        if self.extractor is not None and gen.labels is not None and getattr(self.extractor, "num_classes", 0):
            from .features import class_accuracy

            out["class_accuracy"] = class_accuracy(self.extractor, gen.images, gen.labels)
        if self.clip is not None and gen.prompts:
            out["clip_score"] = self.clip(gen.images, gen.prompts)["clip_score"]
        return out


def _effective_guidance(pipe, guidance: Optional[float]) -> Optional[float]:
    if guidance is not None:
        return float(guidance)
    p = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return None if p is None or p.default is inspect.Parameter.empty else float(p.default)


def nfe(steps: int, guidance: Optional[float], kind: str) -> int:
    """Network evaluations per image: one per step, two under CFG (guidance > 1 on a conditional pipeline)."""
    return steps * (2 if kind != "uncond" and guidance is not None and guidance > 1 else 1)


def _row(name: str, path: str, pipe, steps: int, guidance, suite: MetricSuite, num_images: int, common: dict,
         log: Callable) -> dict:
    kind = pipeline_kind(pipe)
    g = _effective_guidance(pipe, guidance) if kind != "uncond" else None
    gen = generate(pipe, num_images, num_inference_steps=steps, guidance_scale=guidance, desc=f"{name} {steps} steps",
                   **common)
    row = {"model": name, "path": str(path), "steps": steps, "nfe": nfe(steps, g, kind), "guidance_scale": g,
           "scheduler": type(pipe.scheduler).__name__, "sec_per_image": gen.sec_per_image, **suite(gen)}
    log(format_row(row))
    return row


def format_row(row: dict) -> str:
    parts = [f"{row['model']:>10} {row['steps']:>3} steps (NFE {row['nfe']:>3})"]
    for k in COLUMNS:
        if k in row:
            parts.append(f"{k} {row[k]:.4g}")
    parts.append(f"{row['sec_per_image'] * 1000:.2f} ms/image")
    return "  ".join(parts)


def speedups(rows: list, metric: str, lower_is_better: bool = True) -> list:
    """Per student: the cheapest teacher row at least as good, and the measured time ratio to it."""
    teacher = sorted((r for r in rows if r["model"] == "teacher"), key=lambda r: r["nfe"])
    out = []
    for s in (r for r in rows if r["model"] != "teacher"):
        if metric not in s or not teacher:
            continue
        good = [t for t in teacher if (t[metric] <= s[metric] if lower_is_better else t[metric] >= s[metric])]
        entry = {"student": s["model"], "student_steps": s["steps"], "metric": metric, "student_value": s[metric]}
        if good:
            t = good[0]
            entry.update(teacher_steps=t["steps"], teacher_value=t[metric], teacher_at_least_as_good=True,
                         speedup=t["sec_per_image"] / max(s["sec_per_image"], 1e-12), nfe_ratio=t["nfe"] / s["nfe"])
        else:  # the student beats every teacher row: compare with the teacher's best (most steps)
            t = teacher[-1]
            entry.update(teacher_steps=t["steps"], teacher_value=t[metric], teacher_at_least_as_good=False,
                         speedup=t["sec_per_image"] / max(s["sec_per_image"], 1e-12), nfe_ratio=t["nfe"] / s["nfe"])
        out.append(entry)
    return out


def compare(teacher: str, students: Sequence[str], suite: MetricSuite, num_images: int = 1000,
            teacher_steps: Sequence[int] = DEFAULT_TEACHER_STEPS, teacher_guidance: Optional[float] = None,
            prompts: Optional[Sequence[str]] = None, seed: int = 0, batch_size: int = 64, device: str = "cpu",
            out_dir: Optional[str] = None, student_names: Optional[Sequence[str]] = None,
            log: Callable = print, progress: bool = True) -> dict:
    """Rows for the teacher at each of ``teacher_steps`` and each student at its recommended call."""
    common = {"prompts": prompts, "batch_size": batch_size, "seed": seed, "progress": progress}
    for p in [teacher, *students]:  # fail before the (long) teacher rows, not after them
        if not (Path(p) / "model_index.json").is_file() and (Path(p).exists() or str(p).startswith((".", "/", "~"))):
            from ..config import ConfigError

            raise ConfigError(f"{p} is not a diffusers pipeline folder (no model_index.json)")
    t0 = time.perf_counter()
    suite.prepare()
    rows = []
    tpipe = open_pipeline(teacher, device)
    tg = teacher_guidance if teacher_guidance is not None else recommended(teacher)["guidance_scale"]
    for k in teacher_steps:
        rows.append(_row("teacher", teacher, tpipe, int(k), tg, suite, num_images, common, log))
    del tpipe
    names = list(student_names or [])
    for i, path in enumerate(students):
        rec = recommended(path)
        name = names[i] if i < len(names) else (f"{rec['objective'] or 'student'}-{rec['num_inference_steps']}step")
        spipe = open_pipeline(path, device)
        rows.append(_row(name, path, spipe, rec["num_inference_steps"], rec["guidance_scale"], suite, num_images,
                         common, log))
        del spipe
    metric = main_metric(rows)
    result = {"teacher": str(teacher), "students": [str(s) for s in students], "num_images": num_images, "seed": seed,
              "batch_size": batch_size, "device": device, "fid_backend": suite.backend, "rows": rows,
              "main_metric": metric, "speedups": speedups(rows, metric, metric != "clip_score") if metric else [],
              "seconds": time.perf_counter() - t0}
    if out_dir:
        write_outputs(result, out_dir)
    return result


def average_over_seeds(results: Sequence[dict]) -> dict:
    """One result from :func:`compare` runs that differ only in their sampling ``seed``: each row's metrics (and time
    per image) become the mean over the seeds, with ``<metric>_std`` (sample standard deviation) and
    ``<metric>_seeds`` (every seed's value) beside them; the speed-ups are recomputed on the means.  With 1000 images
    the digits-FID of one student moves by about 0.15 from one sampling seed to the next (docs/results)."""
    if not results:
        raise ValueError("average_over_seeds needs at least one compare() result")
    keys = [(r["model"], r["steps"]) for r in results[0]["rows"]]
    for res in results[1:]:
        if [(r["model"], r["steps"]) for r in res["rows"]] != keys:
            raise ValueError("average_over_seeds: the results have different rows")
    rows = []
    for i, first in enumerate(results[0]["rows"]):
        row = dict(first)
        for k in (*COLUMNS, "sec_per_image"):
            if k not in first:
                continue
            vals = [float(res["rows"][i][k]) for res in results]
            mean = sum(vals) / len(vals)
            row[k] = mean
            if k != "sec_per_image":
                row[f"{k}_std"] = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
                row[f"{k}_seeds"] = vals
        row["seeds"] = [res["seed"] for res in results]
        rows.append(row)
    out = dict(results[0], rows=rows, seed=[res["seed"] for res in results],
               seconds=sum(res["seconds"] for res in results))
    metric = main_metric(rows)
    out["speedups"] = speedups(rows, metric, metric != "clip_score") if metric else []
    return out


def main_metric(rows: list) -> Optional[str]:
    for k in ("digits_fid", "fid", "clip_score", "class_accuracy"):
        if rows and all(k in r for r in rows):
            return k
    return None


def markdown(result: dict) -> str:
    rows = result["rows"]
    cols = [("model", "model", str), ("steps", "steps", str), ("nfe", "NFE", str)]
    labels = {"digits_fid": "digits-FID", "fid": "FID", "class_accuracy": "class acc.", "clip_score": "CLIP score",
              **{k: k for k in DIVERSITY_COLUMNS}}
    for k in COLUMNS:
        if any(k in r for r in rows):
            cols.append((k, labels[k], None))
    cols.append(("sec_per_image", "ms / image", lambda v: f"{v * 1000:.2f}"))

    def cell(r, k, fmt):
        if k not in r:
            return "-"
        if fmt is not None:
            return fmt(r[k])
        if not isinstance(r[k], float):
            return "-"
        return f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if k + "_std" in r else f"{r[k]:.4f}"

    head = "| " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r, k, fmt) for k, _, fmt in cols) + " |")
    seeds = next((r["seeds"] for r in rows if "seeds" in r), None)
    if seeds:
        lines.append(f"\nmean ± standard deviation over {len(seeds)} sampling seeds ({', '.join(map(str, seeds))}); "
                     f"the same trained students, {result.get('num_images', '?')} new images per seed.")
    div = next((r["diversity"] for r in rows if "diversity" in r), None)
    if div:
        lines.append(f"\nprecision / recall: k={div['k_pr']} nearest neighbours (Kynkaanniemi et al. 2019); density / "
                     f"coverage: k={div['k_dc']} (Naeem et al. 2020); {div['num_images']} images per row vs "
                     f"{div['num_ref']} reference features.")
    for s in result.get("speedups", []):
        m = labels.get(s["metric"], s["metric"])
        if s["teacher_at_least_as_good"]:
            lines.append(f"\n{s['student']}: speed-up {s['speedup']:.1f}x (measured time per image) over the teacher "
                         f"at {s['teacher_steps']} steps, the fewest steps at which the teacher is at least as good "
                         f"({m} {s['teacher_value']:.4f} vs {s['student_value']:.4f}).")
        else:
            lines.append(f"\n{s['student']}: better {m} than the teacher at any step count tried "
                         f"({s['student_value']:.4f} vs {s['teacher_value']:.4f} at {s['teacher_steps']} steps), "
                         f"speed-up {s['speedup']:.1f}x (measured time per image).")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> Optional[Path]:
    """Main metric vs NFE (log-x): the teacher as a line, each student as a labelled marker."""
    metric = result.get("main_metric")
    if not metric:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"digits_fid": "digits-FID (lower is better)", "fid": "FID (lower is better)",
              "class_accuracy": "class accuracy", "clip_score": "CLIP score (higher is better)"}
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    t = sorted((r for r in result["rows"] if r["model"] == "teacher"), key=lambda r: r["nfe"])
    if t:
        ax.plot([r["nfe"] for r in t], [r[metric] for r in t], "o-", color="0.3", label="teacher")
    markers = "s^Dv<>p*"
    for i, r in enumerate(r for r in result["rows"] if r["model"] != "teacher"):
        ax.plot([r["nfe"]], [r[metric]], markers[i % len(markers)], ms=9, label=f"{r['model']} ({r['steps']} step)")
    floor = result.get("floor") or {}
    if metric in floor:  # e.g. real images against the reference: the best a finite sample can score
        ax.axhline(floor[metric], ls="--", color="0.6", lw=1, label=floor.get("label", "real data"))
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel(labels.get(metric, metric))
    if metric.endswith("fid"):
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    plt.close(fig)
    return p


def write_outputs(result: dict, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "compare.md").write_text(markdown(result))
    png = plot(result, out / "compare.png")
    return {"json": str(out / "compare.json"), "markdown": str(out / "compare.md"), "plot": str(png) if png else None}
