"""QDQ: quantizers as QuantizeLinear/DequantizeLinear pairs and integer weight initializers.

- A weight becomes an initializer of integers in the narrowest container the opset has (see
  :data:`~qcompile.backends.onnx.builder.CONTAINERS`), read by ``DequantizeLinear`` with its
  per-channel step (axis 0).
- An affine activation quantizer becomes ``QuantizeLinear(scale, zero_point)`` then
  ``DequantizeLinear`` with the same parameters. When its codes cover less than the container
  (2-bit codes in UINT4, a narrow signed range) ``Max`` and ``Min`` before the QuantizeLinear
  keep the range, which is exact: clamping to the float value of the end code and rounding gives
  that code. (Not ``Clip``: onnxruntime 1.32 fails to load a Clip followed by a 4-bit
  QuantizeLinear, as it fuses the two.)
- A staircase with evenly spaced thresholds ``offset + (k - 1/2) step`` becomes
  ``QuantizeLinear(x - offset, step)`` (the subtraction folded into the zero point when
  ``offset`` is a whole number of steps) and ``DequantizeLinear`` with the quantizer's own scale;
  the two scales are equal for QIL activations without a pruned zone and QN before training
  moves its thresholds. Other staircases (trained QN thresholds, QIL's signed dead zone) and
  binary ``{-1, 1}`` activation codes have no QuantizeLinear form:
  :class:`~qcompile.errors.NotDeployableError` names the quantizer and the layers reading it.
"""

import numpy as np

from qcompile.backends.onnx.builder import Container, OnnxGraph, container_for
from qcompile.backends.onnx.meaning import (
    ActivationForm,
    WeightIntegers,
    arithmetic_codes,
    uniform_grid,
)
from qcompile.errors import NotDeployableError


class QdqEmitter:
    """Writes weights and activation quantizers of one graph at one opset; records each choice."""

    def __init__(self, graph: OnnxGraph, opset: int):
        self.graph = graph
        self.opset = opset
        self.records: dict[str, dict] = {}

    def weight(self, name: str, weight: WeightIntegers, where: str) -> tuple[str, dict]:
        integers = weight.integers.numpy()
        low, high = int(integers.min()), int(integers.max())
        container = _container(low, high, self.opset, where)
        stored = self.graph.integers(f"{name}.weight_int", integers, container)
        step = self.graph.constant(f"{name}.weight_step", weight.step.numpy())
        axis = {"axis": 0} if weight.step.dim() == 1 else {}
        value = self.graph.node("DequantizeLinear", [stored, step], f"{name}.weight", **axis)
        return value, {"container": container.name, "integers": [low, high]}

    def activation(self, x: str, form: ActivationForm, rank: int, hint: str) -> str:
        codes = form.codes
        if arithmetic_codes(codes) != 1:
            raise NotDeployableError(f"{form.where} has codes {codes.tolist()}, not a contiguous "
                                     "range: QuantizeLinear cannot produce them; export with "
                                     "format='qonnx'")
        if not np.all(form.zero_point == np.round(form.zero_point)):
            raise NotDeployableError(f"{form.where} has a fractional zero point, which "
                                     "DequantizeLinear cannot hold; export with format='qonnx'")
        low, high = int(codes[0]), int(codes[-1])
        step, q_zero, offset = self._grid(form, low)
        dq_zero = np.rint(form.zero_point).astype(np.int64)
        span = [low, high, int(q_zero.min()), int(q_zero.max()), int(dq_zero.min()),
                int(dq_zero.max())]
        container = _container(min(span), max(span), self.opset, form.where)
        axis = {"axis": form.axis} if step.ndim == 1 else {}
        if offset is not None:
            offset = self._const(form, "offset", offset, rank)
            x = self.graph.node("Sub", [x, offset], f"{hint}.shifted")
        if (low, high) != (container.low, container.high):
            x = self._clip(x, form, (low - q_zero) * step, (high - q_zero) * step, rank, hint)
        q = self.graph.node("QuantizeLinear", [x, self._const(form, "step", step),
                                               self._zero(form, "q_zero", q_zero, container)],
                            f"{hint}.codes", **axis)
        value = self.graph.node("DequantizeLinear", [q, self._const(form, "scale", form.scale),
                                                     self._zero(form, "zero", dq_zero, container)],
                                hint, **axis)
        self.records[form.name] = {"container": container.name, "codes": [low, high],
                                   "form": "affine" if form.thresholds is None else
                                   "even thresholds", "quantize_step": _floats(step),
                                   "dequantize_scale": _floats(form.scale)}
        return value

    def _grid(self, form: ActivationForm, low: int):
        """QuantizeLinear's step and zero point, and the offset a Sub must remove first (None
        when the zero point absorbs it), that make its codes the quantizer's."""
        if form.thresholds is None:
            return form.scale, np.rint(form.zero_point).astype(np.int64), None
        grid = uniform_grid(form)
        if grid is None:
            raise NotDeployableError(
                f"{form.where} is a staircase with unevenly spaced thresholds (a trained "
                "Quantization Networks or QIL dead-zone quantizer), which QuantizeLinear cannot "
                "compute: export with format='qonnx' (MultiThreshold) or keep the thresholds even")
        shift = -grid.offset / grid.step
        whole = np.abs(shift - np.rint(shift)) * grid.step <= grid.tolerance
        step = _squeeze(grid.step.astype(np.float32), form)
        if np.all(whole):
            return step, _squeeze(low + np.rint(shift).astype(np.int64), form), None
        zero = np.full(shift.shape, low, dtype=np.int64)
        return step, _squeeze(zero, form), _squeeze(grid.offset, form)

    def _clip(self, x: str, form, low, high, rank: int, hint: str) -> str:
        floor = self.graph.node("Max", [x, self._const(form, "low", low, rank)], f"{hint}.floor")
        return self.graph.node("Min", [floor, self._const(form, "high", high, rank)],
                               f"{hint}.clipped")

    def _const(self, form: ActivationForm, what: str, value, rank: int | None = None) -> str:
        value = np.asarray(value, dtype=np.float32)
        if rank is not None and value.ndim == 1:
            shape = [1] * rank
            shape[form.axis % rank] = -1
            value = value.reshape(shape)
        return self.graph.constant(f"{form.name}.{what}", value,
                                   key=(form.name, what, value.tobytes(), value.shape))

    def _zero(self, form: ActivationForm, what: str, value: np.ndarray,
              container: Container) -> str:
        return self.graph.integers(f"{form.name}.{what}", value, container,
                                   key=(form.name, what, value.tobytes(), container.name))


def _container(low: int, high: int, opset: int, where: str) -> Container:
    container = container_for(low, high, opset)
    if container is None:
        raise NotDeployableError(f"{where}: integers {low}..{high} fit no QuantizeLinear/"
                                 f"DequantizeLinear type of opset {opset} (16-bit types need 21)")
    return container


def _squeeze(array: np.ndarray, form: ActivationForm) -> np.ndarray:
    return array.reshape(()) if form.axis is None or array.size == 1 else array.reshape(-1)


def _floats(array) -> float | list[float]:
    array = np.asarray(array, dtype=np.float64)
    return float(array) if array.ndim == 0 else array.tolist()

