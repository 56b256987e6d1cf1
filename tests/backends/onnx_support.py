"""Helpers of the ONNX backend tests: quantized models, runtime sessions, and comparisons.

Comparisons against the simulated model are of two kinds:

- **op by op** (:func:`assert_ops_agree`): every fx node is recomputed in torch on the values the
  runtime fed it (teacher forcing), and compared with what the runtime made of them. A float op
  must agree to float32 rounding; a quantizer must give the same code everywhere except within
  float32 rounding of one of its decision thresholds, where it may differ by one code (a tie).
  This proves the ONNX graph computes the simulated model's function, op for op.
- **end to end** (:func:`assert_logits_agree`): logits within one output LSB of what the last
  layer's input explains, and argmax agreement. One output LSB is the most one code step of one
  input of the last layer can move a logit: ``s_in * max|W|`` (its input scale times its largest
  quantized weight). Where the runtime's last-layer input codes equal the simulated ones, the
  logits then agree to within that LSB; where a code differs (a tie upstream, propagated: deep
  untrained float32 networks amplify ties), the bound adds exactly what the differing inputs can
  change, ``sum_i |a_rt - a_sim|_i |W_ji|``. The argmax must agree on every image whose
  last-layer input codes all equal the simulated ones, and elsewhere wherever that bound cannot
  reach across the top-2 margin (a tie at 2 bits in an untrained resnet18 can move an image's
  argmax: one tie upstream of the last layer is within float32 rounding of a threshold and
  the runtime's summation order decides it).
"""

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx

from quantized_models import held_out
from quantized_models import quantized as quantized_model
from qcompile.quant import Quantizer
from qcompile.quant.layers import quantizable_layers

TIE = 2e-5
"""Relative distance to a decision threshold within which the runtime's code may differ."""


def quantized(arch: str, method: str, bits: int) -> tuple[fx.GraphModule, torch.Tensor]:
    """The shared test model (calibrated on 32 digits for the small CNN) in eval mode with hard
    quantizers, and a test batch it was not calibrated on."""
    qm, _ = quantized_model(arch, method, bits, count=32)
    return hard(qm), held_out(arch, count=32)


def hard(qm: fx.GraphModule) -> fx.GraphModule:
    qm.eval()
    for module in qm.modules():
        if isinstance(module, Quantizer):
            module.set_hard(True)
    return qm


def session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    """An onnxruntime CPU session as a user makes one (onnxruntime's default optimizations,
    unless ``level`` says otherwise)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = level
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the values ``names`` (those it has)."""
    model = copy.deepcopy(model)
    produced = {o for n in model.graph.node for o in n.output}
    known = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    present = [name for name in dict.fromkeys(names) if name in produced]
    model.graph.output.extend(known.get(name) or onnx.helper.make_tensor_value_info(
        name, onnx.TensorProto.FLOAT, None) for name in present)
    return model


def run(model, x: torch.Tensor, names=(), **session_options) -> dict[str, np.ndarray]:
    """The logits (``output``) and the values ``names`` the runtime computes on ``x``."""
    model = with_outputs(onnx.load(str(model)) if not isinstance(model, onnx.ModelProto)
                         else model, names)
    outputs = session(model, **session_options).run(None, {"x": x.numpy()})
    return dict(zip([o.name for o in model.graph.output], outputs, strict=True))


def last_layer(qm: fx.GraphModule):
    """The last layer's node, its quantized weight and its input quantizer's scale."""
    site = quantizable_layers(qm)[-1]
    with torch.no_grad():
        weight = site.module.quantized_weight() if hasattr(site.module, "quantized_weight") \
            else site.module.weight_quantizer(site.module.folded_weight())
    reader = qm.get_submodule(site.node.args[0].target)
    scale = float(reader.integer_spec().scale.reshape(-1)[0])
    return site.node, weight.detach(), scale


def simulated(qm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's value in the simulated model on ``x``."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            values[node.name] = super().run_node(node)
            return values[node.name]

    with torch.no_grad():
        values["output"] = Recorder(qm).run(x)
    return values


@dataclass(frozen=True)
class LogitAgreement:
    argmax: float
    max_lsb: float
    drifted: float


def assert_logits_agree(qm: fx.GraphModule, x: torch.Tensor, runtime: dict) -> LogitAgreement:
    """Logits within the bound of the module docstring, and the same argmax wherever the bound
    is below half the simulated model's top-2 margin (where no logits within the bound can
    change the argmax); returns the argmax agreement, the largest logit difference in output
    LSBs and the fraction of last-layer inputs whose codes differ."""
    node, weight, scale = last_layer(qm)
    reference = simulated(qm, x)
    logits = torch.from_numpy(runtime["output"])
    expected = reference["output"]
    lsb = scale * float(weight.abs().max())
    drift = (torch.from_numpy(runtime[node.args[0].name]) - reference[node.args[0].name]).abs()
    bound = lsb + (drift.flatten(1) @ weight.abs().flatten(1).T) * (1 + 1e-5) + 1e-5
    difference = (logits - expected).abs()
    assert bool((difference <= bound).all()), (
        f"logits differ by {float(difference.max()):.3g}, one output LSB is {lsb:.3g}")
    top = expected.topk(2, dim=1).values
    decided = top[:, 0] - top[:, 1] > 2 * bound.amax(dim=1)
    agree = logits.argmax(1) == expected.argmax(1)
    assert bool(agree[decided].all()), "argmax differs where no tie can explain it"
    untouched = (drift.flatten(1) == 0).all(dim=1)
    assert bool(agree[untouched].all()), "argmax differs on an image no tie reached"
    return LogitAgreement(float(agree.float().mean()), float(difference.max()) / lsb,
                          float((drift > 0).float().mean()))


def assert_ops_agree(qm: fx.GraphModule, model, x: torch.Tensor) -> dict[str, int]:
    """Teacher-forced comparison of every node (module docstring); returns tie counts."""
    values = run(model, x, [n.name for n in qm.graph.nodes])
    checker = _TeacherForced(qm, values)
    with torch.no_grad():
        checker.run(x)
    assert checker.compared > len(quantizable_layers(qm)), "too few values compared"
    return checker.ties


class _TeacherForced(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, runtime: dict[str, np.ndarray]):
        super().__init__(gm)
        self.runtime = runtime
        self.modules = dict(gm.named_modules())
        self.ties: dict[str, int] = {}
        self.compared = 0

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if node.op in ("placeholder", "output") or node.name not in self.runtime:
            return result
        got = torch.from_numpy(self.runtime[node.name])
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, Quantizer):
            source = self.env[node.args[0]]
            self.ties[node.name] = _assert_codes_agree(node.name, module, source, got, result)
        else:
            scale = float(result.abs().max()) + 1e-12
            assert torch.allclose(got, result, rtol=1e-4, atol=1e-4 * scale), (
                f"{node.name}: runtime differs by {float((got - result).abs().max()):.3g} "
                f"(values up to {scale:.3g})")
        self.compared += 1
        return got


def _assert_codes_agree(name: str, quantizer: Quantizer, source: torch.Tensor,
                        got: torch.Tensor, expected: torch.Tensor) -> int:
    """Equal values except at ties, where one code step apart; returns the number of ties."""
    spec = quantizer.integer_spec()
    step = float(spec.scale.reshape(-1).max())
    differs = got != expected
    if not bool(differs.any()):
        return 0
    thresholds = _decision_thresholds(spec)
    distance = (source[differs].reshape(-1, 1) - thresholds.reshape(1, -1)).abs().amin(dim=1)
    tolerance = TIE * max(float(thresholds.abs().max()), step)
    gap = (got[differs] - expected[differs]).abs()
    assert bool((distance <= tolerance).all()), (
        f"{name}: {int((distance > tolerance).sum())} codes differ away from any threshold")
    assert bool((gap <= step * (1 + 1e-4)).all()), f"{name}: codes differ by more than one"
    return int(differs.sum())


def _decision_thresholds(spec) -> torch.Tensor:
    if spec.thresholds is not None:
        return spec.thresholds.double().reshape(-1)
    codes = spec.codes.double()
    return ((codes[1:] - spec.zero_point.double().reshape(-1, 1) - 0.5)
            * spec.scale.double().reshape(-1, 1)).reshape(-1)
