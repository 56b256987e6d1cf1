"""The fx graph, node by node, as an ONNX model.

Walks the quantized graph in its (topological) order. A placeholder is a graph input (batch
dimension symbolic in QDQ, as the example input in QONNX, whose FINN compiler works on fixed
shapes); a quantizer node is one activation quantizer in the format's form; a conv or linear
layer is :func:`~qcompile.backends.onnx.layers.layer_op`; every other op is
:func:`~qcompile.backends.onnx.ops.float_op`; the output becomes ``output`` (``output_<i>`` for
several). Each quantizer node maps to its own ONNX nodes, so a boundary quantizer shared by the
operands of an add appears once per operand, with one set of parameters.
"""

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper
from torch import fx

from qcompile.backends.onnx.builder import (
    CONTAINERS,
    MIN_OPSET,
    QONNX_DOMAIN,
    OnnxExportError,
    OnnxGraph,
)
from qcompile.backends.onnx.layers import layer_op
from qcompile.backends.onnx.meaning import activation_form
from qcompile.backends.onnx.ops import float_op, unsupported
from qcompile.backends.onnx.qdq import QdqEmitter
from qcompile.backends.onnx.qonnx import QonnxEmitter
from qcompile.quant.base import Quantizer
from qcompile.quant.layers import is_quantizable

BATCH = "batch"


@dataclass
class Lowered:
    """The ONNX model of a graph, what each layer and quantizer became, and the opset used."""

    model: onnx.ModelProto
    layers: dict[str, dict] = field(default_factory=dict)
    quantizers: dict[str, dict] = field(default_factory=dict)
    opset: int = MIN_OPSET


def lower(gm: fx.GraphModule, fmt: str, opset: int, fixed_opset: bool) -> Lowered:
    """``gm`` (eval, hard quantizers, shapes propagated) as an ONNX model in format ``fmt``.

    QDQ containers are chosen among the types ``opset`` has; unless ``fixed_opset``, the model
    then declares the lowest opset (13 or more) that has every container it uses.
    """
    graph = OnnxGraph()
    emitter = (QdqEmitter if fmt == "qdq" else QonnxEmitter)(graph, opset)
    walker = _Walker(gm, graph, emitter, dynamic_batch=fmt == "qdq")
    inputs, outputs = walker.run()
    if fmt == "qdq" and not fixed_opset:
        used = {r.get("container") for r in [*walker.layers.values(),
                                             *emitter.records.values()]}
        opset = max([MIN_OPSET] + [c.opset for c in CONTAINERS if c.name in used])
    imports = [helper.make_opsetid("", opset)]
    if fmt == "qonnx":
        imports.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    body = helper.make_graph(graph.nodes, "qcompile", inputs, outputs, graph.initializers)
    model = helper.make_model(body, opset_imports=imports, producer_name="qcompile")
    model.ir_version = helper.find_min_ir_version_for(imports, ignore_unknown=True)
    quantizers = {name: dict(walker.quantizer_info[name], **record)
                  for name, record in emitter.records.items()}
    return Lowered(model, walker.layers, quantizers, opset)


class _Walker:
    def __init__(self, gm: fx.GraphModule, graph: OnnxGraph, emitter, dynamic_batch: bool):
        self.gm = gm
        self.graph = graph
        self.emitter = emitter
        self.dynamic_batch = dynamic_batch
        self.modules = dict(gm.named_modules())
        self.values: dict[fx.Node, str] = {}
        self.layers: dict[str, dict] = {}
        self.quantizer_info: dict[str, dict] = {}
        self.forms: dict[str, object] = {}

    def run(self) -> tuple[list, list]:
        inputs, outputs = [], []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.values[node] = self.graph.reserve(node.name)
                inputs.append(self._value_info(node.name, node))
            elif node.op == "output":
                outputs = self._outputs(node)
            else:
                self.values[node] = self._value(node)
        return inputs, outputs

    def _value(self, node: fx.Node) -> str:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if node.op == "get_attr":
            raise unsupported(node, None)
        if isinstance(module, Quantizer):
            return self._quantizer(node, module)
        if module is not None and is_quantizable(module):
            value, record = layer_op(self.graph, self.emitter, node, module,
                                     self.values[node.args[0]], len(self._shape(node.args[0])))
            source = self.modules.get(node.args[0].target)
            if isinstance(source, Quantizer):
                record.update(input_bits=source.bits, input_method=source.method)
            self.layers[str(node.target)] = record
            return value
        return float_op(self.graph, node, module, self.values, self._shape)

    def _quantizer(self, node: fx.Node, quantizer: Quantizer) -> str:
        name = str(node.target)
        if name not in self.forms:
            readers = ", ".join(str(u.target) if u.op == "call_module" else u.name
                                for u in node.users)
            self.forms[name] = activation_form(quantizer, name,
                                               f"quantizer {name} (read by {readers})")
            self.quantizer_info[name] = {"bits": quantizer.bits, "method": quantizer.method}
        x = self.values[node.args[0]]
        return self.emitter.activation(x, self.forms[name], len(self._shape(node)), node.name)

    def _outputs(self, node: fx.Node) -> list:
        results = node.args[0]
        results = list(results) if isinstance(results, (tuple, list)) else [results]
        if not all(isinstance(r, fx.Node) for r in results):
            raise OnnxExportError("the model returns something other than tensors; return a "
                                  "tensor or a tuple of tensors")
        outputs = []
        for index, result in enumerate(results):
            hint = "output" if len(results) == 1 else f"output_{index}"
            name = self.graph.node("Identity", [self.values[result]], hint)
            outputs.append(self._value_info(name, result))
        return outputs

    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if getattr(meta, "shape", None) is None:
            raise OnnxExportError(f"node {node.name} has no recorded tensor shape; it must "
                                  "produce a single tensor")
        return tuple(meta.shape)

    def _value_info(self, name: str, node: fx.Node) -> onnx.ValueInfoProto:
        shape = list(self._shape(node))
        if self.dynamic_batch and shape:
            shape[0] = BATCH
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
