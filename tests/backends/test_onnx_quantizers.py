"""Property test: one activation quantizer of any method, exported alone, in both formats.

A QDQ export must either reproduce the quantizer in onnxruntime (every code, except within
float32 rounding of a decision threshold) or raise NotDeployableError, and it must raise exactly
when QuantizeLinear cannot state the quantizer: codes that are not a contiguous range, or a
staircase whose thresholds are not evenly spaced (checked here independently, on staircases
made clearly even or clearly uneven). A QONNX export always succeeds, and qonnx's executor
reproduces the quantizer bit for bit (``Quant`` divides and rounds half to even as torch does,
``MultiThreshold`` compares ``x >= t`` with the same thresholds), rounding ties and inputs
exactly on a threshold included.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import qcompile
from onnx_support import _assert_codes_agree, session
from qcompile.errors import ConfigError, NotDeployableError
from qcompile.quant import available_methods
from qcompile.quant.registry import make_quantizer


def single_quantizer_graph(quantizer: nn.Module) -> fx.GraphModule:
    root = nn.Module()
    root.add_module("q", quantizer)
    graph = fx.Graph()
    graph.output(graph.call_module("q", (graph.placeholder("x"),)))
    return fx.GraphModule(root, graph)


def evenly_spaced(spec) -> bool:
    codes = spec.codes.numpy()
    if not np.all(np.diff(codes) == 1):
        return False
    if spec.thresholds is None or spec.thresholds.numel() < 3:
        return True
    gaps = np.diff(spec.thresholds.double().numpy())
    return bool(np.ptp(gaps) <= 1e-3 * gaps.mean())


def decision_thresholds(spec) -> torch.Tensor:
    """The inputs where the code steps, as float32: exact rounding ties of an affine quantizer
    (``(code - zero_point - 1/2) * scale``), the thresholds themselves of a staircase."""
    if spec.thresholds is not None:
        return spec.thresholds.reshape(-1).float()
    codes = spec.codes[1:].float()
    return ((codes - spec.zero_point.float().reshape(-1)[0] - 0.5)
            * spec.scale.float().reshape(-1)[0])


def perturbed(quantizer, amount: float) -> None:
    """Make a staircase clearly uneven: QIL gets a dead zone (its centre moves out), QN moves
    one threshold by ``amount`` of a step."""
    with torch.no_grad():
        if quantizer.method == "qil":
            quantizer.center += amount * quantizer.distance
        elif quantizer.method == "qn" and quantizer.biases.shape[1] >= 3:
            quantizer.biases[:, 1] += amount


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(available_methods()), bits=st.integers(1, 8),
       signed=st.booleans(), spread=st.floats(0.05, 20.0), seed=st.integers(0, 2**16),
       uneven=st.sampled_from([0.0, 0.3]), fmt=st.sampled_from(["qdq", "qonnx"]))
def test_one_quantizer_exports_exactly_or_says_why_not(method, bits, signed, spread, seed,
                                                       uneven, fmt):
    try:
        quantizer = make_quantizer(method, "activation", bits, signed=signed)
    except ConfigError:
        assume(False)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(512, generator=gen) * spread
    quantizer.initialize(sample if signed else sample.abs())
    perturbed(quantizer, uneven)
    quantizer.set_hard(True).eval()
    spec = quantizer.integer_spec()
    x = torch.randn(2, 3, 8, 8, generator=gen) * spread * 1.5
    ties = decision_thresholds(spec)[:x.numel()]
    x.view(-1)[:len(ties)] = ties
    with torch.no_grad():
        expected = quantizer(x)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "q.onnx"
        try:
            qcompile.export_onnx(single_quantizer_graph(quantizer), path, (x,), format=fmt)
        except NotDeployableError:
            assert fmt == "qdq" and not evenly_spaced(spec)
            return
        assert fmt == "qonnx" or evenly_spaced(spec)
        if fmt == "qdq":
            got = torch.from_numpy(session(path).run(None, {"x": x.numpy()})[0])
            _assert_codes_agree(f"{method} W{bits}", quantizer, x, got, expected)
        else:
            from qonnx.core.modelwrapper import ModelWrapper
            from qonnx.core.onnx_exec import execute_onnx
            from qonnx.transformation.infer_shapes import InferShapes

            model = ModelWrapper(str(path)).transform(InferShapes())
            got = execute_onnx(model, {"x": x.numpy()})["output"]
            assert torch.equal(torch.from_numpy(got), expected)
