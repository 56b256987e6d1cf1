"""TVM's thread pool is sized to the process's cores, and binds no thread to one core."""

import os
import subprocess
import sys

import pytest

PROBE = """
import os
cores = len(os.sched_getaffinity(0))
import qcompile.backends.tvm as backend
print(cores, backend.threads.pool_threads(), len(os.sched_getaffinity(0)))
"""


def _probe(**env_vars) -> tuple[int, int, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_vars)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    cores, pool, after = (int(v) for v in done.stdout.split())
    return cores, pool, after


pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                                reason="needs os.sched_getaffinity (Linux)")


def test_pool_has_a_thread_per_core_and_leaves_the_affinity_alone():
    cores, pool, after = _probe()
    assert pool == cores
    assert after == cores


def test_pool_honours_tvm_num_threads():
    cores, pool, after = _probe(TVM_NUM_THREADS="1")
    assert pool == 1
    assert after == cores
