"""Fault drill: inject each fault into a real run and report what happened.

    python bench/fault_drill.py             # 2 ranks on this machine, ~3 minutes on 2 cores
    python bench/fault_drill.py --nproc 4 --timeout-s 20 --work /tmp/drill

Every run is the same small GrAPE job (MNIST MLP, 2048 images, 2 epochs of 16 steps, Adam,
calibration every epoch, a checkpoint every 5 steps) launched with torchrun. Faults come from
GRAPE_FAULT (grape_dist/faults.py) or from outside (a signal, a damaged file). For each, the
table gives the outcome, the time from the fault to the job's first error line ("time to
detect"), and the training steps that must be redone ("work lost": steps since the checkpoint
the run continues from). "same result" compares metrics.jsonl, summary and the final weights
with an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN = ["--config", "configs/mnist_mlp_grape.yaml", "--quiet", "data.train_subset=2048",
       "data.test_subset=512", "model.hidden=[64,64]", "train.epochs=2", "train.threads=1",
       "train.save_final=true", "calibration.every_epochs=1", "train.checkpoint_every_steps=5",
       "train.keep_checkpoints=100"]
FAULT_STEP = 12  # mid-epoch 1; the last checkpoint before it is step 10


@dataclass
class Result:
    fault: str
    how: str
    outcome: str
    detect_s: float | str | None  # seconds, or when it was detected
    work_lost: str


class Job:
    """One launch, with its stderr lines time-stamped as they arrive."""

    def __init__(self, nproc: int, args: list[str], env: dict[str, str] | None = None,
                 restarts: int = 0) -> None:
        cmd = [str(TORCHRUN), f"--nproc_per_node={nproc}", "--standalone",
               f"--max-restarts={restarts}", "-m", "grape_dist.train"] if nproc > 1 else \
            [sys.executable, "-m", "grape_dist.train"]
        self.t0 = time.time()
        self.proc = subprocess.Popen(
            [*cmd, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                            **(env or {})}, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.time(), line.rstrip("\n")))

    def wait(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def first(self, pattern: str) -> tuple[float, str] | None:
        return next(((t, x) for t, x in self.lines if re.search(pattern, x)), None)

    def exit_codes(self, rc: int) -> str:
        """torchrun's own code, and the first failed worker's (from its summary)."""
        worker = self.first(r"exitcode\s*:\s*-?\d+")
        code = re.search(r"exitcode\s*:\s*(-?\d+)", worker[1]).group(1) if worker else None
        return f"exit {rc}" + (f" (worker {code})" if code is not None and rc else "")


def same_result(a: Path, b: Path) -> bool:
    import torch

    from grape_dist.runtime import load_final_state

    if (a / "metrics.jsonl").read_text() != (b / "metrics.jsonl").read_text():
        return False
    fa, fb = load_final_state(a), load_final_state(b)
    return all(torch.equal(fa[p][k], fb[p][k]) for p in ("model", "feedback") for k in fa[p])


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def steps_of(name: str) -> int:
    return int(name.split("_")[1].split(".")[0])


def one_line(job: Job, pattern: str) -> str:
    hit = job.first(pattern)
    return hit[1] if hit else "(no line)"


def drill(work: Path, nproc: int, timeout_s: int) -> list[Result]:
    results: list[Result] = []
    base = work / "uninterrupted"
    rc = Job(nproc, [*RUN, "--out", str(base)]).wait()
    assert rc == 0, "the uninterrupted run failed"

    def peer(action: str, how: str, extra: list[str]) -> None:
        out, marker = work / action, work / f"{action}.fired"
        job = Job(nproc, [*RUN, *extra, "--out", str(out)],
                  env={"GRAPE_FAULT": f"{action}:step={FAULT_STEP}:rank=1:once={marker}"})
        rc = job.wait()
        hit = job.first(r"^error \(rank")
        detect = hit[0] - marker.stat().st_mtime if hit and marker.exists() else None
        resumed = Job(nproc, ["--resume", str(out), "--quiet"]).wait() == 0
        outcome = (f"{job.exit_codes(rc)}; `{hit[1][:70] if hit else 'no line'}…`; --resume: "
                   + ("same result" if resumed and same_result(base, out) else "DIFFERS"))
        results.append(Result(f"rank 1 {how} after step {FAULT_STEP}", f"GRAPE_FAULT={action}",
                              outcome, detect, f"{FAULT_STEP - 10} steps (since step 10)"))

    peer("kill", "SIGKILLed", [f"pipeline.timeout_s={timeout_s}"])
    peer("exit", "exits (code 17)", [f"pipeline.timeout_s={timeout_s}"])
    peer("hang", "hangs", [f"pipeline.timeout_s={timeout_s}"])

    # torchrun restarts the workers, which resume from the newest checkpoint by themselves.
    out, marker = work / "restart", work / "restart.fired"
    job = Job(nproc, [*RUN, "--out", str(out)], restarts=1,
              env={"GRAPE_FAULT": f"kill:step={FAULT_STEP}:rank=1:once={marker}"})
    rc = job.wait()
    hit = job.first(r"^error \(rank")  # the failed attempt's line; the restart follows
    results.append(Result(
        f"rank 1 SIGKILLed after step {FAULT_STEP}, torchrun --max-restarts=1",
        "GRAPE_FAULT=kill (once)",
        f"{job.exit_codes(rc)}, restarted and resumed from step 10: "
        + ("same result" if rc == 0 and same_result(base, out) else "DIFFERS"),
        hit[0] - marker.stat().st_mtime if hit and marker.exists() else None,
        f"{FAULT_STEP - 10} steps (since step 10)"))

    # Killed while writing the step-10 checkpoint: the step-5 one stays the latest.
    out, marker = work / "save", work / "save.fired"
    job = Job(nproc, [*RUN, "--out", str(out), f"pipeline.timeout_s={timeout_s}"],
              env={"GRAPE_FAULT": f"kill:step=10:rank=1:at=save:once={marker}"})
    rc = job.wait()
    hit = job.first(r"^error \(rank")
    kept = latest(out)
    resumed = Job(nproc, ["--resume", str(out), "--quiet"]).wait() == 0
    results.append(Result(
        "rank 1 SIGKILLed while writing the step-10 checkpoint", "GRAPE_FAULT=kill at=save",
        f"{job.exit_codes(rc)}; step_000000010.partial left, latest = {kept}; --resume: "
        + ("same result" if resumed and same_result(base, out) else "DIFFERS"),
        hit[0] - marker.stat().st_mtime if hit and marker.exists() else None,
        f"{10 - steps_of(kept)} steps (since step {steps_of(kept)})"))

    # Preemption: SIGTERM to the launcher once metrics show epoch 1 done.
    out = work / "sigterm"
    job = Job(nproc, [*RUN, "train.epochs=6", "--out", str(out)])
    metrics = out / "metrics.jsonl"
    while job.proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)  # the first evaluation row: epoch 1 is done
    sent = time.time()
    os.killpg(job.proc.pid, signal.SIGTERM)
    rc = job.wait()
    hit = job.first(r"^stopped")
    results.append(Result("SIGTERM (preemption, scancel) during epoch 2", "kill -TERM torchrun",
                          f"{job.exit_codes(rc)}; `{(hit[1] if hit else 'no line')[:70]}…`",
                          hit[0] - sent if hit else None, "0 (checkpoint at the current step)"))

    # Divergence: the learning rate blows the weights up in the first step.
    out = work / "nan"
    job = Job(nproc, [*RUN, "optim.name=sgd", "optim.lr=1e30", "--out", str(out)])
    rc = job.wait()
    results.append(Result("NaN/Inf in the weights", "optim.lr=1e30 (SGD)",
                          f"{job.exit_codes(rc)}; `{one_line(job, 'non-finite')[:70]}…`", None,
                          "the steps since the last checkpoint (none here)"))
    results[-1].detect_s = "the same step"

    # Damaged checkpoint files: refused on resume, naming the file.
    for how in ("flip", "truncate"):
        out = work / f"ckpt_{how}"
        shutil.copytree(base, out)
        shard = next((out / "checkpoints" / latest(out)).glob("__0_*.distcp"))
        data = bytearray(shard.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data if how == "flip" else data[:100]))
        job = Job(nproc, ["--resume", str(out)])
        rc = job.wait()
        what = "bit flip" if how == "flip" else "truncated"
        results.append(Result(f"checkpoint shard {what}", "edited on disk",
                              f"{job.exit_codes(rc)}; `{one_line(job, 'cannot resume')[:90]}…`",
                              None,
                              "nothing trained; the file is named"))
        results[-1].detect_s = "on resume, before loading"

    # A damaged data cache: warned about, rebuilt, the run goes on (needs local parquet data).
    root = os.environ.get("GRAPE_DATA_DIR")
    if root and (Path(root) / "mnist").is_dir():
        env = {"GRAPE_CACHE_DIR": str(work / "cache")}
        data = ["data.name=mnist", f"data.root={root}", "train.epochs=1"]
        Job(nproc, [*RUN, *data, "--out", str(work / "cache_first")], env=env).wait()
        (cached,) = (work / "cache").glob("mnist-*.pt")
        cached.write_bytes(cached.read_bytes()[:1000])
        job = Job(nproc, [*RUN, *data, "--out", str(work / "cache_again")], env=env)
        rc = job.wait()
        warned = sum("ignoring corrupt" in x for _, x in job.lines)
        results.append(Result("data cache file truncated", "edited on disk",
                              f"{job.exit_codes(rc)}; {warned} warning(s) "
                              f"`{one_line(job, 'ignoring corrupt')[:60]}…`, rebuilt",
                              "on load", "nothing (the cache is rebuilt in seconds)"))

    # One rank fails its start-up data check (a node without the data), --overwrite of a run.
    out = work / "one_rank"
    shutil.copytree(base, out)
    before = (out / "metrics.jsonl").read_text()
    job = Job(nproc, [*RUN, "--out", str(out), "--overwrite"], env={"GRAPE_FAULT": "refuse:rank=1"})
    rc = job.wait()
    kept = (out / "metrics.jsonl").read_text() == before
    results.append(Result("rank 1 alone fails its data check", "GRAPE_FAULT=refuse:rank=1",
                          f"{job.exit_codes(rc)}; `{one_line(job, '^error')[:70]}…`; the run "
                          f"it would overwrite {'kept' if kept else 'LOST'}",
                          "before the first step", "nothing started"))

    # Bad input: refused before any rank starts.
    job = Job(nproc, [*RUN, "pipeline.pp=3", "--out", str(work / "bad")])
    rc = job.wait()
    results.append(Result("a mesh that does not fit", "pipeline.pp=3 on 2 ranks",
                          f"{job.exit_codes(rc)}; `{one_line(job, 'config error')[:90]}…`",
                          "before any rank joins", "nothing started; --out not created"))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--timeout-s", type=int, default=10, help="pipeline.timeout_s for the runs")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temp folder)")
    args = p.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="fault_drill_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = drill(work, args.nproc, args.timeout_s)
    print(f"# fault drill: {args.nproc} ranks, pipeline.timeout_s={args.timeout_s}, "
          f"{platform.node()} ({os.cpu_count()} CPUs), {time.time() - t0:.0f} s")
    print(f"# command: python bench/fault_drill.py --nproc {args.nproc} "
          f"--timeout-s {args.timeout_s}")
    print("\n| fault | how | outcome | time to detect | work lost |\n|---|---|---|---|---|")
    for r in results:
        detect = f"{r.detect_s:.2f} s" if isinstance(r.detect_s, float) else r.detect_s or "-"
        print(f"| {r.fault} | {r.how} | {r.outcome} | {detect} | {r.work_lost} |")
    (work / "fault_drill.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))


if __name__ == "__main__":
    main()
