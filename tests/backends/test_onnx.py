"""The ONNX backend against consumers it did not write: onnxruntime (QDQ) and qonnx (QONNX).

The issue's matrix: the small CNN, resnet18 and mobilenet_v2 (random weights, randomized batch
norm, 64x64 input) at W8A8, W4A4 and W2A2 (first and last layer 8-bit). A representative pair of
methods runs by default (LSQ: affine quantizers; QIL: threshold staircases), every method under
``slow``. Agreement is checked end to end and op by op (see ``onnx_support``).
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from torch import nn

import qcompile
from onnx_support import (
    LogitAgreement,
    assert_logits_agree,
    assert_ops_agree,
    hard,
    last_layer,
    quantized,
    run,
    session,
    simulated,
)
from quantized_models import images
from qcompile.backends.onnx import OnnxExportError
from qcompile.errors import NotDeployableError, QcompileError
from qcompile.models import SmallCNN
from qcompile.quant import Quantizer, available_methods

BITS = [2, 4, 8]
BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
DEFAULT_METHODS = ["lsq", "qil"]
OTHER_METHODS = [m for m in available_methods() if m not in DEFAULT_METHODS]


def export_and_compare(arch: str, method: str, bits: int, tmp_path) -> LogitAgreement:
    """End to end with ONNX's own arithmetic (graph optimizations BASIC), op by op, and end to
    end as onnxruntime runs it by default (its graph optimizations and fused kernels); returns
    the agreement of the default session."""
    qm, x = quantized(arch, method, bits)
    path = qcompile.export_onnx(qm, tmp_path / "model.onnx", (x[:1],))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    last_input = [last_layer(qm)[0].args[0].name]
    assert_logits_agree(qm, x, run(model, x, last_input, level=BASIC))
    assert_ops_agree(qm, model, x)
    return assert_logits_agree(qm, x, run(model, x, last_input))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_small_cnn_qdq_runs_in_onnxruntime_and_agrees(method, bits, tmp_path):
    agreement = export_and_compare("small", method, bits, tmp_path)
    assert agreement.argmax == 1.0 or agreement.drifted > 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("arch, method", [("resnet18", "lsq"), ("mobilenet_v2", "qil")])
def test_torchvision_qdq_runs_in_onnxruntime_and_agrees(arch, method, bits, tmp_path):
    agreement = export_and_compare(arch, method, bits, tmp_path)
    assert agreement.argmax == 1.0 or agreement.drifted > 0


@pytest.mark.slow
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("arch, method", [
    *[("small", m) for m in OTHER_METHODS],
    *[(a, m) for a in ("resnet18", "mobilenet_v2") for m in available_methods()
      if (a, m) not in (("resnet18", "lsq"), ("mobilenet_v2", "qil"))],
])
def test_every_method_qdq_runs_in_onnxruntime_and_agrees(arch, method, bits, tmp_path):
    export_and_compare(arch, method, bits, tmp_path)


def test_metadata_and_low_bit_containers(tmp_path):
    qm, x = quantized("small", "lsq", 2)
    model = onnx.load(str(qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],))))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["qcompile_version"] == qcompile.__version__
    assert props["qcompile_format"] == "qdq"
    layers = json.loads(props["qcompile_layers"])
    assert {name: (r["weight_bits"], r["input_bits"], r["method"]) for name, r in layers.items()} \
        == {"features.0.0": (8, 8, "lsq"), "features.1.0": (2, 2, "lsq"),
            "features.2.0": (2, 2, "lsq"), "classifier": (8, 8, "lsq")}
    assert layers["features.1.0"]["container"] == "INT4"
    assert layers["classifier"]["container"] == "INT8"
    quantizers = json.loads(props["qcompile_quantizers"])
    assert quantizers["input_quantizers.features_1_0_input"]["container"] == "UINT4"
    assert model.opset_import[0].version == 21 == int(props["qcompile_opset"])
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["features.1.0.weight_int"] == TensorProto.INT4
    assert types["classifier.weight_int"] == TensorProto.INT8


def test_opset_25_holds_2_bit_codes_in_int2(tmp_path):
    """onnxruntime 1.32 loads INT2/UINT2 Q/DQ only without its QDQ fusions (BASIC)."""
    qm, x = quantized("small", "qil", 2)
    model = onnx.load(str(qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],), opset=25)))
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["features.1.0.weight_int"] == TensorProto.INT2
    assert types["input_quantizers.features_1_0_input.zero"] == TensorProto.UINT2
    basic = torch.from_numpy(run(model, x, level=BASIC)["output"])
    torch.testing.assert_close(basic, simulated(qm, x)["output"], rtol=0, atol=1e-5)


def test_opset_13_keeps_low_bit_ranges_in_8_bit_containers(tmp_path):
    qm, x = quantized("small", "lsq", 2)
    model = onnx.load(str(qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],), opset=13)))
    quantizers = json.loads({p.key: p.value for p in model.metadata_props}["qcompile_quantizers"])
    middle = quantizers["input_quantizers.features_1_0_input"]
    assert (middle["container"], middle["codes"]) == ("UINT8", [0, 3])
    assert model.opset_import[0].version == 13
    codes = run(model, x, ["input_quantizers_features_1_0_input.codes"])
    values = codes["input_quantizers_features_1_0_input.codes"]
    assert values.dtype == np.uint8 and values.max() == 3
    assert assert_logits_agree(qm, x, run(model, x, [last_layer(qm)[0].args[0].name])).argmax == 1


def test_export_leaves_the_model_as_it_was(tmp_path):
    qm, x = quantized("small", "qn", 2)
    qm.train()
    for module in qm.modules():
        if isinstance(module, Quantizer):
            module.set_hard(False)
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],))
    assert qm.training and not any(m.hard for m in qm.modules() if isinstance(m, Quantizer))
    assert all(torch.equal(before[k], v) for k, v in qm.state_dict().items())


@pytest.mark.parametrize("method", ["lsq", "qil"])
def test_qonnx_executor_runs_small_cnn_w2a2_and_agrees(method, tmp_path):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    qm, x = quantized("small", method, 2)
    x = x[:16]
    path = qcompile.export_onnx(qm, tmp_path / "m.onnx", (x,), format="qonnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    wrapper = ModelWrapper(str(path)).transform(InferShapes())
    ops = [n.op_type for n in wrapper.graph.node]
    assert ops.count("Quant") >= 4
    assert ("MultiThreshold" in ops) == (method == "qil")
    widths = {n.input[0]: int(wrapper.get_initializer(n.input[3])) for n in wrapper.graph.node
              if n.op_type == "Quant"}
    assert widths["features.1.0.weight_float"] == 2 and widths["classifier.weight_float"] == 8
    node, _, _ = last_layer(qm)
    context = execute_onnx(wrapper, {"x": x.numpy()}, return_full_exec_context=True)
    agreement = assert_logits_agree(qm, x, {"output": context["output"],
                                            node.args[0].name: context[node.args[0].name]})
    assert agreement.argmax == 1.0 and agreement.drifted == 0


def test_qonnx_states_an_uneven_staircase_that_qdq_cannot(tmp_path):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    qm, x = quantized("small", "qn", 2)
    quantizer = qm.get_submodule("input_quantizers.features_1_0_input")
    with torch.no_grad():
        quantizer.biases[0, 1] += 0.3
    with pytest.raises(NotDeployableError, match=r"input_quantizers\.features_1_0_input.*"
                                                 r"features\.1\.0.*unevenly spaced"):
        qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],))
    assert not os.listdir(tmp_path)
    x = x[:8]
    path = qcompile.export_onnx(qm, tmp_path / "m.onnx", (x,), format="qonnx")
    context = execute_onnx(ModelWrapper(str(path)).transform(InferShapes()), {"x": x.numpy()},
                           return_full_exec_context=True)
    node, _, _ = last_layer(qm)
    agreement = assert_logits_agree(qm, x, {"output": context["output"],
                                            node.args[0].name: context[node.args[0].name]})
    assert agreement.argmax == 1.0 and agreement.drifted == 0


class _EveryOp(nn.Module):
    """Conv1d (``same`` and explicit padding), ReLU6, hardtanh, cat, max and average pooling,
    a residual add, linear layers on a 3-D and a 2-D input, flatten."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv1d(3, 8, 3, padding="same")
        self.right = nn.Conv1d(3, 8, 3, padding=2, dilation=2)
        self.pool = nn.MaxPool1d(2)
        self.mix = nn.Conv1d(16, 16, 1)
        self.across = nn.Linear(4, 4)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        y = torch.cat([nn.functional.relu6(self.left(x)),
                       nn.functional.hardtanh(self.right(x), -0.5, 0.5)], dim=1)
        y = self.pool(y)
        y = nn.functional.avg_pool1d(y + self.mix(y), 2)
        return self.head(torch.flatten(torch.relu(self.across(y)), 1))


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_every_supported_op_agrees(method, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16)
    qm = hard(qcompile.quantize(_EveryOp().eval(), (x[:1],), bits=4, method=method,
                                calib_data=[(x,)]))
    path = qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Concat", "MaxPool", "AveragePool", "Add", "MatMul", "Gemm", "Flatten"} <= ops
    assert assert_logits_agree(qm, x, run(path, x, [last_layer(qm)[0].args[0].name])).argmax == 1
    assert_ops_agree(qm, path, x)


class _CumulativeProduct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        return self.head(torch.flatten(torch.cumprod(self.conv(x), dim=1), 1))


def test_op_without_onnx_form_names_the_node_and_leaves_nothing(tmp_path):
    x = images("small")[:4]
    qm = qcompile.quantize(_CumulativeProduct().eval(), (x[:1],), bits=4, method="lsq")
    target = tmp_path / "m.onnx"
    with pytest.raises(OnnxExportError, match=r"node cumprod \(function cumprod\)") as raised:
        qcompile.export_onnx(qm, target, (x[:1],))
    assert isinstance(raised.value, QcompileError)
    assert not os.listdir(tmp_path)
    target.write_bytes(b"previous")
    with pytest.raises(OnnxExportError):
        qcompile.export_onnx(qm, target, (x[:1],))
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]


class _NoMeaning(Quantizer):
    def fake_quantize(self, x):
        return torch.round(x * 4) / 4


def test_quantizer_without_integer_meaning_names_the_layer(tmp_path):
    qm, x = quantized("small", "lsq", 4)
    qm.get_submodule("features.1.0").weight_quantizer = _NoMeaning(4, signed=True)
    with pytest.raises(NotDeployableError, match=r"layer features\.1\.0"):
        qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],))
    assert not os.listdir(tmp_path)


def test_switched_off_quantizer_is_not_exported(tmp_path):
    qm, x = quantized("small", "lsq", 4)
    qm.get_submodule("input_quantizers.classifier_input").enabled = False
    with pytest.raises(NotDeployableError, match=r"classifier_input.*switched off"):
        qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],))


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    qm, x = quantized("small", "lsq", 8)

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("call, fragment", [
    (lambda qm, x, p: qcompile.export_onnx(qm, p, (x[:1],), format="tflite"), "unknown ONNX"),
    (lambda qm, x, p: qcompile.export_onnx(qm, p, (x[:1],), opset=12), "opset must be"),
    (lambda qm, x, p: qcompile.export_onnx(SmallCNN(), p, (x[:1],)), "fx GraphModule"),
    (lambda qm, x, p: qcompile.export_onnx(qm, p.parent / "no" / "m.onnx", (x[:1],)),
     "does not exist"),
])
def test_bad_arguments_are_qcompile_errors(call, fragment, tmp_path):
    qm, x = quantized("small", "lsq", 8)
    with pytest.raises(QcompileError, match=fragment):
        call(qm, x, tmp_path / "m.onnx")


def test_dynamic_batch_in_qdq(tmp_path):
    qm, x = quantized("small", "qil", 4)
    path = qcompile.export_onnx(qm, tmp_path / "m.onnx", (x[:1],))
    for batch in (1, 5):
        logits = session(path).run(None, {"x": x[:batch].numpy()})[0]
        assert logits.shape == (batch, 10)
