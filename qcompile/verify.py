"""``verify``: does an integer program compute what the simulated model computes, layer by layer?

For every quantizer of the simulated model (every integer activation a layer reads) the report
gives the fraction of codes the integer program reproduces exactly, the largest difference in
LSBs (code steps), and how many of the differences are rounding ties: elements whose simulated
input lies within rounding of one of the quantizer's decision thresholds, where float evaluation
order alone decides the code. Any other difference is a bug. At the output it gives argmax
agreement and the largest absolute difference of the logits.

The simulated model is evaluated in float64 by default (a copy; the model is not changed), the
precision ``integerize`` takes the model at, so the only differences left are exact ties; pass
``dtype=torch.float32`` to measure against the model as it trains and runs in float32.
"""

import copy
from dataclasses import dataclass

import torch
from torch import fx

from qcompile.errors import IntegerizeError
from qcompile.quant.base import IntegerSpec, Quantizer
from qcompile.requantization import decision_thresholds

TIE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
"""Relative distance to a decision threshold within which a difference counts as a tie."""


@dataclass(frozen=True)
class LayerFidelity:
    """Agreement of one integer activation (a quantizer's codes) with the simulated model."""

    name: str
    quantizer: str
    bits: int
    elements: int
    matched: int
    max_lsb: int
    ties: int

    @property
    def match_fraction(self) -> float:
        return self.matched / max(self.elements, 1)

    @property
    def unexplained(self) -> int:
        """Differences that are not rounding ties."""
        return self.elements - self.matched - self.ties


@dataclass(frozen=True)
class FidelityReport:
    layers: list[LayerFidelity]
    argmax_agreement: float
    max_output_difference: float
    dtype: torch.dtype

    @property
    def min_match_fraction(self) -> float:
        return min((layer.match_fraction for layer in self.layers), default=1.0)

    @property
    def max_lsb(self) -> int:
        return max((layer.max_lsb for layer in self.layers), default=0)

    @property
    def unexplained(self) -> int:
        return sum(layer.unexplained for layer in self.layers)

    def format(self) -> str:
        lines = [f"{'integer activation':48} {'bits':>4} {'match %':>9} {'max LSB':>7} "
                 f"{'ties':>5} {'other':>5}"]
        for layer in self.layers:
            lines.append(f"{layer.name:48} {layer.bits:4d} {100 * layer.match_fraction:9.4f} "
                         f"{layer.max_lsb:7d} {layer.ties:5d} {layer.unexplained:5d}")
        lines.append(f"output: argmax agreement {100 * self.argmax_agreement:.2f}%, max |dlogit| "
                     f"{self.max_output_difference:.3g} (simulated in {self.dtype})")
        return "\n".join(lines)


def verify(qmodel: fx.GraphModule, integer_program, inputs, dtype: torch.dtype = torch.float64
           ) -> FidelityReport:
    """Compare ``integer_program`` (an IntegerGraph, or any backend's compiled module with an
    ``integer_activations(*inputs)`` method returning codes by quantizer node name) with the
    simulated ``qmodel`` on ``inputs`` (a tensor or a tuple of tensors)."""
    if dtype not in TIE_TOLERANCE:
        raise IntegerizeError(f"verify simulates in float32 or float64, not {dtype}")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    simulated = copy.deepcopy(qmodel).to(dtype).eval()
    for module in simulated.modules():
        if isinstance(module, Quantizer):
            module.set_hard(True)
    recorder = _Recorder(simulated)
    with torch.no_grad():
        expected = recorder.run(*(x.to(dtype) for x in inputs))
        produced = integer_program.integer_activations(*inputs)
    layers = []
    for name, (quantizer, spec, x) in recorder.seen.items():
        if name not in produced:
            raise IntegerizeError(f"the integer program has no value for quantizer {name}")
        layers.append(_compare(name, quantizer, spec, x, produced[name], TIE_TOLERANCE[dtype]))
    output = produced[getattr(integer_program, "output", "output")].double()
    expected = expected.double()
    agreement = float((output.argmax(-1) == expected.argmax(-1)).double().mean())
    difference = float((output - expected).abs().max()) if output.numel() else 0.0
    return FidelityReport(layers, agreement, difference, dtype)


class _Recorder(fx.Interpreter):
    """Runs the simulated model and keeps every quantizer node's input."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seen: dict[str, tuple[str, IntegerSpec, torch.Tensor]] = {}

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, Quantizer):
            self.seen[self._node_name] = (target, module.integer_spec(), args[0])
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        self._node_name = n.name
        return super().run_node(n)


def _compare(name: str, quantizer_path: str, spec: IntegerSpec, x: torch.Tensor,
             codes: torch.Tensor, tolerance: float) -> LayerFidelity:
    expected = torch.searchsorted(spec.codes.to(x.device), spec.quantize(x).contiguous())
    codes = codes.to(expected.device)
    if codes.shape != expected.shape:
        raise IntegerizeError(f"{name}: integer codes of shape {tuple(codes.shape)}, simulated "
                              f"{tuple(expected.shape)}")
    differ = codes != expected
    ties = 0
    if bool(differ.any()):
        thresholds = decision_thresholds(spec).reshape(-1).to(torch.float64)
        off = x[differ].double()
        distance = (off[:, None] - thresholds[None, :]).abs().min(dim=1).values
        scale = off.abs() + float(spec.scale.double().abs().max())
        ties = int((distance <= tolerance * scale).sum())
    return LayerFidelity(name, quantizer_path, spec.bits, codes.numel(),
                         int((~differ).sum()), int((codes - expected).abs().max()) if
                         codes.numel() else 0, ties)

