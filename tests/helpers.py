"""Tiny models and configs shared by the math tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from grape_dist.config import Config, load_config
from grape_dist.models import Block, BlockModel
from grape_dist.rules import MicroBatch, build_stage_rule, output_signal

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def tiny_mlp(d_in: int = 5, h1: int = 4, h2: int = 3, d_out: int = 3, act=nn.Tanh,
             seed: int = 0) -> BlockModel:
    torch.manual_seed(seed)
    return BlockModel(
        [Block("fc1", nn.Linear(d_in, h1), act()), Block("fc2", nn.Linear(h1, h2), act()),
         Block("out", nn.Linear(h2, d_out))],
        (d_in,), d_out)


def tiny_cnn(seed: int = 0) -> BlockModel:
    """conv(3x3, pad 1)+ReLU+max pool, conv(3x3)+Tanh+avg pool, Flatten+Linear."""
    torch.manual_seed(seed)
    return BlockModel(
        [Block("conv1", nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
         Block("conv2", nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AvgPool2d(2)),
         Block("out", nn.Flatten(), nn.Linear(4, 3))],
        (2, 8, 8), 3)


def sgd_config(rule: str, *extra: str) -> Config:
    """Plain SGD with lr 1 and no momentum, so that W_new - W_old = -(the update direction)."""
    return load_config(None, [f"rule={rule}", "optim.name=sgd", "optim.lr=1.0",
                              "optim.momentum=0.0", *extra])


def one_step(cfg: Config, model: BlockModel, x: torch.Tensor, y: torch.Tensor):
    """Run one mini-batch of `cfg.rule` on a copy of `model`; returns (old params, new params,
    the stage rule)."""
    model = copy.deepcopy(model)
    old = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule = build_stage_rule(cfg, model, 0, len(model.blocks))
    mb = MicroBatch(0, 0, 0, len(y), len(y))
    h, t = rule.forward(mb, x, None)
    _, _, signal = output_signal(h, y, len(y), t)
    rule.backward(mb, signal, None)
    if rule.second_pass:
        rule.modulated_forward(mb, signal, None)
    rule.finish_step()
    new = {k: v.detach().clone() for k, v in model.named_parameters()}
    return old, new, rule
