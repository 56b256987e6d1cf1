"""Targets of the TVM backend: the host CPU through LLVM, or CUDA.

``"llvm"`` is this machine's CPU as LLVM names it (``tvm.target.codegen.llvm_get_system_cpu()``;
never ``"native"``, which TVM 0.27 silently turns into a generic CPU without AVX-512) with as many
cores as the process may use, with AMX-INT8 exactly where this CPU has it and Linux lets the
process use it (:mod:`.amx_host`; LLVM names some such CPUs after an earlier model without AMX,
so the features are added, or taken away where the CPU's name has them and the process may not
use them). ``"llvm:CPU"`` is that CPU as LLVM knows it, AMX included only if the CPU has it.
``"cuda"`` is an sm_80 GPU, ``"cuda:sm_90"`` another architecture. A dict is passed to
``tvm.target.Target`` as it is.
"""

import tvm

from qcompile.backends.tvm import amx_host
from qcompile.backends.tvm.kernels import amx
from qcompile.backends.tvm.threads import CORES
from qcompile.errors import ConfigError

CUDA_ARCH = "sm_80"


def resolve_target(target: "str | dict | tvm.target.Target") -> tvm.target.Target:
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return _checked(target)
    if not isinstance(target, str):
        raise ConfigError(f"target must be 'llvm', 'cuda', 'cuda:sm_XX' or a dict, got {target!r}")
    kind, _, detail = target.partition(":")
    if kind == "llvm":
        spec = {"kind": "llvm", "mcpu": detail or tvm.target.codegen.llvm_get_system_cpu(),
                "num-cores": len(CORES)}
        if not detail:
            spec.update(_amx_features(spec))
        return _checked(spec)
    if kind == "cuda":
        return _checked({"kind": "cuda", "arch": detail or CUDA_ARCH})
    raise ConfigError(f"unknown target {target!r}: use 'llvm' (this CPU), 'llvm:CPU', 'cuda' "
                      "or 'cuda:sm_XX'")


def without_amx(num_cores: int | None = None) -> dict:
    """This CPU with AMX taken away: its low-bit convs then take the bit-serial kernels (for a
    comparison, or for tests of those kernels on an AMX machine). ``num_cores`` defaults to the
    cores this process may use."""
    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "mattr": [f"-{feature}" for feature in amx.FEATURES],
            "num-cores": len(CORES) if num_cores is None else num_cores}


def _amx_features(spec: dict) -> dict:
    """``mattr`` adding AMX where this process may use it and LLVM's name for the CPU lacks
    it, or taking it away where the CPU's name has it and the process may not (an older
    kernel, or a hypervisor that withholds it); nothing otherwise."""
    granted, named = amx_host.enabled(), amx.available(_checked(spec))
    if granted == named:
        return {}
    sign = "+" if granted else "-"
    return {"mattr": [f"{sign}{feature}" for feature in amx.FEATURES]}


def _checked(spec: dict) -> tvm.target.Target:
    try:
        return tvm.target.Target(spec)
    except Exception as error:  # noqa: BLE001 - TVM reports a bad target with its own errors
        raise ConfigError(f"TVM does not accept the target {spec}: {error}") from None
