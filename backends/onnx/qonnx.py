"""QONNX: quantizers as the FINN/QONNX ``Quant`` op, and ``MultiThreshold`` for staircases.

``Quant(x, scale, zero_point, bit_width)`` with attributes ``signed``, ``narrow`` and
``rounding_mode`` computes ``(clamp(round(x / scale + zero_point)) - zero_point) * scale`` on
the integer range those attributes name (``bit_width == 1`` and ``signed``: the bipolar
``{-1, 1}``, split at 0). That is an affine quantizer's meaning exactly, half-integer zero points
(DoReFa weights) included, so:

- a weight is its quantized float value followed by a ``Quant`` of the quantizer's own scale,
  zero point and code range (for a DQ level table: the integer levels' grid step and the
  narrowest range that holds them), which returns it unchanged;
- an affine activation quantizer is one ``Quant``, rounding ``ROUND`` (half to even, as torch);
- a staircase (QIL, QN, binary activations) is ``MultiThreshold`` with the quantizer's own
  thresholds (a code counts the thresholds ``x >= t``, the comparison the simulated model makes)
  and integer output bias, then ``Mul`` by the scale: exact bit for bit.
"""

import numpy as np

from qcompile.backends.onnx.builder import QONNX_DOMAIN, OnnxGraph
from qcompile.backends.onnx.meaning import ActivationForm, WeightIntegers, arithmetic_codes
from qcompile.errors import NotDeployableError


def integer_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """The codes ``Quant`` clamps to (QONNX's ``min_int``/``max_int``)."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)


def quant_range(low: int, high: int, exact: bool) -> tuple[int, bool, bool] | None:
    """The fewest ``(bits, signed, narrow)`` whose range is ``low..high`` (or holds it when not
    ``exact``); 1-bit signed is bipolar in QONNX and is never chosen here."""
    signed = low < 0
    for bits in range(1 + signed, 33):
        ranges = {narrow: integer_range(bits, signed, narrow) for narrow in (False, True)}
        for narrow, (lo, hi) in ranges.items():
            if (lo, hi) == (low, high):
                return bits, signed, narrow
        for narrow, (lo, hi) in ranges.items():
            if not exact and lo <= low and high <= hi:
                return bits, signed, narrow
    return None


class QonnxEmitter:
    """Writes weights and activation quantizers as QONNX ops; records each choice."""

    def __init__(self, graph: OnnxGraph, opset: int):
        self.graph = graph
        self.opset = opset
        self.records: dict[str, dict] = {}

    def weight(self, name: str, weight: WeightIntegers, where: str) -> tuple[str, dict]:
        spec = weight.spec
        rank = weight.values.dim()
        if spec.values is not None:
            low, high = int(weight.integers.min()), int(weight.integers.max())
            scale, zero, width = weight.step.numpy(), np.float32(0), quant_range(low, high, False)
        else:
            codes = spec.codes.numpy()
            scale = spec.scale.detach().float().numpy()
            zero = spec.zero_point.detach().float().numpy()
            width = _bipolar(codes, zero) or quant_range(int(codes[0]), int(codes[-1]), True)
        if width is None:
            raise NotDeployableError(f"{where}: no Quant range holds its integer weights")
        stored = self.graph.constant(f"{name}.weight_float", weight.values.numpy())
        value = self._quant(stored, name + ".weight", (scale, zero), width, rank, 0)
        bits, signed, narrow = width
        return value, {"quant_bits": bits, "signed": signed, "narrow": narrow}

    def activation(self, x: str, form: ActivationForm, rank: int, hint: str) -> str:
        if form.thresholds is None:
            low, high = int(form.codes[0]), int(form.codes[-1])
            width = quant_range(low, high, True)
            if width is None:
                raise NotDeployableError(f"{form.where}: codes {low}..{high} are no Quant range")
            value = self._quant(x, hint, (form.scale, form.zero_point), width, rank, form.axis)
            self.records[form.name] = {"op": "Quant", "quant_bits": width[0],
                                       "signed": width[1], "narrow": width[2]}
            return value
        return self._multithreshold(x, form, rank, hint)

    def _quant(self, x: str, hint: str, affine, width, rank: int, axis: int | None) -> str:
        scale, zero = (self._broadcast(np.asarray(p, np.float32), rank, axis) for p in affine)
        bits, signed, narrow = width
        inputs = [x, self.graph.constant(f"{hint}.scale", scale),
                  self.graph.constant(f"{hint}.zero_point", zero),
                  self.graph.constant(f"{hint}.bit_width", np.float32(bits), key=("bits", bits))]
        return self.graph.node("Quant", inputs, hint, domain=QONNX_DOMAIN, signed=int(signed),
                               narrow=int(narrow), rounding_mode="ROUND")

    def _multithreshold(self, x: str, form: ActivationForm, rank: int, hint: str) -> str:
        gap = arithmetic_codes(form.codes)
        zero = np.unique(form.zero_point)
        if gap is None or len(zero) != 1:
            raise NotDeployableError(f"{form.where}: codes {form.codes.tolist()} are not evenly "
                                     "spaced with one zero point; MultiThreshold cannot make them")
        thresholds = form.thresholds.reshape(-1, form.thresholds.shape[-1])
        if thresholds.shape[0] > 1 and form.axis % rank != 1:
            raise NotDeployableError(f"{form.where}: per-channel thresholds along axis "
                                     f"{form.axis}; MultiThreshold reads channels on axis 1")
        low = int(form.codes[0])
        kind = "BIPOLAR" if form.codes.tolist() == [-1, 1] else (
            f"{'INT' if low < 0 else 'UINT'}{form.bits}")
        table = self.graph.constant(f"{form.name}.thresholds", thresholds.astype(np.float32),
                                    key=(form.name, "thresholds"))
        codes = self.graph.node("MultiThreshold", [x, table], f"{hint}.codes",
                                domain=QONNX_DOMAIN, out_dtype=kind, out_scale=float(gap),
                                out_bias=float(low - zero[0]),
                                data_layout="NC" + "DHW"[3 - (rank - 2):] if rank > 2 else "NC")
        scale = self._broadcast(np.asarray(form.scale, np.float32), rank, form.axis)
        scale = self.graph.constant(f"{form.name}.scale", scale, key=(form.name, "scale"))
        self.records[form.name] = {"op": "MultiThreshold", "out_dtype": kind,
                                   "thresholds": int(thresholds.shape[-1])}
        return self.graph.node("Mul", [codes, scale], hint)

    @staticmethod
    def _broadcast(param: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
        if param.ndim == 0 or param.size == 1:
            return param.reshape(())
        shape = [1] * rank
        shape[(axis or 0) % rank] = -1
        return param.reshape(shape)


def _bipolar(codes: np.ndarray, zero: np.ndarray) -> tuple[int, bool, bool] | None:
    if codes.tolist() == [-1, 1] and np.all(zero == 0):
        return 1, True, False
    return None
