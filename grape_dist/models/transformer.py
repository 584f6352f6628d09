"""A decoder-only Transformer language model as a sequence of blocks (paper Tables 4 and 5).

Blocks: `embed` (token + learned position embeddings), then per layer one block (**macro**
feedback: the attention and MLP sub-layers together) or two (**micro**: one per sub-layer), then
`head` (final LayerNorm + Linear to the vocabulary). Sub-layers are pre-LN residual:
`x + attn(LN(x))` with causal multi-head attention, and `x + W2 GELU(W1 LN(x))` with a 4 x d_model
MLP. No dropout.

Feedback follows Launay et al. 2020: the broadcast signal is the error at the head's input
(d_model per token, from the exact backward of the head), each hidden block's feedback matrix is
d_model x d_model, shared over positions, and inside a block (attention internals included)
training is local backprop. `BlockModel(signal_at_head_input=True)` says so to the rules.

Tangents through these sub-layers are written in closed form in `rules/tangents.py`; this module
holds only the model.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, BlockFactory, BlockModel


class TokenEmbedding(nn.Module):
    """Token ids (N, T) -> token embedding + learned position embedding (N, T, d_model)."""

    def __init__(self, vocab: int, context: int, d_model: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.empty(context, d_model))
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos[: ids.shape[-1]]


def _linear(d_in: int, d_out: int, std: float = 0.02) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class AttentionSublayer(nn.Module):
    """x + proj(causal multi-head attention(LN(x)))."""

    def __init__(self, d_model: int, heads: int, out_std: float = 0.02) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.heads = heads
        self.ln = nn.LayerNorm(d_model)
        self.qkv = _linear(d_model, 3 * d_model)
        self.proj = _linear(d_model, d_model, out_std)

    def split_heads(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., T, 3 d) -> q, k, v, each (..., H, T, d / H)."""
        *lead, t, three_d = z.shape
        d = three_d // 3
        z = z.view(*lead, t, 3, self.heads, d // self.heads).movedim(-3, 0).transpose(-3, -2)
        return z[0], z[1], z[2]

    @staticmethod
    def merge_heads(o: torch.Tensor) -> torch.Tensor:
        """(..., H, T, d / H) -> (..., T, d)."""
        o = o.transpose(-3, -2)
        return o.reshape(*o.shape[:-2], o.shape[-2] * o.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.qkv(self.ln(x)))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(self.merge_heads(o))

    def taps(self, out_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """Feedback points at every weight layer (`feedback.points: layer`): the qkv
        projection's output (T, 3 d) and the sub-layer's output (T, d), which is linear in the
        output projection's."""
        t, d = out_shape
        return [("qkv", (t, 3 * d)), ("proj", (t, d))]


class MLPSublayer(nn.Module):
    """x + W2 GELU(W1 LN(x)), hidden width `ratio` x d_model."""

    def __init__(self, d_model: int, ratio: int = 4, out_std: float = 0.02) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.fc1 = _linear(d_model, ratio * d_model)
        self.fc2 = _linear(ratio * d_model, d_model, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))

    def taps(self, out_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """Feedback points at every weight layer: the hidden GELU output (T, ratio d) and the
        sub-layer's output (T, d), which is linear in the second projection's."""
        t, _ = out_shape
        return [("fc1", (t, self.fc1.out_features)), ("fc2", out_shape)]


def _embed(vocab: int, context: int, d_model: int) -> Block:
    return Block("embed", TokenEmbedding(vocab, context, d_model))


def _layer(name: str, d_model: int, heads: int, out_std: float,
           parts: tuple[str, ...]) -> Block:
    layers: list[nn.Module] = []
    if "attn" in parts:
        layers.append(AttentionSublayer(d_model, heads, out_std))
    if "mlp" in parts:
        layers.append(MLPSublayer(d_model, 4, out_std))
    return Block(name, *layers)


def _head(d_model: int, vocab: int) -> Block:
    return Block("head", nn.LayerNorm(d_model), _linear(d_model, vocab))


def build_transformer(vocab: int, context: int, d_model: int = 128, layers: int = 4,
                      heads: int = 4, feedback: Literal["macro", "micro"] = "macro"
                      ) -> BlockModel:
    """On the meta device: embed, `layers` transformer layers (one block each for macro
    feedback, two for micro), head. Inputs are token ids of length `context`."""
    if feedback not in ("macro", "micro"):
        raise ValueError(f"feedback must be 'macro' or 'micro', got {feedback!r}")
    # GPT-2's scaled init of the residual projections keeps the residual stream's variance
    # independent of depth.
    out_std = 0.02 / math.sqrt(2 * layers)
    blocks: list[BlockFactory] = [partial(_embed, vocab, context, d_model)]
    for i in range(layers):
        if feedback == "macro":
            blocks.append(partial(_layer, f"layer{i}", d_model, heads, out_std, ("attn", "mlp")))
        else:
            blocks.append(partial(_layer, f"attn{i}", d_model, heads, out_std, ("attn",)))
            blocks.append(partial(_layer, f"mlp{i}", d_model, heads, out_std, ("mlp",)))
    blocks.append(partial(_head, d_model, vocab))
    return BlockModel(blocks, (context,), vocab, input_dtype=torch.long,
                      signal_at_head_input=True)
