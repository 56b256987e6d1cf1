"""The ONNX graph under construction: nodes, initializers, unique names, integer containers.

:class:`OnnxGraph` is what the exporter writes into while it walks the fx graph: every node it
adds gets a unique name, every constant becomes a named initializer (deduplicated by a key, so a
quantizer called at several places stores its scale once). :func:`container_for` picks the
integer type that holds a range of codes at an opset.
"""

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import QcompileError

QONNX_DOMAIN = "qonnx.custom_op.general"
"""The domain of the QONNX ``Quant`` and ``MultiThreshold`` ops."""

MIN_OPSET = 13
"""The oldest opset the exporter writes: per-axis Quantize/DequantizeLinear arrived in 13."""

MAX_OPSET = 25
"""The newest opset the exporter writes (INT2/UINT2 in Quantize/DequantizeLinear)."""


class OnnxExportError(QcompileError):
    """A graph, or a node of it, that the ONNX exporter cannot express."""


@dataclass(frozen=True)
class Container:
    """An ONNX integer element type: its name, TensorProto code, range and first opset."""

    name: str
    code: int
    low: int
    high: int
    opset: int

    def holds(self, low: int, high: int) -> bool:
        return self.low <= low and high <= self.high


CONTAINERS = (
    Container("INT2", TensorProto.INT2, -2, 1, 25),
    Container("UINT2", TensorProto.UINT2, 0, 3, 25),
    Container("INT4", TensorProto.INT4, -8, 7, 21),
    Container("UINT4", TensorProto.UINT4, 0, 15, 21),
    Container("INT8", TensorProto.INT8, -128, 127, 10),
    Container("UINT8", TensorProto.UINT8, 0, 255, 10),
    Container("INT16", TensorProto.INT16, -(2**15), 2**15 - 1, 21),
    Container("UINT16", TensorProto.UINT16, 0, 2**16 - 1, 21),
)
"""From narrowest to widest; a type is used only at an opset that has it in QDQ. INT16 holds
8-bit codes with a half-integer zero point (DoReFa's weights: ``2 code + 1`` up to 255)."""


def container_for(low: int, high: int, opset: int) -> Container | None:
    """The narrowest type available at ``opset`` that holds ``low..high`` (unsigned types for a
    range without negatives, signed otherwise), or None when none does."""
    for container in CONTAINERS:
        signed = container.low < 0
        if container.opset <= opset and signed == (low < 0) and container.holds(low, high):
            return container
    return None


@dataclass
class OnnxGraph:
    """Nodes and initializers in the order they are added (the fx order is topological)."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    constants: dict[tuple, str] = field(default_factory=dict)

    def unique(self, hint: str) -> str:
        name, index = hint, 1
        while name in self.names:
            index += 1
            name = f"{hint}_{index}"
        self.names.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim ``name`` exactly (graph inputs and fx values keep their own names)."""
        if name in self.names:
            raise OnnxExportError(f"two ONNX values would be named {name!r}")
        self.names.add(name)
        return name

    def node(self, op_type: str, inputs: list[str], output: str, *, domain: str = "",
             **attributes) -> str:
        """Add one node with one output, named ``output`` (made unique); returns that name."""
        output = self.unique(output)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, domain=domain,
                                           **attributes))
        return output

    def constant(self, hint: str, value, key: tuple | None = None) -> str:
        """A float32 (or given dtype) numpy initializer; one per ``key`` when a key is given."""
        if key is not None and key in self.constants:
            return self.constants[key]
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self.unique(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        if key is not None:
            self.constants[key] = name
        return name

    def integers(self, hint: str, values: np.ndarray, container: Container,
                 key: tuple | None = None) -> str:
        """An initializer of ``container`` type holding the integers ``values``."""
        if key is not None and key in self.constants:
            return self.constants[key]
        values = np.asarray(values, dtype=np.int64)
        if values.size and not container.holds(int(values.min()), int(values.max())):
            raise OnnxExportError(f"{hint}: integers {int(values.min())}..{int(values.max())} "
                                  f"do not fit {container.name}")
        name = self.unique(hint)
        self.initializers.append(helper.make_tensor(name, container.code, list(values.shape),
                                                    values.reshape(-1).tolist()))
        if key is not None:
            self.constants[key] = name
        return name
