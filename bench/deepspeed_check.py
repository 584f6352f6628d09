"""bp-deepspeed against the runtime's native BP on the same blocks, split, weights and batches.

    torchrun --standalone --nproc_per_node=2 bench/deepspeed_check.py

For each case (preset, micro-batches, split): 3 SGD(0.9) steps through `bench/pipeline.py`'s
DeepSpeedPipe and through `build_engine` (rule bp, native schedule) from the same initial
weights; prints each step's mean loss from both and, per rank, the largest weight difference.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import pipeline as bench  # noqa: E402

from grape_dist.build import build_engine  # noqa: E402
from grape_dist.runtime import plan_layout  # noqa: E402

CASES = [  # preset, batch, micro, stage_blocks (None: the runtime's parameter split), extra
    ("mlp", 64, 4, None, {"blocks": 3, "width": 64}),
    ("resnet20", 16, 2, [3, 8], {}),
    ("transformer", 8, 2, [3, 3], {"depth": 4}),
]

dist.init_process_group("gloo")
torch.set_num_threads(1)
rank, device = dist.get_rank(), torch.device("cpu")
for preset, batch, micro, split, extra in CASES:
    args = argparse.Namespace(**{"preset": preset, "batch": batch, "micro": micro,
                                 "routing": "shared", "tangent_samples": 8, "threads": 1,
                                 "blocks": 8, "width": 1024,
                                 "depth": bench.PRESETS[preset].depth, **extra})
    results = {}
    for method in ("bp-native", "bp-deepspeed"):
        cfg = bench._config(method, args, micro, stage_blocks=split)
        model = bench.build_meta_model(args)
        layout = plan_layout(cfg, len(model.blocks), dist.get_world_size())
        pipe = bench.DeepSpeedPipe(args, cfg, model, layout, device) \
            if method == "bp-deepspeed" else build_engine(cfg, model, layout, device)
        losses = []
        for step in range(3):
            x, y = bench.random_batch(args, batch, device, torch.Generator().manual_seed(step))
            out = pipe.train_step(x, y, step)
            losses.append(float(out) if method == "bp-deepspeed"
                          else out.loss_sum / y.numel())
        if method == "bp-deepspeed":
            mod = pipe.engine.module
            weights = {int(k): [p.detach().clone() for p in m.parameters()]
                       for k, m in mod._modules.items() if k.isdigit()}
        else:
            weights = {i: [p.detach().clone() for p in b.parameters()]
                       for i, b in enumerate(model.blocks) if model.is_materialized(i)}
        results[method] = (losses, weights)
    (ln, wn), (ld, wd) = results["bp-native"], results["bp-deepspeed"]
    assert sorted(wn) == sorted(wd), (sorted(wn), sorted(wd))
    diff = max((a - b).abs().max().item() for i in wn for a, b in zip(wn[i], wd[i]))
    scale = max(a.abs().max().item() for i in wn for a in wn[i])
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (sorted(wn), diff, scale))
    if rank == 0:
        print(f"{preset} batch {batch} M={micro} split {split or 'by parameters'}: losses "
              f"native {[f'{v:.6f}' for v in ln]} deepspeed {[f'{v:.6f}' for v in ld]}; "
              + "; ".join(f"rank {r}: blocks {b}, max |w_native - w_deepspeed| {d:.2e} "
                          f"(max |w| {s:.2f})" for r, (b, d, s) in enumerate(rows)),
              flush=True)
dist.barrier()
dist.destroy_process_group()
