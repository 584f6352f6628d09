"""The paper's Table 5 on one device: a Transformer (d_model 128, batch 256, sequence 64, depth
2/4/8); per-step time of sequential BP, a fair BP and layer-parallel GrAPE.

    python bench/table5.py --device cuda --json out.json          # the paper's setting
    python bench/table5.py --device cpu --threads 2 --batch 8 --depths 2 --steps 3   # smoke run

Methods, measured side by side in one run on the same model and data (random tokens; time does
not depend on the values), SGD(0.9), lr 0.01 for every method (the paper's local optimiser):

- `bp-seq`: this runtime's BP rule on one stage: the eager, sequential forward + backward the
  paper compares against.
- `bp-eager`: the plain PyTorch step on the same blocks (`BlockModel.forward`, cross-entropy,
  `loss.backward()`, fused SGD), no runtime in between.
- `bp-graph` (CUDA): that step captured whole in a CUDA graph (static input, capturable fused
  SGD) and replayed: no Python or launch overhead left. `--compile` adds `bp-compile`
  (torch.compile of the model, fused SGD). The fair BP is the fastest of these.
- `grape-seq`: GrAPE (shared tangent routing, tangents on every row as the paper's
  double-forward) on one stage, blocks one after another.
- `grape-streams`: the same with one stage per block, each on its own CUDA stream
  (`pipeline.stage_streams`): after the forward, every block's B step and local update run
  concurrently. `grape-streams-m32`: tangents on 32 rows of the batch.
- `dfa-streams`: DFA (no tangents) on the same streams.
- `grape-layer-seq`, `grape-layer-streams`, `dfa-layer-streams`: the same with a feedback point
  at every weight layer (`feedback.points=layer`, docs/points.md; GrAPE with tangents on 32
  rows); `grape-layer-graph` (`--grape-graph`): `grape-layer-streams` in one CUDA graph.
- `grape-graph` (CUDA, `--grape-graph`): `grape-streams`' whole step (forward, signal, every
  stage's B step and update, with its stream forks and joins) captured in one CUDA graph and
  replayed, as `bp-graph` is for BP. Inside the graph the tangent noise comes from the default
  CUDA generator (advanced at each replay) instead of the keyed streams. `grape-graph-seq`: the
  same on one stream (what the streams add under a graph); `grape-graph-m32`: tangents on 32
  rows.

Each time is the median of `--steps` steps after `--warmup` (CUDA: synchronised before and
after each step; the methods are interleaved step by step so drift falls on all alike). The
forward section compares the plain forward (no autograd) with the forward carrying the shared
tangent bundle on all rows. Peak memory: the allocator's high-water mark over two steps of each
method alone (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import median_ms, sync  # noqa: E402

from grape_dist.build import build_engine  # noqa: E402
from grape_dist.config import load_config  # noqa: E402
from grape_dist.models.transformer import build_transformer  # noqa: E402
from grape_dist.rules.tangents import block_forward  # noqa: E402
from grape_dist.runtime import Layout  # noqa: E402

# The paper's Table 5 (ms per batch, one A100): sequential BP and its layer-parallel prototype.
PAPER = {2: (9.1, 3.0), 4: (17.5, 6.2), 8: (35.8, 12.1)}
OPTIM = ["optim.name=sgd", "optim.lr=0.01", "optim.momentum=0.9"]
ENGINE_METHODS = {
    "bp-seq": (["rule=bp"], False),
    "grape-seq": (["rule=grape", "grape.routing=shared"], False),
    "grape-streams": (["rule=grape", "grape.routing=shared"], True),
    "grape-streams-m32": (["rule=grape", "grape.routing=shared", "grape.tangent_samples=32"],
                          True),
    "dfa-streams": (["rule=dfa"], True),
    # Feedback at every weight layer (docs/points.md), the shipped form of the CPU transformer.
    "grape-layer-seq": (["rule=grape", "grape.routing=shared", "feedback.points=layer",
                         "grape.tangent_samples=32"], False),
    "grape-layer-streams": (["rule=grape", "grape.routing=shared", "feedback.points=layer",
                             "grape.tangent_samples=32"], True),
    "dfa-layer-streams": (["rule=dfa", "feedback.points=layer"], True),
}


def _model(args, depth: int, device: torch.device):
    model = build_transformer(args.vocab, args.seq, args.d_model, depth, args.heads, "macro")
    return model.materialize(seed=0, device=device)


def _engine(args, depth: int, device: torch.device, overrides: list[str], streams: bool):
    model = _model(args, depth, device)
    cfg = load_config(None, [*overrides, *OPTIM, f"data.batch_size={args.batch}",
                             "grape.tangent_noise=device",
                             f"pipeline.stage_streams={str(streams).lower()}"])
    n = len(model.blocks) if streams and device.type == "cuda" else 1
    return build_engine(cfg, model, Layout.in_process(n), device)


def engine_step(args, depth: int, device: torch.device, overrides: list[str],
                streams: bool) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
    engine = _engine(args, depth, device, overrides, streams)
    return lambda x, y, step: engine.train_step(x, y, step)


def graphed_engine_step(args, depth: int, device: torch.device, x: torch.Tensor,
                        y: torch.Tensor, overrides: list[str], streams: bool = True):
    """This runtime's whole step (on CUDA streams, or one stream), captured in a CUDA graph."""
    engine = _engine(args, depth, device, overrides, streams)
    sx, sy = x.clone(), y.clone()
    for step in range(3):  # warm up: gradients, momentum, cached index tensors
        engine.train_step(sx, sy, step)
    torch.cuda.synchronize(device)
    engine.train_schedule.read_stats = False
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the stage streams fork from and join the capture stream
        engine.train_step(sx, sy, 3)

    def replay(x_, y_, _, keep=(engine, sx, sy)):  # the graph reads these: keep them alive
        graph.replay()
    return replay


def eager_bp_step(args, depth: int, device: torch.device, compile_model: bool = False):
    model = _model(args, depth, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    fwd = torch.compile(model) if compile_model else model

    def step(x, y, _):
        loss = F.cross_entropy(fwd(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    return step


def graphed_bp_step(args, depth: int, device: torch.device, x: torch.Tensor, y: torch.Tensor):
    """The whole BP step (forward, backward, fused SGD) as one CUDA graph, replayed on the
    static batch (PyTorch's whole-network capture recipe)."""
    model = _model(args, depth, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    sx, sy = x.clone(), y.clone()

    def body():
        loss = F.cross_entropy(model(sx).flatten(0, 1), sy.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: allocate gradients and momentum outside the capture
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()

    def replay(x_, y_, _, keep=(model, opt, sx, sy)):  # the graph reads these: keep them alive
        graph.replay()
    return replay


def forward_times(args, depth: int, device: torch.device, x: torch.Tensor,
                  timed: Callable) -> dict[str, float]:
    """Plain forward vs the forward carrying one shared tangent bundle on every row."""
    model = _model(args, depth, device)
    blocks = list(model.blocks)

    @torch.no_grad()
    def plain():
        h = x
        for b in blocks:
            h = b(h)

    @torch.no_grad()
    def with_tangents():
        h, t = blocks[0](x), None
        for b in blocks[1:-1]:
            if t is not None:
                h, t = block_forward(b, h, t)
            else:
                h = b(h)
            p = torch.randn(1, *h.shape, device=device)
            t = p if t is None else t + p
        blocks[-1](h)  # the head: the signal is taken at its input

    out = {"forward": timed(plain), "forward+jvp": timed(with_tangents)}
    if device.type == "cuda":
        # The same, replayed from CUDA graphs: the GPU's own cost, without Python's launches.
        for name, fn in (("forward (graph)", plain), ("forward+jvp (graph)", with_tangents)):
            fn()
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            out[name] = timed(graph.replay)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--depths", default="2,4,8")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="add torch.compile's BP")
    p.add_argument("--grape-graph", action="store_true",
                   help="add grape-graph (a failed capture can leave the CUDA context unusable, "
                        "so it is opt-in)")
    p.add_argument("--methods", default="",
                   help="comma-separated subset of the methods to run (default: all)")
    p.add_argument("--profile", action="store_true",
                   help="at the deepest depth, print torch.profiler's top ops of grape-streams "
                        "and bp-eager (where the time goes)")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere, like the paper's prototype
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (platform.processor() or platform.machine())
    header = (f"# bench/table5.py on {name}, torch {torch.__version__}, "
              f"threads={torch.get_num_threads()}; transformer d_model={args.d_model}, "
              f"batch={args.batch}, seq={args.seq}, heads={args.heads}, vocab={args.vocab}; "
              f"median of {args.steps} steps after {args.warmup}")
    print(header, flush=True)
    results: dict = {"header": header, "args": vars(args), "depths": {}}

    def timed(fn: Callable[[], object]) -> float:
        return median_ms(fn, args.warmup, args.steps, device)

    wanted = set(args.methods.split(",")) if args.methods else None

    def want(method: str) -> bool:
        return wanted is None or method in wanted

    for depth in [int(d) for d in args.depths.split(",")]:
        g = torch.Generator().manual_seed(depth)
        x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
        y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
        steps: dict[str, Callable] = {}
        for method, (overrides, streams) in ENGINE_METHODS.items():
            if streams and device.type != "cuda":
                continue  # streams need CUDA; on the CPU they would repeat grape-seq
            if want(method):
                steps[method] = engine_step(args, depth, device, overrides, streams)
        if want("bp-eager"):
            steps["bp-eager"] = eager_bp_step(args, depth, device)
        if device.type == "cuda" and want("bp-graph"):
            steps["bp-graph"] = graphed_bp_step(args, depth, device, x, y)
        graphs = {"grape-graph": ("grape-streams", True),
                  "grape-graph-seq": ("grape-streams", False),
                  "grape-graph-m32": ("grape-streams-m32", True),
                  "grape-layer-graph": ("grape-layer-streams", True)}
        for method, (like, streams) in graphs.items():
            if device.type != "cuda" or not args.grape_graph or not want(method):
                continue
            try:
                steps[method] = graphed_engine_step(args, depth, device, x, y,
                                                    ENGINE_METHODS[like][0], streams)
            except Exception as exc:  # report and go on: the other methods still count
                print(f"{method}: capture failed: {type(exc).__name__}: {exc}")
        if args.compile:
            steps["bp-compile"] = eager_bp_step(args, depth, device, compile_model=True)

        peak: dict[str, float] = {}
        if device.type == "cuda":
            for method, fn in steps.items():
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                for s in range(2):
                    fn(x, y, s)
                sync(device)
                peak[method] = (torch.cuda.max_memory_allocated(device) - base) / 2**20

        times: dict[str, list[float]] = {m: [] for m in steps}
        for step in range(args.warmup + args.steps):
            for method, fn in steps.items():
                sync(device)
                t0 = time.perf_counter()
                fn(x, y, step)
                sync(device)
                if step >= args.warmup:
                    times[method].append(time.perf_counter() - t0)
        ms = {m: 1e3 * statistics.median(t) for m, t in times.items()}
        fw = forward_times(args, depth, device, x, timed)
        fair = min((v for m, v in ms.items() if m in ("bp-eager", "bp-graph", "bp-compile")),
                   default=float("nan"))
        grape = min((v for m, v in ms.items()
                     if m in ("grape-streams", "grape-graph", "grape-graph-seq")),
                    default=ms.get("grape-seq", float("nan")))
        row = {"ms": ms, "peak_mb": peak, "forward_ms": fw, "fair_bp_ms": fair,
               "grape_vs_bp_seq": ms.get("bp-seq", float("nan")) / grape,
               "grape_vs_fair_bp": fair / grape,
               "jvp_forward_ratio": fw["forward+jvp"] / fw["forward"],
               "paper_ms": dict(zip(("bp", "grape"), PAPER.get(depth, (None, None))))}
        results["depths"][depth] = row
        print(f"\n## depth {depth}: ms per step (x = speed-up of GrAPE, the fastest of "
              "grape-streams, grape-graph and grape-graph-seq, over it)")
        for m, v in ms.items():
            mem = f"  peak {peak[m]:8.1f} MB" if m in peak else ""
            print(f"{m:>18s} {v:8.2f} ms   x{v / grape:5.2f}{mem}")
        print(f"{'forward':>18s} {fw['forward']:8.2f} ms;  forward+jvp {fw['forward+jvp']:.2f} "
              f"ms (x{row['jvp_forward_ratio']:.2f})")
        if "forward (graph)" in fw:
            ratio = fw["forward+jvp (graph)"] / fw["forward (graph)"]
            row["jvp_forward_ratio_graph"] = ratio
            print(f"{'forward (graph)':>18s} {fw['forward (graph)']:8.2f} ms;  forward+jvp "
                  f"{fw['forward+jvp (graph)']:.2f} ms (x{ratio:.2f})")
        if depth in PAPER:
            print(f"{'paper (A100)':>18s} BP {PAPER[depth][0]} ms, GrAPE {PAPER[depth][1]} ms "
                  f"(x{PAPER[depth][0] / PAPER[depth][1]:.2f})")
        if args.profile and depth == max(int(d) for d in args.depths.split(",")):
            _profile(steps, ("grape-streams", "grape-seq", "bp-eager"), x, y, device)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _profile(steps: dict[str, Callable], methods: tuple[str, ...], x, y,
             device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for method in methods:
        if method not in steps:
            continue
        sync(device)
        with profile(activities=acts) as prof:
            for s in range(5):
                steps[method](x, y, 1000 + s)
            sync(device)
        print(f"\n### profile of {method}, 5 steps")
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=48))


if __name__ == "__main__":
    main()
