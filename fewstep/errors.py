"""The user-facing exception classes, in a module that imports nothing heavy.

``fewstep.cli`` catches these around every command; keeping them here (rather than in the modules that raise them,
which import torch) lets ``fewstep --help`` and ``fewstep distill --dry-run`` run without importing torch or
diffusers.  Each class is re-exported where it used to live (``fewstep.data.DataError``,
``fewstep.teachers.base.TeacherLoadError``, ``fewstep.export.WriteError``, ``fewstep.trainer.Preempted`` ...), so
both names are the same class.  ``ConfigError`` lives in ``fewstep.config``, which imports no torch either.
"""
from __future__ import annotations

import signal


class DataError(ValueError):
    """One-line, user-facing data problem."""


class TeacherLoadError(ValueError):
    """One-line, user-facing problem loading a teacher."""


class WriteError(RuntimeError):
    """A checkpoint, sample grid or export could not be written (disk full, quota, file-size limit, permissions).

    ``str(e)`` is one line naming the path, the reason and the free space; ``e.errno`` the errno where known."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; training stopped before the step was applied."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be read."""


class Preempted(Exception):
    """A stop signal arrived: the step in flight finished and a checkpoint was written.  Exit with ``exit_code``."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        self.exit_code = 128 + self.signum
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after step {step}; checkpoint: {checkpoint}; "
                         f"run the same command to resume")
