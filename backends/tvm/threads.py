"""TVM's CPU thread pool, sized to the cores this process may use.

Left alone, TVM 0.27 sizes its pool from ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``), else from
half of ``std::thread::hardware_concurrency()`` on x86 (it assumes every second logical CPU is a
hyper-thread): one thread on a 2-vCPU machine, so a compiled module ran on one core of two
(ResNet-18 W2A2: 10.8 ms a call against 6.4 ms on both cores, measured on a 2-vCPU znver4 VM).
With one worker it also binds the calling thread to a single core, which narrows the affinity
of every thread the process starts afterwards (onnxruntime's pool, a data loader's workers).

The pool can shrink after it is created but never grow, so :func:`configure` sizes it when the
backend is imported, before any kernel runs: ``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS`` threads
when set (as TVM itself reads them), else one per core of the process's affinity, in TVM's
"threads share all cores" mode, which pins no thread to one core.
"""

import os

import tvm

SHARE_ALL_CORES = -3
"""``tvm::runtime::threading::ThreadGroup::kSpecifyThreadShareAllCore``."""


def usable_cores() -> list[int]:
    """The CPUs this process may run on (all of them where affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


CORES = usable_cores()
"""The process's CPUs when the backend was imported, before TVM could bind a thread."""


def requested_threads() -> int:
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(CORES)


def configure(threads: int | None = None) -> int:
    """Size TVM's pool to ``threads`` (default: see the module docstring) and return the threads
    it has: fewer than asked when the pool already had fewer workers (it can shrink, not grow)."""
    config = tvm.get_global_func("runtime.config_threadpool")
    config(SHARE_ALL_CORES, threads or requested_threads(), [str(cpu) for cpu in CORES])
    return pool_threads()


def pool_threads() -> int:
    """The threads TVM's pool runs a parallel kernel on."""
    return int(tvm.get_global_func("runtime.NumThreads")())
