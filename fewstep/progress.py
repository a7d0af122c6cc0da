"""Progress output of the training loop (``train.progress``).

``bar`` is a tqdm bar; ``lines`` writes one plain line to stderr at a logging step (every ``train.log_every``) once at
least 1% of ``max_steps`` or a minute has passed since the previous line, and at the last step (so at most ~100 lines
per run plus one a minute: logs stay readable); ``none`` writes nothing (the tensorboard log only); ``auto``
(default) is ``bar`` when stderr is a terminal, else ``lines``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional

PROGRESS = ("auto", "bar", "lines", "none")  # train.progress
LINE_FRACTION = 0.01  # progress=lines: a line after at least this fraction of max_steps ...
LINE_SECONDS = 60.0  # ... or this many seconds since the previous line (checked at logging steps)


def progress_mode(value: str, stream=None) -> str:
    """``train.progress`` resolved to ``bar``, ``lines`` or ``none`` (``auto``: a bar when ``stream``, default stderr,
    is a terminal); a one-line ConfigError for an unknown value."""
    if value not in PROGRESS:
        from .config import ConfigError

        raise ConfigError(f"train.progress must be one of {', '.join(PROGRESS)}, got {value!r}")
    if value != "auto":
        return value
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class Progress:
    """The training loop's progress output: a tqdm bar, plain lines on stderr, or nothing (see the module doc)."""

    def __init__(self, mode: str, total: int, initial: int, desc: str, enabled: bool = True):
        self.mode = mode if enabled else "none"
        self.total, self.desc = total, desc
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.every = max(1, math.ceil(total * LINE_FRACTION))
        self.last_step, self.last_time = initial, time.time()

    def update(self, step: int, logs: Optional[dict] = None) -> None:
        """One step done (``step`` is the new count); ``logs``: this step's logged values, at logging steps."""
        if self.bar is not None:
            if logs:
                self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.endswith("loss")})
            self.bar.update(1)
        elif self.mode == "lines" and logs is not None:
            now = time.time()
            if step >= self.total or step - self.last_step >= self.every or now - self.last_time >= LINE_SECONDS:
                self.last_step, self.last_time = step, now
                print(self.line(step, logs), file=sys.stderr, flush=True)

    def line(self, step: int, logs: dict) -> str:
        rate = logs.get("steps_per_sec", 0.0)
        parts = [f"{self.desc}: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)", f"{rate:.3g} steps/s"]
        if rate > 0 and step < self.total:
            eta = int((self.total - step) / rate)
            parts.append(f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        parts += [f"{k} {v:.4g}" for k, v in logs.items() if k.endswith("loss")]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
