"""The one accelerate trainer.

It owns everything an objective does not: ``accelerate.prepare`` (DDP/FSDP on many processes), one
AdamW per trainable group, mixed precision, gradient accumulation and clipping, an EMA of the student,
atomic checkpoints with exact resume, tensorboard, progress output, sample grids, and a NaN/inf guard.

Progress (``train.progress``): :mod:`fewstep.progress`.

Randomness: every micro-batch draws all of its noise from a CPU generator seeded by
``(train.seed, step, group, micro-batch, process)``, so a run is a pure function of its config and
resume is exact without saving a data-loader position.  A micro-batch samples (and encodes) conditions only when its
objective uses them (``Objective.wants_conditions``), and real images are VAE-encoded once, before the first step.

Optimizers: one AdamW per group, ``fused`` where torch supports it for the device and dtype, else ``foreach``
(:mod:`fewstep.optim`; the choice is logged and returned by ``fit`` as ``optimizer``, which lands in metrics.json).

Host syncs: logged values stay tensors and are read back once per ``train.log_every`` (one sync for all of them);
the only per-step sync is the divergence guard, one per group (it must know before the update is applied).

Preemption: SIGTERM, SIGINT and SIGUSR1 (``train.save_on_signal``) let the current optimisation step finish, write a
checkpoint and raise :class:`Preempted` (the CLI exits with 128 + the signal number).  Under torchrun the ranks agree
on the stop with one all-reduce of two integers per step, so all of them stop after the same step.

Writes: a checkpoint is written into ``checkpoints/.tmp-checkpoint-STEP``, every file and then the folder are
fsynced, and it is renamed into place; a failed write (disk full, quota, file-size limit, permissions) removes the
temp folder and raises a one-line :class:`~fewstep.export.WriteError`; stale ``.tmp-*`` folders are removed at start.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import sharding
from .errors import CheckpointError, Preempted, TrainingDiverged  # noqa: F401  (re-exported)
from .export import TMP_PREFIX, WriteError, clean_stale, fsync_tree, replace_dir, write_failure
from .objectives.base import Batch
from .memory import trim_heap
from .optim import EMA, apply_impl, make_optimizer, warmup_scheduler
from .progress import PROGRESS, Progress, progress_mode  # noqa: F401  (re-exported)

CKPT_PREFIX = "checkpoint-"
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # train.save_on_signal: finish the step, checkpoint, exit 128 + N
HISTORY_LEN = 1000  # logged rows kept in memory (metrics.json shows the tail); bounded so RSS does not grow


def _seed_for(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _plain_grads(grads: list) -> bool:
    """Gradients on one CPU/CUDA device and dtype, plain dense tensors: torch's foreach kernels take them as one."""
    return bool(grads) and len({(g.device, g.dtype) for g in grads}) == 1 and grads[0].device.type in ("cpu", "cuda") \
        and all(type(g) is torch.Tensor and not g.is_sparse for g in grads)


def _total_norm(grads: list):
    """The 2-norm of all ``grads`` together: ``torch.nn.utils.get_total_norm``'s number (the same kernels), without
    its per-call grouping for plain gradients."""
    if not grads:
        return torch.zeros(())
    with torch.no_grad():
        if _plain_grads(grads):
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        get = getattr(torch.nn.utils, "get_total_norm", None)
        if get is not None:
            return sharding.full(get(grads, 2.0, foreach=None))  # FSDP: the norm of the whole gradient
        return torch.norm(torch.stack([g.norm() for g in grads]))


def _clip_to(params: list, max_norm: float, total) -> None:
    """Scale the gradients by ``min(max_norm / (total + 1e-6), 1)``: torch's ``clip_grads_with_norm_``."""
    grads = [p.grad for p in params if p.grad is not None]
    with torch.no_grad():
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if _plain_grads(grads):
            torch._foreach_mul_(grads, coef)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with their state file), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    cks = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "fewstep_state.json").is_file()]
    return sorted(cks, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


class Trainer:
    def __init__(self, cfg, teacher, objective, data, run_dir, log=print):
        from accelerate import Accelerator
        from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, ProjectConfiguration

        self.cfg, self.teacher, self.obj, self.data = cfg, teacher, objective, data
        self.run_dir = Path(run_dir)
        self.log = log
        tc = cfg.train
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # single process: a fresh accelerate state per run, so a second run in the same process (tests,
            # notebooks) may use another mixed_precision; accelerate's state is otherwise a process-wide singleton
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        sharding.check_launch(objective, cfg)  # FSDP/DeepSpeed launches that cannot work: one line, before accelerate
        self.acc = Accelerator(
            # torchrun on CPUs: accelerate starts DDP over gloo only when told the run is CPU-only
            cpu=world > 1 and not torch.cuda.is_available(),
            mixed_precision=tc.mixed_precision,
            log_with=None if tc.tracker == "none" else tc.tracker,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                             # with gradient checkpointing, no autocast weight cache: it would hold a 16-bit copy of
                             # every float32 weight used in a forward until the step ends (for a full SDXL student,
                             # 5 GB) where checkpointing otherwise drops them with the block's activations
                             *([AutocastKwargs(cache_enabled=False)] if tc.gradient_checkpointing else [])],
        )
        self.fsdp = sharding.enable_cpu_fsdp(self.acc) or sharding.is_fsdp(self.acc)  # FSDP2 (fewstep.sharding)
        sharding.configure_deepspeed(self.acc, cfg)
        self.device = self.acc.device
        self._trim_heap = self.device.type == "cpu" and tc.gradient_checkpointing
        teacher.to(self.device)
        self.names = list(objective.networks().keys())
        modules = [objective.networks()[n].to(self.device) for n in self.names]
        optims = []
        self.optim_impl: dict[str, str] = {}  # group -> fused / foreach / for-loop (fewstep.optim)
        for n, m in zip(self.names, modules):
            params = [p for p in m.parameters() if p.requires_grad]
            opt, self.optim_impl[n] = make_optimizer(tc.optimizer, params, lr=tc.lr * objective.lr_scale(n),
                                                     betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay)
            optims.append(opt)
        # FSDP: an unsharded frame of the student (parameters on the meta device) for export and sample grids
        self._frame = sharding.meta_copy(modules[self.names.index("student")]) \
            if self.fsdp and "student" in self.names else None
        self._gathered = None  # FSDP: the gathered student that a sample grid reads (main process, while sampling)
        prepared_m, prepared_o = sharding.prepare(self.acc, modules, optims)  # one call per network under FSDP2
        self.wrapped = dict(zip(self.names, prepared_m))
        self.optims = dict(zip(self.names, prepared_o))
        from accelerate.utils import DistributedType

        # one process: prepare() wrapped nothing (unwrap_model would return the same modules, but its check for
        # torch.compile imports torch._dynamo: 1-2 s before the first step)
        single = self.acc.distributed_type == DistributedType.NO
        self.plain = {n: m if single else self.acc.unwrap_model(m) for n, m in self.wrapped.items()}
        # the torch optimizer itself where accelerate's plain wrapper adds nothing (no fp16 grad scaler, not XLA; not
        # a DeepSpeed wrapper): step/zero_grad then skip its per-call package lookups and signature inspection
        from accelerate.optimizer import AcceleratedOptimizer

        direct = self.acc.distributed_type != DistributedType.XLA
        self._step_opt = {n: (o.optimizer if direct and type(o) is AcceleratedOptimizer and o.scaler is None else o)
                          for n, o in self.optims.items()}
        self._params = {n: self._trainable(m) for n, m in self.wrapped.items()}  # what the guard and clipping read
        # one process, no grad scaler: accelerate's clip_grad_norm_ is torch's (after unscaling nothing), its
        # backward is loss.backward() (after dividing by 1), its autocast is a no-op without mixed precision
        self._plain_clip = single and self.acc.scaler is None
        self._plain_backward = self.acc.scaler is None and self.acc.distributed_type != DistributedType.DEEPSPEED \
            and self.acc.gradient_accumulation_steps == 1
        self._autocast = self.acc.autocast if self.acc.native_amp else nullcontext
        self.ema = None
        if tc.ema_decay > 0:  # diffusers' EMAModel rule and checkpoint format, foreach update (fewstep.optim.EMA)
            self.ema = EMA(self._trainable(self.plain["student"]), decay=tc.ema_decay)
            self.ema.to(self.device)
            self.acc.register_for_checkpointing(self.ema)
        for m in objective.state_modules().values():  # objective-owned state (e.g. an EMA target): checkpointed
            m.to(self.device)
            self.acc.register_for_checkpointing(m)
        # train.lr_warmup_steps: a LambdaLR per group on the torch optimizer made above (what DDP/FSDP/DeepSpeed step),
        # stepped with that group's own optimizer steps; registered last, so runs without it checkpoint as before
        self._raw_opts = dict(zip(self.names, optims))
        self.schedulers = {n: warmup_scheduler(o, tc.lr_warmup_steps) for n, o in self._raw_opts.items()} \
            if tc.lr_warmup_steps > 0 else {}
        for sched in self.schedulers.values():
            self.acc.register_for_checkpointing(sched)
        self.step = 0
        self.history: list[dict] = []  # the last HISTORY_LEN logged rows
        self._signal = 0  # first stop signal received (0: none)

    @staticmethod
    def _trainable(module: nn.Module) -> list:
        return [p for p in module.parameters() if p.requires_grad]

    # ---- batches ------------------------------------------------------------------------------
    def make_batch(self, step: int, group_idx: int, micro: int, shared: Optional[dict] = None) -> Batch:
        g = torch.Generator().manual_seed(_seed_for(self.cfg.train.seed, step, group_idx, micro, self.acc.process_index))
        n = self.cfg.train.batch_size
        cond = None  # conditions (prompts sampled and encoded) only for a loss that reads them
        if self.obj.wants_conditions(self.names[group_idx], step):
            cond = self.teacher.sample_conditions(n, g, self.data).to(self.device)
        real = real_cond = None
        if self.obj.wants_real(step):
            got = self.teacher.real_samples(n, g, self.data)
            if got is None:
                raise ValueError("this objective needs real samples but the teacher/data provide none (set data.images)")
            real, real_cond = got[0].to(self.device), got[1].to(self.device)
        return Batch(size=n, cond=cond, generator=g, device=self.device, real=real, real_cond=real_cond,
                     shared=shared)

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-STEP`` atomically: save into a temp dir, fsync its files and then the dir,
        rename.  A failed write removes the temp dir (the previous checkpoint stays) and raises a WriteError on
        every process."""
        root = self.run_dir / "checkpoints"
        final = root / f"{CKPT_PREFIX}{self.step:07d}"
        tmp = root / f"{TMP_PREFIX}{CKPT_PREFIX}{self.step:07d}"
        main = self.acc.is_main_process
        err: Optional[BaseException] = None

        def phase(fn, on_all: bool):
            nonlocal err
            if err is None and (on_all or main):
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - classified below; anything else is re-raised
                    err = e
            if self._any_process(err is not None) and err is None:
                err = WriteError(f"cannot write checkpoint {final}: another process failed to write its part")

        def prepare():
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)

        def commit():
            with open(tmp / "fewstep_state.json", "w") as f:
                json.dump({"step": self.step, "objective": self.obj.name}, f)
            fsync_tree(tmp)  # every file, then the folder: a checkpoint with a complete name is complete on disk
            replace_dir(tmp, final)  # an existing one (same step) is renamed aside, deleted once the new is in
            for old in list_checkpoints(self.run_dir)[: -max(1, self.cfg.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)

        try:
            phase(prepare, on_all=False)
            phase(lambda: self.acc.save_state(str(tmp)), on_all=True)
            phase(commit, on_all=False)
        except BaseException:  # interrupted (KeyboardInterrupt with save_on_signal off): no half-written folder
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if err is not None:
            failure = err if isinstance(err, WriteError) else write_failure(err, final, "checkpoint ", written=tmp)
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise (failure or err) from None
        return final

    def maybe_resume(self) -> Optional[Path]:
        if not self.cfg.train.resume:
            return None
        cks = list_checkpoints(self.run_dir)
        if not cks:
            return None
        ck = cks[-1]
        try:
            state = json.loads((ck / "fewstep_state.json").read_text())
            self.acc.load_state(str(ck))
        except Exception as e:  # corrupt or truncated files
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {ck} is unreadable ({msg[:200]}); delete it to resume from an "
                                  f"earlier one, or set train.resume=false to start over") from None
        self.step = int(state["step"])
        for n, opt in self.optims.items():  # load_state_dict restored the saved groups' flags: use this run's choice
            apply_impl(opt, self.optim_impl[n])
        return ck

    # ---- training -----------------------------------------------------------------------------
    def _params_finite(self) -> bool:
        ok = all(torch.isfinite(sharding.local(p)).all() for m in self.plain.values() for p in m.parameters())
        return not self._any_process(not ok)

    def _any_process(self, bad) -> bool:
        """Whether ``bad`` (a bool, or a bool tensor on the device: read back once here) holds on any process."""
        if self.acc.num_processes == 1:
            return bool(bad)
        flag = torch.as_tensor(bad, device=self.device).float().reshape(1)
        return float(self.acc.reduce(flag, "sum")) > 0

    def _to_host(self, logs: dict) -> dict:
        """Logged values as floats: every tensor read back in one transfer (one host sync per logging step)."""
        keys = [k for k, v in logs.items() if torch.is_tensor(v)]
        if keys:
            vals = torch.stack([logs[k].detach().float().reshape(()).to(self.device) for k in keys]).tolist()
            logs = {**logs, **dict(zip(keys, vals))}
        return {k: float(v) for k, v in logs.items()}

    # ---- preemption ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        """Signal handler: remember the first stop signal; the loop checks it after the step in flight."""
        name = signal.Signals(signum).name
        if self._signal:
            msg = f"\nfewstep: got {name} while stopping; still finishing the step and checkpoint\n"
        else:
            self._signal = signum
            msg = f"\nfewstep: got {name}; finishing the current step, then writing a checkpoint\n"
        if self.acc.is_local_main_process:
            os.write(2, msg.encode())  # not print(): a signal handler may interrupt a print in progress

    def _install_signal_handlers(self) -> dict:
        if not self.cfg.train.save_on_signal or threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                old[sig] = signal.signal(sig, self._on_signal)
        return old

    def _agree(self, sig: int, failed: bool) -> tuple[int, bool]:
        """(stop signal, failure) as seen by any process: one all-reduce (max) of two ints when world size > 1."""
        if self.acc.num_processes == 1:
            return sig, failed
        import torch.distributed as dist

        flags = torch.tensor([int(sig), int(failed)], dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def _clean_stale(self) -> None:
        """Remove ``.tmp-*`` folders a crash left in the run folder (checkpoints, samples, exports)."""
        if self.acc.is_main_process:
            for d in (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "samples"):
                for p in clean_stale(d):
                    self.log(f"removed {p} (left by an interrupted write)")
        self.acc.wait_for_everyone()

    def train_step(self) -> dict:
        """One optimisation step of every group in the objective's plan.  The returned logs hold tensors (and
        floats): :meth:`fit` reads them back only at logging steps."""
        tc = self.cfg.train
        logs: dict = {}
        for group in self.obj.reset_groups(self.step):  # the objective re-initialised these weights
            opt = self.optims[group]
            getattr(opt, "optimizer", opt).state.clear()
        shared = [{} for _ in range(tc.grad_accum)]  # Batch.shared: micro-batch i of every group in this step
        for gi, group in enumerate(self.obj.plan(self.step)):
            module, opt = self.wrapped[group], self._step_opt[group]
            nets = {n: (self.wrapped[n] if n == group else self.plain[n]) for n in self.names}
            opt.zero_grad(set_to_none=True)
            loss_sum = None
            for micro in range(tc.grad_accum):
                batch = self.make_batch(self.step, self.names.index(group), micro, shared[micro])
                sync = self.acc.no_sync(module) if micro < tc.grad_accum - 1 else nullcontext()
                with sync, self._autocast():
                    out = self.obj.loss(group, batch, self.step, nets)
                loss = out.loss / tc.grad_accum if tc.grad_accum > 1 else out.loss
                loss.backward() if self._plain_backward else self.acc.backward(loss)
                loss = loss.detach()
                loss_sum = loss if loss_sum is None else loss_sum + loss
                for k, v in out.logs.items():
                    v = v / tc.grad_accum if tc.grad_accum > 1 else v
                    prev = logs.get(f"{group}/{k}")
                    logs[f"{group}/{k}"] = v if prev is None else prev + v
            logs[f"{group}/loss"] = loss_sum
            params = self._params[group]
            if self._plain_clip or tc.max_grad_norm <= 0:
                # the gradient norm and the loss read back together: the divergence guard (the step's one read-back
                # per group, before the update is applied; a non-finite micro-batch loss makes the sum non-finite)
                # and the clipping decision (torch's clip_grad_norm_ numbers, its no-op multiply by 1 skipped)
                gnorm = _total_norm([p.grad for p in params if p.grad is not None]).detach()
                loss_h, norm_h = torch.stack([loss_sum.float(), gnorm.float().to(loss_sum.device)]).tolist()
                if self._any_process(not (math.isfinite(loss_h) and math.isfinite(norm_h))):
                    raise TrainingDiverged(f"non-finite loss or gradient in group '{group}' at step {self.step}")
                if 0 < tc.max_grad_norm <= (norm_h + 1e-6) * (1 + 1e-6):
                    _clip_to(params, tc.max_grad_norm, gnorm)
            else:
                if self.fsdp:  # accelerate's FSDP clip compares parameter lists with ==: fails for two same-shape nets
                    self.acc.unscale_gradients(self.optims[group])
                    gnorm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                else:
                    gnorm = self.acc.clip_grad_norm_(params, tc.max_grad_norm)
                gnorm = sharding.full(torch.as_tensor(gnorm if gnorm is not None else 0.0)).detach()  # DeepSpeed: None
                if self._any_process(~(torch.isfinite(loss_sum) & torch.isfinite(gnorm.to(loss_sum.device)))):
                    raise TrainingDiverged(f"non-finite loss or gradient in group '{group}' at step {self.step}")
            logs[f"{group}/grad_norm"] = gnorm
            pgs = self._raw_opts[group].param_groups
            factor = self.obj.lr_factor(group, self.step)
            if factor != 1.0:  # the objective's own factor (e.g. a warm-up after a phase start), for this update only
                base_lrs = [pg["lr"] for pg in pgs]
                for pg in pgs:
                    pg["lr"] = pg["lr"] * factor
            logs[f"{group}/lr"] = pgs[0]["lr"]  # this update's (warm-up) lr
            opt.step()
            if factor != 1.0:
                for pg, lr in zip(pgs, base_lrs):
                    pg["lr"] = lr
            if group in self.schedulers:
                self.schedulers[group].step()
            opt.zero_grad(set_to_none=True)  # free this group's gradients before the next group's forward (memory)
            if self._trim_heap:  # a CPU run saving memory: the freed gradients back to the OS before the next group
                trim_heap()
            if group == "student" and self.ema is not None:
                self.ema.step(self._trainable(self.plain["student"]))
            self.obj.after_step(group, self.step)
        return logs

    def fit(self, on_sample=None) -> dict:
        tc = self.cfg.train
        mode = progress_mode(tc.progress)
        self._clean_stale()
        resumed = self.maybe_resume()
        if resumed is not None:
            self.log(f"resumed from {resumed} at step {self.step}")
        self.obj.setup(self.run_dir, self.acc, self.data)
        self._prepare_real(mode)
        if self.acc.is_main_process:
            self.log(f"optimizer: {self.optimizer_info()['describe']}")
        if self.acc.is_main_process and tc.tracker != "none":
            from .config import config_to_dict, flatten

            hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                  for k, v in flatten(config_to_dict(self.cfg)).items()}
            hp["train.optimizer"] = self.optimizer_info()["describe"]  # resolved here, not a config key
            self.acc.init_trackers("fewstep", config=hp)
        bar = Progress(mode, tc.max_steps, self.step, f"{self.obj.name}", enabled=self.acc.is_local_main_process)
        t0 = time.time()
        start = self.step
        last_good = resumed
        throttle = float(os.environ.get("FEWSTEP_STEP_SLEEP", "0"))  # testing aid: slow steps down (seconds)
        self._signal = 0
        old_handlers = self._install_signal_handlers()
        try:
            while self.step < tc.max_steps:
                try:
                    logs = self.train_step()
                except TrainingDiverged as e:
                    where = f"; last good checkpoint: {last_good}" if last_good else "; no checkpoint was written yet"
                    raise TrainingDiverged(f"{e}{where}") from None
                self.step += 1
                if throttle:
                    time.sleep(throttle)
                logged = self.step % tc.log_every == 0 or self.step == tc.max_steps
                if logged:
                    logs = self._to_host(logs)  # the one read-back of this logging interval
                    logs["steps_per_sec"] = (self.step - start) / max(time.time() - t0, 1e-9)
                    self.acc.log(logs, step=self.step)
                    self.history.append({"step": self.step, **logs})
                    if len(self.history) > 2 * HISTORY_LEN:
                        del self.history[:-HISTORY_LEN]
                bar.update(self.step, logs if logged else None)
                saved = False
                if self.step % tc.checkpoint_every == 0 or self.step == tc.max_steps:
                    last_good = self._checked_save(last_good)
                    saved = True
                sample_error = None
                if self.fsdp and on_sample is not None and tc.sample_every and self.step % tc.sample_every == 0:
                    self._gathered = self._gather_student()  # every process: FSDP gathers the student (a collective)
                if on_sample is not None and tc.sample_every and self.step % tc.sample_every == 0 \
                        and self.acc.is_main_process:
                    try:
                        on_sample(self, self.step)
                    except WriteError as e:
                        sample_error = e
                self._gathered = None
                sig, failed = self._agree(self._signal, sample_error is not None)
                if failed:  # every process stops, not only the one whose write failed
                    raise sample_error or WriteError("stopped: the main process could not write a sample grid")
                if sig:
                    if not saved:
                        last_good = self._checked_save(last_good)
                    self._signal = sig
                    raise Preempted(sig, self.step, last_good)
        except WriteError as e:
            where = f"; last good checkpoint: {last_good}" if last_good else "; no checkpoint was written yet"
            raise WriteError(f"{e}{where}", e.errno) from None
        except Preempted:
            bar.close()
            # every rank reaches this point after the same step; meet once more so that no rank tears down its
            # process group while a peer is still using it (gloo aborts the peer: "terminate called ...")
            self.acc.wait_for_everyone()
            self.acc.end_training()  # flush trackers; leave the process group cleanly
            raise
        finally:
            bar.close()
            if not self._signal:  # after a stop, our handler stays: a late second signal is noted, never fatal
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
        self.acc.wait_for_everyone()
        return {"steps": self.step, "train_seconds": time.time() - t0, "last_checkpoint": str(last_good),
                "optimizer": self.optimizer_info()}

    def optimizer_info(self) -> dict:
        """The resolved optimizer: ``{"name": "AdamW", "impl": {group: fused|foreach|for-loop}, "describe": str}``."""
        impls = sorted(set(self.optim_impl.values()))
        name = "AdamW8bit (bitsandbytes)" if self.cfg.train.optimizer == "adamw8bit" else "AdamW"
        describe = f"{name}, " + (impls[0] if len(impls) == 1 else
                                  ", ".join(f"{g} {i}" for g, i in self.optim_impl.items()))
        return {"name": name, "impl": dict(self.optim_impl), "describe": describe}

    def _prepare_real(self, mode: str) -> None:
        """Real samples that any step will ask for (e.g. ``data.images`` VAE-encoded), then every prompt of the run
        (``teacher.prepare_conditions``: encoded into the prompt cache, the text encoders freed after; then, with
        ``data.free_vae``, the VAE freed too): prepared now,
        once, with a progress bar (``mode`` bar) or a line (lines), so that no training step pays for them.  With
        several processes the local main process goes first (it writes the disk caches; the others then read them)."""
        main = self.acc.is_local_main_process
        kw = {"bar": main and mode == "bar",
              "log": (lambda msg: print(msg, file=sys.stderr, flush=True)) if main and mode == "lines" else None}
        many = self.acc.num_processes > 1
        for turn in ((True, False) if many else (main,)):
            if main == turn:
                if self.obj.uses_real_data():
                    self.teacher.prepare_real_samples(self.data, **kw)
                self.teacher.prepare_conditions(self.data, **kw)
            if many:
                self.acc.wait_for_everyone()
        if self.data is not None and self.data.free_vae:  # every latent is cached now: the VAE only for previews
            self.teacher.free_vae(kw["log"])

    def _checked_save(self, last_good) -> Path:
        if not self._params_finite():
            where = f"; last good checkpoint: {last_good}" if last_good else ""
            raise TrainingDiverged(f"non-finite parameters after step {self.step}{where}")
        return self.save_checkpoint()

    def _gather_student(self) -> Optional[nn.Module]:
        return sharding.gather(self.wrapped["student"], self._frame, self.acc.is_main_process)

    def sample_student(self) -> nn.Module:
        """The student that a sample grid reads (main process): the trained module, or under FSDP its gathered copy
        (set by the loop at a sample step, and by :meth:`final_student`)."""
        return self._gathered if self.fsdp else self.plain["student"]

    def final_student(self) -> Optional[nn.Module]:
        """The student to export: EMA weights when EMA is on.  Under FSDP a collective (call it on every process):
        the whole student is gathered into an unsharded copy on the main process (``None`` elsewhere), and the raw
        copy is kept for the last sample grid (:meth:`sample_student`)."""
        if self.fsdp:
            self._gathered = self._gather_student()
            shadows = [sharding.full(s) for s in self.ema.shadow_params] if self.ema is not None else None
            if self._gathered is None or shadows is None:
                return self._gathered
            import copy

            student = copy.deepcopy(self._gathered)
            with torch.no_grad():
                for p, s in zip(self._trainable(student), shadows):
                    p.copy_(s.to(p.device, p.dtype))
            return student
        student = self.plain["student"]
        if self.ema is not None:
            import copy

            student = copy.deepcopy(student)
            self.ema.copy_to(self._trainable(student))
        return student

    def end(self):
        self.acc.end_training()
