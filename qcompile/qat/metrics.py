"""What training measured: running sums within an epoch, per-epoch records, the JSON-lines log.

One record per epoch, the same in :class:`History` and in the metrics file: ``epoch`` (1-based,
epochs completed), ``step`` (optimizer steps so far), ``train_loss``, ``train_accuracy``,
``val_loss``, ``val_accuracy`` (None without validation data), ``lr`` (of the weights' group at
the epoch's end), ``seconds`` (the epoch's training time), ``samples_per_second``, then the
distillation loss terms averaged over the epoch and each schedule's figures.
"""

import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class History:
    """The records of a training run, and the figures benchmarks compare."""

    records: list[dict[str, Any]] = field(default_factory=list)
    initial_val_accuracy: float | None = None
    """Validation accuracy of the quantized model before any training step."""
    seconds: float = 0.0
    """Wall-clock seconds spent in :func:`qcompile.train`, summed over resumed runs."""
    step_seconds: list[float] = field(default_factory=list)

    @property
    def best_val_accuracy(self) -> float | None:
        values = [r["val_accuracy"] for r in self.records if r.get("val_accuracy") is not None]
        return max(values) if values else None

    @property
    def final_val_accuracy(self) -> float | None:
        return self.records[-1].get("val_accuracy") if self.records else None

    @property
    def median_step_seconds(self) -> float | None:
        """Median seconds of one optimizer step (data loading, forward, backward, update)."""
        return statistics.median(self.step_seconds) if self.step_seconds else None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "History":
        return cls(**state)


@dataclass
class EpochMeter:
    """Running sums of one epoch's training figures (saved in a mid-epoch checkpoint)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0
    extra_sums: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, correct: int, count: int, extra: dict[str, float]) -> None:
        self.loss_sum += loss * count
        self.correct += correct
        self.count += count
        for key, value in extra.items():
            self.extra_sums[key] = self.extra_sums.get(key, 0.0) + float(value) * count

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

    def totals(self, all_reduce_sum) -> dict[str, float]:
        """Loss, accuracy, averaged extras and samples/s over every process."""
        keys = sorted(self.extra_sums)
        sums = all_reduce_sum([self.loss_sum, self.correct, self.count]
                              + [self.extra_sums[k] for k in keys])
        loss_sum, correct, count, extras = sums[0], sums[1], max(sums[2], 1), sums[3:]
        figures = dict(train_loss=loss_sum / count, train_accuracy=correct / count,
                       samples_per_second=sums[2] / self.seconds if self.seconds else None)
        figures.update({key: value / count for key, value in zip(keys, extras)})
        return figures

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "EpochMeter":
        return cls(**state)


class MetricsLog:
    """The JSON-lines metrics file: one line per epoch, appended as each epoch ends."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def restart(self, records: list[dict[str, Any]]) -> None:
        """Make the file hold exactly ``records`` (none on a fresh run, the checkpoint's history
        on a resume, so epochs the interrupted run logged after its checkpoint are not repeated).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".metrics-")
        try:
            with os.fdopen(handle, "w") as out:
                out.writelines(_line(record) for record in records)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(_line(record))
            out.flush()


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=_plain) + "\n"


def _plain(value: Any) -> float | str:
    """A figure JSON cannot hold as it is (a 0-d tensor, a numpy number) as a float, else text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
