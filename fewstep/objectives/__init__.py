"""Objectives, one file per method, found by name through the registry."""
from .base import Batch, LossOutput, Objective, get_objective, known_objectives, register  # noqa: F401


def _import_builtins():
    from . import dmd  # noqa: F401
    from . import consistency  # noqa: F401
    from . import boot  # noqa: F401
    from . import flow_map  # noqa: F401
    from . import phased_dmd  # noqa: F401


_load_all = _import_builtins()
