"""Diffusers pipelines for what no stock pipeline expresses, and :func:`load_pipeline`, which opens any folder.

A folder saved by one of these classes names it in ``model_index.json`` (``_class_name``), which
``DiffusionPipeline.from_pretrained`` cannot resolve on its own; :func:`load_pipeline` can.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

# class name in model_index.json -> module in this package
CUSTOM_PIPELINES = {"ClassConditionalPipeline": "pipelines.class_conditional",
                    "FlowMapStableDiffusion3Pipeline": "pipelines.flow_map_sd3",
                    "FlowMapFluxPipeline": "pipelines.flow_map_flux",
                    "PhasedStableDiffusionPipeline": "pipelines.phased_sd15",
                    "PhasedStableDiffusionXLPipeline": "pipelines.phased_sdxl",
                    "PhasedStableDiffusion3Pipeline": "pipelines.phased_sd3",
                    "PhasedFluxPipeline": "pipelines.phased_flux",
                    "PhasedClassConditionalPipeline": "pipelines.phased_class_conditional"}


def pipeline_class_name(path) -> str:
    """``_class_name`` of a local pipeline folder (``""`` for a hub id or a folder without model_index.json)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return ""
    name = json.loads(index.read_text()).get("_class_name", "")
    return name[1] if isinstance(name, (list, tuple)) else str(name)


def load_pipeline(path, **kwargs):
    """``DiffusionPipeline.from_pretrained(path, **kwargs)``, resolving fewstep's own pipeline classes."""
    name = pipeline_class_name(path)
    if name in CUSTOM_PIPELINES:
        cls = getattr(importlib.import_module(CUSTOM_PIPELINES[name]), name)
    else:
        from diffusers import DiffusionPipeline as cls
    return cls.from_pretrained(str(path), **kwargs)
