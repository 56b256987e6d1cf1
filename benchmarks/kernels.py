"""Our conv kernels against torch fp32 and onnxruntime int8 on ResNet-18's 3x3 layers.

Each ResNet-18 3x3 conv shape (64->64 at 56x56, 128->128 at 28x28, 256->256 at 14x14,
512->512 at 7x7; batch 1, stride 1, padding 1) runs as:

- our bit-serial kernels at W1A1 (bipolar weights), W2A2 and W4A4 (signed weights), unsigned
  activation codes, with the per-channel fixed-point requantization epilogue they are deployed
  with (int32 codes in, int32 codes out; activation packing included);
- torch fp32 ``F.conv2d``;
- on CPUs with AMX-INT8, the AMX kernel (:mod:`qcompile.backends.tvm.kernels.amx`) at W2A2, as
  consecutive AMX layers run it in a compiled model: codes in its input layout, codes out in the
  next layer's layout (padded channels-last bytes), the same epilogue; the bit-width does not
  change its speed;
- onnxruntime int8: a one-conv QDQ model on uint8 codes (DequantizeLinear on the uint8 input and
  the int8 per-channel-scaled weight, QuantizeLinear on the output), which onnxruntime fuses into
  ``QLinearConv``: codes in, codes out, as for the bit-serial kernels.

All three use ``--threads`` threads (2 by default: TVM's pool, ``torch.set_num_threads``,
onnxruntime's intra-op threads). Every call is timed from Python (``perf_counter`` around
``calls`` calls), so each runtime's call overhead is included. The rounds are interleaved: each
round times every configuration in turn, after a pause (:data:`PAUSE`) and two untimed calls,
so one runtime's spinning threads do not run into the next (with a 0.02 s pause the runner
after onnxruntime or torch measured up to 7x slower at 2 threads); the tables give the median
over rounds and the fastest round, and the machine's load average is printed with them
(threads that share a core with another process wait at every barrier, so a loaded machine
slows the multi-threaded runs by far more than its load).

``--packed`` times the bit-serial kernels alone, each layer with int32 codes in and out against
the packed activation layout (:mod:`qcompile.backends.tvm.kernels.bitserial_packed`) in and out,
as consecutive bit-serial layers pass it: no activation packing, output codes packed in the
kernel. Each round times every configuration at 1 and then 2 threads (TVM's pool is
reconfigured between them), and at 1 thread also in CPU time (``thread_time``: one TVM thread
runs the kernel in the calling thread), which time slices lost to other processes do not count.

Usage: ``python benchmarks/kernels.py [--threads 2] [--rounds 15] [--calls 20]
[--layers 0,1,2,3] [--packed]``.
"""

import argparse
import os
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import tvm
from onnx import TensorProto, helper

from qcompile.backends.tvm import amx_host
from qcompile.backends.tvm import threads as pool
from qcompile.backends.tvm.kernels import amx
from qcompile.backends.tvm.kernels.bitserial import Epilogue, conv2d_kernel, packed_shape
from qcompile.backends.tvm.target import resolve_target
from qcompile.packing import pack_bits

PAUSE = 0.3
"""Seconds before each runner's calls in a round: torch's, onnxruntime's and TVM's pools spin
a while after a call."""
LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]
BITS = [(1, "bipolar"), (2, "signed"), (4, "signed")]
TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                            "num-cores": 2})
AMX_TARGET = resolve_target("llvm") if amx_host.enabled() else None
"""This CPU with AMX, where it has it and the process may use it."""


def tvm_runner(channels: int, size: int, bits: int, form: str, rng, packed: bool = False):
    """A zero-argument call of the W{bits}A{bits} kernel on random codes, packed in and out or
    int32 in and out."""
    levels = 2**bits - 1
    epilogue = Epilogue("fixed_point", levels, True, 16)
    shape = (1, channels, size, size)
    func = conv2d_kernel(shape, (channels, channels, 3, 3), bits, bits, form, 1, 1, 1, epilogue,
                         TARGET, packed_input=packed, packed_output=packed)
    kernel = tvm.compile(tvm.IRModule({"main": func}), TARGET).mod[func.attrs["global_symbol"]]
    codes = rng.integers(0, 2**bits, (channels, channels, 3, 3))
    words = packed_shape(shape, bits, TARGET)
    arrays = [rng.integers(0, 2**63, words, np.uint64) if packed
              else rng.integers(0, 2**bits, shape).astype(np.int32),
              pack_bits(codes, bits, axis=1),
              rng.integers(1, 2**10, channels).astype(np.int64),
              rng.integers(-(2**15), 2**15, channels).astype(np.int64),
              np.ones(channels, np.int64),
              np.zeros(words, np.uint64) if packed else np.zeros(shape, np.int32)]
    args = [tvm.runtime.tensor(a) for a in arrays]
    return lambda: kernel(*args)


def amx_runner(channels: int, size: int, bits: int, rng):
    """A zero-argument call of the AMX kernel on W{bits}A{bits} codes as consecutive AMX layers
    run it: codes in the input layout, codes out in the next layer's layout, the same
    fixed-point epilogue as :func:`tvm_runner`."""
    levels = 2**bits - 1
    epilogue = Epilogue("fixed_point", levels, True, 16)
    args = (channels, (3, 3), 1, (1, 1))
    layout = amx.shared_layout(1, channels, size, size, [args])
    conv = amx.Conv(layout, *args)
    symbol = f"amx_w{bits}_{channels}_{size}"
    func = amx.conv2d_kernel(conv, epilogue, layout, symbol)
    kernel = tvm.compile(tvm.IRModule({"main": func}), AMX_TARGET)[symbol]
    weight = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (channels, channels, 3, 3))
    arrays = [layout.to_layout(rng.integers(0, 2**bits, (1, channels, size, size))),
              amx.pack_weight(weight.astype(np.int8), layout.padded_channels,
                              conv.padded_out_channels),
              rng.integers(1, 2**10, channels).astype(np.int64),
              rng.integers(-(2**15), 2**15, channels).astype(np.int64),
              np.ones(channels, np.int64),
              np.zeros(layout.shape, np.uint8)]
    args = [tvm.runtime.tensor(a) for a in arrays]
    return lambda: kernel(*args)


def torch_runner(channels: int, size: int, rng):
    x = torch.from_numpy(rng.standard_normal((1, channels, size, size), np.float32))
    w = torch.from_numpy(rng.standard_normal((channels, channels, 3, 3), np.float32))

    def call():
        with torch.inference_mode():
            F.conv2d(x, w, padding=1)
    return call


def qdq_model(channels: int, size: int, rng) -> onnx.ModelProto:
    """One 3x3 conv in QDQ form on uint8 codes: DequantizeLinear of the uint8 input and of the
    int8 weight (one scale per output channel), the float conv, QuantizeLinear to uint8. Like the
    bit-serial kernel, it takes codes and returns codes (onnxruntime fuses it to QLinearConv)."""
    shape = [1, channels, size, size]
    weight = rng.integers(-127, 128, (channels, channels, 3, 3)).astype(np.int8)
    inits = [
        helper.make_tensor("w_q", TensorProto.INT8, weight.shape, weight.tobytes(), raw=True),
        helper.make_tensor("w_scale", TensorProto.FLOAT, [channels],
                           (rng.random(channels) * 0.01 + 0.001).astype(np.float32)),
        helper.make_tensor("w_zero", TensorProto.INT8, [channels], np.zeros(channels, np.int8)),
        helper.make_tensor("x_scale", TensorProto.FLOAT, [], [0.02]),
        helper.make_tensor("x_zero", TensorProto.UINT8, [], [0]),
        helper.make_tensor("y_scale", TensorProto.FLOAT, [], [0.05]),
        helper.make_tensor("y_zero", TensorProto.UINT8, [], [0]),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["y_q"]),
    ]
    graph = helper.make_graph(nodes, "conv_qdq",
                              [helper.make_tensor_value_info("x_q", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("y_q", TensorProto.UINT8, shape)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def ort_runner(channels: int, size: int, threads: int, rng):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(qdq_model(channels, size, rng).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input("x_q", rng.integers(0, 256, (1, channels, size, size), np.uint8))
    binding.bind_output("y_q", "cpu")
    return lambda: session.run_with_iobinding(binding)


def per_call(call, calls: int, clock=time.perf_counter) -> float:
    start = clock()
    for _ in range(calls):
        call()
    return (clock() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--layers", default="0,1,2,3")
    parser.add_argument("--packed", action="store_true",
                        help="int32 against packed activations, at 1 and 2 threads")
    args = parser.parse_args()
    if args.packed:
        return main_packed(args)
    pool.configure(args.threads)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s); load average {os.getloadavg()[0]:.2f} at start")
    rng = np.random.default_rng(0)
    medians, minima = [], []
    for index in (int(i) for i in args.layers.split(",")):
        channels, size = LAYERS[index]
        layer = f"{channels}->{channels} {size}x{size}"
        times = measure(channels, size, args, rng)
        medians.append((layer, {k: statistics.median(t) * 1e3 for k, t in times.items()}))
        minima.append((layer, {k: min(t) * 1e3 for k, t in times.items()}))
        print(f"{layer}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in medians[-1][1].items()),
              flush=True)
    print("\nmedian over rounds:")
    print_table(medians)
    print("\nfastest round (the least disturbed by other processes):")
    print_table(minima)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def measure(channels: int, size: int, args, rng) -> dict[str, list[float]]:
    """Seconds per call of every configuration in each of ``args.rounds`` interleaved rounds."""
    runners = {f"W{b}A{b}": tvm_runner(channels, size, b, form, rng) for b, form in BITS}
    if AMX_TARGET is not None:
        runners["AMX W2A2"] = amx_runner(channels, size, 2, rng)
    runners["torch fp32"] = torch_runner(channels, size, rng)
    runners["ort int8"] = ort_runner(channels, size, args.threads, rng)
    times = {name: [] for name in runners}
    for call in runners.values():
        per_call(call, 3)
    for _ in range(args.rounds):
        for name, call in runners.items():
            time.sleep(PAUSE)
            per_call(call, 2)
            times[name].append(per_call(call, args.calls))
    return times


def main_packed(args) -> None:
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    rng = np.random.default_rng(0)
    print("| layer | bits | threads | int32 ms | packed ms | int32 / packed |")
    print("|---|---|---|---|---|---|")
    for index in (int(i) for i in args.layers.split(",")):
        channels, size = LAYERS[index]
        runners = {(b, packed): tvm_runner(channels, size, b, form, rng, packed)
                   for b, form in BITS for packed in (False, True)}
        times = {(key, threads): [] for key in runners for threads in ("1 cpu", 1, 2)}
        for _ in range(args.rounds):
            for threads in ("1 cpu", 1, 2):
                pool.configure(1 if threads == "1 cpu" else threads)
                clock = time.thread_time if threads == "1 cpu" else time.perf_counter
                for key, call in runners.items():
                    time.sleep(0.02)
                    per_call(call, 2)
                    times[key, threads].append(per_call(call, args.calls, clock))
        for b, _ in BITS:
            for threads in ("1 cpu", 1, 2):
                plain, packed = (statistics.median(times[(b, p), threads]) * 1e3
                                 for p in (False, True))
                print(f"| {channels}->{channels} {size}x{size} | W{b}A{b} | {threads} | "
                      f"{plain:.3f} | {packed:.3f} | {plain / packed:.2f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def print_table(rows) -> None:
    names = list(rows[0][1])
    amx_columns = " AMX vs torch | AMX vs ort |" if "AMX W2A2" in names else ""
    print("| layer | " + " | ".join(f"{n} ms" for n in names)
          + " | W2A2 vs torch | W2A2 vs ort | W1A1 vs W2A2 |" + amx_columns)
    print("|---" * (len(names) + 4 + amx_columns.count("|")) + "|")
    for layer, m in rows:
        amx_ratios = (f" {m['torch fp32'] / m['AMX W2A2']:.2f}x |"
                      f" {m['ort int8'] / m['AMX W2A2']:.2f}x |" if amx_columns else "")
        print(f"| {layer} | " + " | ".join(f"{m[n]:.3f}" for n in names)
              + f" | {m['torch fp32'] / m['W2A2']:.2f}x | {m['ort int8'] / m['W2A2']:.2f}x"
              + f" | {m['W2A2'] / m['W1A1']:.2f}x |" + amx_ratios)


if __name__ == "__main__":
    main()
