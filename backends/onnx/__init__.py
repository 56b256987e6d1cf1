"""The ONNX backend: a quantized graph as a QDQ or QONNX model that other tools run.

``export_onnx(qmodel, path, example_inputs, format="qdq" | "qonnx")`` writes the simulated model
of :func:`qcompile.quantize` (every quantizer in hard mode, batch norm folded, eval) as ONNX.

Design. The ONNX graph is built directly from the fx graph with ``onnx.helper``
(:mod:`~qcompile.backends.onnx.lowering`), not with ``torch.onnx.export``: every quantizer node
maps one to one to its ONNX form, and its parameters come from its integer meaning
(:class:`~qcompile.quant.base.IntegerSpec`), so nothing depends on how a tracer would see its
forward. The ops between quantizers are those the integer lowering accepts (conv/linear layers,
ReLU/ReLU6/hardtanh, add, cat, max and average pooling, flatten, dropout and identity); any other
op is :class:`OnnxExportError` naming the node.

- **QDQ** (:mod:`~qcompile.backends.onnx.qdq`): integer weight initializers read by
  DequantizeLinear (per output channel), activation quantizers as QuantizeLinear/
  DequantizeLinear. Integers go in the narrowest container the opset has: INT8/UINT8 from opset
  13, INT4/UINT4 and INT16/UINT16 from 21, INT2/UINT2 from 25; codes narrower than their
  container keep their range by their values (Max/Min before the QuantizeLinear), and the
  choice per layer and quantizer is in the metadata. What onnxruntime 1.32 does with them on
  CPU (checked by the tests): it runs all of them, but with its default graph optimizations it
  fails to load INT2/UINT2 (its QDQ fusions build integer kernels that reject them) and a Clip
  feeding a 4-bit QuantizeLinear. So by default the export uses opset 21 at most (2-bit codes in
  INT4/UINT4, clamps written as Max/Min) and declares the lowest opset its containers need (13
  or 21); ``opset=25`` stores 2-bit codes as INT2/UINT2, which onnxruntime runs with graph
  optimizations at BASIC; ``opset`` 13-20 keeps every code in 8 bits (DoReFa/PACT 8-bit weights,
  whose half-integer zero point makes them 9-bit integers, then have no container and raise).
  Threshold quantizers export exactly when their thresholds are evenly spaced; others raise
  :class:`~qcompile.errors.NotDeployableError`.
- **QONNX** (:mod:`~qcompile.backends.onnx.qonnx`): the ``Quant`` op of the FINN/QONNX
  ecosystem (bit width, scale, zero point, signed, narrow, rounding mode) for weights and affine
  activations, ``MultiThreshold`` for threshold staircases; default opset 13 plus the
  ``qonnx.custom_op.general`` domain. Shapes are static (the example input's).

Every model passes ``onnx.checker.check_model(full_check=True)`` before it is written, and
carries metadata (``metadata_props``): ``qcompile_version``, ``qcompile_format``,
``qcompile_opset`` and ``qcompile_opset_reason``, JSON ``qcompile_layers`` (per layer: weight
and input bits, method, weight container or Quant range) and ``qcompile_quantizers`` (per
activation quantizer: bits, method, container or op, form). The file is written atomically (a
temporary file in the same folder, then renamed), so an error leaves nothing at ``path``.

Biases stay float, as the simulated model adds them, in an ``Add`` after the layer: onnxruntime's
``WeightBiasQuantization`` optimization (on by default) rounds the float bias input of a Conv or
Gemm fed by DequantizeLinear to int32 on the grid ``input scale * weight scale``, which moves
codes that sit near a threshold (measured: 8 output LSBs on the small CNN at W2A2, half the
argmaxes of resnet18 at W8A8); it leaves an ``Add`` alone, so a session with onnxruntime's
defaults runs the exported model as it is.

Agreement with the simulated model: weights are bit exact; quantizers compute the same codes
except where float32 rounding puts an input within rounding error of a decision threshold
(QuantizeLinear divides by the scale where the simulated staircase compares with thresholds;
onnxruntime sums convolutions in another order), where a code can differ by one. With its
default optimizations onnxruntime also fuses QDQ groups into integer kernels (QLinearAdd,
QLinearConv, ...) whose requantization rounds such ties its own way. One differing code changes
the next layer's input, and a deep untrained network at 4-8 bits can amplify it into visibly
different logits, so the tests check agreement op by op on the runtime's own inputs, and end to
end both with ONNX's own arithmetic (graph optimizations at BASIC) and with onnxruntime's
defaults, within a bound that accounts for codes that differ at the last layer's input.
"""

import copy
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from onnx import helper
from torch import fx

from qcompile.backends.onnx.builder import MAX_OPSET, MIN_OPSET, OnnxExportError
from qcompile.backends.onnx.lowering import lower
from qcompile.errors import ConfigError
from qcompile.ir.shapes import propagate_shapes
from qcompile.quant.base import Quantizer

FORMATS = ("qdq", "qonnx")
QDQ_OPSET = 21
"""The newest opset the QDQ export uses unless asked (see the module docstring)."""
QONNX_OPSET = 13
__all__ = ["FORMATS", "OnnxExportError", "export_onnx"]


def export_onnx(
    qmodel: fx.GraphModule,
    path: str | os.PathLike,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    format: str = "qdq",
    opset: int | None = None,
) -> Path:
    """Write ``qmodel`` (from :func:`qcompile.quantize`) to ``path`` as an ONNX model.

    ``format`` is ``"qdq"`` (QuantizeLinear/DequantizeLinear, runs in onnxruntime) or
    ``"qonnx"`` (QONNX ``Quant``/``MultiThreshold``, for FINN and the ``qonnx`` package).
    ``example_inputs`` fixes the input shapes (QDQ keeps the batch dimension free). ``opset``
    defaults to the lowest one the model needs. ``qmodel`` itself is left unchanged. Returns
    the path written.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown ONNX format {format!r}; choose one of {', '.join(FORMATS)}")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset must be {MIN_OPSET}-{MAX_OPSET}, got {opset}")
    gm = _prepared(qmodel, example_inputs)
    chosen = opset or (QDQ_OPSET if format == "qdq" else QONNX_OPSET)
    lowered = lower(gm, format, chosen, fixed_opset=opset is not None)
    model = lowered.model
    helper.set_model_props(model, _metadata(format, lowered, opset))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise OnnxExportError(f"the exported graph fails the ONNX checker: {error}") from error
    return _write_atomically(model.SerializeToString(), Path(path))


def _prepared(qmodel, example_inputs) -> fx.GraphModule:
    """A float32 eval copy of ``qmodel`` with hard quantizers and propagated shapes (recorded
    with the quantizers switched off: shapes do not depend on them, and a float run is fast)."""
    if not isinstance(qmodel, fx.GraphModule):
        raise ConfigError(f"export_onnx takes the fx GraphModule qcompile.quantize returns, got "
                          f"{type(qmodel).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in example_inputs):
        raise ConfigError("example_inputs must be float tensors (a tuple of them)")
    gm = copy.deepcopy(qmodel).float().eval()
    quantizers = [m for m in gm.modules() if isinstance(m, Quantizer)]
    switches = [q.enabled for q in quantizers]
    for quantizer in quantizers:
        quantizer.set_hard(True)
        quantizer.enabled = False
    try:
        with torch.no_grad():
            propagate_shapes(gm, tuple(x.float() for x in example_inputs))
    except Exception as error:
        raise ConfigError(f"the model does not run on the example inputs: "
                          f"{type(error).__name__}: {error}") from error
    finally:
        for quantizer, enabled in zip(quantizers, switches, strict=True):
            quantizer.enabled = enabled
    return gm


def _metadata(fmt: str, lowered, requested: int | None) -> dict[str, str]:
    import qcompile

    if requested is not None:
        reason = f"opset {requested} was requested"
    elif fmt == "qdq":
        reason = ("the lowest opset whose QuantizeLinear/DequantizeLinear types hold every "
                  "container used (INT8/UINT8: 13, INT4/UINT4/INT16/UINT16: 21); 2-bit codes "
                  "in 4-bit containers, as onnxruntime's default session rejects INT2/UINT2 "
                  "(opset=25 uses them)")
    else:
        reason = "QONNX Quant and MultiThreshold carry any bit width over float tensors"
    metadata = {
        "qcompile_version": qcompile.__version__,
        "qcompile_format": fmt,
        "qcompile_opset": str(lowered.opset),
        "qcompile_opset_reason": reason,
        "qcompile_layers": json.dumps(lowered.layers, sort_keys=True),
        "qcompile_quantizers": json.dumps(lowered.quantizers, sort_keys=True),
    }
    return metadata


def _write_atomically(data: bytes, path: Path) -> Path:
    """``data`` at ``path`` by way of a temporary file in the same folder and a rename."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the path of the .onnx file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"the folder {path.parent} does not exist; create it first")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path
