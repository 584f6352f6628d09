"""Per-step time of BP, DFA and GrAPE on the Table 1 models, and the cost of the JVP tangents.

    python bench/step_time.py --threads 1              # what the README's table reports
    python bench/step_time.py --threads 2 --batch 256

Everything is measured side by side in one run, with the thread count fixed, on random data of
the datasets' shapes (time does not depend on the values). Each number is the median over
`--steps` timed steps after `--warmup` untimed ones. Ratios are relative to BP's step and to the
plain forward pass.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from grape_dist.config import load_config
from grape_dist.models import build_model
from grape_dist.rules import MicroBatch, build_stage_rule, output_signal
from grape_dist.rules.tangents import block_forward
from grape_dist.runtime import Layout, build_engine

MODELS = {
    "mlp": (["model.name=mlp", "model.hidden=[1024, 1024]"], (1, 28, 28)),
    "cnn": (["model.name=lenet", "model.channels=[6, 16]", "model.hidden=[120, 84]"],
            (1, 28, 28)),
    "cnn-cifar": (["model.name=lenet", "model.channels=[32, 64]", "model.hidden=[512, 256]"],
                  (3, 32, 32)),
}
RULES = {
    "bp": ["rule=bp"],
    "dfa": ["rule=dfa"],
    "grape(per_block)": ["rule=grape", "grape.routing=per_block"],
    "grape(shared)": ["rule=grape", "grape.routing=shared"],
    "grape(shared,m=16)": ["rule=grape", "grape.routing=shared", "grape.tangent_samples=16"],
}


def _median_ms(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _build(model_name: str, rule_overrides: list[str], batch: int):
    overrides, shape = MODELS[model_name]
    cfg = load_config(None, [*overrides, *rule_overrides, f"data.batch_size={batch}"])
    model = build_model(cfg.model, shape, 10).materialize(seed=0)
    return cfg, model, shape


def step_times(model_name: str, batch: int, warmup: int, steps: int) -> dict[str, float]:
    """Median step time of every rule, measured round-robin (one step of each rule per round)
    so that machine noise falls on all rules alike."""
    pipes, x, y = {}, None, None
    for rule, overrides in RULES.items():
        cfg, model, shape = _build(model_name, overrides, batch)
        pipes[rule] = build_engine(cfg, model, Layout.in_process(), torch.device("cpu"))
        x = torch.randn(batch, *shape)
        y = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {rule: [] for rule in pipes}
    for step in range(warmup + steps):
        for rule, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.train_step(x, y, step)
            if step >= warmup:
                times[rule].append(time.perf_counter() - t0)
    return {rule: 1e3 * statistics.median(ts) for rule, ts in times.items()}


def forward_times(model_name: str, batch: int, warmup: int, steps: int) -> dict[str, float]:
    """Plain forward vs forward carrying tangents (inference mode, no update)."""
    out = {}
    _, model, shape = _build(model_name, ["rule=grape"], batch)
    x = torch.randn(batch, *shape)
    blocks = list(model.blocks)

    @torch.no_grad()
    def plain():
        h = x
        for b in blocks:
            h = b(h)

    def with_tangents(shared: bool, m: int):
        @torch.no_grad()
        def run():
            h, t = x, None
            for i, b in enumerate(blocks):
                h, t = block_forward(b, h, t)
                if i < len(blocks) - 1:
                    p = torch.randn(m, *b.out_shape).unsqueeze(0)
                    t = p if t is None else (t + p if shared else torch.cat([t, p]))
        return run

    out["forward"] = _median_ms(plain, warmup, steps)
    out["fwd+jvp shared"] = _median_ms(with_tangents(True, batch), warmup, steps)
    out["fwd+jvp per_block"] = _median_ms(with_tangents(False, batch), warmup, steps)
    out["fwd+jvp shared m=16"] = _median_ms(with_tangents(True, 16), warmup, steps)

    # The generic reference: torch.func.jvp of the whole model (one shared tangent per block
    # injected at the input only, for timing), to show what the hand-written tangents save.
    from torch.func import jvp
    t_in = torch.randn_like(x)
    out["torch.func.jvp"] = _median_ms(lambda: jvp(model, (x,), (t_in,)), warmup, steps)
    return out


def grape_phase_breakdown(model_name: str, batch: int, warmup: int, steps: int):
    """Where a GrAPE step's time goes: forward+tangents, signal, B step + local updates."""
    cfg, model, shape = _build(model_name, ["rule=grape", "grape.routing=shared"], batch)
    rule = build_stage_rule(cfg, model, 0, len(model.blocks))
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    acc = {"forward+tangents": [], "update": []}
    for step in range(warmup + steps):
        mb = MicroBatch(step, 0, 0, batch, batch)
        t0 = time.perf_counter()
        h, t = rule.forward(mb, x, None)
        t1 = time.perf_counter()
        _, _, signal = output_signal(h, y, batch, t)
        rule.backward(mb, signal, None)
        rule.finish_step()
        t2 = time.perf_counter()
        if step >= warmup:
            acc["forward+tangents"].append(t1 - t0)
            acc["update"].append(t2 - t1)
    return {k: 1e3 * statistics.median(v) for k, v in acc.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--models", default="mlp,cnn")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={torch.get_num_threads()}, batch={args.batch}, median of {args.steps} steps")
    for name in args.models.split(","):
        print(f"\n## {name}: per-step time (ms) and ratio to BP")
        times = step_times(name, args.batch, args.warmup, args.steps)
        for rule, ms in times.items():
            print(f"{rule:>20s} {ms:8.2f} ms   x{ms / times['bp']:5.2f}")
        print(f"\n## {name}: forward with tangents (ms) and ratio to the plain forward")
        fw = forward_times(name, args.batch, args.warmup, args.steps)
        for k, v in fw.items():
            print(f"{k:>20s} {v:8.2f} ms   x{v / fw['forward']:5.2f}")
        print(f"\n## {name}: GrAPE (shared) step phases (ms)")
        for k, v in grape_phase_breakdown(name, args.batch, args.warmup, args.steps).items():
            print(f"{k:>20s} {v:8.2f} ms")


if __name__ == "__main__":
    main()
