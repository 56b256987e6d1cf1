"""The Relax module of a planned program: ``main`` and ``trace`` over one list of kernel calls.

``main(x, *params)`` runs the calls ``main`` needs and returns the output; ``trace(x, *params)``
runs every call, including those only the trace needs (values ``main`` computes another way),
and returns every traced value. Parameters are function inputs, each array once however many
calls read it.
"""

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax


@dataclass(frozen=True)
class Call:
    """``value = symbol(*args)``: ``args`` are value names or parameter arrays."""

    value: str
    symbol: str
    args: list
    shape: tuple[int, ...]
    dtype: str = "int32"
    trace_only: bool = False


def build_module(kernels: dict[str, tvm.tirx.PrimFunc], calls: list[Call], traced: list[str],
                 input_name: str, output_name: str, input_shape: tuple[int, ...]
                 ) -> tuple[tvm.IRModule, list[np.ndarray]]:
    """The module and its parameter arrays, in the order ``main`` and ``trace`` take them."""
    bb = relax.BlockBuilder()
    symbols = {name: bb.add_func(func.with_attr("global_symbol", name), name)
               for name, func in kernels.items()}
    arrays, slots = [], {}
    for call in calls:
        for a in call.args:
            if isinstance(a, np.ndarray) and id(a) not in slots:
                slots[id(a)] = len(arrays)
                arrays.append(a)
    for function, returns_all in (("main", False), ("trace", True)):
        x = relax.Var("x", relax.TensorType(tuple(input_shape), "float32"))
        params = [relax.Var(f"p{k}", relax.TensorType(a.shape, str(a.dtype)))
                  for k, a in enumerate(arrays)]
        with bb.function(function, [x, *params]):
            with bb.dataflow():
                env = {input_name: x}
                for call in calls:
                    if call.trace_only and not returns_all:
                        continue
                    inputs = [params[slots[id(a)]] if isinstance(a, np.ndarray) else env[a]
                              for a in call.args]
                    env[call.value] = bb.emit(relax.call_tir(
                        symbols[call.symbol], inputs, relax.TensorType(call.shape, call.dtype)))
                if returns_all:
                    out = bb.emit_output(relax.Tuple([env[v] for v in traced]))
                else:
                    out = bb.emit_output(env[output_name])
            bb.emit_func_output(out)
    return bb.get(), arrays
