"""The anchor of a multi-step student's earlier steps (one shared network, ``objective.anchor_weight``).

While phase k trains, an MSE term keeps the network's x0 at the earlier steps' inputs on a frozen snapshot of its
trainable weights taken at the start of phase k (a LoRA: the adapter only).  The snapshot is written to
``RUN_DIR/anchor/phaseK.safetensors`` and read back when a run resumes mid-phase, so a resumed run anchors to the
same weights.  Used by :class:`~fewstep.objectives.phased_dmd.PhasedDMD` (and so by dmd2's phased exits).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..conditions import Condition


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class PhaseAnchor:
    """Snapshot, inputs and loss of the anchor; ``bounds``: the student grid ``[t_0, ..., t_{K-1}, 0]``."""

    def __init__(self, bounds: list):
        self.bounds = bounds
        self.run_dir: Optional[Path] = None  # set by the objective's setup(): where snapshots are kept
        self.snapshot: Optional[dict] = None  # trainable name -> frozen tensor, taken at the start of self.phase
        self.phase = -1
        self.phases_seen: set = set()  # phases this process has trained in (a fresh snapshot needs phase k - 1 seen)

    def file(self, k: int) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / "anchor" / f"phase{k}.safetensors"

    def take(self, student_plain, k: int) -> None:
        """The frozen snapshot of phase ``k``: the trainable weights at the phase's first step (saved in the run folder,
        and read back from there when a run resumes mid-phase)."""
        if self.phase == k:
            return
        path = self.file(k)
        names = [n for n, p in student_plain.named_parameters() if p.requires_grad]
        if path is not None and k - 1 not in self.phases_seen and path.is_file():  # resumed mid-phase
            from safetensors.torch import load_file

            saved = load_file(str(path))
            dev = next(student_plain.parameters()).device
            self.snapshot = {n: saved[n].to(dev) for n in names}
        else:
            params = dict(student_plain.named_parameters())
            self.snapshot = {n: params[n].detach().clone() for n in names}
            if path is not None and _is_main_process():
                from safetensors.torch import save_file

                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({n: v.contiguous().cpu() for n, v in self.snapshot.items()}, str(tmp))
                tmp.replace(path)
        self.phase = k

    def inputs(self, states: list, cond: Condition):
        """The earlier steps' inputs as one batch: ``(x_{t_0..t_{k-1}}, their times, cond repeated)``."""
        x = torch.cat(states)
        t = torch.cat([torch.full((v.shape[0],), self.bounds[j], device=v.device) for j, v in enumerate(states)])
        return x, t, Condition.cat([cond] * len(states))

    def loss(self, out: Tensor, student_plain, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """MSE between the network's x0 ``out`` at the earlier steps' inputs ``(x, t)`` and the snapshot's there."""
        from torch.func import functional_call

        with torch.no_grad():
            ref = functional_call(student_plain, self.snapshot, (x, t, cond), strict=False)
        return torch.nn.functional.mse_loss(out.float(), ref.float())
