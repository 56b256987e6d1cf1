"""The CPU targets the backend tests compile for: this CPU as ``"llvm"`` resolves it and, where
that runs conv layers on AMX, the same CPU without AMX, so the bit-serial kernels stay tested on
AMX machines too."""

import pytest

from qcompile.backends.tvm import glue_plan
from qcompile.backends.tvm.kernels import amx, vnni
from qcompile.backends.tvm.target import resolve_target, without_amx
from qcompile.backends.tvm.threads import CORES

HOST_HAS_AMX = amx.available(resolve_target("llvm"))
WITHOUT_AMX = without_amx()
BIT_SERIAL = WITHOUT_AMX if HOST_HAS_AMX else "llvm"
"""This CPU, its low-bit convs on the bit-serial kernels."""
AMX_CPU = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": len(CORES)}
"""A CPU with AMX-INT8, to lower and generate code for on any machine."""
TARGETS = [pytest.param("llvm", id="llvm")] + (
    [pytest.param(WITHOUT_AMX, id="llvm-without-amx")] if HOST_HAS_AMX else [])


def low_bit_kernel(target, bits: int = 2) -> str:
    """The kernel kind conv layers of ``bits``-bit codes and weights take on ``target``."""
    resolved = resolve_target(target)
    if amx.available(resolved):
        return "amx"
    if bits * bits > glue_plan.BITSERIAL_PLANE_PAIRS and vnni.available(resolved):
        return "direct int8"
    return "bit-serial"
