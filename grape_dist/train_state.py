"""What a run has done so far: the trainer's state, kept in every checkpoint's manifest
(runtime/checkpoint.py) so that a resumed run continues where it stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CalibrationEvent:
    epoch: int
    step: int
    batch_size: int
    # With `calibration.line_search`: the check rows' mean loss (eval mode) before and after the
    # step, and the fraction of the exact step kept (runtime/engine.py, CalibrationResult).
    loss_before: float | None = None
    loss_after: float | None = None
    scale: float = 1.0


@dataclass
class EpochProgress:
    """The running sums of the epoch in progress (checkpointed mid-epoch)."""

    batches: int = 0  # mini-batches of this epoch done
    loss: float = 0.0
    correct: float = 0.0
    seen: int = 0
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (1-based), or the last one finished
    step: int = 0
    calibrations: list[CalibrationEvent] = field(default_factory=list)
    best_test_accuracy: float = 0.0
    best_test_loss: float = float("inf")
    last_test_loss: float = float("nan")
    last_test_accuracy: float = float("nan")
    progress: EpochProgress = field(default_factory=EpochProgress)
    epoch_done: bool = True  # whether `epoch` is finished (trained, calibrated, evaluated)
    metrics_rows: int = 0  # lines of metrics.jsonl written so far
    elapsed_s: float = 0.0  # training time before this process (resumed runs)
    # Seconds spent in training steps and calibrations so far (no evaluation, probe or
    # checkpoint): the clock of time-to-accuracy comparisons (timing.jsonl).
    train_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        data = dict(data)
        data["calibrations"] = [CalibrationEvent(**c) for c in data["calibrations"]]
        data["progress"] = EpochProgress(**data["progress"])
        return cls(**data)
