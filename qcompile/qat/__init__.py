"""Quantization-aware training: the loop (``train``), its schedules and distillation.

``train`` trains a quantized graph from :func:`qcompile.quantize` in place, with checkpoints that
resume exactly, Ctrl-C safety, progress and a metrics log, and data-parallel training under
``torchrun``. Schedules (progressive quantization, stochastic precision, temperature annealing,
batch-norm freezing) drive the model through the hooks of :class:`Schedule`; ``Distillation``
adds a teacher's loss.
"""

from qcompile.qat.distill import Distillation
from qcompile.qat.metrics import History
from qcompile.qat.progressive import ProgressiveActivations, ProgressiveBits
from qcompile.qat.schedules import (
    FreezeBatchNorm,
    StochasticPrecision,
    TemperatureAnnealing,
    default_schedules,
)
from qcompile.qat.state import Schedule, TrainState
from qcompile.qat.trainer import train

__all__ = [
    "Distillation",
    "FreezeBatchNorm",
    "History",
    "ProgressiveActivations",
    "ProgressiveBits",
    "Schedule",
    "StochasticPrecision",
    "TemperatureAnnealing",
    "TrainState",
    "default_schedules",
    "train",
]
