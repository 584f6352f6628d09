"""Bad input is refused before the first training step: one line naming the problem and the fix,
exit code 2, no traceback, nothing written to --out; under torchrun, one copy of the message,
from rank 0.

Most cases run the real entry point (`grape_dist.train.main`) in this process, with the
environment a launcher would give it; the torchrun cases launch real process groups."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from grape_dist import train

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
CONFIG = str(ROOT / "configs" / "mnist_mlp_grape.yaml")
SMALL = ["--quiet", "data.train_subset=256", "data.test_subset=128", "train.epochs=1",
         "model.hidden=[16]", "train.threads=1"]


@dataclass
class Case:
    """`args` may hold {tmp} (the test's folder) and {out}; `setup(tmp)` prepares files; `match`
    must appear in the single line printed."""

    args: list[str]
    match: str
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    config: bool = True  # prepend --config mnist_mlp_grape.yaml


def existing_run(tmp: Path) -> None:
    run = tmp / "out"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')


def file_out(tmp: Path) -> None:
    (tmp / "out").write_text("not a folder")


def read_only_parent(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


def bad_yaml(tmp: Path) -> None:
    (tmp / "bad.yaml").write_text("train: {epochs: 3\n")


def list_yaml(tmp: Path) -> None:
    (tmp / "list.yaml").write_text("- rule\n- grape\n")


def wrong_schema(tmp: Path) -> None:
    """cifar10 laid out like the hub's export, but with columns nobody reads as images."""
    folder = tmp / "data" / "cifar10" / "plain_text"
    folder.mkdir(parents=True)
    table = pa.table({"picture": [b"x", b"y"], "tag": [0, 1]})
    for split in ("train", "test"):
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")


def empty_dataset_folder(tmp: Path) -> None:
    (tmp / "data" / "cifar10").mkdir(parents=True)


def run_without_checkpoint(tmp: Path) -> None:
    run = tmp / "out"
    run.mkdir()
    (run / "config.yaml").write_text("rule: grape\n")


def finished_run(tmp: Path) -> None:
    """A real one-epoch run in {tmp}/out, with its checkpoint."""
    assert train.main(["--config", CONFIG, *SMALL, "--out", str(tmp / "out")]) == 0


def run_with_metrics_cut(tmp: Path) -> None:
    """A finished run whose metrics.jsonl lost the rows its checkpoint counts on."""
    finished_run(tmp)
    (tmp / "out" / "metrics.jsonl").write_text("")


CASES: dict[str, Case] = {
    # -- the config file and overrides ----------------------------------------------------------
    "unknown top-level key": Case(["colour=red"], "colour"),
    "unknown section key": Case(["train.epoch=3"], "train.epoch"),
    "wrong type (int)": Case(["train.epochs=three"], "train.epochs"),
    "wrong type (bool)": Case(["train.progress=maybe"], "train.progress"),
    "wrong type (list)": Case(["model.hidden=64"], "model.hidden"),
    "zero epochs": Case(["train.epochs=0"], "train.epochs"),
    "negative batch": Case(["data.batch_size=-5"], "data.batch_size"),
    "zero batch": Case(["data.batch_size=0"], "data.batch_size"),
    "negative learning rate": Case(["optim.lr=-0.1"], "optim.lr"),
    "unknown rule": Case(["rule=sgd"], "rule"),
    "unknown model": Case(["model.name=resnet9000"], "model.name"),
    "unknown dataset": Case(["data.name=imagenet22k"], "data.name"),
    "unknown schedule": Case(["pipeline.schedule=interleaved"], "pipeline.schedule"),
    "unknown optimiser": Case(["optim.name=lion"], "optim.name"),
    "unknown conv feedback": Case(["feedback.conv=pixel"], "feedback.conv"),
    "bp schedule for grape": Case(["pipeline.schedule=1f1b"], "pipeline.schedule"),
    "torch schedule keeping partial batches": Case(["rule=bp", "pipeline.schedule=1f1b"],
                                                   "data.drop_last"),
    "torch schedule with unkeyed dropout": Case(
        ["rule=bp", "model.name=alexnet", "data.name=cifar10", "pipeline.schedule=gpipe",
         "data.drop_last=true"], "model.dropout"),
    "model does not fit data": Case(["model.name=transformer"], "model.name"),
    "more micro-batches than rows": Case(["data.batch_size=4", "pipeline.micro_batches=8"],
                                         "pipeline.micro_batches"),
    "override without =": Case(["train.epochs"], "train.epochs"),
    "missing config file": Case(["--config", "{tmp}/nope.yaml"], "nope.yaml", config=False),
    "config not YAML": Case(["--config", "{tmp}/bad.yaml"], "bad.yaml", setup=bad_yaml,
                            config=False),
    "config not a mapping": Case(["--config", "{tmp}/list.yaml"], "list.yaml",
                                 setup=list_yaml, config=False),
    # -- the layout and the launcher's environment ----------------------------------------------
    "more stages than blocks": Case(["pipeline.pp=4"], "block",
                                    env={"RANK": "0", "WORLD_SIZE": "4"}),
    "world size not divisible by dp": Case(["pipeline.dp=2"], "pipeline.dp",
                                           env={"RANK": "0", "WORLD_SIZE": "3"}),
    "pp x dp is not the world size": Case(["pipeline.pp=2", "pipeline.dp=2"], "WORLD_SIZE",
                                          env={"RANK": "0", "WORLD_SIZE": "2"}),
    "world size not a number": Case([], "WORLD_SIZE", env={"RANK": "0", "WORLD_SIZE": "two"}),
    "cuda without a gpu": Case(["train.device=cuda"], "train.device"),
    "malformed fault injection": Case([], "GRAPE_FAULT", env={"GRAPE_FAULT": "explode:step=1"}),
    # -- the data -------------------------------------------------------------------------------
    "batch larger than the data": Case(["data.batch_size=100000"], "data.batch_size"),
    "eval batch of zero": Case(["data.eval_batch_size=0"], "data.eval_batch_size"),
    "missing data root": Case(["data.name=cifar10", "model.name=mlp",
                               "data.root={tmp}/nowhere"], "cifar10"),
    "dataset missing from the root": Case(["data.name=cifar10", "data.root={tmp}/data"],
                                          "cifar10", setup=empty_dataset_folder),
    "dataset with the wrong schema": Case(["data.name=cifar10", "data.root={tmp}/data"],
                                          "column", setup=wrong_schema),
    # -- the run folder -------------------------------------------------------------------------
    "--out is a file": Case([], "--out", setup=file_out),
    "--out below a file": Case(["--out", "{tmp}/out/run"], "--out", setup=file_out),
    "--out not writable": Case(["--out", "{tmp}/ro/run"], "writable", setup=read_only_parent),
    "--out holds a run": Case([], "--resume", setup=existing_run),
    "--overwrite, bad config": Case(["--overwrite", "train.epochs=0"], "train.epochs",
                                    setup=existing_run),
    "--overwrite, batch larger than the data": Case(
        ["--overwrite", "data.batch_size=100000"], "data.batch_size", setup=existing_run),
    "--resume without a checkpoint": Case(["--resume", "{tmp}/out"], "checkpoint",
                                          setup=run_without_checkpoint, config=False),
    "--resume not a run": Case(["--resume", "{tmp}"], "config.yaml", config=False),
    "--resume with --config": Case(["--resume", "{tmp}/out"], "--config"),
    "--resume with another rule": Case(["--resume", "{tmp}/out", "rule=dfa"], "rule",
                                       setup=finished_run, config=False),
    "--resume, metrics.jsonl cut short": Case(["--resume", "{tmp}/out", "train.epochs=2"],
                                              "metrics.jsonl",
                                              setup=run_with_metrics_cut, config=False),
    "data.root that does not exist": Case(["data.root={tmp}/no_such_data"], "no such folder"),
    "GRAPE_DATA_DIR that does not exist": Case([], "GRAPE_DATA_DIR",
                                               env={"GRAPE_DATA_DIR": "/no/such/data"}),
    "--resume a finished run": Case(["--resume", "{tmp}/out"], "finished its 1 epochs",
                                    setup=finished_run, config=False),
    # Another world size may resume (the same global batches): 2 ranks as dp=2 need half the
    # per-replica batch.
    "--resume on 2 replicas, same per-replica batch": Case(
        ["--resume", "{tmp}/out", "train.epochs=2", "pipeline.pp=1", "pipeline.dp=2"],
        "set data.batch_size=64", env={"RANK": "0", "WORLD_SIZE": "2"}, setup=finished_run,
        config=False),
}


def _expand(args: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in args]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` but the data cache, with its bytes (None for folders)."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")
            if "cache" not in p.relative_to(folder).parts}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line_before_anything_is_written(
        name, tmp_path, monkeypatch, capfd):
    case = CASES[name]
    if name == "--out not writable" and os.geteuid() == 0:
        pytest.skip("root writes through mode 0555 ('--out below a file' covers root)")
    if name == "cuda without a gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if case.setup:
        case.setup(tmp_path)
    monkeypatch.setenv("GRAPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GRAPE_DATA_DIR", raising=False)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GRAPE_FAULT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    argv = (["--config", CONFIG] if case.config else []) + SMALL + _expand(case.args, tmp_path)
    if "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = _snapshot(tmp_path)
    capfd.readouterr()
    rc = train.main(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert case.match in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "something was written"


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


# -- under torchrun: one copy of the message, from rank 0 ----------------------------------------

def _torchrun(nproc: int, args: list[str], tmp: Path, env: dict[str, str] | None = None,
              restarts: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "GRAPE_CACHE_DIR": str(tmp / "cache"), **(env or {})}
    env.pop("GRAPE_DATA_DIR", None)
    cmd = [str(TORCHRUN), f"--nproc_per_node={nproc}", "--standalone",
           f"--max-restarts={restarts}", "-m", "grape_dist.train", "--config", CONFIG, *SMALL,
           "--out", str(tmp / "out"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _ours(stderr: str) -> list[str]:
    """Every line our processes printed (torchrun's log lines and summary left out)."""
    return [line for line in stderr.splitlines()
            if line.startswith(("error", "config error", "stopped", "warning"))]


def _no_traceback_of_ours(stderr: str) -> None:
    # torchrun's own summary of the failed job follows (its traceback is of torchrun itself);
    # none of our processes printed one.
    assert 'File "' + str(ROOT / "grape_dist") not in stderr, stderr[-4000:]


@pytest.mark.parametrize("args,match", [
    (["pipeline.pp=2", "pipeline.dp=2"], "WORLD_SIZE"),  # layout: before the group
    (["data.batch_size=100000"], "data.batch_size"),  # data: inside the group
    (["data.name=cifar10", "model.name=mlp", "data.root=/nonexistent/data"], "cifar10"),
], ids=["layout", "batch", "data"])
def test_under_torchrun_rank_0_says_it_once(args, match, tmp_path):
    r = _torchrun(2, args, tmp_path)
    assert r.returncode != 0
    ours = _ours(r.stderr)
    assert len(ours) == 1 and match in ours[0] and "(rank" not in ours[0], r.stderr[-4000:]
    _no_traceback_of_ours(r.stderr)
    assert not (tmp_path / "out").exists()


def test_a_check_that_fails_on_one_rank_stops_all_and_keeps_the_old_run(tmp_path):
    """Rank 1 alone fails its data check (GRAPE_FAULT=refuse, as on a node without the data)
    in a run that would --overwrite an earlier one: the ranks compare notes before anything is
    written, rank 0 reports rank 1's problem in one line, and the earlier run is intact."""
    existing_run(tmp_path)
    before = _snapshot(tmp_path / "out")
    r = _torchrun(2, ["--overwrite"], tmp_path, env={"GRAPE_FAULT": "refuse:rank=1"})
    assert r.returncode != 0
    ours = _ours(r.stderr)
    assert len(ours) == 1 and ours[0].startswith("error: rank 1: GRAPE_FAULT"), r.stderr[-4000:]
    _no_traceback_of_ours(r.stderr)
    assert _snapshot(tmp_path / "out") == before


def test_a_torchrun_restart_after_a_refusal_does_not_take_over_another_run(tmp_path):
    """--out holds a finished run (with checkpoints) of another job. The first attempt is
    refused; torchrun restarts the workers (exit 2 is a failure to it), and the restart must be
    refused the same way: not resume that run, not replace it."""
    finished_run(tmp_path)
    before = _snapshot(tmp_path / "out")
    r = _torchrun(2, ["train.epochs=2"], tmp_path, restarts=1)
    assert r.returncode != 0
    ours = _ours(r.stderr)
    assert len(ours) == 2 and all("already holds a run" in line for line in ours), r.stderr
    assert _snapshot(tmp_path / "out") == before
