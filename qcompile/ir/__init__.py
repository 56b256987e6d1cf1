"""The IR: fx tracing, shape propagation and a networkx view for analysis."""

from qcompile.ir.graph_view import to_networkx
from qcompile.ir.shapes import output_shape, propagate_shapes
from qcompile.ir.trace import QUANTIZABLE_LAYERS, QcompileTracer, register_leaf_type, trace

__all__ = [
    "QUANTIZABLE_LAYERS",
    "QcompileTracer",
    "output_shape",
    "propagate_shapes",
    "register_leaf_type",
    "to_networkx",
    "trace",
]
