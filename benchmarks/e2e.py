"""Whole ResNet-18 (224x224, batch 1): qcompile's compiled W2A2 model against torch and onnxruntime.

Quantizes an untrained torchvision ResNet-18 at W2A2 (first and last layer 8-bit, LSQ,
calibrated on random images: speed does not depend on the weights' values), compiles it with
the TVM backend for this CPU, and times, in one process with interleaved rounds:

- qcompile: the compiled module (``qcompile.compile(qm, "llvm")``), TVM's pool sized to the same
  thread count as the others; where that runs convs on AMX, also the module compiled for this
  CPU without AMX (the bit-serial kernels), "qcompile, no AMX";
- torch fp32 (2 threads, eval, no_grad);
- onnxruntime fp32 on the same model exported to ONNX;
- onnxruntime int8: static QDQ quantization by onnxruntime's own tools (``quant_pre_process``,
  then ``quantize_static`` per-channel, QInt8 weights, QUInt8 activations), its strongest CPU
  setting.

Each round gives every runner in turn a pause (:data:`PAUSE`), one untimed call and
:data:`CALLS` timed calls. Prints the median over all calls and the fastest round (the least
disturbed by other processes: the median of its calls), with ratios, the compile time, and the
artifact's bytes against the float32 weights' bytes.
Usage: ``python benchmarks/e2e.py [--rounds 20] [--bits 2] [--method lsq]``.
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
from onnxruntime.quantization import quant_pre_process, quantize_static

import qcompile
from qcompile.backends.tvm import threads as pool
from qcompile.backends.tvm.target import without_amx

SHAPE = (1, 3, 224, 224)
THREADS = 2
PAUSE = 0.3
"""Seconds between two runners: torch's, onnxruntime's and TVM's thread pools spin a while after
a call, and a pool still spinning on both cores slows the next runtime severalfold."""
WITHOUT_AMX = without_amx(num_cores=THREADS)
"""This CPU without AMX: the bit-serial kernels, for comparison where ``llvm`` uses AMX."""
CALLS = 5
"""Timed calls per runner and round, after one untimed call."""


class Images(CalibrationDataReader):
    def __init__(self, name: str, count: int = 8):
        gen = np.random.default_rng(0)
        self.batches = iter([{name: gen.standard_normal(SHAPE).astype(np.float32)}
                             for _ in range(count)])

    def get_next(self):
        return next(self.batches, None)


def onnx_sessions(model: torch.nn.Module, folder: Path) -> dict[str, ort.InferenceSession]:
    float_path = folder / "resnet18.onnx"
    torch.onnx.export(model, (torch.randn(SHAPE),), str(float_path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    prepared = folder / "resnet18.pre.onnx"
    quant_pre_process(str(float_path), str(prepared))
    int8_path = folder / "resnet18.int8.onnx"
    quantize_static(str(prepared), str(int8_path), Images("x"), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in (("onnxruntime fp32", float_path), ("onnxruntime int8", int8_path))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--method", default="lsq")
    args = parser.parse_args()
    model, qm = quantized_resnet18(args.bits, args.method)
    start = time.perf_counter()
    compiled = qcompile.compile(qm, "llvm")
    compile_seconds = time.perf_counter() - start
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        artifact = compiled.save(Path(folder) / "resnet18.qc")
        artifact_bytes = artifact.stat().st_size
        sessions = onnx_sessions(model, Path(folder))
        runners = {f"qcompile W{args.bits}A{args.bits}": lambda: compiled(x)}
        if any(layer["kernel"] == "amx" for layer in compiled.manifest["layers"]):
            popcount = qcompile.compile(qm, WITHOUT_AMX)
            runners["qcompile, no AMX"] = lambda: popcount(x)
        runners.update({
            "torch fp32": lambda: _torch(model, x),
            **{name: (lambda s=s: s.run(None, {"x": x})) for name, s in sessions.items()},
        })
        rounds = {name: [] for name in runners}
        for _ in range(3):
            for run in runners.values():
                run()
        for _ in range(args.rounds):
            for name, run in runners.items():
                time.sleep(PAUSE)
                run()
                calls = []
                for _ in range(CALLS):
                    begin = time.perf_counter()
                    run()
                    calls.append(time.perf_counter() - begin)
                rounds[name].append(calls)
    medians = {name: statistics.median(t for calls in r for t in calls)
               for name, r in rounds.items()}
    fastest = {name: min(statistics.median(calls) for calls in r) for name, r in rounds.items()}
    key = f"qcompile W{args.bits}A{args.bits}"
    print(f"\nResNet-18 {SHAPE}, {THREADS} threads, {args.rounds} interleaved rounds")
    print(f"{'runner':24} {'median ms':>10} {'qcompile speed-up':>18} {'fastest round ms':>17} "
          f"{'speed-up':>9}")
    for name in runners:
        print(f"{name:24} {medians[name] * 1000:10.2f} {medians[name] / medians[key]:17.2f}x "
              f"{fastest[name] * 1000:17.2f} {fastest[name] / fastest[key]:8.2f}x")
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    print(f"\nartifact {artifact_bytes} bytes vs float32 parameters {fp32_bytes} bytes "
          f"(1/{fp32_bytes / artifact_bytes:.1f}); compile {compile_seconds:.1f} s")
    print(f"machine: {platform.machine()}, {tvm_cpu()}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")


def quantized_resnet18(bits: int = 2, method: str = "lsq"):
    """An untrained ResNet-18 (seed 0) and its quantized graph, calibrated on random images, with
    torch and TVM sized to :data:`THREADS` threads."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    pool.configure(THREADS)
    model = torchvision.models.resnet18(weights=None).eval()
    calibration = [(torch.randn(SHAPE),) for _ in range(4)]
    qm = qcompile.quantize(model, (calibration[0][0],), bits=bits, method=method,
                           calib_data=calibration)
    return model, qm


@torch.no_grad()
def _torch(model, x):
    return model(torch.from_numpy(x))


def tvm_cpu() -> str:
    import tvm

    return f"llvm cpu {tvm.target.codegen.llvm_get_system_cpu()}"


if __name__ == "__main__":
    main()
