"""Per-step time of BP, DFA and GrAPE on the Table 1 models, ResNet-20 and the Transformer, and
the cost of the JVP tangents.

    python bench/step_time.py --threads 1              # what the README's table reports
    python bench/step_time.py --threads 1 --models resnet20,transformer --json steps.json
    python bench/step_time.py --device cuda --models mlp,cnn,transformer

`dfa` and `grape` are the form the model's shipped config sets (its `feedback` and `grape`
sections: configs/cifar10_resnet20_*.yaml for resnet20, configs/shakespeare_transformer_*.yaml
for the transformer, ...); the `(paper)` rows are the paper's form, one feedback point per block,
for comparison. Everything is measured side by side in one run, with the thread count fixed, on
random data of the datasets' shapes (time does not depend on the values). Each number is the
median over `--steps` timed steps after `--warmup` untimed ones, the methods taking turns step by
step. Ratios are relative to BP's step and to the plain forward pass. `--json FILE` writes the
step times as records (bench/timing.py: bench, model, method, micro_batches, ms, peak_mb).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import merge_overrides, record, shipped_form, sync, write_records

from grape_dist.build import build_engine
from grape_dist.config import load_config
from grape_dist.models import build_model
from grape_dist.models.transformer import build_transformer
from grape_dist.rules import MicroBatch, build_stage_rule, output_signal
from grape_dist.runtime import Layout

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
# The shipped configs whose `feedback` and `grape` sections give each model's dfa and grape form.
SHIPPED = {"mlp": "mnist_mlp", "cnn": "mnist_cnn", "cnn-cifar": "cifar10_cnn",
           "resnet20": "cifar10_resnet20", "transformer": "shakespeare_transformer"}
# The paper's form, for comparison: one feedback point per block (the shipped config's other
# settings kept).
PAPER = {
    "dfa(paper)": ["rule=dfa", "feedback.points=block"],
    "grape(paper,shared)": ["rule=grape", "feedback.points=block", "grape.routing=shared",
                            "grape.tangent_samples=0"],
    "grape(paper,shared,m=16)": ["rule=grape", "feedback.points=block", "grape.routing=shared",
                                 "grape.tangent_samples=16"],
}


def methods(model_name: str) -> dict[str, list[str]]:
    """Method name -> rule overrides: bp, the shipped dfa and grape forms, the paper's."""
    out = {"bp": ["rule=bp"]}
    for rule in ("dfa", "grape"):
        out[rule] = [f"rule={rule}", *shipped_form(SHIPPED.get(model_name, ""), rule)]
    if model_name in ("resnet20", "transformer"):
        out.update({k: merge_overrides(out[k.split("(")[0]], v) for k, v in PAPER.items()})
    return out


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
    """Median step time of every method, measured round-robin (one step of each per round) so
    that machine noise falls on all of them alike."""
    pipes, x, y = {}, None, None
    for rule, overrides in methods(model_name).items():
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


def _rule(model_name: str, overrides: list[str], batch: int, device: torch.device):
    """(stage rule over the whole model, a batch) for `overrides`."""
    cfg, model, make_batch = _build(model_name, overrides, batch, device)
    return build_stage_rule(cfg, model, 0, len(model.blocks)), make_batch(), model


def forward_times(model_name: str, batch: int, warmup: int, steps: int,
                  device: torch.device) -> dict[str, float]:
    """The plain forward (no autograd graph) against the rules' own forwards: DFA's (whatever
    its update keeps, no tangents) and GrAPE's with tangents on 16 rows and on every row, in the
    shipped form; methods take turns step by step."""
    forms = methods(model_name)
    grape = forms["grape"]
    variants = {"dfa": forms["dfa"],
                "grape m=16": merge_overrides(grape, ["grape.tangent_samples=16"]),
                "grape every row": merge_overrides(grape, ["grape.tangent_samples=0"])}
    if "dfa(paper)" in forms:
        variants["dfa(paper)"] = forms["dfa(paper)"]
        variants["grape(paper) m=16"] = forms["grape(paper,shared,m=16)"]
    _, model, make_batch = _build(model_name, ["rule=bp"], batch, device)
    x, _ = make_batch()

    @torch.no_grad()
    def plain():
        h = x
        for b in model.blocks:
            h = b(h)

    runs = {"plain forward": plain}
    for name, overrides in variants.items():
        rule, (xb, _), _ = _rule(model_name, overrides, batch, device)

        def run(rule=rule, xb=xb):
            rule.forward(MicroBatch(0, 0, 0, batch, batch), xb, None)
            rule.reset_step()
        runs[name] = run
    times: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(warmup + steps):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def phase_breakdown(model_name: str, overrides: list[str], batch: int, warmup: int,
                    steps: int, device: torch.device) -> dict[str, float]:
    """Where a direct rule's step goes (median ms): forward (with tangents), loss and signal,
    B step, local update, optimiser; from the rule's own trace spans (grape_dist.trace)."""
    from grape_dist import trace
    rule, (x, y), _ = _rule(model_name, overrides, batch, device)
    acc: dict[str, list[float]] = {"forward": [], "signal": []}
    with tempfile.TemporaryDirectory() as tmp:
        trace.enable(tmp, 0, skip=warmup, steps=steps, device=device)
        for step in range(warmup + steps):
            mb = MicroBatch(step, 0, 0, batch, batch)
            with trace.step(step):
                sync(device)
                t0 = time.perf_counter()
                h, t = rule.forward(mb, x, None)
                sync(device)
                t1 = time.perf_counter()
                _, _, signal = output_signal(h, y, batch, t)
                rule.backward(mb, rule.signal_at_output(mb, signal), None)
                sync(device)
                t2 = time.perf_counter()
                rule.finish_step()
            if step >= warmup:
                acc["forward"].append(t1 - t0)
                acc["signal"].append(t2 - t1)
        path = trace.save()
        events = json.loads(Path(path).read_text())["traceEvents"]
    per_step: dict[str, dict[int, float]] = {}
    step_of = sorted((e["ts"], e["ts"] + e["dur"], e["args"]["step"]) for e in events
                     if e.get("name") == "step" and e.get("ph") == "X")
    for e in events:
        if e.get("ph") != "X" or e["name"] not in ("B step", "local update", "optimiser"):
            continue
        k = next(s for t0, t1, s in step_of if t0 <= e["ts"] <= t1)
        per_step.setdefault(e["name"], {}).setdefault(k, 0.0)
        per_step[e["name"]][k] += e["dur"] / 1e3
    out = {k: 1e3 * statistics.median(v) for k, v in acc.items()}
    for name in ("B step", "local update", "optimiser"):
        if name in per_step:
            out[name] = statistics.median(per_step[name].values())
    return out


def bp_phases(model_name: str, batch: int, warmup: int, steps: int,
              device: torch.device) -> dict[str, float]:
    """BP's forward (with its graph) and backward through the whole model, median ms."""
    _, model, make_batch = _build(model_name, ["rule=bp"], batch, device)
    x, y = make_batch()
    fw, bw = [], []
    for step in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=False)
        if step >= warmup:
            fw.append(t1 - t0)
            bw.append(t2 - t1)
    return {"forward": 1e3 * statistics.median(fw), "backward": 1e3 * statistics.median(bw)}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    p.add_argument("--json", metavar="FILE", help="also write the step times as JSON records")
    p.add_argument("--skip-forward", action="store_true",
                   help="only the step times (no forward and phase tables)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (platform.processor() or platform.machine())
    print(f"# torch {torch.__version__}, {where}, threads={torch.get_num_threads()}, "
          f"batch={args.batch}, median of {args.steps} steps; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    records = []
    for name in args.models.split(","):
        forms = methods(name)
        print(f"\n## {name}: per-step time (ms) and ratio to BP")
        times = step_times(name, args.batch, args.warmup, args.steps, device)
        for rule, ms in times.items():
            print(f"{rule:>26s} {ms:8.2f} ms   x{ms / times['bp']:5.2f}   "
                  f"{' '.join(o for o in forms[rule] if not o.startswith('rule='))}")
            records.append(record("step", name, rule, 1, ms, peak_mb(), batch=args.batch,
                                  threads=args.threads, device=str(device),
                                  overrides=forms[rule]))
        if args.json:
            write_records(args.json, records)
        if args.skip_forward:
            continue
        print(f"\n## {name}: forward (ms), ratio to the plain forward and to DFA's forward")
        fw = forward_times(name, args.batch, args.warmup, args.steps, device)
        for k, v in fw.items():
            print(f"{k:>26s} {v:8.2f} ms   x{v / fw['plain forward']:5.2f}   "
                  f"x{v / fw['dfa']:5.2f} of dfa")
        print(f"\n## {name}: where the time goes (ms per step)")
        bp = bp_phases(name, args.batch, args.warmup, args.steps, device)
        print(f"{'bp':>26s} forward {bp['forward']:8.2f}   backward {bp['backward']:8.2f}")
        for method in [m for m in forms if m != "bp"]:
            ph = phase_breakdown(name, forms[method], args.batch, args.warmup, args.steps,
                                 device)
            print(f"{method:>26s} " + "   ".join(f"{k} {v:8.2f}" for k, v in ph.items()))


if __name__ == "__main__":
    main()
