"""The reference backend: an :class:`~qcompile.integer_ir.IntegerGraph` run with torch integer ops.

It is the definition of the integer program's semantics, and the oracle the other backends are
checked against. Codes, accumulators and weights are ``int64`` tensors; integer layers hold no
float (convolution, sums and pooling run on integers; the static bound of every accumulator keeps
it inside the int32 range, so int64 arithmetic gives the int32 results a backend computes). Float
appears only where the graph meets the outside: the input quantization and the final
dequantization.
"""

import torch

from qcompile.backends.reference.ops import integer_op_runners
from qcompile.errors import IntegerizeError
from qcompile.integer_ir import IntegerGraph


def run(graph: IntegerGraph, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Execute ``graph`` on float ``inputs``; return every value by name."""
    if len(inputs) != len(graph.inputs):
        raise IntegerizeError(f"the integer graph takes {len(graph.inputs)} input(s) "
                              f"({', '.join(graph.inputs)}), got {len(inputs)}")
    values: dict[str, torch.Tensor] = {}
    for name, x in zip(graph.inputs, inputs, strict=True):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise IntegerizeError(f"input {name} must be a float tensor, got "
                                  f"{getattr(x, 'dtype', type(x).__name__)}")
        values[name] = x
    runners = integer_op_runners()
    with torch.no_grad():
        for op in graph.ops:
            values[op.name] = runners[type(op)](op, values, graph)
    return values

