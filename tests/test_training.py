"""End to end on real MNIST: the trainer, calibration schedule, and the entry point's outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grape_dist.config import load_config
from grape_dist.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["data.train_subset=6000", "data.test_subset=2000", "train.progress=false",
         "model.hidden=[256, 256]", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    out = {}
    for rule in ("bp", "dfa", "grape"):
        d = tmp_path_factory.mktemp(rule)
        cfg = load_config(None, [f"rule={rule}", "train.epochs=2", *QUICK])
        summary = Trainer(cfg, d).fit()
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        out[rule] = (summary, [r for r in rows if r["split"] == "test"])
    return out


@pytest.mark.parametrize("rule", ["bp", "dfa", "grape"])
def test_short_mnist_run_is_far_above_chance(rule, short_runs):
    summary, test_rows = short_runs[rule]
    assert summary["final_test_accuracy"] > 0.85, summary
    assert [r["epoch"] for r in test_rows] == [1, 2]


def test_grape_aligns_feedback_far_better_than_dfa(short_runs):
    grape = short_runs["grape"][1][-1]["alignment"]
    dfa = short_runs["dfa"][1][-1]["alignment"]
    assert set(grape) == set(dfa) == {"fc1", "fc2"}
    for block in grape:
        # cos(B^T e, true gradient): GrAPE's learned B points nearly along the gradient.
        assert grape[block]["grad_cos"] > 0.8, grape
        assert grape[block]["grad_cos"] > dfa[block]["grad_cos"] + 0.2, (grape, dfa)
        assert grape[block]["jac_cos"] > dfa[block]["jac_cos"], (grape, dfa)


def test_calibration_fires_once_every_T_epochs_on_one_mini_batch(tmp_path):
    cfg = load_config(None, [
        "rule=grape", "train.epochs=5", "data.train_subset=512", "data.batch_size=128",
        "data.test_subset=256", "train.progress=false", "model.hidden=[32, 32]",
        "calibration.every_epochs=2", "calibration.batch_size=64",
        "calibration.optim.name=adam", "calibration.optim.lr=1e-3",
    ])
    trainer = Trainer(cfg, tmp_path)
    summary = trainer.fit()
    events = trainer.state.calibrations
    assert [(e.epoch, e.step, e.batch_size) for e in events] == [(2, 8, 64), (4, 16, 64)]
    assert summary["calibration_steps"] == 2
    # Exactly one optimiser step per calibration, each from a fresh state: Adam counts them.
    opt = trainer.stages[0].calibration.optimizer
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {1}


@pytest.mark.parametrize("threshold,budget,expected", [(1.5, 2, [1, 2]), (-1.5, 0, []),
                                                        (1.5, 0, [1, 2, 3])])
def test_alignment_triggered_calibration(threshold, budget, expected, tmp_path):
    """trigger=alignment: calibrate when the probe's mean grad_cos is below the threshold
    (cosines lie in [-1, 1]: 1.5 always fires, -1.5 never), within the budget."""
    cfg = load_config(None, [
        "rule=dfa", "train.epochs=3", "data.train_subset=256", "data.batch_size=128",
        "data.test_subset=128", "train.progress=false", "model.hidden=[16]",
        "calibration.every_epochs=1", "calibration.trigger=alignment",
        f"calibration.threshold={threshold}", f"calibration.budget={budget}",
    ])
    trainer = Trainer(cfg, tmp_path)
    summary = trainer.fit()
    assert [e.epoch for e in trainer.state.calibrations] == expected
    assert summary["calibration_steps"] == len(expected)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if '"test"' in r]
    assert [r["calibrated"] for r in rows] == [e in expected for e in (1, 2, 3)]
    # The measured alignment is recorded wherever it was measured (not once the budget is out).
    measured = [r for r in rows if "trigger_grad_cos" in r]
    assert len(measured) == (3 if budget == 0 else budget)
    assert all(-1 <= r["trigger_grad_cos"] <= 1 for r in measured)


def test_each_calibration_is_one_fresh_bp_step_on_its_batch(tmp_path):
    """Every calibration moves the weights exactly as one autograd SGD step on its own batch:
    the momentum of the calibration optimiser (0.9, the paper's) never carries a previous
    calibration's gradient into the next one."""
    from grape_dist.data import random_batch_indices
    cfg = load_config(None, [
        "rule=dfa", "train.epochs=1", "data.train_subset=256", "data.test_subset=64",
        "train.progress=false", "model.hidden=[16]", "calibration.every_epochs=1",
        "calibration.batch_size=32", "calibration.optim.momentum=0.9",
        "calibration.optim.lr=0.5", "calibration.form=paper", "calibration.max_update=0",
        "calibration.line_search=0",
    ])
    trainer = Trainer(cfg, None)
    trainer.train_epoch(1)
    for epoch in (1, 2):
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        idx = random_batch_indices(len(trainer.train.y), 32, cfg.seed, epoch)
        x, y = trainer.inputs(trainer.train.x[idx]), trainer.train.y[idx]
        loss = torch.nn.functional.cross_entropy(trainer.model(x), y)
        grads = torch.autograd.grad(loss, list(trainer.model.parameters()))
        trainer.calibrate(epoch)
        for (k, p), g in zip(trainer.model.named_parameters(), grads):
            torch.testing.assert_close(p.detach(), before[k] - 0.5 * g)


def _run_cli(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _check_outputs(out: Path, world_size: int = 1):
    assert (out / "config.yaml").is_file()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_test_accuracy", "best_test_accuracy", "epochs", "steps", "rule",
                "world_size", "wall_seconds", "parameters_per_rank", "peak_memory_mb_per_rank"):
        assert key in summary
    assert summary["world_size"] == world_size
    assert len(summary["parameters_per_rank"]) == world_size
    assert all(m > 0 for m in summary["peak_memory_mb_per_rank"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"epoch", "step", "split", "loss", "accuracy"} <= set(rows[-1])
    return summary


def test_entry_point_writes_run_outputs(tmp_path):
    out = tmp_path / "run"
    r = _run_cli([sys.executable, "-m", "grape_dist.train", "--config",
                  "configs/mnist_mlp_grape.yaml", "--out", str(out), "train.epochs=1", *QUICK],
                 tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stderr and "test loss" in r.stderr
    assert _check_outputs(out)["final_test_accuracy"] > 0.8


@pytest.mark.skipif(shutil.which("torchrun") is None and not
                    (Path(sys.executable).parent / "torchrun").exists(), reason="no torchrun")
def test_entry_point_under_torchrun(tmp_path):
    out = tmp_path / "run"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = _run_cli([torchrun, "--nproc_per_node=1", "-m", "grape_dist.train", "--config",
                  "configs/mnist_mlp_dfa.yaml", "--out", str(out), "--quiet", "train.epochs=1",
                  *QUICK], tmp_path)
    assert r.returncode == 0, r.stderr
    _check_outputs(out)


def test_threads_are_shared_out_when_the_node_would_be_oversubscribed():
    from grape_dist.startup import threads_per_process

    assert threads_per_process(2, local_world_size=8, cpus=2) == 1
    assert threads_per_process(4, local_world_size=2, cpus=6) == 3
    assert threads_per_process(2, local_world_size=1, cpus=2) == 2  # fits: as configured
    assert threads_per_process(1, local_world_size=8, cpus=2) == 1
    assert threads_per_process(0, local_world_size=8, cpus=2) == 0  # torch's default


def test_a_subset_larger_than_the_split_takes_all_of_it_and_says_so(caplog):
    cfg = load_config(None, ["data.train_subset=1000000", "data.test_subset=500",
                             "train.progress=false", "model.hidden=[16]"])
    with caplog.at_level("WARNING", logger="grape_dist"):
        trainer = Trainer(cfg, None)
    assert len(trainer.train.y) == 60000 and len(trainer.test.y) == 500
    lines = [r.getMessage() for r in caplog.records if "larger than" in r.getMessage()]
    assert lines == ["data.train_subset=1000000 is larger than the 60000 samples of mnist's "
                     "split: using all 60000"]



def test_drop_last_drops_the_partial_batch_on_the_native_schedule_too():
    """data.drop_last applies to every schedule (torch's need it): 100 rows in batches of 32
    are 4 steps an epoch, or 3 with drop_last."""
    steps = {}
    for drop in (False, True):
        cfg = load_config(None, ["rule=dfa", "data.train_subset=100", "data.test_subset=32",
                                 "data.batch_size=32", "model.hidden=[8]", "train.epochs=1",
                                 "train.progress=false", f"data.drop_last={str(drop).lower()}"])
        trainer = Trainer(cfg, None)
        trainer.train_epoch(1)
        steps[drop] = trainer.state.step
    assert steps == {False: 4, True: 3}


def test_the_global_random_streams_are_seeded_by_the_config():
    """Anything drawing from torch's or Python's global stream (a direct call's dropout, a
    hook) repeats from run to run: the trainer seeds both from `seed`."""
    import random

    draws = []
    for seed in (3, 3, 4):
        cfg = load_config(None, [f"seed={seed}", "rule=dfa", "data.train_subset=128",
                                 "data.test_subset=32", "model.hidden=[8]",
                                 "train.progress=false"])
        torch.manual_seed(12345 + len(draws))
        random.seed(12345 + len(draws))
        Trainer(cfg, None)
        draws.append((float(torch.rand(1)), random.random()))
    assert draws[0] == draws[1] != draws[2]


def test_warmup_ramps_the_first_steps_learning_rate_then_keeps_the_schedules():
    """optim.warmup_steps=2 with plain SGD: step 1 moves the weights by half an autograd SGD
    step on its batch, steps 2 and 3 by a whole one (the lr is put back after the warm-up)."""
    import copy

    from grape_dist.data import epoch_batches
    cfg = load_config(None, [
        "rule=bp", "train.epochs=1", "data.train_subset=96", "data.test_subset=32",
        "data.batch_size=32", "train.progress=false", "model.hidden=[16]", "optim.name=sgd",
        "optim.momentum=0", "optim.lr=0.5", "optim.warmup_steps=2",
    ])
    trainer = Trainer(cfg, None)
    model = copy.deepcopy(trainer.model)
    trainer.train_epoch(1)
    params = list(model.parameters())
    for k, idx in enumerate(epoch_batches(96, 32, cfg.seed, 1)):
        x, y = trainer.inputs(trainer.train.x[idx]), trainer.train.y[idx]
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * min(1.0, (k + 1) / 2) * g
    assert k == 2
    for (name, got), want in zip(trainer.model.named_parameters(), params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
