"""Analytic Gaussian-mixture teacher: the exact posterior mean, for tests and toys.

Data: ``x0 ~ sum_k w_k N(mu_k, std_k^2 I)``, each component a class.  Under ``x_t = a x0 + s eps`` the
noised mixture is again a mixture, so ``E[x0 | x_t, class]`` is closed-form: a teacher with no
approximation error, against which a distilled student's distribution can be judged.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditions import NULL_CLASS, Condition
from ..schedules import NoiseSchedule, _bcast, make_schedule
from .base import Denoiser, Teacher


@dataclass
class Mixture:
    means: Tensor  # (K, D)
    stds: Tensor  # (K,) isotropic std per component
    weights: Tensor  # (K,) sums to 1

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator, labels: Optional[Tensor] = None):
        """``n`` samples and their component labels (drawn by weight unless ``labels`` is given)."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=self.means.dtype)
        return self.means[labels] + self.stds[labels, None] * z, labels

    def nearest_mode_spacing(self) -> float:
        d = torch.cdist(self.means, self.means)
        d.fill_diagonal_(float("inf"))
        return float(d.min())

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, labels: Optional[Tensor]) -> Tensor:
        """``E[x0 | x_t]`` (``labels`` None or NULL_CLASS entries: the whole mixture; else that component)."""
        dt = torch.float64
        x = x_t.to(dt)
        a = _bcast(alpha.to(dt), x)[..., None]  # (B, 1, 1)
        s = _bcast(sigma.to(dt), x)[..., None]
        mu = self.means.to(x.device, dt)[None]  # (1, K, D)
        var_x0 = (self.stds.to(x.device, dt) ** 2)[None, :, None]  # (1, K, 1)
        var = a**2 * var_x0 + s**2  # (B, K, 1)
        diff = x[:, None, :] - a * mu  # (B, K, D)
        loglik = -0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * self.dim * var[..., 0].log()
        logits = loglik + self.weights.to(x.device, dt).log()[None]
        if labels is not None:
            labels = labels.to(x.device)
            cond = labels != NULL_CLASS
            mask = F.one_hot(labels.clamp_min(0), self.num_classes).bool() | ~cond[:, None]
            logits = logits.masked_fill(~mask, float("-inf"))
        r = torch.softmax(logits, dim=1)[..., None]  # (B, K, 1)
        comp_mean = mu + a * var_x0 / var * diff
        return (r * comp_mean).sum(1).to(x_t.dtype)

    def to_json(self) -> dict:
        return {"means": self.means.tolist(), "stds": self.stds.tolist(), "weights": self.weights.tolist()}


def _ring(k: int, radius: float, std: float) -> Mixture:
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = torch.stack([radius * ang.cos(), radius * ang.sin()], 1)
    return Mixture(means, torch.full((k,), std, dtype=torch.float64), torch.full((k,), 1.0 / k, dtype=torch.float64))


def _grid(n: int, spacing: float, std: float) -> Mixture:
    c = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    means = torch.cartesian_prod(c, c)
    k = means.shape[0]
    return Mixture(means, torch.full((k,), std, dtype=torch.float64), torch.full((k,), 1.0 / k, dtype=torch.float64))


BUILTIN = {
    "ring8": lambda: _ring(8, 2.0, 0.1),  # 8 equal modes on a circle of radius 2
    "grid9": lambda: _grid(3, 1.5, 0.1),  # 3x3 grid
    # unequal weights and stds (multi-step diversity checks): 6 classes, stds 0.05..0.3, weights 0.05..0.3
    "uneq6": lambda: Mixture(torch.tensor([[-2.0, -1.0], [0.0, -2.0], [2.0, -1.0], [2.0, 1.5], [0.0, 2.0],
                                           [-2.0, 1.5]], dtype=torch.float64),
                             torch.tensor([0.05, 0.3, 0.1, 0.2, 0.15, 0.08], dtype=torch.float64),
                             torch.tensor([0.3, 0.1, 0.05, 0.25, 0.2, 0.1], dtype=torch.float64)),
    # 3 close modes of very different size: a wide heavy one next to two narrow light ones
    "skew3": lambda: Mixture(torch.tensor([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2]], dtype=torch.float64),
                             torch.tensor([0.35, 0.06, 0.12], dtype=torch.float64),
                             torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)),
    "line4": lambda: Mixture(torch.tensor([[-1.0], [0.0], [1.0], [2.0]], dtype=torch.float64),
                             torch.full((4,), 0.05, dtype=torch.float64),
                             torch.full((4,), 0.25, dtype=torch.float64)),  # 1-D data on {-1, 0, 1, 2}
}


def load_mixture(spec: str) -> Mixture:
    """``NAME`` of a built-in mixture, or a JSON file ``{"means": [[..]..], "stds": [..], "weights": [..]}``."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path = Path(spec)
    if path.suffix != ".json":
        raise ValueError(f"unknown GMM teacher 'gmm:{spec}'; use one of {sorted(BUILTIN)} or gmm:FILE.json")
    if not path.is_file():
        raise FileNotFoundError(f"GMM file not found: {spec}")
    try:
        obj = json.loads(path.read_text())
        means = torch.tensor(obj["means"], dtype=torch.float64)
        k = means.shape[0]
        stds = torch.tensor(obj.get("stds", [0.1] * k), dtype=torch.float64)
        weights = torch.tensor(obj.get("weights", [1.0] * k), dtype=torch.float64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed GMM file {spec}: {e}; expected {{'means': [[x, y], ...], 'stds': [...], 'weights': [...]}}") from None
    if means.ndim != 2 or stds.shape != (k,) or weights.shape != (k,):
        raise ValueError(f"malformed GMM file {spec}: means must be (K, D), stds and weights (K,)")
    if not torch.all(stds > 0) or not torch.all(weights > 0):
        raise ValueError(f"malformed GMM file {spec}: stds and weights must be positive")
    return Mixture(means, stds, weights / weights.sum())


class ResidualMLP(nn.Module):
    """Trainable correction on top of the analytic prediction: ``MLP([x, fourier(t), emb(class)])``.

    The last layer is zero-initialised, so a fresh network equals the teacher exactly ("initialised
    from the teacher", as DMD's student and critic are).  ``body`` output is the bottleneck feature.
    ``jump=True`` adds ``fourier(d)`` of a flow-map student's jump length ``d`` to the input.
    ``guidance_dim > 0`` adds ``guidance_dim`` Fourier features of a scalar ``w`` (``cond.guidance_w``: the
    guidance embedding of LCM-style students, or SLAM's gamma); 0, the default, leaves the network as it was.
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 3, n_freq: int = 8,
                 jump: bool = False, guidance_dim: int = 0):
        super().__init__()
        if guidance_dim < 0 or guidance_dim % 2:
            raise ValueError(f"guidance_dim must be an even number >= 0, got {guidance_dim}")
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), n_freq)), persistent=False)
        self.class_emb = nn.Embedding(num_classes + 1, 16)  # last index: null class
        self.jump = jump
        self.guidance_dim = guidance_dim
        if guidance_dim:  # periods from ~1.5 to ~25: w in [0, ~15] (LCM form) or gamma - 1 in [-1, 0]
            self.register_buffer("w_freqs", torch.exp(torch.linspace(math.log(0.25), math.log(4.0), guidance_dim // 2)),
                                 persistent=False)
        layers, width = [], dim + 2 * n_freq * (2 if jump else 1) + 16 + guidance_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.num_classes = num_classes

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, d: Optional[Tensor] = None,
                w: Optional[Tensor] = None) -> Tensor:
        ang = t[:, None].to(x.dtype) * self.freqs[None].to(x.dtype)
        lab = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        parts = [x, ang.sin(), ang.cos(), self.class_emb(lab).to(x.dtype)]
        if self.jump:
            if d is None:
                raise ValueError("this flow-map student needs a jump length (cond.jump)")
            dang = d.reshape(-1, 1).to(x.dtype) * self.freqs[None].to(x.dtype)
            parts += [dang.sin(), dang.cos()]
        elif d is not None:
            raise ValueError("this network has no jump input (only flow-map students take cond.jump)")
        if self.guidance_dim:
            if w is None:
                raise ValueError("this network has a guidance embedding: the condition needs guidance_w")
            wa = w.reshape(-1, 1).to(x.dtype) * self.w_freqs[None].to(x.dtype)
            parts += [wa.sin(), wa.cos()]
        elif w is not None:
            raise ValueError("this network has no guidance embedding (the condition carries guidance_w)")
        return self.out(self.body(torch.cat(parts, 1)))


class GMMNet(nn.Module):
    """The GMM family's network: analytic posterior mean (as native prediction) + optional residual MLP."""

    def __init__(self, mixture: Mixture, residual: Optional[ResidualMLP] = None, analytic: bool = True):
        super().__init__()
        self.register_buffer("means", mixture.means.float())
        self.register_buffer("stds", mixture.stds.float())
        self.register_buffer("weights", mixture.weights.float())
        self.residual = residual
        self.analytic = analytic  # False: the residual MLP alone (a plain network, e.g. BOOT's noise -> signal map)

    @property
    def mixture(self) -> Mixture:
        return Mixture(self.means.double(), self.stds.double(), self.weights.double())

    def spec(self) -> dict:
        """Non-default ``GMMTeacher.new_network`` keywords that rebuild this network (saved with toy students)."""
        out = {}
        if self.residual is not None and self.residual.jump:
            out["jump"] = True
        if self.residual is not None and self.residual.guidance_dim:
            out["guidance_dim"] = self.residual.guidance_dim
        if not self.analytic:
            out["analytic"] = False
        return out


class GMMDenoiser(Denoiser):
    feature_module = "residual.body"

    def __init__(self, net: GMMNet, schedule: NoiseSchedule):
        super().__init__(net, schedule, "velocity" if schedule.kind == "flow" else "v")

    def net_call(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        labels = cond.class_labels if cond is not None and cond.class_labels is not None else \
            torch.full((x_t.shape[0],), NULL_CLASS, dtype=torch.long, device=x_t.device)
        if getattr(self.net, "analytic", True):
            tc = t.clamp(1e-4, 1.0)  # keep eps/v conversions finite at t = 0
            a, s = self.schedule.alpha(tc), self.schedule.sigma(tc)
            mix = Mixture(self.net.means, self.net.stds, self.net.weights)
            x0 = mix.posterior_mean(x_t, a, s, labels)
            base = self.schedule.convert(x0, "x0", self.prediction, x_t, tc)
        else:
            base = torch.zeros_like(x_t)
        jump = cond.jump if cond is not None else None
        w = cond.guidance_w if cond is not None else None
        if self.net.residual is not None:
            base = base + self.net.residual(x_t, t, labels, jump, w)
        elif jump is not None:
            raise ValueError("this network has no jump input (only flow-map students take cond.jump)")
        elif w is not None:
            raise ValueError("this network has no guidance embedding (the condition carries guidance_w)")
        return base


class GMMTeacher(Teacher):
    family = "gmm"
    supports_jump = True  # new_network(..., jump=True) gives a flow-map student
    exports_pipeline = False  # students are student.safetensors + student.json (save_student), not pipelines
    student_folder = "student"  # where a run keeps it
    needs_image_folder = False  # real samples are drawn from the mixture itself
    panel_samples = 1000  # a scatter plot wants many points

    def __init__(self, mixture: Mixture, schedule: str = "vp", guidance_scale: float = 1.0, name: str = "custom"):
        self.mixture = mixture
        self.name = name
        super().__init__(GMMDenoiser(GMMNet(mixture), make_schedule(schedule)), guidance_scale)
        self.sample_shape = (mixture.dim,)
        self.feature_channels = 128

    def new_network(self, role: str, jump: bool = False, guidance_dim: int = 0, analytic: bool = True) -> Denoiser:
        """Analytic posterior mean + a zero-initialised residual MLP: equal to the teacher at start.

        ``jump``: a flow-map jump-length input; ``guidance_dim``: Fourier features of ``cond.guidance_w``
        (a guidance embedding); ``analytic=False``: the residual MLP alone (starts at zero).
        """
        net = GMMNet(self.mixture, ResidualMLP(self.mixture.dim, self.mixture.num_classes, jump=jump,
                                               guidance_dim=guidance_dim), analytic=analytic)
        d = GMMDenoiser(net, self.schedule)
        d.train()
        return d

    def sample_conditions(self, n, generator, data=None):
        labels = torch.multinomial(self.mixture.weights, n, replacement=True, generator=generator)
        return Condition(class_labels=labels)

    def real_samples(self, n, generator, data=None):
        x, labels = self.mixture.sample(n, generator)
        return x.float(), Condition(class_labels=labels)

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def describe(self):
        d = super().describe()
        d.update(name=self.name, num_classes=self.mixture.num_classes)
        return d

    # ---- the trained student: saved, loaded and judged against the exact answer ------------------
    def write_panel(self, x0, path, title):
        from ..toy import scatter_panels

        scatter_panels({title: x0.cpu()}, str(path))

    def save_student(self, student, objective, folder, run_config=None) -> dict:
        """``student.safetensors`` + ``student.json`` (objective, steps, times, mixture, network keywords), atomically."""
        from ..export import atomic_dir

        with atomic_dir(Path(folder)) as tmp:
            _write_toy_student(student, objective, self, tmp)
        return {}

    def load_student(self, folder, objective=None):
        """The saved student, in the objective's own student module when given (the network it trained)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "student.safetensors").is_file():
            raise FileNotFoundError(f"{folder.parent} has no trained student yet ({folder.name}/student.safetensors)")
        meta = folder / "student.json"
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        kw = dict(info.get("network", {}))
        if info.get("jump"):
            kw["jump"] = True
        if objective is not None:
            student = objective.student_module(objective.networks())
        else:
            student = self.new_network("student", **kw)
        student.load_state_dict(load_file(str(folder / "student.safetensors")))
        student.eval()
        return student

    def evaluate(self, objective, student, **kw) -> dict:
        return evaluate_toy(self, objective, student, **kw)

    def evaluate_run(self, objective, student, run_dir) -> dict:
        """Teacher ODE vs student against the true mixture (``toy_table``), and ``samples.png`` of the three."""
        from ..export import atomic_file
        from ..toy import scatter_panels

        res = evaluate_toy(self, objective, student)
        samples = res.pop("_samples")
        plot = Path(run_dir) / "samples.png"
        with atomic_file(plot, "sample plot ") as tmp:
            scatter_panels(
                {"data (true mixture)": samples["data"], f"teacher ODE ({res['teacher']['nfe']} NFE)": samples["teacher"],
                 f"student ({objective.steps} step)": samples["student"]}, str(tmp))
        return {"eval": res, "plot": str(plot), "table": toy_table(res)}


# ---- students of the analytic teacher ------------------------------------------------------------
def _write_toy_student(student, objective, teacher, out: Path) -> None:
    from safetensors.torch import save_file

    net = getattr(student, "net", None)  # None: a multi-network student (phased experts), rebuilt by its objective
    sd = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(sd, str(out / "student.safetensors"))
    (out / "student.json").write_text(json.dumps({
        "objective": objective.name, "student_steps": objective.steps, "times": objective.times,
        "teacher": teacher.describe(), "mixture": teacher.mixture.to_json(),
        "jump": bool(getattr(getattr(net, "residual", None), "jump", False)),  # flow-map student
        # the new_network keywords that rebuild this network (guidance embedding, residual-only, ...)
        "network": net.spec() if hasattr(net, "spec") else {},
    }, indent=2))


# ---- evaluation on the known answer --------------------------------------------------------------
_REFERENCES: dict = {}  # evaluate_toy's teacher half, by (mixture, schedule, guidance, n, seed, ode_steps, device)


def _teacher_reference(teacher, n: int, seed: int, ode_steps: int) -> dict:
    """The fixed data, conditions, noise and teacher ODE samples (with their scores) that every student of this teacher
    is judged against: computed once per process (a benchmark or a test session evaluates many students).  The key is
    what determines them: the analytic teacher is its mixture, its schedule and its guidance scale."""
    import time

    from ..sampling import ode_sample
    from ..toy import energy_distance, mode_stats

    mix, dev, gs = teacher.mixture, teacher.device, teacher.guidance_scale
    key = (json.dumps(mix.to_json()), teacher.schedule.kind, gs, n, seed, ode_steps, str(dev))
    if key not in _REFERENCES:
        g = torch.Generator().manual_seed(seed)
        data, _ = mix.sample(n, g)
        cond = teacher.sample_conditions(n, g)
        noise = torch.randn((n, *teacher.sample_shape), generator=g)
        t0 = time.perf_counter()
        x_t = ode_sample(teacher, noise.to(dev), cond.to(dev), ode_steps, guidance_scale=gs).cpu()
        t_teacher = time.perf_counter() - t0
        _REFERENCES[key] = {"data": data.float(), "cond": cond, "noise": noise, "x_t": x_t,
                            "energy_distance": energy_distance(x_t, data.float()), "modes": mode_stats(x_t, mix),
                            "sec_per_1k": t_teacher * 1000 / n}
    ref = _REFERENCES[key]
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in ref.items()}  # callers may keep or change them


@torch.no_grad()
def evaluate_toy(teacher, objective, student, n: int = 5000, seed: int = 123, ode_steps: int = 100) -> dict:
    """Teacher ODE vs student on a GMM: energy distance to the true mixture, modes, NFE, time per 1k samples."""
    import time

    from ..toy import energy_distance, mode_stats

    mix = teacher.mixture
    ref = _teacher_reference(teacher, n, seed, ode_steps)
    data, cond, noise, x_t = ref["data"], ref["cond"], ref["noise"], ref["x_t"]
    dev = teacher.device
    gs = teacher.guidance_scale
    student = student.to(dev).eval()
    t0 = time.perf_counter()
    x_s = objective.sample(student, noise.to(dev), cond.to(dev), generator=torch.Generator().manual_seed(seed + 1)).cpu()
    t_student = time.perf_counter() - t0
    cfg_mult = 1 if gs in (None, 1.0) else 2
    spacing = mix.nearest_mode_spacing()
    res = {
        "teacher": {"sampler": f"DDIM ODE, {ode_steps} steps", "nfe": ode_steps * cfg_mult,
                    "energy_distance": ref["energy_distance"], **ref["modes"], "sec_per_1k": ref["sec_per_1k"]},
        "student": {"sampler": f"{objective.name}, {objective.steps} step(s)", "nfe": objective.steps,
                    "energy_distance": energy_distance(x_s, data), **mode_stats(x_s, mix),
                    "sec_per_1k": t_student * 1000 / n},
        "endpoint_error": float((x_s - x_t).norm(dim=1).mean()),
        "nearest_mode_spacing": spacing,
        "num_samples": n,
    }
    res["energy_ratio"] = res["student"]["energy_distance"] / max(res["teacher"]["energy_distance"], 1e-12)
    if hasattr(objective, "tracking_errors"):  # flow maps: the jump f(z, d) vs the teacher's ODE from the same noise
        m = min(n, 2000)
        res["flow_map_tracking"] = objective.tracking_errors(student, noise[:m].to(dev), cond[:m].to(dev))
    res["_samples"] = {"data": data, "teacher": x_t, "student": x_s}
    return res


def toy_table(res: dict) -> str:
    """``evaluate_toy``'s result as a markdown table and two summary lines."""
    rows = [("", "sampler", "NFE", "energy dist.", "modes", "in-mode", "spread", "s / 1k samples")]
    for k in ("teacher", "student"):
        r = res[k]
        rows.append((k, r["sampler"], str(r["nfe"]), f"{r['energy_distance']:.4f}",
                     f"{r['modes_covered']}/{r['num_modes']}", f"{r['in_mode_frac']:.2f}", f"{r['spread']:.2f}",
                     f"{r['sec_per_1k']:.4f}"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
    out = [fmt(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows[1:]]
    out.append(f"student/teacher energy ratio {res['energy_ratio']:.2f}; mean endpoint error vs the teacher ODE "
               f"of the same noise {res['endpoint_error']:.3f} (nearest-mode spacing {res['nearest_mode_spacing']:.2f})")
    if "flow_map_tracking" in res:
        out.append("flow map f(z, d) vs the teacher ODE from the same noise, mean error: " + ", ".join(
            f"d={d}: {e:.4f}" for d, e in res["flow_map_tracking"].items()))
    return "\n".join(out)
