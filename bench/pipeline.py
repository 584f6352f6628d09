"""The GrAPE pipeline against BP pipelines on the same stages, plus a schedule model.

    python bench/pipeline.py                          # 2 ranks x 1 thread (this 2-core machine)
    python bench/pipeline.py --nproc 8 --threads 2    # 8 ranks on a 16-core machine

For each method and micro-batch count the driver launches `torchrun --nproc_per_node=P` on this
file (one fresh process group per point, so peak memory is per configuration) and prints:
time per mini-batch (max over ranks, median of the timed steps), samples/s, and peak memory
per rank (RSS growth from just before the first step: activations, gradients, optimiser state,
communication buffers). The model is a deep MLP: `--blocks` Linear(width)+ReLU blocks and a
Linear output block, split into P stages by parameter count.

Methods: `grape` (sync: signals broadcast once per mini-batch), `grape-stream`
(pipeline.streaming: per micro-batch), `dfa` (the same runtime without tangents), and BP on
torch.distributed.pipelining over the same blocks: `bp-gpipe`, `bp-1f1b`, and the strongest
schedules torch ships, with two stages per rank: `bp-zb` (interleaved zero bubble), `bp-zbv`
(zero bubble V) and `bp-dualpipev`; `bp-native` is this runtime's all-forward-all-backward BP.
Each point also reports the parameters each rank holds (every rank materialises only its own
blocks).

The schedule model (bottom of the output) simulates each schedule as per-rank sequences of
operations whose costs are measured here on one thread (per-block forward, backward, forward
with tangents, local update, optimiser step) and a link cost (latency + bytes / bandwidth)
measured between two ranks. It predicts the measured points, then extrapolates to P = 2..64.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grape_dist.config import load_config  # noqa: E402
from grape_dist.models import BlockModel  # noqa: E402
from grape_dist.models.mlp import dense_factories  # noqa: E402
from grape_dist.optim import build_optimizer  # noqa: E402
from grape_dist.rules import MicroBatch, build_stage_rule, output_signal  # noqa: E402

METHODS = {
    "grape": ["rule=grape"],
    "grape-stream": ["rule=grape", "pipeline.streaming=true"],
    "dfa": ["rule=dfa"],
    "bp-1f1b": ["rule=bp", "pipeline.schedule=1f1b"],
    "bp-gpipe": ["rule=bp", "pipeline.schedule=gpipe"],
    "bp-zb": ["rule=bp", "pipeline.schedule=zero_bubble"],
    "bp-zbv": ["rule=bp", "pipeline.schedule=zbv"],
    "bp-dualpipev": ["rule=bp", "pipeline.schedule=dualpipev"],
    "bp-native": ["rule=bp"],
}
BP_METHODS = [m for m in METHODS if m.startswith("bp-") and m != "bp-native"]


def deep_mlp(blocks: int, width: int) -> BlockModel:
    """`blocks` Linear(width)+ReLU blocks and a Linear head, on the meta device."""
    return BlockModel(dense_factories(width, [width] * blocks, 10, "relu", False), (width,), 10)


def _config(method: str, args, micro: int, rule: str | None = None):
    return load_config(None, [
        *METHODS[method], *([f"rule={rule}"] if rule else []),
        "optim.name=sgd", "optim.lr=0.01", "optim.momentum=0.9",
        f"data.batch_size={args.batch}", f"pipeline.micro_batches={micro}",
        f"grape.routing={args.routing}", f"grape.tangent_samples={args.tangent_samples}",
    ])


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------
# Worker: one point, under torchrun.


def worker(args) -> None:
    import torch.distributed as dist

    from grape_dist.distributed import backend_for, resolve_device
    from grape_dist.runtime import build_engine, plan_layout

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    world = int(os.environ["WORLD_SIZE"])
    cfg = _config(args.method, args, args.micro)
    model = deep_mlp(args.blocks, args.width)
    # Checked before joining the group, like the trainer (a refused point prints its reason).
    layout = plan_layout(cfg, len(model.blocks), world, backend_for(device))
    dist.init_process_group(backend_for(device))
    pipe = build_engine(cfg, model, layout, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
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
    args.device_resolved = device
    link = _link_cost(args, dist) if args.measure_link else None
    params = pipe.memory_report()["parameters_per_rank"]
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({
            "method": args.method, "P": world, "M": args.micro,
            "ms": 1e3 * statistics.median(times), "peak_mb": [round(float(p), 1) for p in peaks],
            "params": params, "link": link}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _link_cost(args, dist) -> dict | None:
    """Ping-pong between ranks 0 and 1: one-way time for small and activation-sized tensors."""
    if dist.get_world_size() < 2:
        return None
    from grape_dist.distributed import p2p
    out = {}
    for n in (1, args.batch * args.width // args.micro, 4 * args.batch * args.width):
        buf = torch.zeros(n, device=args.device_resolved)
        ts = []
        for _ in range(12):
            dist.barrier()
            t0 = time.perf_counter()
            if dist.get_rank() == 0:
                p2p.wait_all(p2p.isend([buf], 1, buf.device))
                p2p.recv(1, buf.device)
            elif dist.get_rank() == 1:
                p2p.recv(0, buf.device)
                p2p.wait_all(p2p.isend([buf], 0, buf.device))
            ts.append((time.perf_counter() - t0) / 2)
        out[n * 4] = statistics.median(ts[2:])
    return out


# ---------------------------------------------------------------------------------------------
# Per-block costs on one thread, for the schedule model.


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


def block_costs(args, mb: int) -> dict[str, float]:
    """Seconds per micro-batch of `mb` rows for one hidden block (and one optimiser step)."""
    from grape_dist.distributed import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = deep_mlp(1, args.width).materialize(device=device)
    block = model.blocks[0]
    x = torch.randn(mb, args.width, device=device)
    out: dict[str, float] = {}

    def fwd():
        return block(x.detach().requires_grad_())

    out["fwd"] = _median_s(fwd)
    xg = x.detach().requires_grad_()
    h = block(xg)
    grad = torch.randn_like(h)
    # BP's backward: the input gradient (for the previous block) and the weight gradients.
    out["bwd"] = _median_s(lambda: torch.autograd.grad(h, [xg, *block.parameters()], grad,
                                                       retain_graph=True))
    grape = build_stage_rule(_config("grape", args, 1),
                             deep_mlp(2, args.width).materialize(device=device), 0, 1)
    # Streaming: backward() runs the local update at once, so it can be timed on its own.
    dfa = build_stage_rule(_config("grape-stream", args, 1, rule="dfa"),
                           deep_mlp(2, args.width).materialize(device=device), 0, 1)
    counter = iter(range(10**9))
    m = min(mb, args.tangent_samples or mb)

    def fwd_tangent():
        grape.reset_step()
        mbd = MicroBatch(next(counter), 0, 0, mb, mb)
        return grape.forward(mbd, x, torch.randn(1, m, args.width, device=device))

    out["fwd_jvp"] = _median_s(fwd_tangent)
    _, _, sig = output_signal(torch.randn(mb, 10, device=device),
                              torch.randint(0, 10, (mb,), device=device), mb, None)

    def update():
        dfa.reset_step()
        mbd = MicroBatch(0, 0, 0, mb, mb)
        dfa.forward(mbd, x, None)
        _sync()
        t0 = time.perf_counter()
        dfa.backward(mbd, sig, None)
        _sync()
        return time.perf_counter() - t0

    for _ in range(3):
        update()
    out["update"] = statistics.median(update() for _ in range(10))
    opt = build_optimizer(block.parameters(), _config("bp-native", args, 1).optim)
    for p in block.parameters():
        p.grad = torch.zeros_like(p)
    out["opt"] = _median_s(opt.step)
    return out


# ---------------------------------------------------------------------------------------------
# The schedule model: a per-rank list of operations, each starting when its rank is free and
# its inputs have arrived.


def simulate(method: str, P: int, M: int, c: dict[str, float], blocks_per_stage: float,
             link, fused_update: float | None = None) -> float:
    """Predicted seconds per mini-batch of `method` on P stages with M micro-batches.

    `c` holds per-block costs of a whole mini-batch run as M micro-batches; `fused_update` is
    the per-block update cost of the whole mini-batch in one call (sync mode updates dense
    blocks over all micro-batches at once)."""
    k = blocks_per_stage
    F, B, FJ, U, OPT = (k * c["fwd"], k * c["bwd"], k * c["fwd_jvp"], k * c["update"],
                      k * c["opt"])
    act, grad_link, bcast = link["act"], link["act"], link["small"] * max(1, (P - 1).bit_length())
    free = [0.0] * P
    done: dict[tuple, float] = {}

    def run(s: int, op: tuple, cost: float, deps: list[float]) -> None:
        start = max([free[s], *deps])
        free[s] = start + cost
        done[op] = free[s]

    if method.startswith("bp"):
        orders = []
        for s in range(P):
            if method == "bp-1f1b":
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
                    run(s, ("F", s, j), F / M, [d + act for d in dep])
                else:
                    dep = [done.get(("F", s, j))] + ([] if s == P - 1 else
                                                     [done.get(("B", s + 1, j))])
                    if None in dep:
                        continue
                    deps = [dep[0]] + [d + grad_link for d in dep[1:]]
                    run(s, ("B", s, j), B / M, deps)
                idx[s] += 1
                progressed = True
            if not progressed:
                raise RuntimeError("schedule deadlock in the model")
        return max(free) + OPT
    # Direct rules: forward(+tangents) chain, then (sync) one broadcast and all updates, or
    # (streaming) each micro-batch's update once its signal arrived.
    fwd = FJ if method.startswith("grape") else F
    for j in range(M):
        for s in range(P):
            dep = [] if s == 0 else [done[("F", s - 1, j)] + act]
            run(s, ("F", s, j), fwd / M, dep)
            if method == "grape-stream":
                w = P - 1 - s
                if j - w >= 0:
                    run(s, ("U", s, j - w), U / M, [done.get(("F", P - 1, j - w), 0) + bcast])
    for s in range(P):
        if method == "grape-stream":
            for j in range(max(0, M - (P - 1 - s)), M):
                run(s, ("U", s, j), U / M, [done[("F", P - 1, j)] + bcast])
        else:
            total = k * fused_update if fused_update is not None else U
            run(s, ("U", s), total, [done[("F", P - 1, M - 1)] + bcast])
    return max(free) + OPT


# ---------------------------------------------------------------------------------------------


def driver(args) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    backend = "nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo"
    print(f"# {platform.machine()}, torch {torch.__version__}, {backend}, P={args.nproc} ranks x "
          f"{args.threads} thread(s), deep MLP {args.blocks} x Linear({args.width})+ReLU + head, "
          f"batch {args.batch}, tangents: routing={args.routing} m={args.tangent_samples or 'all'}"
          f", SGD(0.9); median of {args.steps} steps after {args.warmup} warm-up")
    print(f"# command: python bench/pipeline.py {' '.join(sys.argv[1:])}")
    results = []
    link = None
    for method in args.methods.split(","):
        for micro in [int(m) for m in args.micro.split(",")]:
            cmd = [torchrun, "--standalone", f"--nproc_per_node={args.nproc}", __file__,
                   "--worker", "--method", method, "--micro", str(micro)]
            cmd += [f"--{k}={v}" for k, v in (("batch", args.batch), ("blocks", args.blocks),
                                              ("width", args.width), ("threads", args.threads),
                                              ("steps", args.steps), ("warmup", args.warmup),
                                              ("routing", args.routing),
                                              ("device", args.device),
                                              ("tangent_samples", args.tangent_samples))]
            if link is None and args.nproc > 1:
                cmd.append("--measure_link")
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                errors = [x for x in r.stderr.splitlines() if "Error" in x or "error" in x]
                print(f"{method:>13s} M={micro}: not run: {errors[-1] if errors else r.stderr}")
                continue
            res = json.loads(line[7:])
            link = link or res.get("link")
            results.append(res)
            param_mb = [round(4 * n / 2**20, 1) for n in res["params"]]
            print(f"{method:>13s} M={micro}: {res['ms']:8.1f} ms/mini-batch "
                  f"{1e3 * args.batch / res['ms']:8.0f} samples/s  peak MB per rank "
                  f"{res['peak_mb']}  parameter MB per rank {param_mb}", flush=True)
    by = {(r["method"], r["M"]): r for r in results}
    print("\n## ratios (same blocks, same micro-batches): BP time / GrAPE time")
    for micro in [int(m) for m in args.micro.split(",")]:
        for grape in ("grape", "grape-stream"):
            for bp in BP_METHODS:
                if (grape, micro) in by and (bp, micro) in by:
                    g, b = by[(grape, micro)], by[(bp, micro)]
                    print(f"M={micro}: {grape} throughput / {bp} = {b['ms'] / g['ms']:.2f}x; "
                          f"peak memory {max(g['peak_mb']):.0f} vs {max(b['peak_mb']):.0f} MB")
    # Schedule model.
    costs = block_costs(args, args.batch)
    costs_mb = {m: block_costs(args, args.batch // m) for m in
                sorted({int(x) for x in args.micro.split(",")})}
    print("\n## schedule model: per-block costs on one thread (ms per micro-batch)")
    for m, c in costs_mb.items():
        print(f"M={m} (rows {args.batch // m}): " + ", ".join(f"{k} {1e3 * v:.2f}"
                                                           for k, v in c.items()))
    if link:
        sizes = sorted(int(k) for k in link)
        print("link one-way (ms): " + ", ".join(f"{s} B: {1e3 * link[str(s)]:.3f}"
                                               for s in sizes))
    bps = (args.blocks + 1) / args.nproc

    def link_for(M):
        if not link:
            return {"act": 0.0, "small": 0.0}
        sizes = sorted(int(k) for k in link)
        small, mid, big = (link[str(s)] for s in sizes)
        per_byte = (big - small) / (sizes[2] - sizes[0])
        return {"act": small + per_byte * 4 * args.batch * args.width / M, "small": small}

    print(f"\n## schedule model vs measured (P = {args.nproc})")
    for res in results:
        if res["method"] in ("bp-zb", "bp-zbv", "bp-dualpipev"):
            continue  # the model simulates GPipe and 1F1B orders only
        m = res["M"]
        # Costs per micro-batch were measured at rows = batch / M; the model takes mini-batch
        # totals, so scale by M.
        c = {k: v * m for k, v in costs_mb[m].items()}
        pred = simulate(res["method"], args.nproc, m, c, bps, link_for(m), costs["update"])
        print(f"{res['method']:>13s} M={m}: predicted {1e3 * pred:8.1f} ms, measured "
              f"{res['ms']:8.1f} ms ({100 * (1e3 * pred / res['ms'] - 1):+.0f}%)")
    print("\n## schedule model extrapolated: 64 blocks of this width, M = 8, ms per mini-batch")
    c = {k: v * 8 for k, v in costs_mb.get(8, costs).items()}
    print(f"{'P':>4s} " + " ".join(f"{m:>13s}" for m in ("grape", "grape-stream", "bp-1f1b",
                                                         "bp-gpipe")) + "  grape/1f1b speed-up")
    for P in (2, 4, 8, 16, 32, 64):
        row = [simulate(m, P, 8, c, 64 / P, link_for(8), costs["update"]) for m in
               ("grape", "grape-stream", "bp-1f1b", "bp-gpipe")]
        print(f"{P:>4d} " + " ".join(f"{1e3 * v:13.1f}" for v in row)
              + f"  {row[2] / row[0]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (GPU + nccl if present), cpu, cuda")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--micro", default="1,4,8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--routing", default="shared")
    p.add_argument("--tangent_samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--method", default="grape")
    p.add_argument("--measure_link", action="store_true")
    args = p.parse_args()
    if args.worker:
        args.micro = int(args.micro)
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
