"""AVX-512 VNNI dot products as TVM tensor intrinsics, for ``sch.tensorize``.

``vpdpbusd`` adds to each of 16 int32 lanes the sum of 4 products of an unsigned byte and a
signed byte; ``vpdpwssd`` the sum of 2 products of signed 16-bit words. Both are exact (no
saturation) and do 64 and 32 multiply-adds per instruction, against 16 for an int32 ``vpmulld``.
Three shapes of each instruction are registered:

- ``broadcast``: ``c[i] += sum_j a[j] * b[i, j]``, one group of ``a`` (4 bytes or 2 words)
  broadcast to all lanes, ``b`` one group per lane. With lanes over output channels this is a
  convolution tile (the layout of oneDNN's and TVM's ``NCHW[x]c`` int8 convolutions);
- ``columns``: ``c[i] += sum_j a[i, j] * b[j]``, ``a`` contiguous and one group of ``b``
  broadcast. With lanes over output pixels of a row this is a convolution tile whose
  accumulators are rows of the NCHW output, stored without a transposition;
- ``lanes``: ``c[i] += sum_j a[i, j] * b[i, j]``, both operands contiguous, so a dense layer
  reads its weight rows as they are and sums the 16 lanes at the end.

TVM 0.27 ships a ``dot_16x4_vnni`` intrinsic, but it passes ``<16 x i32>`` operands, which the
LLVM 22 inside the wheel rejects (its ``vpdpbusd`` takes ``<64 x i8>``); these pass the byte
and word vectors LLVM 22 expects, so :func:`available` also asks for LLVM 22 or later.
"""

from dataclasses import dataclass

import tvm
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

LANES = 16
"""int32 lanes of an AVX-512 register."""


@dataclass(frozen=True)
class DotKind:
    """One VNNI instruction: ``group`` products of ``data`` and ``weight`` values per lane."""

    name: str
    data: str
    weight: str
    group: int
    instruction: str

    def vector(self, dtype: str) -> str:
        return f"{dtype}x{LANES * self.group}"


U8S8 = DotKind("u8s8", "uint8", "int8", 4, "llvm.x86.avx512.vpdpbusd.512")
S16S16 = DotKind("s16s16", "int16", "int16", 2, "llvm.x86.avx512.vpdpwssd.512")


def available(target: tvm.target.Target) -> bool:
    """Whether ``target`` is an LLVM CPU with AVX-512 VNNI that these intrinsics compile for."""
    if target.kind.name != "llvm" or tvm.target.codegen.llvm_version_major() < 22:
        return False
    return bool(tvm.target.codegen.llvm_cpu_has_features(["avx512vnni"], target))


def broadcast_intrinsic(kind: DotKind) -> str:
    """The registered name of ``c[i] += sum_j a[j] * b[i, j]`` (``c`` in local scope)."""
    name = f"qcompile_{kind.name}_broadcast"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_broadcast(kind))
    return name


def columns_intrinsic(kind: DotKind) -> str:
    """The registered name of ``c[i] += sum_j a[i, j] * b[j]`` (``c`` in local scope)."""
    name = f"qcompile_{kind.name}_columns"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_columns(kind))
    return name


def lanes_intrinsic(kind: DotKind) -> str:
    """The registered name of ``c[i] += sum_j a[i * group + j] * b[i * group + j]``."""
    name = f"qcompile_{kind.name}_lanes"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_lanes(kind))
    return name


def _broadcast(kind: DotKind):
    group, data, weight = kind.group, kind.data, kind.weight
    intrinsic = kind.instruction
    a_vector, b_vector = kind.vector(data), kind.vector(weight)
    a_group = f"{data}x{group}"

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((group,), data, offset_factor=1),
             b: T.Buffer((LANES, group), weight, offset_factor=1),
             c: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:group], b[0:LANES, 0:group])
            T.writes(c[0:LANES])
            for i, j in T.grid(LANES, group):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    c[vi] = c[vi] + T.cast(a[vj], "int32") * T.cast(b[vi, vj], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((group,), data, offset_factor=1),
             b: T.Buffer((LANES, group), weight, offset_factor=1),
             c: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:group], b[0:LANES, 0:group])
            T.writes(c[0:LANES])
            packed = T.reinterpret(a.vload([0], a_group), dtype="int32")
            c[T.ramp(T.int32(0), 1, LANES)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                c.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(packed, LANES), dtype=a_vector),
                b.vload([0, 0], dtype=b_vector),
                dtype="int32x16")

    return desc, impl


def _columns(kind: DotKind):
    group, data, weight = kind.group, kind.data, kind.weight
    intrinsic = kind.instruction
    a_vector, b_vector = kind.vector(data), kind.vector(weight)
    b_group = f"{weight}x{group}"

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((LANES, group), data, offset_factor=1),
             b: T.Buffer((group,), weight, offset_factor=1),
             c: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:LANES, 0:group], b[0:group])
            T.writes(c[0:LANES])
            for i, j in T.grid(LANES, group):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    c[vi] = c[vi] + T.cast(a[vi, vj], "int32") * T.cast(b[vj], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((LANES, group), data, offset_factor=1),
             b: T.Buffer((group,), weight, offset_factor=1),
             c: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:LANES, 0:group], b[0:group])
            T.writes(c[0:LANES])
            packed = T.reinterpret(b.vload([0], b_group), dtype="int32")
            c[T.ramp(T.int32(0), 1, LANES)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                c.vload([0], dtype="int32x16"),
                a.vload([0, 0], dtype=a_vector),
                T.reinterpret(T.broadcast(packed, LANES), dtype=b_vector),
                dtype="int32x16")

    return desc, impl


def _lanes(kind: DotKind):
    group, data, weight = kind.group, kind.data, kind.weight
    width = LANES * group
    intrinsic = kind.instruction
    a_vector, b_vector = kind.vector(data), kind.vector(weight)

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((width,), data, offset_factor=1),
             b: T.Buffer((width,), weight, offset_factor=1),
             c: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:width], b[0:width])
            T.writes(c[0:LANES])
            for i, j in T.grid(LANES, group):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    c[vi] = c[vi] + T.cast(a[vi * group + vj], "int32") * T.cast(
                        b[vi * group + vj], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((width,), data, offset_factor=1),
             b: T.Buffer((width,), weight, offset_factor=1),
             c: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:width], b[0:width])
            T.writes(c[0:LANES])
            c[T.ramp(T.int32(0), 1, LANES)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                c.vload([0], dtype="int32x16"),
                a.vload([0], dtype=a_vector),
                b.vload([0], dtype=b_vector),
                dtype="int32x16")

    return desc, impl
