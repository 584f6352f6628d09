"""Learning rules, one implementation each, applied per pipeline stage.

`build_stage_rule` turns a config and a contiguous range of a model's blocks into the rule object
that a stage runs; a single process is the pipeline with one stage spanning every block.
"""

from __future__ import annotations

from ..config import Config
from ..models import BlockModel
from ..optim import build_optimizer
from ..rng import keyed_generator
from .backprop import BackpropRule, convert_to_fa
from .base import MicroBatch, OutputSignal, StageRule, output_signal
from .direct import DirectFeedbackRule
from .feedback import init_feedback
from .pepita import PepitaRule

__all__ = [
    "BackpropRule", "DirectFeedbackRule", "MicroBatch", "OutputSignal", "PepitaRule",
    "StageRule", "build_stage_rule", "build_calibration_rule", "output_signal",
]


def build_stage_rule(cfg: Config, model: BlockModel, first: int, last: int) -> StageRule:
    """The rule for blocks [first, last) of `model` (built identically on every rank)."""
    blocks = list(model.blocks)[first:last]
    n = len(model.blocks)
    params = [p for b in blocks for p in b.parameters()]
    opt = build_optimizer(params, cfg.optim)
    rule = cfg.rule
    if rule == "bp":
        return BackpropRule(blocks, first, n, opt)
    if rule == "fa":
        convert_to_fa(blocks, first, cfg.seed)
        out = BackpropRule(blocks, first, n, opt)
        out.name = "fa"
        return out
    if rule == "pepita":
        return PepitaRule(blocks, first, n, opt, model.input_shape, model.num_classes,
                          cfg.pepita.f_scale, cfg.seed)
    if rule in ("dfa", "drtp", "grape"):
        # B_l for every hidden block, keyed by (seed, block): the same whatever the partition.
        feedback = {
            i: init_feedback(model.num_classes, model.blocks[i].out_features,
                             keyed_generator(cfg.seed, "feedback", i), cfg.feedback.init,
                             cfg.feedback.normalize_columns)
            for i in range(first, min(last, n - 1))
        }
        out = DirectFeedbackRule(
            blocks, first, n, opt, feedback,
            signal="target" if rule == "drtp" else "error",
            grape=cfg.grape if rule == "grape" else None,
            b_optimizer_factory=lambda ps: build_optimizer(ps, cfg.grape.b_optim),
            seed=cfg.seed, name=rule,
        )
        out.streaming = cfg.pipeline.streaming
        return out
    raise ValueError(f"unknown rule {rule!r}")


def build_calibration_rule(cfg: Config, model: BlockModel, first: int, last: int) -> BackpropRule:
    """BP on the same blocks with the calibration optimiser (its own momentum state)."""
    blocks = list(model.blocks)[first:last]
    opt = build_optimizer([p for b in blocks for p in b.parameters()], cfg.calibration.optim)
    out = BackpropRule(blocks, first, len(model.blocks), opt)
    out.name = "calibration"
    return out
