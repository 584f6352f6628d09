"""On CUDA (`pytest -m gpu`; skipped without a GPU): the fused tangents against torch.func.jvp,
one step of every rule against the same step on the CPU, layer-parallel stages on CUDA streams
against the sequential run, and (with two GPUs or more) the nccl pipeline against one process.

`bench/gpu_check.sh` runs these first on a GPU machine.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import freeze_batch_statistics
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from grape_dist.build import build_engine
from grape_dist.config import load_config
from grape_dist.models import build_model
from grape_dist.models.transformer import build_transformer
from grape_dist.rules.tangents import block_forward
from grape_dist.runtime import Layout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would make CUDA's float32 products differ from the CPU's in the 3rd digit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _models():
    return {
        "mlp-relu": (build_model(load_config(None, ["model.hidden=[64,32]"]).model,
                                 (1, 8, 8), 10), (1, 8, 8), None),
        "mlp-tanh": (build_model(load_config(None, ["model.hidden=[64,32]",
                                                    "model.activation=tanh"]).model,
                                 (1, 8, 8), 10), (1, 8, 8), None),
        "lenet": (build_model(load_config(None, ["model.name=lenet"]).model, (1, 28, 28), 10),
                  (1, 28, 28), None),
        "transformer": (build_transformer(17, 12, 32, 2, 4, "micro"), (12,), 17),
        "resnet": (build_model(load_config(None, ["model.name=resnet", "model.depth=8"]).model,
                               (3, 8, 8), 10), (3, 8, 8), None),
    }


def _batch(shape, vocab, n=8, device=CUDA):
    g = torch.Generator().manual_seed(1)
    if vocab:
        x = torch.randint(0, vocab, (n, *shape), generator=g)
        y = torch.randint(0, vocab, (n, *shape), generator=g)
    else:
        x = torch.randn(n, *shape, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("name", list(_models()))
def test_fused_tangents_match_torch_func_jvp_on_cuda(name):
    model, shape, vocab = _models()[name]
    model = model.materialize(seed=0, device=CUDA).double()
    x, _ = _batch(shape, vocab)
    h = model.blocks[0](x if vocab else x.double())
    rows = torch.tensor([1, 5, 6], device=CUDA)
    for block in list(model.blocks)[1:]:
        t = torch.randn(2, len(rows), *h.shape[1:], dtype=torch.double, device=CUDA)
        y, tt = block_forward(block, h, t, rows)
        ref_block = copy.deepcopy(block)
        freeze_batch_statistics(ref_block, h)  # BatchNorm: the batch's statistics held
        for k in range(2):
            with sdpa_kernel([SDPBackend.MATH]):
                _, ref = jvp(ref_block, (h[rows],), (t[k],))
            torch.testing.assert_close(tt[k], ref, rtol=1e-9, atol=1e-11)
        h = y.detach()


RULES = [("bp", []), ("fa", []), ("dfa", []), ("drtp", []), ("pepita", []),
         ("grape", ["grape.tangent_samples=4"]), ("grape", ["grape.routing=shared"])]


@pytest.mark.parametrize("rule,extra", RULES)
@pytest.mark.parametrize("name", ["mlp-relu", "lenet", "transformer", "resnet"])
def test_one_step_of_every_rule_on_cuda_matches_the_cpu(rule, extra, name):
    model, shape, vocab = _models()[name]
    if vocab and rule in ("drtp", "pepita", "fa"):
        pytest.skip(f"{rule} is not defined for the language model")
    if rule == "pepita" and name != "mlp-relu":
        pytest.skip("PEPITA is defined for dense blocks only")
    cfg = load_config(None, [f"rule={rule}", *extra, "optim.name=sgd", "optim.lr=0.1",
                             "optim.momentum=0.9", "pipeline.micro_batches=2"])
    out = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model)
        engine = build_engine(cfg, m, Layout.in_process(2), torch.device(device))
        x, y = _batch(shape, vocab, device=torch.device(device))
        losses = [engine.train_step(x, y, s).loss_sum for s in range(2)]
        out[device] = losses, {k: v.detach().cpu() for k, v in m.state_dict().items()}
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-4)
    for k, v in out["cpu"][1].items():
        torch.testing.assert_close(out["cuda"][1][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("rule,extra", [("grape", ["grape.routing=shared"]),
                                        ("grape", ["grape.tangent_samples=4"]),
                                        ("dfa", []), ("bp", []), ("pepita", [])])
@pytest.mark.parametrize("name", ["mlp-relu", "transformer"])
def test_stages_on_cuda_streams_match_the_sequential_run(rule, extra, name):
    """Every block its own stage on its own stream, two micro-batches (so forwards overlap
    updates), against the same stages issued on one stream."""
    model, shape, vocab = _models()[name]
    if vocab and rule == "pepita":
        pytest.skip("PEPITA is not defined for the language model")
    n = len(model.blocks)
    runs = {}
    for streams in (False, True):
        cfg = load_config(None, [f"rule={rule}", *extra, "optim.name=sgd", "optim.lr=0.1",
                                 "optim.momentum=0.9", "pipeline.micro_batches=2",
                                 "grape.tangent_noise=device",
                                 f"pipeline.stage_streams={str(streams).lower()}"])
        m = copy.deepcopy(model)
        engine = build_engine(cfg, m, Layout.in_process(n), CUDA)
        assert type(engine.transport).__name__ == ("StreamTransport" if streams
                                                   else "InProcessTransport")
        x, y = _batch(shape, vocab, n=16)
        results = [engine.train_step(x, y, s) for s in range(4)]
        loss, correct = engine.evaluate(x, y, 8)
        runs[streams] = ([r.loss_sum for r in results], results[-1].stats, loss,
                         {k: v.detach().cpu() for k, v in m.state_dict().items()})
    seq, par = runs[False], runs[True]
    assert par[0] == pytest.approx(seq[0], rel=1e-5)
    assert par[1] == pytest.approx(seq[1], rel=1e-5, abs=1e-6)
    assert par[2] == pytest.approx(seq[2], rel=1e-5)
    for k, v in seq[3].items():
        torch.testing.assert_close(par[3][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="multi-rank nccl needs 2 GPUs")
def test_two_ranks_on_nccl_follow_the_one_process_trajectory(tmp_path):
    base = ["rule=grape", "train.device=cuda", "train.epochs=1", "data.train_subset=512",
            "data.test_subset=256", "model.hidden=[64,64,64]", "train.save_final=true",
            "pipeline.micro_batches=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NVIDIA_TF32_OVERRIDE": "0"}
    summaries = {}
    for n in (1, 2):
        out = tmp_path / str(n)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={n}", "-m", "grape_dist.train", "--quiet",
                            "--out", str(out), *base], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        summaries[n] = json.loads((out / "summary.json").read_text())
    assert summaries[2]["final_test_accuracy"] == pytest.approx(
        summaries[1]["final_test_accuracy"], abs=1e-6)
