"""Learning rules, one implementation each, applied per pipeline stage.

`build_stage_rule` turns a config and a contiguous range of a model's blocks into the rule object
that a stage runs, complete: optimisers, feedback matrices, GrAPE's feedback learner, the
streaming mode and the function that sums tensors over data-parallel replicas are all given at
construction. A single process is the pipeline with one stage spanning every block.
"""

from __future__ import annotations

from torch import nn

from ..config import Config
from ..models import BlockModel, SignalSpec
from ..optim import build_optimizer
from ..rng import keyed_generator
from .backprop import BackpropRule, convert_to_fa
from .base import (
    MicroBatch,
    OutputSignal,
    Reduce,
    StageRule,
    no_reduce,
    output_signal,
)
from .direct import DirectFeedbackRule
from .feedback import init_feedback
from .grape import FeedbackLearner
from .pepita import PepitaRule

__all__ = [
    "BackpropRule", "DirectFeedbackRule", "FeedbackLearner", "MicroBatch", "OutputSignal",
    "PepitaRule", "Reduce", "SignalSpec", "StageRule", "build_calibration_rule", "build_stage_rule",
    "output_signal",
]


def _stage_blocks(model: BlockModel, first: int, last: int) -> list:
    missing = [i for i in range(first, last) if not model.is_materialized(i)]
    if missing:
        raise ValueError(f"blocks {missing} are not materialised on this rank "
                         "(BlockModel.materialize)")
    return list(model.blocks)[first:last]


def build_stage_rule(cfg: Config, model: BlockModel, first: int, last: int,
                     reduce: Reduce = no_reduce) -> StageRule:
    """The rule for blocks [first, last) of `model` (identical on every rank that builds it)."""
    blocks = _stage_blocks(model, first, last)
    n = len(model.blocks)
    opt = build_optimizer([p for b in blocks for p in b.parameters()], cfg.optim)
    rule = cfg.rule
    if rule == "bp":
        return BackpropRule(blocks, first, n, opt, name="bp", reduce=reduce)
    if rule == "fa":
        convert_to_fa(blocks, first, cfg.seed)
        return BackpropRule(blocks, first, n, opt, name="fa", reduce=reduce)
    if rule == "pepita":
        return PepitaRule(blocks, first, n, opt, model.input_shape, model.num_classes,
                          cfg.pepita.f_scale, cfg.seed, reduce)
    if rule in ("dfa", "drtp", "grape"):
        device = next(p.device for b in blocks for p in b.parameters())
        # B_p for every feedback point of the stage's hidden blocks, keyed by (seed, point): the
        # same whatever the partition. Leaf parameters so that a torch optimiser can step them;
        # they never enter an autograd graph (GrAPE's gradients come from eq. 17's closed form).
        per_channel = cfg.feedback.conv == "channel"
        all_points = model.feedback_points(layer=cfg.feedback.points == "layer")
        points = [pt for pt in all_points if first <= pt.block < last]
        feedback = {
            pt.index: nn.Parameter(init_feedback(model.signal_spec.signal_width,
                                                 model.feedback_width(pt, per_channel),
                                                 keyed_generator(cfg.seed, "feedback", pt.index),
                                                 cfg.feedback.init,
                                                 cfg.feedback.normalize_columns).to(device),
                                   requires_grad=False)
            for pt in points
        }
        learner = None
        if rule == "grape":
            # A stage holding only the output block has no B, but still carries tangents.
            b_opt = build_optimizer(list(feedback.values()), cfg.grape.b_optim) \
                if feedback else None
            learner = FeedbackLearner(feedback, cfg.grape, cfg.seed, b_opt,
                                      num_hidden=len(all_points), reduce=reduce)
        return DirectFeedbackRule(blocks, first, n, opt, feedback, points=all_points, name=rule,
                                  signal="target" if rule == "drtp" else "error",
                                  learner=learner, streaming=cfg.pipeline.streaming,
                                  head_signal=model.signal_spec.at_head_input, reduce=reduce)
    raise ValueError(f"unknown rule {rule!r}")


def build_calibration_rule(cfg: Config, model: BlockModel, first: int, last: int,
                           reduce: Reduce = no_reduce, *, rule: StageRule) -> BackpropRule:
    """BP on the same blocks as the stage's `rule`. `calibration.form: paper`: with the
    calibration optimiser, its state fresh at every calibration (the paper's single SGD step);
    `optimizer`: through `rule`'s own optimiser and state. Either bounded by
    `calibration.max_update`."""
    c = cfg.calibration
    blocks = _stage_blocks(model, first, last)
    paper = c.form == "paper"
    opt = build_optimizer([p for b in blocks for p in b.parameters()], c.optim) if paper \
        else rule.optimizer
    return BackpropRule(blocks, first, len(model.blocks), opt, name="calibration",
                        reduce=reduce, fresh_optimizer_state=paper, max_update=c.max_update)
