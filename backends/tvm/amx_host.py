"""Whether this process may run AMX instructions, and asking Linux for them.

Linux (5.16 and later) keeps the AMX tile state off until a process asks for it with
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; an AMX instruction before that raises
``SIGILL``. The permission covers every thread of the process, so asking once, before the first
AMX kernel runs, is enough. :func:`enabled` asks (once) on a CPU that lists ``amx_tile`` and
``amx_int8`` and says whether it was granted.
"""

import ctypes
import functools
import sys

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158
"""The ``arch_prctl`` system call number on x86-64 Linux."""
CPU_FLAGS = ("amx_tile", "amx_int8")


def cpu_flags() -> set[str]:
    """The flags ``/proc/cpuinfo`` lists for the first CPU (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@functools.cache
def enabled() -> bool:
    """Whether this CPU has AMX-INT8 and this process has the kernel's permission to use it
    (asked for here, the first time)."""
    if not sys.platform.startswith("linux") or not set(CPU_FLAGS) <= cpu_flags():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
