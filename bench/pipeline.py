"""The GrAPE pipeline against BP pipelines on the same stages, plus a schedule model.

    python bench/pipeline.py                          # 2 ranks x 1 thread (this 2-core machine)
    python bench/pipeline.py --nproc 8 --threads 2    # 8 ranks on a 16-core machine
    python bench/pipeline.py --preset resnet20        # ResNet-20 on CIFAR-shaped inputs
    python bench/pipeline.py --preset transformer     # the Shakespeare Transformer LM
    python bench/pipeline.py --preset table5 --depth 8    # the paper's Table 5 setting

Presets (`--preset`), each a model from the project's config (`build_model` with `model.*`
overrides, as the trainer builds it) on random inputs of the dataset's shape and dtype:

- `mlp` (default): a deep MLP, `--blocks` Linear(`--width`)+ReLU blocks and a Linear output
  block, batch 256, split by parameter count (the runtime's default).
- `resnet20`: He et al.'s CIFAR ResNet (`--depth`, default 20: stem, 9 residual blocks, head)
  on 3x32x32 images, 10 classes, batch 128.
- `transformer`: the repository's Shakespeare language model (configs/shakespeare_*): vocab
  128, d_model 128, 4 heads, `--depth` layers (default 4, macro feedback), context 128, batch
  32; labels are the next tokens, (batch, context).
- `table5`: the paper's Table 5 setting: d_model 128, 4 heads, `--depth` 2/4/8 layers, batch
  256, sequence 64, vocab 256 (as bench/table5.py). The paper's numbers are from a GPU; on a
  CPU 256 x 64 tokens per step is slow, `--batch` overrides the batch (say so when reporting).

The non-MLP presets are split by measured forward time (`--balance time`: the per-block costs
below, balanced by the runtime's exact partition and passed to every method as
`pipeline.stage_blocks`, so every method runs the same split; by parameter count a ResNet would
put most of its compute on the first stage).

For each method and micro-batch count the driver launches `torchrun --nproc_per_node=P` on this
file (one fresh process group per point, so peak memory is per configuration) and prints:
time per mini-batch (max over ranks, median of the timed steps), samples/s, and peak memory
per rank (RSS growth from just before the first step: activations, gradients, optimiser state,
communication buffers).

Methods: `grape` (sync: signals broadcast once per mini-batch), `grape-stream`
(pipeline.streaming: per micro-batch), `dfa` (the same runtime without tangents), and BP on
torch.distributed.pipelining over the same blocks: `bp-gpipe`, `bp-1f1b`, and the strongest
schedules torch ships, with two stages per rank: `bp-zb` (interleaved zero bubble), `bp-zbv`
(zero bubble V) and `bp-dualpipev`; `bp-deepspeed`: BP through DeepSpeed's pipeline engine
(`deepspeed.pipe.PipelineModule` over the same blocks and split, `engine.train_batch`: its 1F1B
TrainSchedule); `bp-native` is this runtime's all-forward-all-backward BP.
Each point also reports the parameters each rank holds (every rank materialises only its own
blocks).

    python bench/pipeline.py --preset resnet20 --json out.json   # also a JSON list of records
    python bench/pipeline.py --methods grape,bp-1f1b --micro 4 --trace traces/
    python -m grape_dist.report timeline traces/grape_M4 --out grape_M4.png

`--json FILE`: one record per point (bench "pipeline", model = the preset, method, micro_batches,
ms per mini-batch, peak_mb = the largest rank's, and the settings; a point that did not run has
ms null and its reason in not_run), rewritten after every point. `--trace DIR`: each point's
timed steps as per-rank timelines under DIR/<method>_M<m>/ (docs/pipeline.md, Timelines).

The schedule model (bottom of the output) simulates each schedule as per-rank sequences of
operations whose costs are measured here on one thread for every distinct block of the model
(forward, BP backward, forward with tangents, the streaming local update, the synchronous
end-of-step updates of GrAPE (with its B step) and DFA, and the optimiser step)
and a link cost (latency + bytes / bandwidth) measured between two ranks. It predicts the
measured points, then extrapolates: to P = 2 .. blocks on the preset's own model, and to
P = 2 .. 64 on a deep model of the same blocks (64 hidden blocks of the MLP, a CIFAR ResNet of
depth 128, a 64-layer Transformer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import merge_overrides, record, shipped_form, write_records  # noqa: E402

from grape_dist import trace  # noqa: E402
from grape_dist.config import load_config  # noqa: E402
from grape_dist.models import BlockModel, build_model  # noqa: E402
from grape_dist.models.mlp import dense_factories  # noqa: E402
from grape_dist.optim import build_optimizer  # noqa: E402
from grape_dist.rules import MicroBatch, OutputSignal, build_stage_rule  # noqa: E402
from grape_dist.runtime.partition import balanced_bounds, parameter_costs  # noqa: E402

METHODS = {
    "grape": ["rule=grape"],
    "grape-stream": ["rule=grape", "pipeline.streaming=true"],
    "dfa": ["rule=dfa"],
    "bp-1f1b": ["rule=bp", "pipeline.schedule=1f1b", "data.drop_last=true"],
    "bp-gpipe": ["rule=bp", "pipeline.schedule=gpipe", "data.drop_last=true"],
    "bp-zb": ["rule=bp", "pipeline.schedule=zero_bubble", "data.drop_last=true"],
    "bp-zbv": ["rule=bp", "pipeline.schedule=zbv", "data.drop_last=true"],
    "bp-dualpipev": ["rule=bp", "pipeline.schedule=dualpipev", "data.drop_last=true"],
    # DeepSpeed's pipeline engine (DeepSpeedPipe below); the config gives the layout and optimiser.
    "bp-deepspeed": ["rule=bp"],
    "bp-native": ["rule=bp"],
}
BP_METHODS = [m for m in METHODS if m.startswith("bp-") and m != "bp-native"]
# torch's schedules with two stages per rank (the schedule model does not simulate them).
TWO_STAGES_PER_RANK = ("bp-zb", "bp-zbv", "bp-dualpipev")
# Deep variants for the extrapolation: 64 hidden blocks of the preset's kinds.
DEEP_HIDDEN = 64


# ---------------------------------------------------------------------------------------------
# Presets: the model (from the project's config) and its random inputs.


@dataclass(frozen=True)
class Preset:
    """Config overrides for the model, the input per sample, and defaults."""

    batch: int
    depth: int = 0  # resnet: depth; transformer: layers (0: not used)
    seq: int = 0  # transformer: context (tokens per sequence)
    vocab: int = 0  # transformer: vocabulary
    balance: str = "params"

    @property
    def tokens(self) -> bool:
        return self.vocab > 0


PRESETS = {
    "mlp": Preset(batch=256),
    "resnet20": Preset(batch=128, depth=20, balance="time"),
    "transformer": Preset(batch=32, depth=4, seq=128, vocab=128, balance="time"),
    "table5": Preset(batch=256, depth=4, seq=64, vocab=256, balance="time"),
}


def model_overrides(args, depth: int | None = None) -> list[str]:
    """The preset's `model.*` config overrides (depth: the preset's unless given), and the
    dataset whose shapes the random inputs take (the config checks that they fit; no data is
    read)."""
    depth = depth or args.depth
    if args.preset == "resnet20":
        return ["model.name=resnet", f"model.depth={depth}", "data.name=cifar10"]
    if args.preset in ("transformer", "table5"):
        return ["model.name=transformer", "model.d_model=128", "model.heads=4",
                f"model.layers={depth}", "model.feedback=macro", "data.name=shakespeare",
                f"data.seq_len={PRESETS[args.preset].seq}"]
    return []


def input_shape(args) -> tuple[int, ...]:
    if args.preset == "resnet20":
        return (3, 32, 32)
    if PRESETS[args.preset].tokens:
        return (PRESETS[args.preset].seq,)
    return (args.width,)


def num_classes(args) -> int:
    return PRESETS[args.preset].vocab or 10


def deep_mlp(blocks: int, width: int) -> BlockModel:
    """`blocks` Linear(width)+ReLU blocks and a Linear head, on the meta device."""
    return BlockModel(dense_factories(width, [width] * blocks, 10, "relu", False), (width,), 10)


def build_meta_model(args, deep: bool = False) -> BlockModel:
    """The preset's model on the meta device, from the project's config; `deep`: the variant
    with DEEP_HIDDEN hidden blocks for the extrapolation."""
    if args.preset == "mlp":
        return deep_mlp(DEEP_HIDDEN if deep else args.blocks, args.width)
    depth = None
    if deep:
        # A CIFAR ResNet of depth 6n + 2 has 3n residual blocks and the stem; a Transformer
        # one block per layer and the embedding.
        depth = 6 * ((DEEP_HIDDEN - 1) // 3) + 2 if args.preset == "resnet20" else DEEP_HIDDEN
    cfg = load_config(None, model_overrides(args, depth))
    return build_model(cfg.model, input_shape(args), num_classes(args))


def random_batch(args, rows: int, device: torch.device, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of the preset's shapes and dtypes (time does not depend on values):
    token ids and next-token labels (rows, seq) for a language model."""
    classes, shape = num_classes(args), input_shape(args)
    if PRESETS[args.preset].tokens:
        x = torch.randint(0, classes, (rows, *shape), generator=generator)
        y = torch.randint(0, classes, (rows, *shape), generator=generator)
    else:
        x = torch.randn(rows, *shape, generator=generator)
        y = torch.randint(0, classes, (rows,), generator=generator)
    return x.to(device), y.to(device)


def describe(args) -> str:
    model = build_meta_model(args)
    n = len(model.blocks)
    if args.preset == "mlp":
        return f"deep MLP {args.blocks} x Linear({args.width})+ReLU + head"
    if args.preset == "resnet20":
        return (f"ResNet-{args.depth} ({n} blocks: stem, {n - 2} residual, head), 3x32x32, "
                "10 classes")
    p = PRESETS[args.preset]
    return (f"Transformer LM ({args.preset} preset) d_model 128, 4 heads, {args.depth} layers "
            f"({n} blocks: embed, {n - 2} layers, head), sequence {p.seq}, vocab {p.vocab}")


# The shipped config whose `feedback` and `grape` sections are each preset's dfa / grape form.
SHIPPED = {"resnet20": "cifar10_resnet20", "transformer": "shakespeare_transformer",
           "table5": "shakespeare_transformer"}


def form_overrides(args, rule: str) -> list[str]:
    """The direct rules' form: the shipped config's (`--form shipped`), or the same with the
    paper's one feedback point per block (`--form paper`: only the points differ), then the
    explicit --routing / --tangent_samples."""
    form = shipped_form(SHIPPED.get(args.preset, ""), rule)
    if args.form == "paper":
        form = merge_overrides(form, ["feedback.points=block"])
    explicit = [f"grape.routing={args.routing}"] if args.routing else []
    if args.tangent_samples is not None:
        explicit.append(f"grape.tangent_samples={args.tangent_samples}")
    return merge_overrides(form, explicit)


def resolve_form(args) -> None:
    """Fill args.routing / tangent_samples / points from the form (the schedule model and the
    header need them)."""
    cfg = load_config(None, [*model_overrides(args), *form_overrides(args, "grape")])
    args.routing = cfg.grape.routing
    args.tangent_samples = cfg.grape.tangent_samples
    args.points = cfg.feedback.points


def _config(method: str, args, micro: int, rule: str | None = None,
            stage_blocks: list[int] | None = None):
    rule = rule or next(o.split("=")[1] for o in METHODS[method] if o.startswith("rule="))
    form = form_overrides(args, rule) if rule in ("dfa", "grape") else []
    return load_config(None, [
        *METHODS[method], f"rule={rule}", *model_overrides(args),
        "optim.name=sgd", "optim.lr=0.01", "optim.momentum=0.9",
        f"data.batch_size={args.batch}", f"pipeline.micro_batches={micro}", *form,
        *([f"pipeline.stage_blocks={stage_blocks}"] if stage_blocks else []),
    ])


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def act_elements(args, model: BlockModel) -> int:
    """Elements of the widest activation a stage boundary can carry, for the whole batch."""
    return args.batch * max(b.out_features for b in list(model.blocks)[:-1])


# ---------------------------------------------------------------------------------------------
# Worker: one point, under torchrun.


def worker(args) -> None:
    import torch.distributed as dist

    from grape_dist.build import build_engine
    from grape_dist.distributed import backend_for, resolve_device
    from grape_dist.runtime import plan_layout

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    world = int(os.environ["WORLD_SIZE"])
    split = json.loads(args.stage_blocks) if args.stage_blocks else None
    cfg = _config(args.method, args, args.micro, stage_blocks=split)
    model = build_meta_model(args)
    # Checked before joining the group, like the trainer (a refused point prints its reason).
    layout = plan_layout(cfg, len(model.blocks), world, backend_for(device))
    dist.init_process_group(backend_for(device))
    if args.trace:
        # The timed steps, one file per rank (before the stages exist: torch's schedules are
        # instrumented when built).
        trace.enable(args.trace, dist.get_rank(), skip=args.warmup, steps=args.steps,
                     device=device)
    if args.method == "bp-deepspeed":
        pipe = DeepSpeedPipe(args, cfg, model, layout, device)
    else:
        pipe = build_engine(cfg, model, layout, device)
    x, y = random_batch(args, args.batch, device, torch.Generator().manual_seed(1))
    cuda = device.type == "cuda"
    dist.barrier()
    rss0 = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device) / 2**20
    times = []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        pipe.train_step(x, y, step)
        if cuda:
            torch.cuda.synchronize(device)
        t = torch.tensor([time.perf_counter() - t0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if step >= args.warmup:
            times.append(float(t))
    # Peak memory: GPU allocator high-water mark on CUDA, RSS growth on the CPU.
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 - mem0
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    peak = torch.tensor([peak_mb], device=device)
    peaks = [torch.zeros(1, device=device) for _ in range(world)]
    dist.all_gather(peaks, peak)
    trace.save()
    link = _link_cost(args, dist, device, act_elements(args, model)) if args.measure_link \
        else None
    params = pipe.memory_report()["parameters_per_rank"]
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({
            "method": args.method, "P": world, "M": args.micro,
            "ms": 1e3 * statistics.median(times), "peak_mb": [round(float(p), 1) for p in peaks],
            "params": params, "link": link}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


class _DSBlock(torch.nn.Module):
    """One block of the model for DeepSpeed's `LayerSpec`: built only on the rank that holds it,
    with the runtime's initial weights (keyed by seed and block index)."""

    def __init__(self, model: BlockModel, index: int, seed: int) -> None:
        super().__init__()
        self.block = model.build_block(index, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _DSStageStart(_DSBlock):
    """The first block of a stage: `partition_method="type:_DSStageStart"` gives each stage one
    of these, and DeepSpeed's balanced partition then cuts exactly before each (checked)."""


class DeepSpeedPipe:
    """BP through DeepSpeed's pipeline engine: a `deepspeed.pipe.PipelineModule` whose layers are
    the model's blocks, split as the other methods split them, trained by `engine.train_batch`
    (DeepSpeed's TrainSchedule: 1F1B over M micro-batches, gradients accumulated, then the
    optimiser step) with the same loss (the mean cross entropy over every output position) and
    the same optimiser (the project's `build_optimizer`, passed to `deepspeed.initialize`)."""

    def __init__(self, args, cfg, model: BlockModel, layout, device: torch.device) -> None:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.pipe import LayerSpec, PipelineModule

        from grape_dist.distributed.torch_schedules import _mean_ce
        from grape_dist.runtime.partition import partition

        if layout.dp != 1 or layout.num_stages != layout.world_size:
            raise ValueError(f"bp-deepspeed runs one stage per rank, got {layout.describe()}")
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts torchrun's group
        n = len(model.blocks)
        # The runtime's split: explicit (the time-balanced presets) or by parameter count.
        bounds = partition(model, layout.num_stages, cfg.pipeline.stage_blocks or None)
        starts = {a for a, _ in bounds}
        specs = [LayerSpec(_DSStageStart if i in starts else _DSBlock, model, i, cfg.seed)
                 for i in range(n)]
        module = PipelineModule(layers=specs, num_stages=layout.num_stages, loss_fn=_mean_ce,
                                partition_method="type:_DSStageStart")
        parts = [int(b) for b in module.parts]
        if parts != [a for a, _ in bounds] + [n]:
            raise RuntimeError(f"DeepSpeed split the blocks at {parts}, not at the runtime's "
                               f"{[a for a, _ in bounds] + [n]}")
        optimizer = build_optimizer(module.parameters(), cfg.optim)
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": args.batch // args.micro,
            "gradient_accumulation_steps": args.micro, "steps_per_print": 10**9,
            "wall_clock_breakdown": False, "zero_optimization": {"stage": 0},
            # DeepSpeed clips the gradient norm at 1.0 unless told otherwise; the others don't.
            "gradient_clipping": 0.0})
        torch.set_num_threads(args.threads)
        self.micro = args.micro
        local = torch.tensor([sum(p.numel() for p in module.parameters())], device=device)
        counts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, local)
        self.params = [int(c) for c in counts]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One mini-batch: M (inputs, labels) micro-batches; DeepSpeed feeds the inputs to the
        first stage and the labels to the last; returns the mean loss (on every rank)."""
        with trace.step(step):
            return self.engine.train_batch(iter(list(zip(x.chunk(self.micro),
                                                         y.chunk(self.micro)))))

    def memory_report(self) -> dict[str, list]:
        return {"parameters_per_rank": self.params}


def _link_cost(args, dist, device: torch.device, act: int) -> dict | None:
    """Ping-pong between ranks 0 and 1: one-way time for small and activation-sized tensors
    (`act`: the widest boundary activation of the whole batch, in elements)."""
    if dist.get_world_size() < 2:
        return None
    from grape_dist.distributed import p2p
    out = {}
    for n in (1, act // args.micro, 4 * act):
        buf = torch.zeros(n, device=device)
        ts = []
        for _ in range(14):
            dist.barrier()
            t0 = time.perf_counter()
            if dist.get_rank() == 0:
                p2p.wait_all(p2p.isend([buf], 1, buf.device))
                p2p.recv(1, buf.device)
            elif dist.get_rank() == 1:
                p2p.recv(0, buf.device)
                p2p.wait_all(p2p.isend([buf], 0, buf.device))
            ts.append((time.perf_counter() - t0) / 2)
        out[n * 4] = statistics.median(ts[4:])
    return out


# ---------------------------------------------------------------------------------------------
# Per-block costs on one thread, for the schedule model.

COSTS = ("fwd", "bwd", "fwd_jvp", "update", "sync", "sync_dfa", "opt")


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_s(fn, n: int = 10) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def block_signature(model: BlockModel, i: int) -> tuple:
    """Blocks with the same signature cost the same: same layers, input shape and role (the
    first block computes no input gradient; the last is the output block)."""
    block = model.blocks[i]
    shape = model.input_shape if i == 0 else model.blocks[i - 1].out_shape
    return (i == 0, i == len(model.blocks) - 1, tuple(shape),
            repr([m for m in block.children()]))


def tangent_rows(args, mb: MicroBatch) -> int:
    """Tangent rows a micro-batch carries (the runtime's rule: `tangent_samples` rows of the
    mini-batch, evenly spaced)."""
    m = min(args.tangent_samples or mb.total, mb.total)
    return -(-(mb.start + mb.size) * m // mb.total) - -(-mb.start * m // mb.total)


def block_costs(args, micro: list[int]) -> dict[int, dict[tuple, dict[str, float]]]:
    """{M: {block signature: {cost: seconds}}} for every distinct block of the preset's model,
    at rows = batch / M (`one_block_costs`)."""
    from grape_dist.distributed import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = build_meta_model(args)
    first_of: dict[tuple, int] = {}
    for i in range(len(model.blocks)):
        first_of.setdefault(block_signature(model, i), i)
    model.materialize(first_of.values(), device=device)
    counter = iter(range(10**9))
    return {M: {sig: one_block_costs(args, model, i, M, device, counter)
                for sig, i in first_of.items()} for M in micro}


def one_block_costs(args, model: BlockModel, i: int, M: int, device: torch.device,
                    counter) -> dict[str, float]:
    """Block i's costs at rows = batch / M: BP forward (with its graph) and backward (weight
    gradients and, except for the first block, the input gradient); GrAPE's forward carrying
    tangents; the streaming DFA local update of one micro-batch (`update`); the synchronous end
    of a mini-batch of M micro-batches (`sync`: GrAPE's finish_step: B step, local updates
    fused over the micro-batches, optimiser step; `sync_dfa`: DFA's, without the B step); the
    optimiser step alone (`opt`)."""
    n, spec, rows = len(model.blocks), model.signal_spec, args.batch // M
    block = model.blocks[i]
    params = list(block.parameters())
    if i == 0:
        x = random_batch(args, rows, device)[0]
    else:
        x = torch.randn(rows, *model.blocks[i - 1].out_shape, device=device)
    c: dict[str, float] = {}
    c["fwd"] = _median_s(lambda: block(x.detach().requires_grad_(i > 0)), args.cost_reps)
    xg = x.detach().requires_grad_(i > 0)
    h = block(xg)
    grad = torch.randn_like(h)
    wrt = [xg, *params] if i > 0 else params
    c["bwd"] = _median_s(lambda: torch.autograd.grad(h, wrt, grad, retain_graph=True),
                         args.cost_reps)
    grape = build_stage_rule(_config("grape", args, M), model, i, i + 1)
    dfa = build_stage_rule(_config("grape-stream", args, M, rule="dfa"), model, i, i + 1)
    dfa_sync = build_stage_rule(_config("dfa", args, M), model, i, i + 1)

    def mb_at(j: int, step: int) -> MicroBatch:
        return MicroBatch(step, j, j * rows, rows, args.batch)

    def tangents_in(mb: MicroBatch) -> torch.Tensor | None:
        m = tangent_rows(args, mb)
        if i == 0 or m == 0:
            return None
        streams = 1 if args.routing == "shared" else len(
            [p for p in model.feedback_points(args.points == "layer") if p.block < i])
        return torch.randn(streams, m, *model.blocks[i - 1].out_shape, device=device)

    def signal(mb: MicroBatch, with_tangents: bool) -> OutputSignal:
        width = spec.num_classes if i == n - 1 else spec.signal_width
        pos = rows * spec.positions
        t = None
        if with_tangents and tangent_rows(args, mb):
            streams = 1 if args.routing == "shared" else len(
                model.feedback_points(args.points == "layer"))
            t = torch.randn(streams, tangent_rows(args, mb), *spec.tangent_tail(),
                            device=device)
        return OutputSignal(1e-3 * torch.randn(pos, width, device=device),
                            torch.zeros(pos, spec.num_classes, device=device), t, args.batch)

    def fwd_tangent():
        grape.reset_step()
        mb = mb_at(0, next(counter))
        return grape.forward(mb, x, tangents_in(mb))

    c["fwd_jvp"] = _median_s(fwd_tangent, args.cost_reps)

    def update() -> float:
        dfa.reset_step()
        mb = mb_at(0, 0)
        dfa.forward(mb, x, None)
        sig = signal(mb, False)
        _sync()
        t0 = time.perf_counter()
        dfa.backward(mb, sig, None)
        _sync()
        return time.perf_counter() - t0

    for _ in range(3):
        update()
    c["update"] = statistics.median(update() for _ in range(args.cost_reps))
    dfa.reset_step()

    def sync_update(rule, tangents: bool) -> float:
        rule.reset_step()
        step = next(counter)
        mbs = [mb_at(j, step) for j in range(M)]
        for mb in mbs:
            rule.forward(mb, x, tangents_in(mb) if tangents else None)
        for mb in mbs:
            rule.backward(mb, signal(mb, tangents), None)
        _sync()
        t0 = time.perf_counter()
        rule.finish_step()
        _sync()
        return time.perf_counter() - t0

    for key, rule, tangents in (("sync", grape, True), ("sync_dfa", dfa_sync, False)):
        for _ in range(2):
            sync_update(rule, tangents)
        c[key] = statistics.median(sync_update(rule, tangents)
                                   for _ in range(max(3, args.cost_reps // 2)))
        rule.reset_step()
    opt = build_optimizer(params, _config("bp-native", args, 1).optim)
    for p in params:
        p.grad = torch.zeros_like(p)
    c["opt"] = _median_s(opt.step, args.cost_reps) if params else 0.0
    for p in params:
        p.grad = None
    return c


def stage_costs(model: BlockModel, costs: dict[tuple, dict[str, float]],
                bounds: list[tuple[int, int]]) -> list[dict[str, float]]:
    """Each stage's costs: the sum over its blocks."""
    sigs = [block_signature(model, i) for i in range(len(model.blocks))]
    missing = {s for s in sigs if s not in costs}
    if missing:
        raise ValueError(f"no measured cost for {len(missing)} block kind(s) of this model")
    return [{k: sum(costs[sigs[i]][k] for i in range(a, b)) for k in COSTS} for a, b in bounds]


def fwd_bounds(model: BlockModel, costs: dict[tuple, dict[str, float]], stages: int
               ) -> list[tuple[int, int]]:
    """The runtime's exact contiguous partition, balanced by measured forward time."""
    return balanced_bounds([costs[block_signature(model, i)]["fwd"]
                            for i in range(len(model.blocks))], stages)


# ---------------------------------------------------------------------------------------------
# The schedule model: a per-rank list of operations, each starting when its rank is free and
# its inputs have arrived.


@dataclass
class Links:
    """Per micro-batch transfer times: `act[s]` from stage s to s + 1 (BP's input gradient goes
    back over the same link), `act_t[s]` the same with GrAPE's tangent rows; `signal` one
    micro-batch's broadcast signal and `signal_all` the whole mini-batch's, each over
    ceil(log2 P) hops."""

    act: list[float]
    act_t: list[float]
    signal: float
    signal_all: float


def links(model: BlockModel, args, bounds: list[tuple[int, int]], M: int, link: dict | None,
          tangents: int) -> Links:
    """Transfer times from the measured link (latency + bytes x seconds per byte)."""
    P = len(bounds)
    if not link:
        return Links([0.0] * P, [0.0] * P, 0.0, 0.0)
    sizes = sorted(int(k) for k in link)
    lat, big = link[str(sizes[0])], link[str(sizes[-1])]
    per_byte = max(0.0, (big - lat) / (sizes[-1] - sizes[0]))
    rows = args.batch // M
    feats = [model.blocks[b - 1].out_features for _, b in bounds]
    spec = model.signal_spec
    sig = 8 * (rows * spec.positions * spec.signal_width
               + tangents * math.prod(spec.tangent_tail()))  # float64 packet
    hops = max(1, math.ceil(math.log2(P))) if P > 1 else 0
    return Links([lat + per_byte * 4 * rows * f for f in feats],
                 [lat + per_byte * 4 * (rows + tangents) * f for f in feats],
                 hops * (lat + per_byte * sig), hops * (lat + per_byte * sig * M))


def simulate(method: str, st: list[dict[str, float]], M: int, ln: Links) -> float:
    """Predicted seconds per mini-batch of `method` on the stages `st` (per-stage costs of one
    micro-batch; `sync` of the whole mini-batch) with M micro-batches."""
    P = len(st)
    free = [0.0] * P
    done: dict[tuple, float] = {}

    def run(s: int, op: tuple, cost: float, deps: list[float]) -> None:
        start = max([free[s], *deps])
        free[s] = start + cost
        done[op] = free[s]

    if method.startswith("bp"):
        orders = []
        for s in range(P):
            if method in ("bp-1f1b", "bp-deepspeed"):  # DeepSpeed's TrainSchedule is 1F1B
                warm = min(M, P - 1 - s)
                seq = [("F", j) for j in range(warm)]
                f_next, b_next = warm, 0
                while b_next < M:
                    if f_next < M:
                        seq.append(("F", f_next))
                        f_next += 1
                    seq.append(("B", b_next))
                    b_next += 1
            else:  # gpipe and native: all forwards, then all backwards
                seq = [("F", j) for j in range(M)] + [("B", j) for j in range(M)]
            orders.append(seq)
        # Execute in a global order that respects dependencies (simple list scheduling).
        idx = [0] * P
        while any(idx[s] < len(orders[s]) for s in range(P)):
            progressed = False
            for s in range(P):
                if idx[s] >= len(orders[s]):
                    continue
                kind, j = orders[s][idx[s]]
                if kind == "F":
                    dep = [] if s == 0 else [done.get(("F", s - 1, j))]
                    if None in dep:
                        continue
                    run(s, ("F", s, j), st[s]["fwd"], [d + ln.act[s - 1] for d in dep])
                else:
                    dep = [done.get(("F", s, j))] + ([] if s == P - 1 else
                                                     [done.get(("B", s + 1, j))])
                    if None in dep:
                        continue
                    deps = [dep[0]] + [d + ln.act[s] for d in dep[1:]]
                    run(s, ("B", s, j), st[s]["bwd"], deps)
                idx[s] += 1
                progressed = True
            if not progressed:
                raise RuntimeError("schedule deadlock in the model")
        return max(free[s] + st[s]["opt"] for s in range(P))
    # Direct rules: forward(+tangents) chain, then (sync) one broadcast and every stage's
    # end-of-step update, or (streaming) each micro-batch's update once its signal arrived.
    grape = method.startswith("grape")
    fwd, act = ("fwd_jvp", ln.act_t) if grape else ("fwd", ln.act)
    for j in range(M):
        for s in range(P):
            dep = [] if s == 0 else [done[("F", s - 1, j)] + act[s - 1]]
            run(s, ("F", s, j), st[s][fwd], dep)
            if method == "grape-stream":
                w = P - 1 - s
                if j - w >= 0:
                    run(s, ("U", s, j - w), st[s]["update"],
                        [done.get(("F", P - 1, j - w), 0) + ln.signal])
    if method == "grape-stream":
        for s in range(P):
            for j in range(max(0, M - (P - 1 - s)), M):
                run(s, ("U", s, j), st[s]["update"], [done[("F", P - 1, j)] + ln.signal])
        # The end of the step: GrAPE's B step (sync less DFA's sync) and the optimiser step.
        return max(free[s] + st[s]["opt"] + max(0.0, st[s]["sync"] - st[s]["sync_dfa"])
                   for s in range(P))
    # `sync` includes the optimiser step.
    for s in range(P):
        run(s, ("U", s), st[s]["sync" if grape else "sync_dfa"],
            [done[("F", P - 1, M - 1)] + ln.signal_all])
    return max(free)


# ---------------------------------------------------------------------------------------------


def _point_split(args, method: str, model: BlockModel, costs1) -> list[int] | None:
    """`pipeline.stage_blocks` for a point: None (the runtime's parameter split) or the split
    balanced by measured forward time, over P or 2P stages."""
    if args.balance != "time":
        return None
    stages = 2 * args.nproc if method in TWO_STAGES_PER_RANK else args.nproc
    if stages > len(model.blocks):
        return None  # plan_layout refuses it and says why
    return [b - a for a, b in fwd_bounds(model, costs1, stages)]


def _failure(r: subprocess.CompletedProcess) -> str:
    """The exception a failed point ended with (the last "...Error: ..." line that is not a
    consequence: a peer's closed connection, torchrun's summary), or the tail of its output."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", x) for x in
             (r.stdout + r.stderr).splitlines()]
    errors = [x for x in lines if re.match(r"[\w.]*(Error|Exception): ", x)]
    causes = [x for x in errors if not any(k in x for k in ("ChildFailedError",
                                                             "Connection closed by peer"))]
    return (causes or errors or [" | ".join(lines[-3:])])[-1]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def driver(args) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    backend = "nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo"
    model = build_meta_model(args)
    micro = sorted({int(m) for m in args.micro.split(",")})
    print(f"# {platform.machine()} ({_cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start), torch {torch.__version__}, {backend}, "
          f"P={args.nproc} ranks x {args.threads} thread(s), {describe(args)}, batch "
          f"{args.batch}, direct rules' form: {args.form} (feedback points: {args.points}, "
          f"tangents: routing={args.routing} m={args.tangent_samples or 'all'})"
          f", SGD(0.9); median of {args.steps} steps after {args.warmup} warm-up")
    print(f"# command: python bench/pipeline.py {' '.join(sys.argv[1:])}", flush=True)
    # Per-block costs first: the time-balanced split comes from them.
    t0 = time.perf_counter()
    costs = block_costs(args, sorted({1, *micro}))
    print(f"# per-block costs measured in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.balance == "time":
        print(f"# split by measured forward time (blocks per stage): P stages "
              f"{_point_split(args, 'grape', model, costs[1])}, 2P stages (zb, zbv, dualpipev) "
              f"{_point_split(args, 'bp-zb', model, costs[1])}", flush=True)
    results = []
    records: list[dict] = []  # --json
    link = None
    for method in args.methods.split(","):
        for m in micro:
            cmd = [torchrun, "--standalone", f"--nproc_per_node={args.nproc}", __file__,
                   "--worker", "--method", method, "--micro", str(m)]
            trace_dir = Path(args.trace) / f"{method}_M{m}" if args.trace else None
            if trace_dir is not None:
                cmd.append(f"--trace={trace_dir}")
            cmd += [f"--{k}={v}" for k, v in (("preset", args.preset), ("batch", args.batch),
                                              ("depth", args.depth), ("blocks", args.blocks),
                                              ("width", args.width), ("threads", args.threads),
                                              ("steps", args.steps), ("warmup", args.warmup),
                                              ("routing", args.routing), ("form", args.form),
                                              ("device", args.device),
                                              ("tangent_samples", args.tangent_samples))]
            split = _point_split(args, method, model, costs[1])
            if split:
                cmd.append(f"--stage_blocks={json.dumps(split)}")
            if link is None and args.nproc > 1:
                cmd.append("--measure_link")
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                reason = _failure(r)
                print(f"{method:>13s} M={m}: not run: {reason}", flush=True)
                if args.json:
                    records.append(_record(args, method, m, None, not_run=reason))
                    write_records(args.json, records)
                continue
            res = json.loads(line[7:])
            link = link or res.get("link")
            results.append(res)
            param_mb = [round(4 * n / 2**20, 1) for n in res["params"]]
            print(f"{method:>13s} M={m}: {res['ms']:8.1f} ms/mini-batch "
                  f"{1e3 * args.batch / res['ms']:8.0f} samples/s  peak MB per rank "
                  f"{res['peak_mb']}  parameter MB per rank {param_mb}", flush=True)
            if trace_dir is not None:
                print(f"{'':>13s} timeline: {trace_dir} (python -m grape_dist.report "
                      f"timeline {trace_dir})", flush=True)
            if args.json:
                records.append(_record(args, method, m, res))
                write_records(args.json, records)
    by = {(r["method"], r["M"]): r for r in results}
    print("\n## ratios (same blocks, same micro-batches): BP time / GrAPE time")
    for m in micro:
        for grape in ("grape", "grape-stream"):
            for bp in BP_METHODS:
                if (grape, m) in by and (bp, m) in by:
                    g, b = by[(grape, m)], by[(bp, m)]
                    print(f"M={m}: {grape} throughput / {bp} = {b['ms'] / g['ms']:.2f}x; "
                          f"peak memory {max(g['peak_mb']):.0f} vs {max(b['peak_mb']):.0f} MB")
    schedule_model(args, model, costs, micro, results, link)


def _record(args, method: str, micro: int, res: dict | None, **extra) -> dict:
    """A --json record of a point (`res`: the worker's RESULT; None: not run, ms null)."""
    more = {} if res is None else {
        "samples_per_s": round(1e3 * args.batch / res["ms"], 1),
        "peak_mb_per_rank": res["peak_mb"], "params_per_rank": res["params"]}
    return record("pipeline", args.preset, method, micro, res["ms"] if res else None,
                  max(res["peak_mb"]) if res else None, nproc=args.nproc,
                  threads=args.threads, batch=args.batch, steps=args.steps,
                  warmup=args.warmup, device=args.device, traced=bool(args.trace),
                  **more, **extra)


def schedule_model(args, model: BlockModel, costs, micro: list[int], results: list[dict],
                   link: dict | None) -> None:
    print("\n## schedule model: per-block costs on one thread (ms per micro-batch; sync: the "
          "whole mini-batch's end-of-step update incl. optimiser)")
    names = {}
    for i, b in enumerate(model.blocks):
        names.setdefault(block_signature(model, i), []).append(b.name)
    for m in micro:
        print(f"M={m} (rows {args.batch // m}):")
        for sig, c in costs[m].items():
            label = ",".join(names[sig]) if len(names[sig]) <= 3 else \
                f"{names[sig][0]}..{names[sig][-1]} ({len(names[sig])} blocks)"
            print(f"  {label:>28s}: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in c.items()))
    if link:
        sizes = sorted(int(k) for k in link)
        print("link one-way (ms): " + ", ".join(f"{s} B: {1e3 * link[str(s)]:.3f}"
                                               for s in sizes))

    def bounds_for(mdl: BlockModel, P: int, c1) -> list[tuple[int, int]]:
        if args.balance == "time":
            return fwd_bounds(mdl, c1, P)
        return balanced_bounds(parameter_costs(mdl), P)

    def predict(mdl: BlockModel, method: str, P: int, M: int) -> float:
        bounds = bounds_for(mdl, P, costs[1])
        rows = MicroBatch(0, 0, 0, args.batch // M, args.batch)
        ln = links(mdl, args, bounds, M, link, tangent_rows(args, rows))
        return simulate(method, stage_costs(mdl, costs[M], bounds), M, ln)

    print(f"\n## schedule model vs measured (P = {args.nproc})")
    for res in results:
        if res["method"] in TWO_STAGES_PER_RANK:
            continue  # the model simulates GPipe and 1F1B orders only
        pred = predict(model, res["method"], args.nproc, res["M"])
        print(f"{res['method']:>13s} M={res['M']}: predicted {1e3 * pred:8.1f} ms, measured "
              f"{res['ms']:8.1f} ms ({100 * (1e3 * pred / res['ms'] - 1):+.0f}%)")
    M = max(micro)
    methods = ("grape", "grape-stream", "dfa", "bp-1f1b", "bp-gpipe")
    deep = build_meta_model(args, deep=True)
    for mdl, title in ((model, f"this model ({len(model.blocks)} blocks)"),
                       (deep, f"a deep variant, {len(deep.blocks)} blocks "
                              f"({DEEP_HIDDEN} hidden blocks of this kind)")):
        print(f"\n## schedule model extrapolated: {title}, M = {M}, ms per mini-batch")
        print(f"{'P':>4s} " + " ".join(f"{m:>13s}" for m in methods)
              + "  grape/1f1b speed-up")
        for P in (2, 4, 8, 16, 32, 64):
            if P > len(mdl.blocks):
                break
            row = [predict(mdl, m, P, M) for m in methods]
            print(f"{P:>4d} " + " ".join(f"{1e3 * v:13.1f}" for v in row)
                  + f"  {row[3] / row[0]:.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mlp", choices=list(PRESETS))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (GPU + nccl if present), cpu, cuda")
    p.add_argument("--batch", type=int, default=0, help="0: the preset's")
    p.add_argument("--depth", type=int, default=0,
                   help="resnet20: ResNet depth (6n + 2); transformer, table5: layers "
                        "(0: the preset's)")
    p.add_argument("--blocks", type=int, default=8, help="mlp: hidden blocks")
    p.add_argument("--width", type=int, default=1024, help="mlp: width")
    p.add_argument("--balance", default="", choices=["", "params", "time"],
                   help="stage split: by parameter count (the runtime's default) or by measured "
                        "forward time ('': the preset's)")
    p.add_argument("--micro", default="1,4,8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--form", default="shipped", choices=["shipped", "paper"],
                   help="the direct rules' form: the preset's shipped config's (feedback "
                        "points, tangent rows, routing), or the same with the paper's one "
                        "feedback point per block")
    p.add_argument("--routing", default="", choices=["", "shared", "per_block"],
                   help="GrAPE's tangent routing ('': the form's)")
    p.add_argument("--tangent_samples", type=int, default=None,
                   help="GrAPE's tangent rows (0: every row; default: the form's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cost_reps", type=int, default=10,
                   help="timed repeats per per-block cost of the schedule model")
    p.add_argument("--json", metavar="FILE",
                   help="also write the measured points as a JSON list of records (bench, "
                        "model, method, micro_batches, ms per mini-batch, peak_mb: the "
                        "largest rank's; and the settings), rewritten after every point")
    p.add_argument("--trace", metavar="DIR",
                   help="record each point's timed steps as per-rank timelines under "
                        "DIR/<method>_M<m>/ (grape_dist/trace.py; spans synchronise a GPU, so "
                        "traced times are not the untraced ones)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--method", default="grape")
    p.add_argument("--stage_blocks", default="")
    p.add_argument("--measure_link", action="store_true")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset.batch
    args.depth = args.depth or preset.depth
    args.balance = args.balance or preset.balance
    resolve_form(args)
    if args.worker:
        args.micro = int(args.micro)
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
