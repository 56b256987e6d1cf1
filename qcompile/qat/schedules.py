"""Training schedules of the QAT stage: stochastic precision, temperature annealing, batch-norm
freezing, the progressive schedules (from :mod:`qcompile.qat.progressive`), and the defaults.

Each is a :class:`~qcompile.qat.state.Schedule`: the training loop calls its hooks with the
:class:`~qcompile.qat.state.TrainState`, and all it needs to resume exactly is in its
``state_dict``.
"""

import math
from typing import Any

import torch
from torch import nn

from qcompile.errors import ConfigError
from qcompile.fused import ConvBatchNorm
from qcompile.qat.progressive import ProgressiveActivations, ProgressiveBits
from qcompile.qat.quantizers import annealable_quantizers, layer_groups
from qcompile.qat.state import Schedule, TrainState

__all__ = ["FreezeBatchNorm", "ProgressiveActivations", "ProgressiveBits", "StochasticPrecision",
           "TemperatureAnnealing", "default_schedules"]


def finished(state: TrainState) -> bool:
    """True once every step of the run is done (at the last ``on_epoch_end``, or resumed after)."""
    return state.step >= state.total_steps


class StochasticPrecision(Schedule):
    """Quantize each layer with probability ``p`` per step, else run it in full precision.

    Zhuang et al.'s stochastic precision ("Effective Training of Convolutional Neural Networks
    with Low-bitwidth Weights and Activations", TPAMI 2021, arXiv:1908.04680): instead of training
    in stages, each step samples a sub-network to quantize and keeps the rest in full precision,
    with the quantized share rising to the whole network. Here a layer is its weight quantizer and
    its input quantizer together (layers that share one input quantizer are drawn together), and
    ``p`` rises linearly from ``start`` to ``end`` over the first ``full_at`` of training, then
    stays at ``end``; the paper's own rise in the quantized share is not reproduced step for step.
    Draws come from ``state.generator`` (seed, step), so a resumed run draws the same layers.

    After each epoch (and at the start) every quantizer is enabled, so validation and checkpoints
    see the fully quantized network; the next step draws again. ``probability`` and ``fraction``
    hold the current step's ``p`` and share of layers quantized.
    """

    name = "stochastic-precision"
    salt = 0x5350
    switches_every_step = True
    """Read by the training loop: a compiled step then reads the switches as tensors."""

    def __init__(self, start: float = 0.5, end: float = 1.0, full_at: float = 0.8):
        if not 0 <= start <= end <= 1 or not 0 < full_at <= 1:
            raise ConfigError("StochasticPrecision needs 0 <= start <= end <= 1 (probabilities "
                              f"of quantizing a layer) and full_at in (0, 1]; got start={start!r},"
                              f" end={end!r}, full_at={full_at!r}")
        self.start, self.end, self.full_at = start, end, full_at
        self.probability = start
        self.fraction = 1.0
        self.epoch_fractions: list[float] = []

    def probability_at(self, progress: float) -> float:
        return self.start + (self.end - self.start) * min(progress / self.full_at, 1.0)

    def on_train_start(self, state: TrainState) -> None:
        _enable_all(state)

    def on_step_start(self, state: TrainState) -> None:
        groups = layer_groups(state.model)
        self.probability = self.probability_at(state.progress)
        draws = torch.rand(len(groups), generator=state.generator(self.salt)) < self.probability
        for group, quantized in zip(groups, draws.tolist(), strict=True):
            for quantizer in group:
                quantizer.enabled = quantized
        self.fraction = float(draws.float().mean()) if groups else 1.0
        self.epoch_fractions.append(self.fraction)

    def on_epoch_end(self, state: TrainState) -> dict[str, Any]:
        _enable_all(state)
        shares, self.epoch_fractions = self.epoch_fractions, []
        return {"quantize_probability": self.probability,
                "quantized_fraction": sum(shares) / len(shares) if shares else 1.0}

    def state_dict(self) -> dict[str, Any]:
        return {"probability": self.probability, "fraction": self.fraction,
                "epoch_fractions": list(self.epoch_fractions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probability, self.fraction = state["probability"], state["fraction"]
        self.epoch_fractions = list(state["epoch_fractions"])


def _enable_all(state: TrainState) -> None:
    for group in layer_groups(state.model):
        for quantizer in group:
            quantizer.enabled = True


class TemperatureAnnealing(Schedule):
    """Raise the temperature of soft quantizers over training, then switch to the hard staircase.

    Quantization Networks (Yang et al., CVPR 2019, sec. 3.2) train a sum of sigmoids of
    temperature ``T`` and raise ``T`` as training goes on, so the soft function tends to the
    staircase used at inference. Every module with ``set_temperature`` gets, for epoch ``e`` of
    ``E``, ``T = start + (end - start) * e / (E - 1)`` (``mode="linear"``, a fixed increase per
    epoch) or ``start * (end / start) ** (e / (E - 1))`` (``"exponential"``): the last epoch trains
    at ``end``. When the run ends they are set hard (``set_hard(True)``), so the trained model
    computes exactly the staircase its integer meaning describes, in training mode too.
    ``end=200`` brings a QN quantizer's soft output within about 1% of a step of its staircase
    (mean absolute difference), so the switch to hard changes little.
    """

    name = "temperature"
    may_leave_parameters_unused = False

    def __init__(self, start: float = 1.0, end: float = 200.0, mode: str = "linear"):
        if mode not in ("linear", "exponential"):
            raise ConfigError(f"temperature mode is 'linear' or 'exponential', got {mode!r}")
        if not 0 < start <= end or not math.isfinite(end):
            raise ConfigError(f"temperatures need 0 < start <= end; got start={start!r}, "
                              f"end={end!r}")
        self.start, self.end, self.mode = float(start), float(end), mode
        self.temperature = self.start
        self.hard = False

    def temperature_at(self, epoch: int, epochs: int) -> float:
        fraction = min(epoch / max(epochs - 1, 1), 1.0)
        if self.mode == "linear":
            return self.start + (self.end - self.start) * fraction
        return self.start * (self.end / self.start) ** fraction

    def on_train_start(self, state: TrainState) -> None:
        self._set(state, self.temperature_at(state.epoch, state.epochs))
        if self.hard or finished(state):
            self._harden(state)

    def on_epoch_start(self, state: TrainState) -> None:
        self._set(state, self.temperature_at(state.epoch, state.epochs))

    def on_epoch_end(self, state: TrainState) -> dict[str, Any]:
        if finished(state):
            self._harden(state)
        return {"temperature": self.temperature}

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "hard": self.hard}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.temperature, self.hard = float(state["temperature"]), bool(state["hard"])

    def _set(self, state: TrainState, temperature: float) -> None:
        self.temperature = temperature
        for quantizer in annealable_quantizers(state.model):
            quantizer.set_temperature(temperature)

    def _harden(self, state: TrainState) -> None:
        self.hard = True
        for quantizer in annealable_quantizers(state.model):
            quantizer.set_hard(True)


class FreezeBatchNorm(Schedule):
    """From ``at`` (a fraction of training) on, stop updating batch-norm statistics.

    Krishnamoorthi ("Quantizing deep convolutional networks for efficient inference", 2018,
    sec. 3.2) freezes the batch-norm statistics late in quantization-aware training, so the last
    steps train the folded weights the deployed model uses. When the run re-estimates batch-norm
    statistics (``train(bn_reestimation=N)``), the statistics frozen are first re-estimated for
    the current weights rather than taken from the moving averages of the last steps. Every
    :class:`~qcompile.fused.ConvBatchNorm` gets
    :meth:`~qcompile.fused.ConvBatchNorm.freeze_statistics` (it then trains with the folded form
    and running statistics); every other batch norm is put in eval mode before each step, since
    the loop's ``model.train()`` would switch it back.
    """

    name = "freeze-bn"
    may_leave_parameters_unused = False

    def __init__(self, at: float = 0.8):
        if not 0 <= at <= 1:
            raise ConfigError(f"FreezeBatchNorm: at is a fraction of training in [0, 1], "
                              f"got {at!r}")
        self.at = at
        self.frozen = False

    def on_train_start(self, state: TrainState) -> None:
        self.on_step_start(state)

    def on_step_start(self, state: TrainState) -> None:
        if not self.frozen and state.progress >= self.at:
            self.frozen = True
            if state.reestimate_batch_norms is not None:
                state.reestimate_batch_norms()
        if not self.frozen:
            return
        for module in state.model.modules():
            if isinstance(module, ConvBatchNorm):
                module.freeze_statistics()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def on_epoch_end(self, state: TrainState) -> dict[str, Any]:
        return {"bn_frozen": float(self.frozen)}

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = bool(state["frozen"])


def default_schedules(gm: nn.Module) -> list[Schedule]:
    """What a run gets unless told otherwise: temperature annealing when a quantizer has a
    temperature (Quantization Networks), batch-norm freezing when batch norm is fused for QAT."""
    schedules: list[Schedule] = []
    if annealable_quantizers(gm):
        schedules.append(TemperatureAnnealing())
    if any(isinstance(module, ConvBatchNorm) for module in gm.modules()):
        schedules.append(FreezeBatchNorm())
    return schedules
