"""The compiled ResNet-18 beside a competing process: TVM's thread pool and ``sched_yield``.

Saves the W2A2 ResNet-18 of :mod:`e2e` as an artifact, then times it in fresh processes (the
pool reads ``TVM_THREAD_POOL_SPIN_COUNT`` once, when its workers start): for each spin count,
on an idle machine and beside one busy loop at ``nice 19``, the median, 10th and 90th
percentile of ``--calls`` back-to-back calls after 20 untimed ones. TVM 0.27's workers spin up to
the spin count (default 300,000) on ``std::this_thread::yield()`` between kernels, and each yield
hands the core to any other runnable process; 0 makes them sleep at once.
Usage: ``python benchmarks/contention.py [--calls 300] [--spins default,1000,0]``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import qcompile
from e2e import quantized_resnet18

TIMER = """
import json, sys, time
import numpy as np
import qcompile
module = qcompile.load(sys.argv[1])
x = np.random.default_rng(1).standard_normal(module.input_shape).astype(np.float32)
for _ in range(20):
    module(x)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    module(x)
    times.append(time.perf_counter() - start)
print(json.dumps([float(v) * 1e3 for v in np.percentile(times, [50, 10, 90])]))
"""

BUSY = "while True:\n    pass\n"


def timed(artifact: Path, calls: int, spin: str, busy: bool) -> list[float]:
    """Median, 10th and 90th percentile ms of a fresh process's calls."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    if spin != "default":
        env["TVM_THREAD_POOL_SPIN_COUNT"] = spin
    loop = None
    if busy:
        loop = subprocess.Popen([sys.executable, "-c", BUSY], preexec_fn=lambda: os.nice(19))
    try:
        result = subprocess.run([sys.executable, "-c", TIMER, str(artifact), str(calls)],
                                env=env, capture_output=True, text=True, check=True)
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--spins", default="default,1000,0",
                        help="TVM_THREAD_POOL_SPIN_COUNT values ('default': unset)")
    args = parser.parse_args()
    _, qm = quantized_resnet18()
    with tempfile.TemporaryDirectory() as folder:
        artifact = qcompile.compile(qm, "llvm").save(Path(folder) / "resnet18.qc")
        print(f"\nResNet-18 W2A2, {args.calls} calls per process; ms median / p10 / p90")
        print(f"{'TVM_THREAD_POOL_SPIN_COUNT':28} {'idle machine':>22} "
              f"{'beside a nice-19 busy loop':>28}")
        for spin in args.spins.split(","):
            idle = timed(artifact, args.calls, spin, busy=False)
            loaded = timed(artifact, args.calls, spin, busy=True)
            print(f"{spin:28} {' / '.join(f'{v:.2f}' for v in idle):>22} "
                  f"{' / '.join(f'{v:.2f}' for v in loaded):>28}", flush=True)


if __name__ == "__main__":
    main()
