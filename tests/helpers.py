"""Tiny models and configs shared by the math tests."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
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
    """Run one mini-batch of `cfg.rule` on a copy of `model` (a language model's signal taken at
    the head's input); returns (old params, new params, the stage rule)."""
    model = copy.deepcopy(model)
    old = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule = build_stage_rule(cfg, model, 0, len(model.blocks))
    mb = MicroBatch(0, 0, 0, len(y), len(y))
    h, t = rule.forward(mb, x, None)
    _, _, signal = output_signal(h, y, len(y), t)
    rule.backward(mb, rule.signal_at_output(mb, signal), None)
    if rule.second_pass:
        rule.modulated_forward(mb, signal, None)
    rule.finish_step()
    new = {k: v.detach().clone() for k, v in model.named_parameters()}
    return old, new, rule


def encode_image(pixels: torch.Tensor, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format=fmt)
    return buf.getvalue()


def write_cifar100(
    root: Path, n_train: int = 40, n_test: int = 24, gray: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write {train,test}-00000-of-00001.parquet with columns img, fine_label, coarse_label.

    Train images are PNG (lossless, so pixels can be compared), test images JPEG.
    Returns the HWC pixels and fine labels written per split.
    """
    folder = root / "cifar100" / "cifar100"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    written = {}
    for split, n, fmt in (("train", n_train, "PNG"), ("test", n_test, "JPEG")):
        shape = (n, 32, 32) if gray else (n, 32, 32, 3)
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        fine = torch.randint(0, 100, (n,), generator=gen)
        images = [{"bytes": encode_image(p, fmt), "path": None} for p in pixels]
        table = pa.table(
            {
                "img": pa.array(images, type=img_type),
                "fine_label": pa.array(fine.tolist(), type=pa.int64()),
                "coarse_label": pa.array((fine // 5).tolist(), type=pa.int64()),
            }
        )
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
        written[split] = (pixels, fine)
    return written


def freeze_batch_statistics(block: nn.Module, x: torch.Tensor) -> None:
    """Put every BatchNorm of `block` in eval mode with running statistics equal to the batch
    statistics it sees on `x` in train mode: the reference function of the tangent."""
    seen = {}
    hooks = [bn.register_forward_hook(
        lambda mod, inp, out: seen.__setitem__(mod, inp[0].detach()))
        for bn in block.modules() if isinstance(bn, nn.BatchNorm2d)]
    block(x)
    for h in hooks:
        h.remove()
    for bn, z in seen.items():
        bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(z.var(dim=(0, 2, 3), unbiased=False))
        bn.eval()
