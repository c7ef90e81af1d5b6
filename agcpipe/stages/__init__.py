"""Pipeline stages as plain functions over the content-addressed store (no Prefect here).

Each stage lives in its own module so that its code version (part of its cache key) covers exactly the
code it runs: editing :mod:`agcpipe.metrics` recomputes the evaluate stage only.
"""
from .base import STAGE_ORDER, Stage, StageResult, get_stage

__all__ = ["STAGE_ORDER", "Stage", "StageResult", "get_stage"]
