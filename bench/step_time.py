"""Per-step time of BP, DFA and GrAPE on the Table 1 models and the Transformer, and the cost of
the JVP tangents.

    python bench/step_time.py --threads 1              # what the README's table reports
    python bench/step_time.py --threads 2 --batch 256
    python bench/step_time.py --device cuda --models mlp,cnn,transformer

Everything is measured side by side in one run, with the thread count fixed, on random data of
the datasets' shapes (time does not depend on the values). Each number is the median over
`--steps` timed steps after `--warmup` untimed ones. Ratios are relative to BP's step and to the
plain forward pass.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from timing import median_ms, sync

from grape_dist.config import load_config
from grape_dist.models import build_model
from grape_dist.models.transformer import build_transformer
from grape_dist.rules import MicroBatch, build_stage_rule, output_signal
from grape_dist.rules.tangents import block_forward
from grape_dist.runtime import Layout, build_engine

MODELS = {
    "mlp": (["model.name=mlp", "model.hidden=[1024, 1024]"], (1, 28, 28)),
    "cnn": (["model.name=lenet", "model.channels=[6, 16]", "model.hidden=[120, 84]"],
            (1, 28, 28)),
    "cnn-cifar": (["model.name=lenet", "model.channels=[32, 64]", "model.hidden=[512, 256]"],
                  (3, 32, 32)),
    "resnet20": (["model.name=resnet", "model.depth=20"], (3, 32, 32)),
}
# The Transformer: the paper's Table 5 width and sequence length, 4 layers, macro feedback.
TRANSFORMER = {"vocab": 256, "context": 64, "d_model": 128, "layers": 4, "heads": 4}
RULES = {
    "bp": ["rule=bp"],
    "dfa": ["rule=dfa"],
    "grape(per_block)": ["rule=grape", "grape.routing=per_block"],
    "grape(shared)": ["rule=grape", "grape.routing=shared"],
    "grape(shared,m=16)": ["rule=grape", "grape.routing=shared", "grape.tangent_samples=16"],
}


def _build(model_name: str, rule_overrides: list[str], batch: int, device: torch.device):
    """(config, materialised model, a function giving a random batch (x, y) on `device`)."""
    if model_name == "transformer":
        cfg = load_config(None, [*rule_overrides, f"data.batch_size={batch}",
                                 f"grape.tangent_noise={_noise(device)}"])
        t = TRANSFORMER
        model = build_transformer(t["vocab"], t["context"], t["d_model"], t["layers"],
                                  t["heads"]).materialize(seed=0, device=device)

        def tokens():
            shape = (batch, t["context"])
            return (torch.randint(0, t["vocab"], shape, device=device),
                    torch.randint(0, t["vocab"], shape, device=device))
        return cfg, model, tokens
    overrides, shape = MODELS[model_name]
    cfg = load_config(None, [*overrides, *rule_overrides, f"data.batch_size={batch}",
                             f"grape.tangent_noise={_noise(device)}"])
    model = build_model(cfg.model, shape, 10).materialize(seed=0, device=device)
    return cfg, model, lambda: (torch.randn(batch, *shape, device=device),
                                torch.randint(0, 10, (batch,), device=device))


def _noise(device: torch.device) -> str:
    return "device" if device.type == "cuda" else "host"


def step_times(model_name: str, batch: int, warmup: int, steps: int,
               device: torch.device) -> dict[str, float]:
    """Median step time of every rule, measured round-robin (one step of each rule per round)
    so that machine noise falls on all rules alike."""
    pipes, x, y = {}, None, None
    for rule, overrides in RULES.items():
        cfg, model, make_batch = _build(model_name, overrides, batch, device)
        pipes[rule] = build_engine(cfg, model, Layout.in_process(), device)
        x, y = make_batch()
    times: dict[str, list[float]] = {rule: [] for rule in pipes}
    for step in range(warmup + steps):
        for rule, pipe in pipes.items():
            sync(device)
            t0 = time.perf_counter()
            pipe.train_step(x, y, step)
            sync(device)
            if step >= warmup:
                times[rule].append(time.perf_counter() - t0)
    return {rule: 1e3 * statistics.median(ts) for rule, ts in times.items()}


def forward_times(model_name: str, batch: int, warmup: int, steps: int,
                  device: torch.device) -> dict[str, float]:
    """Plain forward vs forward carrying tangents (inference mode, no update)."""
    out = {}
    _, model, make_batch = _build(model_name, ["rule=grape"], batch, device)
    x, _ = make_batch()
    blocks = list(model.blocks)
    # A language model's tangents stop at the head's input (its signal is taken there).
    carry = blocks[:-1] if model.signal_spec.at_head_input else blocks

    @torch.no_grad()
    def plain():
        h = x
        for b in blocks:
            h = b(h)

    def with_tangents(shared: bool, m: int):
        @torch.no_grad()
        def run():
            h, t = x, None
            for i, b in enumerate(carry):
                h, t = block_forward(b, h, t)
                if i < len(blocks) - 1:
                    p = torch.randn(m, *b.out_shape, device=device).unsqueeze(0)
                    t = p if t is None else (t + p if shared else torch.cat([t, p]))
            if len(carry) < len(blocks):
                blocks[-1](h)
        return run

    out["forward"] = median_ms(plain, warmup, steps, device)
    out["fwd+jvp shared"] = median_ms(with_tangents(True, batch), warmup, steps, device)
    out["fwd+jvp per_block"] = median_ms(with_tangents(False, batch), warmup, steps, device)
    out["fwd+jvp shared m=16"] = median_ms(with_tangents(True, min(16, batch)), warmup, steps,
                                           device)

    # The generic reference: torch.func.jvp of the whole model (one shared tangent per block
    # injected at the first hidden block's output, for timing), to show what the hand-written
    # tangents save. The math attention kernel: the fused ones have no forward AD.
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rest = copy.copy(model)
    h0 = blocks[0](x).detach()
    rest.blocks = torch.nn.ModuleList(blocks[1:])
    t_in = torch.randn_like(h0)

    def generic():
        with sdpa_kernel([SDPBackend.MATH]):
            jvp(rest, (h0,), (t_in,))
    try:
        out["torch.func.jvp"] = median_ms(generic, warmup, steps, device)
    except RuntimeError:  # BatchNorm in train mode updates buffers: torch.func refuses it
        out["torch.func.jvp"] = float("nan")
    return out


def grape_phase_breakdown(model_name: str, batch: int, warmup: int, steps: int,
                          device: torch.device):
    """Where a GrAPE step's time goes: forward+tangents, signal, B step + local updates."""
    cfg, model, make_batch = _build(model_name, ["rule=grape", "grape.routing=shared"], batch,
                                    device)
    rule = build_stage_rule(cfg, model, 0, len(model.blocks))
    x, y = make_batch()
    acc = {"forward+tangents": [], "update": []}
    for step in range(warmup + steps):
        mb = MicroBatch(step, 0, 0, batch, batch)
        sync(device)
        t0 = time.perf_counter()
        h, t = rule.forward(mb, x, None)
        sync(device)
        t1 = time.perf_counter()
        _, _, signal = output_signal(h, y, batch, t)
        rule.backward(mb, rule.signal_at_output(mb, signal), None)
        rule.finish_step()
        sync(device)
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
    p.add_argument("--models", default="mlp,cnn",
                   help=f"comma-separated, of {', '.join([*MODELS, 'transformer'])}")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (platform.processor() or platform.machine())
    print(f"# torch {torch.__version__}, {where}, threads={torch.get_num_threads()}, "
          f"batch={args.batch}, median of {args.steps} steps")
    for name in args.models.split(","):
        print(f"\n## {name}: per-step time (ms) and ratio to BP")
        times = step_times(name, args.batch, args.warmup, args.steps, device)
        for rule, ms in times.items():
            print(f"{rule:>20s} {ms:8.2f} ms   x{ms / times['bp']:5.2f}")
        print(f"\n## {name}: forward with tangents (ms) and ratio to the plain forward")
        fw = forward_times(name, args.batch, args.warmup, args.steps, device)
        for k, v in fw.items():
            print(f"{k:>20s} {v:8.2f} ms   x{v / fw['forward']:5.2f}")
        print(f"\n## {name}: GrAPE (shared) step phases (ms)")
        for k, v in grape_phase_breakdown(name, args.batch, args.warmup, args.steps,
                                          device).items():
            print(f"{k:>20s} {v:8.2f} ms")


if __name__ == "__main__":
    main()
