"""TensorBoard scalars for watching a run while it trains (rank 0 writes them).

    tb = TensorBoardWriter(out / "tensorboard")      # None: every method does nothing
    tb.step(step, loss=..., step_time_ms=...)        # each training step (or every k-th)
    tb.evaluation(row, step_time_ms=...)             # each metrics.jsonl row, as written
    tb.calibration(step, count)                      # after a calibration
    tb.close()

Tags: `train/loss`, `train/accuracy`, `train/perplexity`, `test/...` (from the evaluation rows),
`step/loss`, `step/step_time_ms` (per step), `alignment/<block>/<metric>` (grad_cos, jac_cos,
jhat_cos, train_col_cos), `calibration/calibrated` (0/1 per evaluation),
`calibration/trigger_grad_cos`, `calibration/count`, `calibration/{loss_before,loss_after,scale}`
(with `calibration.line_search`), `time/step_time_ms` (the mean over an
epoch, with the evaluation row) and `epoch`. The x axis is always the global training step.
View them with `tensorboard --logdir RUN_DIR/tensorboard`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _number(v: Any) -> float | None:
    """A loggable scalar, or None (missing values, strings, NaN from an empty split)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


class TensorBoardWriter:
    """Scalars into `log_dir` through torch's SummaryWriter (the `tensorboard` package).

    `log_dir=None` makes every method a no-op, so callers need no `if rank == 0` around each
    call (as with RunWriter). `purge_step`: on a resumed run, the first step after its
    checkpoint: TensorBoard drops the events a crashed run wrote from there on, so curves do
    not fold back, and keeps the checkpoint step's own.
    `step_every`: `step()` writes only every that many steps (1: all), to keep event files small
    on long runs."""

    def __init__(self, log_dir: str | Path | None, purge_step: int | None = None,
                 step_every: int = 1, flush_secs: int = 30) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.step_every = max(int(step_every), 1)
        self._w = None
        if self.log_dir is not None:
            # Imported here: ranks other than 0 and runs without an --out never load it.
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._w = SummaryWriter(str(self.log_dir), purge_step=purge_step,
                                    flush_secs=flush_secs)

    @property
    def enabled(self) -> bool:
        return self._w is not None

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """One scalar; silently skips None and non-finite values."""
        v = _number(value)
        if self._w is not None and v is not None:
            self._w.add_scalar(tag, v, int(step))

    def step(self, step: int, loss: float | None = None, step_time_ms: float | None = None,
             **scalars: float) -> None:
        """Per training step: `step/loss`, `step/step_time_ms` and `step/<name>` for any other
        keyword (e.g. lr). `step` is the global step after this one (as in metrics.jsonl)."""
        if self._w is None or step % self.step_every:
            return
        self.scalar("step/loss", loss, step)
        self.scalar("step/step_time_ms", step_time_ms, step)
        for name, value in scalars.items():
            self.scalar(f"step/{name}", value, step)

    def evaluation(self, row: Mapping[str, Any], step_time_ms: float | None = None) -> None:
        """One metrics.jsonl row, unchanged: {"epoch", "step", "split", "loss", "accuracy",
        optional "perplexity", and on test rows "calibrated", "trigger_grad_cos",
        "calibration": {loss_before, loss_after, scale}, "alignment": {block: {metric: value}}}.
        `step_time_ms`: the epoch's mean step time."""
        if self._w is None:
            return
        step = int(row["step"])
        split = row.get("split", "test")
        for key in ("loss", "accuracy", "perplexity"):
            self.scalar(f"{split}/{key}", row.get(key), step)
        self.scalar("epoch", row.get("epoch"), step)
        self.scalar("time/step_time_ms", step_time_ms, step)
        if "calibrated" in row:
            self.scalar("calibration/calibrated", 1.0 if row["calibrated"] else 0.0, step)
        self.scalar("calibration/trigger_grad_cos", row.get("trigger_grad_cos"), step)
        for key, value in (row.get("calibration") or {}).items():
            self.scalar(f"calibration/{key}", value, step)
        for block, metrics in (row.get("alignment") or {}).items():
            for metric, value in metrics.items():
                self.scalar(f"alignment/{block}/{metric}", value, step)

    def calibration(self, step: int, count: int) -> None:
        """After a calibration: the number of calibrations so far (a resumed run passes its
        restored total, so the curve continues)."""
        self.scalar("calibration/count", count, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text entry, e.g. the resolved config (shown in TensorBoard's Text tab)."""
        if self._w is not None:
            self._w.add_text(tag, text, step)

    def config(self, data: Mapping[str, Any]) -> None:
        """The resolved config as YAML in the Text tab, so a curve can be traced to its run."""
        import yaml

        body = yaml.safe_dump(dict(data), sort_keys=False)
        # Four-space indent: TensorBoard renders text as markdown; this keeps it verbatim.
        self.text("config", "\n".join("    " + line for line in body.splitlines()))

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
