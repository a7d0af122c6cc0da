"""The trainer's AdamW: torch's own, with the fastest implementation the device supports, chosen once.

:func:`make_adamw` picks ``fused`` (one kernel per parameter group) where torch supports it for the parameters'
device and dtype, else ``foreach`` (a few multi-tensor kernels), else the per-parameter loop, by building and
stepping a one-element optimizer of that kind on the device (so a kernel that exists but fails at run time falls
back too).  The choice is cached per (device, dtypes).  All three keep the same state (``step``, ``exp_avg``,
``exp_avg_sq`` per parameter) and compute the same update to rounding, so a checkpoint resumes under any of them;
:func:`apply_impl` puts the chosen flags back after ``load_state_dict`` (which restores the saved groups' flags).

:class:`AdamW` is ``torch.optim.AdamW`` with its eager entry points (``step``, ``zero_grad``, ``state_dict``,
``load_state_dict``, ``add_param_group``) called without torch's ``torch._dynamo`` wrappers: in eager mode those
wrappers only import ``torch._dynamo`` (1-2 s on the first call, the largest part of the GMM demo's time to its first
step) and mark graph breaks.  Same kernels, same state, same numbers; under ``torch.compile`` use torch's class.
"""
from __future__ import annotations

import inspect
from typing import Iterable, Optional

import torch

IMPLS = ("fused", "foreach", "for-loop")  # fastest first
_CHOSEN: dict = {}  # (device type, dtypes) -> impl


def _raw(fn):
    """``fn`` without its decorators (``functools.wraps`` chains); ``fn`` itself where there are none."""
    try:
        return inspect.unwrap(fn)
    except ValueError:  # a cycle: leave it as it is
        return fn


_STEP = _raw(torch.optim.AdamW.step)
_ZERO_GRAD = _raw(torch.optim.Optimizer.zero_grad)
_STATE_DICT = _raw(torch.optim.Optimizer.state_dict)
_LOAD_STATE_DICT = _raw(torch.optim.Optimizer.load_state_dict)
_ADD_PARAM_GROUP = _raw(torch.optim.Optimizer.add_param_group)


def _plain_step(self, closure=None):
    with torch.no_grad():  # what torch's wrapper does (differentiable=False), minus the graph breaks
        return _STEP(self, closure)


_HOOKED_STEP = torch.optim.Optimizer.profile_hook_step(_plain_step)  # torch's profiler scope and step hooks


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose eager calls skip the ``torch._dynamo`` wrappers (see the module doc)."""

    def step(self, closure=None):
        """One update.  Where no step hook is registered, also without torch's profiler scope around it (a
        ``record_function`` per call: as long as the fused update itself on a small network)."""
        from torch.optim import optimizer as _o

        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _o._global_optimizer_pre_hooks \
                or _o._global_optimizer_post_hooks:
            return _HOOKED_STEP(self, closure)
        return _plain_step(self, closure)

    step.hooked = True  # torch's Optimizer.__init__ wraps an unhooked ``step`` in its profiler scope: done above

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return _ZERO_GRAD(self, set_to_none)
        for group in self.param_groups:  # what torch's does for set_to_none, minus its profiler scope
            for p in group["params"]:
                p.grad = None

    def state_dict(self):
        return _STATE_DICT(self)

    def load_state_dict(self, state_dict) -> None:
        _LOAD_STATE_DICT(self, state_dict)

    def add_param_group(self, param_group) -> None:
        _ADD_PARAM_GROUP(self, param_group)


def _flags(impl: str) -> dict:
    return {"fused": impl == "fused" or None, "foreach": True if impl == "foreach" else (False if impl == "for-loop" else None)}


def _works(impl: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``impl`` builds and steps on ``device``/``dtype`` (a one-element trial)."""
    try:
        p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        opt = AdamW([p], lr=1e-3, **_flags(impl))
        opt.step()
        return bool(torch.isfinite(p).all())
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False


def choose_impl(params: Iterable[torch.Tensor]) -> str:
    """The fastest of :data:`IMPLS` that works for these parameters (cached per device and dtypes)."""
    params = list(params)
    if not params:
        return "for-loop"
    devices = {p.device for p in params}
    dtypes = tuple(sorted({str(p.dtype) for p in params}))
    if len(devices) > 1:  # fused and foreach group by device themselves, but keep the unusual case simple
        return "foreach"
    device = next(iter(devices))
    key = (str(device), dtypes)
    if key not in _CHOSEN:
        if not all(p.is_floating_point() for p in params):
            _CHOSEN[key] = "for-loop"
        else:
            _CHOSEN[key] = next((i for i in IMPLS[:-1] if all(_works(i, device, getattr(torch, d.split(".")[-1]))
                                                          for d in dtypes)), "for-loop")
    return _CHOSEN[key]


def make_adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.01, eps: float = 1e-8,
               impl: Optional[str] = None) -> tuple[AdamW, str]:
    """``(optimizer, impl)``: :class:`AdamW` over ``params`` with ``impl`` (default: :func:`choose_impl`)."""
    params = list(params)
    impl = impl or choose_impl(params)
    if impl not in IMPLS:
        raise ValueError(f"AdamW implementation must be one of {', '.join(IMPLS)}, got {impl!r}")
    return AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, **_flags(impl)), impl


OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(name: str, params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.01,
                   eps: float = 1e-8) -> tuple[torch.optim.Optimizer, str]:
    """``(optimizer, impl)`` for ``train.optimizer``: ``adamw`` (:func:`make_adamw`) or ``adamw8bit``
    (bitsandbytes' ``AdamW8bit``: both moments as blockwise-quantised 8-bit tensors, 2 bytes a weight instead of 8;
    bitsandbytes >= 0.48 has CPU kernels as well as CUDA ones).  Tensors under 4096 elements keep float32 moments
    (bitsandbytes' own rule)."""
    if name == "adamw":
        return make_adamw(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name != "adamw8bit":
        raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'fewstep[memory]' "
                          "(or pip install bitsandbytes)") from None
    return bnb.optim.AdamW8bit(list(params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), "8-bit"


def apply_impl(optimizer, impl: str) -> None:
    """Set ``impl``'s flags on every parameter group again (after ``load_state_dict``, which restores the saved
    groups' own), and keep each ``step`` count where that implementation wants it (fused: a float32 tensor on the
    parameter's device; otherwise on the CPU)."""
    if impl not in IMPLS:  # another optimizer (adamw8bit): its state is its own
        return
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    flags = _flags(impl)
    for group in opt.param_groups:
        group.update(flags)
        group.setdefault("capturable", False)
        for p in group["params"]:
            st = opt.state.get(p)
            if st and torch.is_tensor(st.get("step")):
                want = p.device if (impl == "fused" or group["capturable"]) else torch.device("cpu")
                if st["step"].device != want or st["step"].dtype != torch.float32:
                    st["step"] = st["step"].to(device=want, dtype=torch.float32)


class EMA:
    """Exponential moving average of a student's parameters: diffusers' ``EMAModel`` (``training_utils``), its decay
    rule and its checkpoint format (``state_dict`` keys), with the ``foreach`` update; without importing diffusers,
    which a GMM run does not otherwise need (diffusers imports ``torch._dynamo``: seconds before the first step).

    Decay at update ``k`` (1-based): 0 at the first (the shadow starts as the parameters), then
    ``min(decay, (1 + s) / (10 + s))`` with ``s = k - update_after_step - 1`` (or the warm-up rule), floored at
    ``min_decay``; ``shadow -= (1 - decay) * (shadow - param)``.
    """

    def __init__(self, parameters, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3):
        self.shadow_params = [p.clone().detach() for p in parameters]
        self.decay, self.min_decay = float(decay), float(min_decay)
        self.update_after_step, self.use_ema_warmup = int(update_after_step), bool(use_ema_warmup)
        self.inv_gamma, self.power = inv_gamma, power
        self.optimization_step = 0
        self.cur_decay_value: Optional[float] = None

    def get_decay(self, optimization_step: int) -> float:
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    @torch.no_grad()
    def step(self, parameters) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        train = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        fixed = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if fixed:
            torch._foreach_copy_([s for s, _ in fixed], [p for _, p in fixed])
        if train:
            s, p = [s for s, _ in train], [p for _, p in train]
            torch._foreach_sub_(s, torch._foreach_sub(s, p), alpha=1 - decay)

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for s, p in zip(self.shadow_params, parameters):
            p.data.copy_(s.to(p.device).data)

    def to(self, device=None, dtype=None) -> "EMA":
        self.shadow_params = [s.to(device=device, dtype=dtype) if s.is_floating_point() else s.to(device=device)
                              for s in self.shadow_params]
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "min_decay": self.min_decay, "optimization_step": self.optimization_step,
                "update_after_step": self.update_after_step, "use_ema_warmup": self.use_ema_warmup,
                "inv_gamma": self.inv_gamma, "power": self.power,
                # FSDP: shards gathered to whole tensors (a collective; accelerate asks every process for this dict)
                "shadow_params": [s.full_tensor() if hasattr(s, "full_tensor") else s for s in self.shadow_params]}

    def load_state_dict(self, state_dict: dict) -> None:
        """A state from :meth:`state_dict` (or diffusers' ``EMAModel``); the shadow parameters are copied into the
        current ones, so they stay on the training device (accelerate loads custom states onto the CPU)."""
        for key in ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma",
                    "power"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError("EMA decay must be between 0 and 1")
        shadow = state_dict.get("shadow_params")
        if shadow is not None:
            if not isinstance(shadow, list) or not all(torch.is_tensor(s) for s in shadow):
                raise ValueError("EMA shadow_params must be a list of tensors")
            if len(shadow) == len(self.shadow_params) and all(a.shape == b.shape for a, b in
                                                               zip(shadow, self.shadow_params)):
                with torch.no_grad():
                    for dst, src in zip(self.shadow_params, shadow):
                        if hasattr(dst, "device_mesh") and not hasattr(src, "device_mesh"):  # FSDP: this shard of it
                            from .sharding import shard_like

                            src = shard_like(src, dst)
                        dst.copy_(src)
            else:
                self.shadow_params = [s.clone() for s in shadow]


def _linear_warmup(step: int, steps: int) -> float:
    """lr factor of a group's optimizer step ``step`` (0-based): ``step / steps`` up to 1, diffusers'
    ``constant_with_warmup`` rule (the one DMD2's reference uses: the first update has lr 0, update ``steps`` the
    full lr)."""
    return min(1.0, step / steps)


def warmup_scheduler(optimizer, steps: int):
    """``train.lr_warmup_steps``: torch's ``LambdaLR`` on ``optimizer`` (the torch optimizer itself, not accelerate's
    wrapper), stepped once after each of its optimizer's steps.  Its state (``last_epoch``, the base lrs) is checkpointed
    with the run, so a resumed run continues the ramp exactly; the factor is a ``functools.partial`` of a module
    function, rebuilt from the config on resume rather than pickled."""
    from functools import partial

    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_linear_warmup, steps=int(steps)))
