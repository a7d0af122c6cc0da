"""Regression on the teacher's probability-flow ODE (DMD's regression term, and its K-step form).

:func:`cached_ode_paths` generates teacher ODE paths once and caches them in the run folder: DMD's (noise, sample)
pairs, or the states at a K-step student's grid.  :class:`TrajectoryRegression` turns the latter into per-step
(input, x0 target) rows for multi-step students (README "Regression on the teacher's ODE").
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..conditions import Condition
from ..sampling import ode_sample, ode_trajectory


def cached_ode_paths(path, teacher, n: int, ode_steps: int, guidance_scale, accelerator, data=None,
                     times=None) -> dict:
    """Teacher probability-flow ODE paths for regression terms, generated once (main process, seed 1234) and cached in
    ``path`` (safetensors, written atomically); conditions come from the run's data source (``data.prompts``).

    ``times`` None: ``{"path": [noise, sample]}`` (DMD's pairs: the ODE from pure noise at t = 1, ``ode_steps``
    uniform steps).  ``times`` (a student grid, noisiest first): ``{"path": [x_{times[0]}, ..., x_{times[-1]}, x_0]}``
    from :func:`~fewstep.sampling.ode_trajectory`.  Both with ``"cond"``: the :class:`Condition` of every row."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    want = 2 if times is None else len(times) + 1
    if accelerator.is_main_process and not _has_paths(path, want):
        t0 = time.perf_counter()
        print(f"fewstep: regression term: {n} teacher ODE paths of {ode_steps} DDIM steps -> {path} (once)",
              file=sys.stderr, flush=True)
        g = torch.Generator().manual_seed(1234)
        paths, conds = [[] for _ in range(want)], []
        dev = accelerator.device
        for i in range(0, n, 256):
            m = min(256, n - i)
            cond = teacher.sample_conditions(m, g, data)
            z = torch.randn((m, *teacher.sample_shape), generator=g).to(dev)
            with torch.no_grad():
                if times is None:
                    states = [z, ode_sample(teacher, z, cond.to(dev), ode_steps, guidance_scale=guidance_scale)]
                else:
                    states = ode_trajectory(teacher, z, cond.to(dev), times, ode_steps, guidance_scale=guidance_scale)
            for j, x in enumerate(states):
                paths[j].append(x.cpu())
            conds.append(cond)
        tensors = {f"path.{j}": torch.cat(v).contiguous() for j, v in enumerate(paths)}
        for k, v in vars(Condition.cat(conds)).items():
            if v is not None:
                tensors[f"cond.{k}"] = v.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
        print(f"fewstep: regression term: paths cached in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    d = load_file(str(path))
    return {"path": [d[f"path.{j}"] for j in range(want)],
            "cond": Condition(**{k[5:]: v for k, v in d.items() if k.startswith("cond.")})}


def _has_paths(path, want: int) -> bool:
    """``path`` holds ``want`` path tensors (an older or other-length cache is made again)."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {f"path.{j}" for j in range(want)} <= set(f.keys()) and f"path.{want}" not in set(f.keys())


class TrajectoryRegression:
    """Per-step regression rows from teacher ODE states ``path = [x_{t_0}, ..., x_{t_K} = x_0]`` on the grid ``bounds``
    (``[t_0, ..., t_{K-1}, 0]``).

    Step k's input is the teacher's ``x_{t_k}``; its x0 target (:meth:`targets`) is the x0 whose DDIM/Euler move lands
    on the teacher's ``x_{t_{k+1}}`` (so a K-step sampler meeting every target retraces the teacher's ODE), or with
    re-noising moves (``renoise``: the next input is fresh noise around x0) the teacher's final sample.
    """

    def __init__(self, path: list, cond: Condition, schedule, bounds: list, renoise: bool):
        self.inputs, self.cond, self.bounds = path[:-1], cond, bounds
        self.x0 = self.targets(path, schedule, bounds, renoise)

    @staticmethod
    def targets(path: list, schedule, bounds: list, renoise: bool) -> list:
        steps, out = len(path) - 1, []
        for k in range(steps):
            if k == steps - 1 or renoise:
                out.append(path[-1])
                continue
            t = torch.full((path[k].shape[0],), bounds[k])
            out.append(schedule.ddim_x0(path[k], path[k + 1], t, torch.full_like(t, bounds[k + 1])))
        return out

    def rows(self, k: int, n: int, generator: torch.Generator, device, upto: bool = False):
        """``(x, t, cond, x0_target)`` of ``n`` random paths at step ``k`` (``upto``: each row at a random step 0..k:
        one network serving every step keeps the earlier ones too)."""
        idx = torch.randint(len(self.inputs[k]), (n,), generator=generator)
        ks = torch.randint(k + 1, (n,), generator=generator) if upto else torch.full((n,), k)
        pick = list(zip(ks.tolist(), idx.tolist()))
        x = torch.stack([self.inputs[j][i] for j, i in pick]).to(device)
        y = torch.stack([self.x0[j][i] for j, i in pick]).to(device)
        t = torch.tensor([self.bounds[j] for j, _ in pick], device=device)
        return x, t, self.cond[idx].to(device), y
