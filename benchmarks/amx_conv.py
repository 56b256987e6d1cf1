"""What AMX does for ResNet-18's 3x3 convs: a prototype AMX kernel against onnxruntime int8.

Not part of the compiler yet: this measures the instruction mix the bit-serial kernels cannot
beat on CPUs whose ``vpdpbusd`` outruns ``vpopcntq`` (``benchmarks/RESULTS.md``). Low-bit codes
(here 2-bit activations and weights) are held as uint8 / int8 and multiplied on AMX tiles with
``tdpbusd`` (16 x 64 by 64 x 16 bytes into 16 x 16 int32, 16,384 MACs an instruction).

The prototype kernel: a 3x3, stride-1, pad-1 convolution as an implicit GEMM over the padded
input's flattened rows (channels last, ``(H + 2) * (W + 2)`` positions of ``C`` bytes; an output
position ``p`` reads input positions ``p + i * (W + 2) + j``, so one tile load with a stride of
``C`` bytes covers 16 consecutive positions, and each row's 2 padding columns are computed and
dropped). Each task computes 32 positions x 32 output channels in four accumulator tiles over
the 9 taps and the input channels in steps of 64; weights are stored per tap in AMX's
4-byte-interleaved layout. Output int32, no requantization (onnxruntime's QLinearConv also
requantizes to uint8, a pass over the output). The result is checked against torch's float64
convolution of the same codes.

Each layer runs in a fresh process (TVMScript reuses the first parse of the kernel's closure),
which times, interleaved over rounds: the AMX kernel, onnxruntime int8 (``kernels.ort_runner``,
a QDQ conv fused to QLinearConv) and our packed W2A2 bit-serial kernel (``kernels.tvm_runner``).
Linux needs the process to ask for the AMX state (``arch_prctl``); without AMX the script says
so and exits 1. Usage: ``python benchmarks/amx_conv.py [--rounds 9] [--threads 2]``.
"""

import argparse
import ctypes
import multiprocessing
import statistics
import sys
import time

import numpy as np

LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]
CALLS = 20
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158


def amx_available() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/cpuinfo") as cpuinfo:
        if "amx_int8" not in cpuinfo.read():
            return False
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def conv_kernel(channels: int, size: int, symbol: str):
    """The prototype PrimFunc ``(A, B, O, config)`` for ``channels`` in and out, and the shapes
    its buffers take: ``(rows, blocks, padded width)``."""
    from tvm.script import tirx as T

    c, k, wi = channels, channels, size + 2
    blocks = -(-size * wi // 32)
    rows = blocks * 32 + 2 * wi + 2
    kb = k // 32

    def load(tile, buffer, offset, stride):
        return T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(tile),
                                  buffer.access_ptr("r", offset=offset), T.int64(stride))

    def store(tile, buffer, offset):
        return T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.uint8(tile),
                                  buffer.access_ptr("w", offset=offset), T.int64(k * 4))

    def dot(acc, a, b):
        return T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.uint8(acc), T.uint8(a),
                                  T.uint8(b))

    def zero(tile):
        return T.call_llvm_intrin("void", "llvm.x86.tilezero", T.uint8(tile))

    @T.prim_func
    def conv(A: T.Buffer((rows, c), "uint8"), B: T.Buffer((3, 3, c // 4, k * 4), "int8"),
             O: T.Buffer((blocks * 32, k), "int32"), config: T.Buffer((64,), "uint8")):
        T.func_attr({"global_symbol": symbol, "tir.noalias": True})
        for task in T.parallel(blocks * kb):
            m = task // kb
            n = task % kb
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", config.access_ptr("r")))
            T.evaluate(zero(0))
            T.evaluate(zero(1))
            T.evaluate(zero(2))
            T.evaluate(zero(3))
            for i, j, q in T.grid(3, 3, c // 64):
                T.evaluate(load(4, A, (m * 32 + i * wi + j) * c + q * 64, c))
                T.evaluate(load(5, A, (m * 32 + 16 + i * wi + j) * c + q * 64, c))
                T.evaluate(load(6, B, ((i * 3 + j) * (c // 4) + q * 16) * k * 4 + n * 128, k * 4))
                T.evaluate(load(7, B, ((i * 3 + j) * (c // 4) + q * 16) * k * 4 + n * 128 + 64,
                                k * 4))
                T.evaluate(dot(0, 4, 6))
                T.evaluate(dot(1, 4, 7))
                T.evaluate(dot(2, 5, 6))
                T.evaluate(dot(3, 5, 7))
            T.evaluate(store(0, O, m * 32 * k + n * 32))
            T.evaluate(store(1, O, m * 32 * k + n * 32 + 16))
            T.evaluate(store(2, O, (m * 32 + 16) * k + n * 32))
            T.evaluate(store(3, O, (m * 32 + 16) * k + n * 32 + 16))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    return conv, (rows, blocks, wi)


def tile_config() -> np.ndarray:
    """Palette 1, tiles 0-7 of 16 rows x 64 bytes (tiles 8-15 must stay zero)."""
    config = np.zeros(64, np.uint8)
    config[0] = 1
    config[16:32] = np.frombuffer(np.full(8, 64, np.uint16).tobytes(), np.uint8)
    config[48:56] = 16
    return config


def measure(channels: int, size: int, rounds: int, threads: int, queue) -> None:
    """One layer in this (fresh) process: check the AMX kernel, then time the three runners."""
    import torch
    import tvm

    import kernels
    from qcompile.backends.tvm import threads as pool

    if not amx_available():
        queue.put(None)
        return
    pool.configure(threads)
    torch.set_num_threads(threads)
    symbol = f"amx_conv_{channels}_{size}"
    func, (rows, blocks, wi) = conv_kernel(channels, size, symbol)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": threads})
    kernel = tvm.compile(tvm.IRModule({"main": func}), target)[symbol]
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, (size, size, channels)).astype(np.uint8)
    weight = rng.integers(-2, 2, (channels, channels, 3, 3)).astype(np.int8)
    padded = np.zeros((size + 2, wi, channels), np.uint8)
    padded[1:size + 1, 1:size + 1] = codes
    data = np.zeros((rows, channels), np.uint8)
    data[:padded.shape[0] * wi] = padded.reshape(-1, channels)
    c4 = channels // 4  # B[i, j, c // 4, k * 4 + c % 4] = weight[k, c, i, j]
    interleaved = (weight.transpose(2, 3, 1, 0).reshape(3, 3, c4, 4, channels)
                   .transpose(0, 1, 2, 4, 3).reshape(3, 3, c4, channels * 4))
    args = [tvm.runtime.tensor(a) for a in (data, np.ascontiguousarray(interleaved),
                                            np.zeros((blocks * 32, channels), np.int32),
                                            tile_config())]
    kernel(*args)
    got = args[2].numpy()[:size * wi].reshape(size, wi, channels)[:, :size]
    reference = torch.nn.functional.conv2d(
        torch.from_numpy(codes.transpose(2, 0, 1)[None].astype(np.float64)),
        torch.from_numpy(weight.astype(np.float64)), padding=1)[0].numpy().transpose(1, 2, 0)
    exact = bool(np.array_equal(got, reference.astype(np.int32)))
    runners = {"amx": lambda: kernel(*args),
               "ort int8": kernels.ort_runner(channels, size, threads, rng),
               "W2A2 popcount": kernels.tvm_runner(channels, size, 2, "signed", rng, packed=True)}
    times = {name: [] for name in runners}
    for call in runners.values():
        kernels.per_call(call, 3)
    for _ in range(rounds):  # as kernels.py does: a pause, two untimed calls, CALLS timed
        for name, call in runners.items():
            time.sleep(kernels.PAUSE)
            kernels.per_call(call, 2)
            times[name].append(kernels.per_call(call, CALLS))
    queue.put((exact, {name: statistics.median(t) * 1e3 for name, t in times.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(f"{args.threads} thread(s), {args.rounds} interleaved rounds; ms, median over rounds")
    print("| layer | exact | AMX | ort int8 | W2A2 popcount | AMX vs ort int8 | AMX vs W2A2 |")
    print("|---|---|---|---|---|---|---|")
    for channels, size in LAYERS:
        queue = context.Queue()
        process = context.Process(target=measure,
                                  args=(channels, size, args.rounds, args.threads, queue))
        process.start()
        result = queue.get()
        process.join()
        if result is None:
            print("AMX-INT8 is not available to this process (CPU or kernel)")
            sys.exit(1)
        exact, ms = result
        print(f"| {channels}->{channels} {size}x{size} | {exact} | {ms['amx']:.3f} | "
              f"{ms['ort int8']:.3f} | {ms['W2A2 popcount']:.3f} | "
              f"{ms['ort int8'] / ms['amx']:.2f}x | {ms['W2A2 popcount'] / ms['amx']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
