"""Progressive quantization (Zhuang et al., "Towards Effective Low-bitwidth Convolutional Neural
Networks", CVPR 2018, sec. 3.1-3.2; extended in "Effective Training of Convolutional Neural
Networks with Low-bitwidth Weights and Activations", TPAMI 2021, arXiv:1908.04680).

Training a low-precision network directly easily ends in a poor local minimum; the paper reaches
a better one in steps, each stage starting from what the one before trained:

- (a) weights first: train with quantized weights and full-precision activations, then quantize
  the activations too (:class:`ProgressiveActivations`);
- (b) decreasing bit-width: train at a high precision, then lower it stage by stage to the target
  (e.g. 8 -> 4 -> 2 bits; :class:`ProgressiveBits`).

The paper runs each stage as a separate training to convergence; here the stages are parts of one
run (a fraction of the steps each), so the learning-rate schedule spans them all.
"""

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from qcompile.errors import ConfigError
from qcompile.qat.quantizers import activation_quantizers
from qcompile.qat.state import Schedule, TrainState
from qcompile.quant.layers import quantizable_layers
from qcompile.quant.requantize import recalibrate, requantize


class ProgressiveActivations(Schedule):
    """Quantize the weights only for the first ``weights_only_fraction`` of training, then the
    activations too (progressive quantization (a), the paper's two-stage optimization).

    In the first part every activation quantizer (the ``input_quantizers.*`` modules) has
    ``enabled = False``, so layers see full-precision inputs. At the switch the activation
    quantizers are re-initialized from ``state.calib_data`` (``recalibrate=True``): the network's
    activations have moved while the weights trained, and the paper's second stage starts from the
    first stage's network. Set again before every step, so it also overrides
    :class:`~qcompile.qat.schedules.StochasticPrecision` when listed after it.
    """

    name = "progressive-activations"

    def __init__(self, weights_only_fraction: float = 0.5, recalibrate: bool = True):
        if not 0 <= weights_only_fraction < 1:
            raise ConfigError("weights_only_fraction is the part of training with float "
                              f"activations, in [0, 1); got {weights_only_fraction!r}")
        self.weights_only_fraction = weights_only_fraction
        self.recalibrate = recalibrate
        self.activations_on: bool | None = None

    def on_train_start(self, state: TrainState) -> None:
        if self.recalibrate and not state.calib_data and self.weights_only_fraction > 0:
            raise ConfigError("ProgressiveActivations recalibrates the activation quantizers "
                              "when they switch on: pass calib_data (e.g. qcompile.train(..., "
                              "calib_data=batches)), or use recalibrate=False")
        if self.activations_on is None:
            self.activations_on = state.progress >= self.weights_only_fraction
        self._apply(state)

    def on_step_start(self, state: TrainState) -> None:
        on = state.progress >= self.weights_only_fraction
        if on and not self.activations_on and self.recalibrate:
            # each process records the activations with its own batch norms' running statistics
            recalibrate(state.model, state.calib_data)
            state.synchronize()
        self.activations_on = on
        self._apply(state)

    def on_epoch_end(self, state: TrainState) -> dict[str, Any]:
        return {"activations_quantized": float(bool(self.activations_on))}

    def state_dict(self) -> dict[str, Any]:
        return {"activations_on": self.activations_on}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.activations_on = state["activations_on"]

    def _apply(self, state: TrainState) -> None:
        for quantizer in activation_quantizers(state.model):
            quantizer.enabled = bool(self.activations_on)


class ProgressiveBits(Schedule):
    """Lower the bit-width stage by stage: ``stages`` bits in turn (progressive quantization (b)).

    Stage ``k`` covers the part of training from ``boundaries[k-1]`` to ``boundaries[k]``
    (fractions of the run; equal parts by default). Entering a stage, every quantized layer except
    the first and last (``keep_first_last``, which keep the bits they were given) gets new weight
    and input quantizers of the same method at ``max(stage bits, its assigned bits)``, through
    :func:`qcompile.quant.requantize.requantize`: initialized from the layer's current latent
    weights and from the activations of ``state.calib_data``. The float weights are untouched, so
    each stage starts from the previous stage's network, as in the paper. The assigned bits
    (``node.meta["quant"]`` when training starts) are a floor: quantize the model at the final
    bit-width (e.g. ``bits=2``) and a mixed allocation is approached from above, layer by layer.
    Sets ``state.structure_changed`` so the loop rebuilds its optimizer.

    Resuming needs the model rebuilt at the saved stage before its state dict loads. The loop
    must, in this order: quantize the model afresh as the run began; ``load_state_dict(saved)``;
    ``prepare_for_resume(state)`` (replays the saved stage switches, building the quantizers
    without calibration); ``model.load_state_dict(...)``; build the optimizer; then
    ``on_train_start(state)``, which then finds the structure already right and changes nothing.
    """

    name = "progressive-bits"
    may_leave_parameters_unused = False

    def __init__(
        self,
        stages: Sequence[int] = (8, 4, 2),
        boundaries: Sequence[float] | None = None,
        keep_first_last: bool = True,
    ):
        self.stages = _checked_stages(stages)
        count = len(self.stages)
        self.boundaries = (_checked_boundaries(boundaries, count) if boundaries is not None
                           else [k / count for k in range(1, count)])
        self.keep_first_last = keep_first_last
        self.stage: int | None = None
        self.history: list[int] = []
        self.assigned: dict[str, int] | None = None
        self.pinned: list[str] = []

    def stage_at(self, progress: float) -> int:
        """The stage index at a fraction of training."""
        return sum(progress >= boundary for boundary in self.boundaries)

    def bits_for_layer(self, stage: int) -> Callable[[str], int | None]:
        """Each layer's bits at ``stage`` (None for a pinned layer: it keeps its bits)."""
        def bits(name: str) -> int | None:
            if name in self.pinned or name not in self.assigned:
                return None
            return max(self.stages[stage], self.assigned[name])
        return bits

    def prepare_for_resume(self, state: TrainState) -> None:
        self._remember_layers(state)
        for stage in self.history:
            requantize(state.model, self.bits_for_layer(stage), calib_data=None)

    def on_train_start(self, state: TrainState) -> None:
        self._remember_layers(state)
        if not state.calib_data:
            raise ConfigError("ProgressiveBits initializes each stage's activation quantizers "
                              "from calibration batches: pass calib_data (e.g. "
                              "qcompile.train(..., calib_data=batches))")
        self._enter(state, self.stage if self.stage is not None else self.stage_at(state.progress))

    def on_step_start(self, state: TrainState) -> None:
        stage = self.stage_at(state.progress)
        if stage != self.stage:
            self._enter(state, stage)

    def on_epoch_end(self, state: TrainState) -> dict[str, Any]:
        return {"bits": self.stages[self.stage]} if self.stage is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "history": list(self.history),
                "assigned": dict(self.assigned or {}), "pinned": list(self.pinned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state["stage"]
        self.history = list(state["history"])
        self.assigned = dict(state["assigned"]) if state["assigned"] else None
        self.pinned = list(state["pinned"])

    def _remember_layers(self, state: TrainState) -> None:
        if self.assigned is not None:
            return
        sites = [s for s in quantizable_layers(state.model) if "weight_bits" in
                 s.node.meta.get("quant", {})]
        if not sites:
            raise ConfigError("ProgressiveBits needs a quantized model (qcompile.quantize)")
        self.assigned = {site.name: site.node.meta["quant"]["weight_bits"] for site in sites}
        self.pinned = [sites[0].name, sites[-1].name] if self.keep_first_last else []

    def _enter(self, state: TrainState, stage: int) -> None:
        changed = requantize(state.model, self.bits_for_layer(stage), state.calib_data)
        if changed:
            state.structure_changed = True
            self.history.append(stage)
        self.stage = stage


def _checked_stages(stages: Sequence[int]) -> list[int]:
    stages = list(stages)
    valid = all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8 for b in stages)
    if not stages or not valid or any(a < b for a, b in itertools.pairwise(stages)):
        raise ConfigError(f"stages are bit-widths 1-8 that do not increase, e.g. (8, 4, 2); "
                          f"got {stages!r}")
    return stages


def _checked_boundaries(boundaries: Sequence[float], count: int) -> list[float]:
    boundaries = [float(b) for b in boundaries]
    edges = [0.0, *boundaries, 1.0]
    ordered = all(a < b for a, b in itertools.pairwise(edges))
    if len(boundaries) != count - 1 or not ordered:
        raise ConfigError(f"boundaries: {count - 1} increasing fractions of training in (0, 1), "
                          f"where each stage after the first begins; got {boundaries!r}")
    return boundaries
