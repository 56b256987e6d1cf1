"""Where ResNet-18's time goes, op by op: qcompile's compiled W2A2 model against onnxruntime int8.

The same models as :mod:`e2e` (W2A2 LSQ with first and last layer 8-bit; onnxruntime's static
QDQ int8 after ``quant_pre_process``), 2 threads each. qcompile's kernels are timed by
``CompiledModule.profile`` (the Relax virtual machine's instrument hook: wall time around each
kernel call, so a few microseconds of hook each); onnxruntime's nodes by its own profiler
(``enable_profiling``). Both take the median over ``--calls`` calls of each op's time, summed
into groups that both programs have: the 8-bit first conv, the 3x3 convs, the 1x1 downsample
convs, the max pool, the classifier, the input quantization, and the glue between
(requantizations, adds, pooling, dequantization).
Usage: ``python benchmarks/e2e_ops.py [--calls 50]``.
"""

import argparse
import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qcompile
from e2e import SHAPE, THREADS, onnx_sessions, quantized_resnet18

GROUPS = ["first conv (8-bit)", "3x3 convs", "1x1 convs", "max pool", "classifier",
          "input quantize", "layout packing", "glue"]


def ours_group(symbol: str) -> str:
    if symbol.startswith("bitserial_conv"):
        return "1x1 convs" if re.search(r"_\d+x\d+x1x1_", symbol) else "3x3 convs"
    if symbol.startswith("amx_conv"):
        return "1x1 convs" if re.search(r"_k\d+x1x1s", symbol) else "3x3 convs"
    prefixes = {"direct_conv": "first conv (8-bit)", "direct_dense": "classifier",
                "maxpool": "max pool", "quantize_": "input quantize",
                "amx_pack": "layout packing"}
    return next((group for prefix, group in prefixes.items() if symbol.startswith(prefix)),
                "glue")


def ort_group(node: str) -> str:
    if node.startswith("/conv1/"):
        return "first conv (8-bit)"
    if "downsample" in node:
        return "1x1 convs"
    if re.search(r"/conv\d/", node):
        return "3x3 convs"
    if node.startswith("/maxpool"):
        return "max pool"
    if node.startswith("/fc"):
        return "classifier"
    return "input quantize" if node.startswith("x_QuantizeLinear") else "glue"


def ours(compiled, x: np.ndarray, calls: int) -> dict[str, float]:
    """Median time of each kernel call, grouped (``CompiledModule.profile``)."""
    kernels = compiled.profile(x, calls=calls).kernels
    return _grouped({(k.position, k.kernel): [k.seconds] for k in kernels}, ours_group)


def _grouped(times: dict, group_of) -> dict[str, float]:
    """Microseconds per group: the sum of each op's median seconds."""
    groups = collections.Counter()
    for (_, name), values in times.items():
        groups[group_of(name)] += float(np.median(values)) * 1e6
    return dict(groups)


def onnxruntime(path: Path, x: np.ndarray, calls: int, folder: Path) -> dict[str, float]:
    """Median time of each node, grouped, from onnxruntime's profile."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort_profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(calls):
        session.run(None, {"x": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    times = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[(0, event["name"].removesuffix("_kernel_time"))].append(event["dur"] * 1e-6)
    return _grouped(times, ort_group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    model, qm = quantized_resnet18()
    compiled = qcompile.compile(qm, "llvm")
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        onnx_sessions(model, Path(folder))
        theirs = onnxruntime(Path(folder) / "resnet18.int8.onnx", x, args.calls, Path(folder))
    mine = ours(compiled, x, args.calls)
    print(f"\nResNet-18 {SHAPE}, {THREADS} threads, median of {args.calls} calls per op, us")
    print(f"{'group':22} {'qcompile W2A2':>14} {'ort int8':>10} {'ort / qcompile':>15}")
    for group in GROUPS:
        a, b = mine.get(group, 0.0), theirs.get(group, 0.0)
        print(f"{group:22} {a:14.0f} {b:10.0f} {b / a if a else float('nan'):14.2f}x")
    total_a, total_b = sum(mine.values()), sum(theirs.values())
    print(f"{'total':22} {total_a:14.0f} {total_b:10.0f} {total_b / total_a:14.2f}x")


if __name__ == "__main__":
    main()
