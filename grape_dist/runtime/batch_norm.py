"""BatchNorm running statistics across data-parallel replicas, merged to one process's.

With `pipeline.dp` = D replicas of M micro-batches each, BatchNorm normalises the same D·M row
groups that one process with D·M micro-batches normalises (replica d holds the d-th slice of
the mini-batch), so losses and weight updates agree. The running statistics would not: each
replica's exponential moving average sees only its own micro-batches. Because the average is
linear, one process's value can be rebuilt exactly after every step. With a = 1 - momentum,
replica d updating from the common r0 through its n_d groups ends at
r_d = a^{n_d} r0 + c_d, c_d its groups' contribution; one process, which sees replica 0's groups
first, then replica 1's, ..., ends at

    r = (prod_d a^{n_d}) r0 + sum_d (prod_{d' > d} a^{n_d'}) c_d.

Each replica computes its weighted term and one sum over the replicas gives r everywhere (plus
the tracked-batch count, summed). Cost per step: one all-reduce of the BatchNorm buffers (a few
thousand numbers for ResNet-20).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Reduce = Callable[[list[torch.Tensor]], None]  # in-place sum over the replicas


def batch_norms(modules: Iterable[nn.Module]) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics, in a fixed order."""
    out = []
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
                if sub.momentum is None:
                    raise ValueError(f"{type(sub).__name__} with momentum=None (a cumulative "
                                     "average) cannot be merged over replicas; give it a "
                                     "momentum")
                out.append(sub)
    return out


class ReplicaStatistics:
    """Snapshot the running statistics before a step, merge them over replicas after it."""

    def __init__(self, layers: list[nn.modules.batchnorm._BatchNorm], replica: int, dp: int,
                 reduce: Reduce) -> None:
        self.layers = layers
        self.replica = replica
        self.dp = dp
        self.reduce = reduce
        self._before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def active(self) -> bool:
        return self.dp > 1 and bool(self.layers)

    def snapshot(self) -> None:
        if self.active:
            self._before = [(bn.running_mean.clone(), bn.running_var.clone(),
                             bn.num_batches_tracked.clone()) for bn in self.layers]

    @torch.no_grad()
    def merge(self) -> None:
        """After a step: every replica's buffers become one process's (see the module doc)."""
        if not self.active:
            return
        # Groups each replica normalised this step (0 for a replica without rows).
        counts = torch.zeros(self.dp, dtype=torch.float64,
                             device=self.layers[0].running_mean.device)
        bn0, (_, _, tracked0) = self.layers[0], self._before[0]
        counts[self.replica] = float(bn0.num_batches_tracked - tracked0)
        self.reduce([counts])
        terms = []
        for bn, (mean0, var0, tracked0) in zip(self.layers, self._before, strict=True):
            a = 1.0 - bn.momentum
            later = a ** float(counts[self.replica + 1:].sum())  # prod_{d' > d} a^{n_d'}
            own = a ** float(counts[self.replica])
            first = self.replica == 0  # adds the (prod_d a^{n_d}) r0 term once
            everything = a ** float(counts.sum())
            for now, before in ((bn.running_mean, mean0), (bn.running_var, var0)):
                term = later * (now.double() - own * before.double())
                if first:
                    term += everything * before.double()
                terms.append(term)
            terms.append((bn.num_batches_tracked - tracked0).double().reshape(1))
        self.reduce(terms)
        it = iter(terms)
        for bn, (_, _, tracked0) in zip(self.layers, self._before, strict=True):
            bn.running_mean.copy_(next(it))
            bn.running_var.copy_(next(it))
            bn.num_batches_tracked.copy_(tracked0 + next(it).long().reshape(()))
        self._before = []
