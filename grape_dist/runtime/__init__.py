"""The pipeline runtime: layout, transport, schedules and the engine that drives them.

One code path for one process (every stage here, in-process transport) and P ranks (this rank's
stages, torch.distributed transport); `grape_dist.build.build_engine` chooses, from above this
package and `distributed/`.
"""

from .engine import CheckRows, PipelineEngine
from .final_state import load_final_state
from .layout import Layout, LayoutError, plan_layout
from .schedules import StepResult, split_micro_batches
from .stage import Stage

__all__ = ["CheckRows", "Layout", "LayoutError", "PipelineEngine", "Stage", "StepResult",
           "load_final_state", "plan_layout", "split_micro_batches"]
