"""qcompile: a graph-rewriting compiler from PyTorch models to low-bit integer models.

The public API (see DESIGN.md): ``trace`` a model into the fx IR, run a pipeline of registered
passes with ``PassManager``, add passes of your own with ``register_pass``, and ``quantize`` a
model into a trainable low-bit graph in one call, ``train`` it, ``integerize`` it into an integer
program and ``verify`` that program against the simulated model.
"""

from qcompile.api import compile, load, quantize  # noqa: A004
from qcompile.backends.onnx import export_onnx
from qcompile.errors import QcompileError, TraceError
from qcompile.integer_ir import IntegerGraph
from qcompile.integerize import integerize
from qcompile.ir import to_networkx, trace
from qcompile.pipeline import PassContext, PassManager, register_pass, register_preset
from qcompile.qat import train
from qcompile.verify import verify

import qcompile.passes  # noqa: E402,F401  (registers the built-in passes)

__version__ = "0.1.0"

__all__ = [
    "IntegerGraph",
    "compile",
    "load",
    "PassContext",
    "PassManager",
    "QcompileError",
    "TraceError",
    "quantize",
    "export_onnx",
    "integerize",
    "register_pass",
    "register_preset",
    "to_networkx",
    "trace",
    "train",
    "verify",
]
