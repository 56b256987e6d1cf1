"""The TVM backend: integer programs compiled to packed-integer kernels for CPU (llvm) and CUDA.

``compile_module(model_or_graph, target)`` integerizes a quantized graph (or takes an
``IntegerGraph``), lowers it to a Relax module of scheduled kernels (:mod:`.lower`), builds it
with ``tvm.compile`` and returns a :class:`~.compiled.CompiledModule`; ``load`` reads a saved one.
Importing the backend sizes TVM's CPU thread pool to the process's cores (:mod:`.threads`).
"""

import time

import tvm
from torch import fx

from qcompile import integer_ir as ir
from qcompile.backends.tvm import threads
from qcompile.backends.tvm.compiled import CompiledModule, load, stored_bytes, versions
from qcompile.backends.tvm.lower import lower
from qcompile.backends.tvm.target import resolve_target
from qcompile.errors import ConfigError
from qcompile.integerize import integerize

threads.configure()


def compile_module(model, target="llvm", input_shape=None) -> CompiledModule:
    """``model`` (a quantized GraphModule or an IntegerGraph) compiled for ``target``."""
    graph = integerize(model) if isinstance(model, fx.GraphModule) else model
    if not isinstance(graph, ir.IntegerGraph):
        raise ConfigError(f"compile takes a quantized GraphModule or an IntegerGraph, got "
                          f"{type(model).__name__}")
    shape = tuple(input_shape) if input_shape is not None else (
        graph.input_shapes[0] if graph.input_shapes else None)
    if shape is None:
        raise ConfigError("the input shape is unknown: pass input_shape=(N, C, H, W)")
    resolved = resolve_target(target)
    start = time.perf_counter()
    lowered = lower(graph, shape, resolved)
    executable = tvm.compile(lowered.module, resolved)
    seconds = time.perf_counter() - start
    manifest = {
        "versions": versions(),
        "target": {k: _plain(v) for k, v in resolved.export().items()
                   if k in ("kind", "mcpu", "mattr", "arch", "num-cores")},
        "input": {"name": graph.inputs[0], "shape": list(shape), "dtype": "float32"},
        "output": {"shape": list(lowered.output_shape), "dtype": "float32"},
        "layers": [{"layer": op.layer, "weight_bits": op.weight.bits,
                    "input_bits": graph.values[op.input].bits,
                    "kernel": lowered.kernels.get(op.layer, "?")} for op in graph.layers()],
        "bytes": {"params": stored_bytes(lowered.params, lowered.stored),
                  "fp32_weights": int(sum(row.fp32 for row in graph.size_rows()))},
        "compile_seconds": round(seconds, 2),
        "program": [{"value": value, "kernel": symbol} for value, symbol in lowered.program],
    }
    return CompiledModule(executable, lowered.params, manifest, lowered.traced, lowered.stored)


def _plain(value):
    """A target attribute as JSON: numbers as they are, lists (``mattr``) as lists of text."""
    if isinstance(value, (int, float, bool)):
        return value
    if isinstance(value, (list, tuple, tvm.ir.Array)):
        return [str(v) for v in value]
    return str(value)


__all__ = ["CompiledModule", "compile_module", "load", "resolve_target"]
