"""Runtimes that drive the per-stage rules: in one process now, across ranks next."""

from .local import LocalPipeline, StepResult, split_micro_batches
from .stage import Stage, build_stages

__all__ = ["LocalPipeline", "Stage", "StepResult", "build_stages", "split_micro_batches"]
