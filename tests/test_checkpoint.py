"""Checkpoints and resume: a run stopped (at a checkpoint, or by SIGINT) and resumed ends with
exactly the metrics and weights of an uninterrupted run, on 1 and on 2 ranks; run folders are
never overwritten silently; a corrupted checkpoint is named."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import time

import pytest
from training_runs import RUN, TORCHRUN, assert_close_results, assert_same_results, launch, run


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def uninterrupted(request, tmp_path_factory):
    if request.param > 1 and not TORCHRUN.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path_factory.mktemp(f"full{request.param}") / "run"
    r = run(request.param, *RUN, "--out", str(out), "train.checkpoint_every_steps=5",
            "train.keep_checkpoints=100")
    assert r.returncode == 0, r.stderr[-3000:]
    return request.param, out


@pytest.mark.parametrize("at", ["step_000000010", "step_000000025"])
def test_resume_from_a_checkpoint_ends_like_the_uninterrupted_run(uninterrupted, at, tmp_path):
    """A crash right after checkpoint `at` (mid-epoch 1, mid-epoch 2; the SIGINT test below
    stops at an epoch's first steps): the run folder as it was then (later rows and checkpoints
    are ignored), resumed."""
    nproc, full = uninterrupted
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "latest").write_text(at + "\n")
    (cut / "summary.json").unlink()
    manifest = json.loads((cut / "checkpoints" / at / "manifest.json").read_text())
    assert manifest["world_size"] == nproc and len(manifest["stage_bounds"]) == nproc
    r = run(nproc, "--resume", str(cut), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_results(full, cut)
    # TensorBoard: every step's point once, the checkpoint's own step included.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def loss_steps(run_dir):
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return sorted(e.step for e in acc.Scalars("step/loss"))
    assert loss_steps(cut) == loss_steps(full)


def test_resume_on_another_layout_continues_the_same_trajectory(uninterrupted, tmp_path):
    """A checkpoint written by 2 ranks (pp=2) resumes on one process, and one written by one
    process resumes on 4 ranks (pp=2 x dp=2, the per-replica batches halved so the global ones
    stay): metrics and final state are the uninterrupted run's (up to the summation order of
    other replicas and stages)."""
    nproc, full = uninterrupted
    if nproc == 1 and not TORCHRUN.exists():
        pytest.skip("torchrun not installed")
    at = "step_000000010"  # mid-epoch 1
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "latest").write_text(at + "\n")
    (cut / "summary.json").unlink()
    if nproc == 2:
        r = run(1, "--resume", str(cut), "--quiet", "pipeline.pp=1")
    else:
        r = run(4, "--resume", str(cut), "--quiet", "pipeline.pp=2", "pipeline.dp=2",
                "data.batch_size=64", "calibration.batch_size=64")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["world_size"] == (1 if nproc == 2 else 4)
    assert_close_results(full, cut)
    # The layout change is history: config.yaml stays, resumes.jsonl says what changed.
    changes = json.loads((cut / "resumes.jsonl").read_text().splitlines()[-1])["changed"]
    assert "pipeline.pp" in changes or "pipeline.dp" in changes, changes


def test_resume_refuses_another_global_batch(tmp_path):
    out = tmp_path / "run"
    assert run(1, *RUN, "train.epochs=1", "--out", str(out)).returncode == 0
    r = run(1, "--resume", str(out), "train.epochs=2", "data.batch_size=64")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "global data.batch_size is dp=1 x 128 = 128, this run's pipeline.dp=1 x 64 = 64" \
        in r.stderr, r.stderr[-2000:]
    assert "set data.batch_size=128" in r.stderr and "Traceback" not in r.stderr


def test_sigint_checkpoints_then_resume_ends_like_the_uninterrupted_run(tmp_path):
    """Ctrl-C mid-run: the current step finishes, a checkpoint is written, one line says how to
    resume (exit 130); resuming ends exactly like a run that was never stopped."""
    args = [*RUN, "train.epochs=12"]
    p = launch(1, *args, "--out", str(tmp_path / "stopped"))
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)  # during epoch 2 (of 12)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err, err
    r = run(1, "--resume", str(tmp_path / "stopped"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(1, *args, "--out", str(tmp_path / "whole"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_results(tmp_path / "whole", tmp_path / "stopped")


def test_run_folders_are_not_overwritten_silently_and_are_readable(tmp_path):
    out = tmp_path / "run"
    short = [*RUN, "train.epochs=1", "--out", str(out)]
    assert run(1, *short).returncode == 0
    for name in ("config.yaml", "summary.json", "metrics.jsonl"):
        assert stat.S_IMODE((out / name).stat().st_mode) & 0o044 == 0o044, name
    # Rank 0's TensorBoard scalars: per step, per evaluation, per block.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/step_time_ms", "test/accuracy", "train/loss",
            "alignment/fc1/grad_cos", "calibration/calibrated"} <= tags, tags
    assert len(events.Scalars("step/loss")) == 16
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(row["accuracy"])
    first = (out / "metrics.jsonl").read_text()
    r = run(1, *short)
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (out / "metrics.jsonl").read_text() == first  # untouched
    r = run(1, *short, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "file").write_text("x")
    r = run(1, *RUN, "--out", str(tmp_path / "file"))
    assert r.returncode == 2 and "is a file" in r.stderr


@pytest.mark.parametrize("overrides,match", [
    (["rule=dfa"], "rule is 'dfa' here but 'grape' in the checkpoint"),
    (["model.hidden=[32,32]"], "model.hidden"),
])
def test_resume_refuses_another_config(overrides, match, tmp_path):
    out = tmp_path / "run"
    assert run(1, *RUN, "train.epochs=1", "--out", str(out)).returncode == 0
    r = run(1, "--resume", str(out), *overrides)
    assert r.returncode == 2 and match in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    # Extending the run is allowed.
    r = run(1, "--resume", str(out), "--quiet", "train.epochs=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_a_corrupted_checkpoint_is_named_and_a_partial_one_ignored(tmp_path):
    out = tmp_path / "run"
    assert run(1, *RUN, "train.epochs=1", "--out", str(out)).returncode == 0
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    # A save that died while writing leaves only a .partial folder: `latest` is unaffected.
    (out / "checkpoints" / "step_000000099.partial").mkdir()
    shard = latest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run(1, "--resume", str(out), "train.epochs=2")
    assert r.returncode == 2 and "__0_0.distcp" in r.stderr and "SHA-256" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    shard.write_bytes(bytes(data[:100]))
    r = run(1, "--resume", str(out), "train.epochs=2")
    assert r.returncode == 2 and "truncated" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_divergence_stops_the_run_names_the_blocks_and_keeps_the_last_good_checkpoint(
        tmp_path):
    """Epoch 1 at SGD lr 0.01, then resumed at lr 1e30: epoch 2 overflows within two steps.
    One line names the step and the blocks (exit code 3), no checkpoint is written after it,
    and a resume with a sane learning rate finishes from the last good one."""
    out = tmp_path / "run"
    assert run(1, *RUN, "--out", str(out), "optim.name=sgd", "optim.lr=0.01",
               "train.epochs=1").returncode == 0
    r = run(1, "--resume", str(out), "--quiet", "train.epochs=2", "optim.lr=1e30")
    assert r.returncode == 3, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite values after step 1" in lines[0], r.stderr[-2000:]
    assert "fc1 (weights)" in lines[0] and "step_000000016" in lines[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000016"
    r = run(1, "--resume", str(out), "--quiet", "train.epochs=2", "optim.lr=0.01")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_divergence_stops_every_rank_on_the_same_step(tmp_path):
    """On 2 ranks the non-finite blocks live on different ranks: both stop after the same step
    (no hang in a collective), and rank 0 alone prints the line, naming blocks of both."""
    t0 = time.monotonic()
    r = run(2, *RUN, "--out", str(tmp_path / "run"), "optim.name=sgd", "optim.lr=1e30")
    assert r.returncode != 0 and time.monotonic() - t0 < 120
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: non-finite")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "fc1 (weights)" in lines[0] and "out (weights)" in lines[0], lines[0]


def test_a_resume_that_changes_the_lr_is_history_and_the_next_resume_keeps_it(tmp_path):
    """`--resume RUN optim.lr=X`: config.yaml keeps the lr the run started with, resumes.jsonl
    records the change at its step, and a later resume without the override goes on at X (from
    the checkpoint's config). A run that trained all its epochs is not resumed."""
    out = tmp_path / "run"
    assert run(1, *RUN, "--out", str(out), "optim.name=sgd", "optim.lr=0.01",
               "train.epochs=1").returncode == 0
    started = (out / "config.yaml").read_text()
    r = run(1, "--resume", str(out), "--quiet", "train.epochs=1")
    assert r.returncode == 2 and "finished its 1 epochs" in r.stderr and \
        "train.epochs=2" in r.stderr, r.stderr[-2000:]
    assert run(1, "--resume", str(out), "--quiet", "train.epochs=2",
               "optim.lr=0.005").returncode == 0
    assert (out / "config.yaml").read_text() == started
    history = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert history == [{"step": 16, "epoch": 1, "changed": {"optim.lr": [0.01, 0.005],
                                                            "train.epochs": [1, 2]}}]
    assert run(1, "--resume", str(out), "--quiet", "train.epochs=3").returncode == 0
    latest = (out / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((out / "checkpoints" / latest / "manifest.json").read_text())
    assert manifest["config"]["optim"]["lr"] == 0.005 and manifest["epoch"] == 3
    assert len((out / "resumes.jsonl").read_text().splitlines()) == 2  # train.epochs 2 -> 3


def test_a_checkpoint_from_before_a_new_key_resumes_as_it_trained(tmp_path):
    """`calibration.line_search`, `calibration.check_rows`, `data.drop_last` and the optimisers'
    `warmup_steps` are newer than the checkpoint format: a manifest without them is read as the
    code before them behaved (no line search; a partial batch dropped only by torch's
    schedules; no warm-up), not refused and not silently changed to the new defaults."""
    out = tmp_path / "run"
    assert run(1, *RUN, "train.epochs=1", "calibration.line_search=0", "--out",
               str(out)).returncode == 0
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((latest / "manifest.json").read_text())
    del manifest["config"]["calibration"]["line_search"]
    del manifest["config"]["calibration"]["check_rows"]
    del manifest["config"]["data"]["drop_last"]  # the native schedule: False
    config = manifest["config"]
    for optim in (config["optim"], config["grape"]["b_optim"], config["calibration"]["optim"]):
        del optim["warmup_steps"]
    (latest / "manifest.json").write_text(json.dumps(manifest))
    r = run(1, "--resume", str(out), "train.epochs=2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["calibrated"] for row in rows if row["split"] == "test"] == [True, True]
    assert not any("calibration" in row for row in rows)  # line search logs its decision
