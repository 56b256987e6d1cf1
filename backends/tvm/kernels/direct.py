"""Direct integer conv2d and dense: int32 activations times int8/16/32 weights, int32 sums.

These take every layer the bit-serial kernels do not: 8-bit layers (the first layer's signed
input, the classifier's), weights that are a per-channel table of learned levels, grouped and
depthwise convolutions, odd weights of a half-integer zero point. Exactly, in int32:

    acc[n, k, y, x] = sum_{c, i, j} w[k, c, i, j] a[n, g Cg + c, y s - p + i d, x s - p + j d]

with zero padding and ``g = k // (K / groups)``, followed by the shared :class:`Epilogue`.

On an LLVM CPU with AVX-512 VNNI, when the caller states the range of the activations
(``input_range``), the sum runs on VNNI dot products (:mod:`.vnni`). With int8 weights and at
most 256 activation values, activations are shifted by ``offset = -low`` into bytes
(``vpdpbusd``): the padding holds the offset too, so it still stands for 0, and
``acc = sum w (a + offset) - offset sum w``, the second term once per output channel. Otherwise,
activations and weights that fit int16 run on ``vpdpwssd``. Everything else (depthwise convs,
unknown ranges, int32 weights, other targets) runs as int32 multiply-adds (``plain``).
:mod:`.direct_schedules` lays out and schedules each kind.

A VNNI conv reads its weight reordered into vectors; :func:`pack_conv2d_weight` does that once
on the host (then ``conv2d_kernel(..., prepacked=True)``), else the kernel does it every call.
Weights come in the smallest of int8, int16 and int32 that holds them (:func:`weight_dtype`).
"""

import numpy as np
import tvm
from tvm import te

from qcompile.backends.tvm.kernels import direct_compute as compute
from qcompile.backends.tvm.kernels import direct_schedules as schedules
from qcompile.backends.tvm.kernels import vnni
from qcompile.backends.tvm.kernels.direct_compute import ConvShape
from qcompile.backends.tvm.kernels.epilogue import Epilogue
from qcompile.errors import ConfigError

__all__ = ["Epilogue", "conv2d_kernel", "dense_kernel", "pack_conv2d_weight", "weight_dtype"]

WEIGHT_DTYPES = ("int8", "int16", "int32")


def weight_dtype(integers: np.ndarray) -> str:
    """The smallest of int8, int16, int32 that holds every weight integer."""
    values = np.asarray(integers)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in WEIGHT_DTYPES:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ConfigError(f"weights in [{low}, {high}] do not fit int32")


def conv2d_kernel(shape_in, weight_shape, weight_dtype, stride, padding, dilation, groups,
                  epilogue: Epilogue, target, input_range=None, prepacked=False
                  ) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``(data, weight, *epilogue inputs, out)`` for a 2-d convolution.

    ``data`` int32 ``shape_in`` (N, C, H, W) holds activation integers, within ``input_range``
    ``(low, high)`` when given (which lets the VNNI kernels run); ``weight`` is
    ``weight_dtype`` (K, C / groups, kh, kw), ``weight_shape``; ``out`` int32 (N, K, OH, OW).
    ``stride``, ``padding`` (symmetric, zeros) and ``dilation`` are ints or (h, w) pairs.

    With ``prepacked`` the weight input is instead :func:`pack_conv2d_weight`'s array, packed
    once on the host, so the kernel does not reorder the weight on every call (for late
    layers, whose weights are large next to their activations, that reordering costs more than
    the convolution).
    """
    shape, plan = _conv_setup(shape_in, weight_shape, weight_dtype, stride, padding, dilation,
                              groups, target, input_range)
    if plan.form == "plain":
        tensors = compute.conv_plain(shape, weight_dtype, epilogue, plan.channels, plan.columns)
    elif plan.form == "columns":
        tensors = compute.conv_columns(shape, weight_dtype, plan.kind, plan.offset, epilogue,
                                       plan.channels, prepacked)
    else:
        tensors = compute.conv_channels(shape, weight_dtype, plan.kind, plan.offset, epilogue,
                                        plan.columns, prepacked)
    func = schedules.schedule_conv(te.create_prim_func(tensors), plan, shape, target)
    path = "i32" if plan.kind is None else f"{plan.kind.name}o{plan.offset}{plan.form[:2]}"
    packed = "_packed" if prepacked and plan.kind is not None else ""
    name = (f"direct_conv2d_{shape.tag}_{weight_dtype}_{path}{packed}_{epilogue.tag}_"
            f"{target.kind.name}")
    return _finish(func, name.replace("-", "m"))


def pack_conv2d_weight(weight: np.ndarray, shape_in, stride, padding, dilation, groups, target,
                       input_range=None) -> np.ndarray:
    """``weight`` (K, C / groups, kh, kw) in the layout ``conv2d_kernel(..., prepacked=True)``
    reads for the same arguments: a VNNI layout's zero-padded, reordered weight in the
    instruction's dtype, or the weight itself where the kernel runs without VNNI."""
    weight = np.asarray(weight)
    shape, plan = _conv_setup(shape_in, weight.shape, str(weight.dtype), stride, padding,
                              dilation, groups, target, input_range)
    if plan.kind is None:
        return np.ascontiguousarray(weight)
    form, q, kh, kw = plan.form, plan.kind.group, shape.kh, shape.kw
    packed_shape, axes = compute.weight_layout(shape, plan.kind, form,
                                               plan.channels if form == "columns" else 16)
    blocks = packed_shape[1:2] if form == "columns" else (packed_shape[1], packed_shape[5])
    padded = np.zeros((shape.groups, int(np.prod(blocks)), packed_shape[2] * q, kh, kw),
                      plan.kind.weight)
    padded[:, :shape.kg, :shape.cg] = weight.reshape(shape.groups, shape.kg, shape.cg, kh, kw)
    view = padded.reshape(shape.groups, *blocks, packed_shape[2], q, kh, kw)
    return np.ascontiguousarray(view.transpose(axes))


def dense_kernel(shape_in, weight_shape, weight_dtype, epilogue: Epilogue, target,
                 input_range=None) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``(data, weight, *epilogue inputs, out)`` for a dense layer.

    ``data`` int32 (N, C), within ``input_range`` ``(low, high)`` when given; ``weight``
    ``weight_dtype`` (K, C); ``out`` int32 (N, K). The weight rows are read as they are, so
    VNNI runs only where the weight dtype is the instruction's (int8 bytes, int16 words).
    """
    n, c = _positive(shape_in, 2, "dense input")
    k, c_w = _positive(weight_shape, 2, "dense weight")
    if c_w != c:
        raise ConfigError(f"dense weight {tuple(weight_shape)} does not fit {c} input features")
    _check_dtype(weight_dtype)
    kind, offset = _dot_kind(target, weight_dtype, input_range, c)
    if kind is not None and kind.weight != weight_dtype:
        kind, offset = None, 0
    if target.kind.name == "cuda":
        tensors = compute.dense_simple(n, c, k, weight_dtype, epilogue)
    else:
        tensors = compute.dense_lanes(n, c, k, weight_dtype, kind, offset, epilogue)
    func = schedules.schedule_dense(te.create_prim_func(tensors), kind, target)
    path = "i32" if kind is None else f"{kind.name}o{offset}"
    name = f"direct_dense_n{n}c{c}_k{k}_{weight_dtype}_{path}_{epilogue.tag}_{target.kind.name}"
    return _finish(func, name.replace("-", "m"))


def _conv_setup(shape_in, weight_shape, weight_dtype, stride, padding, dilation, groups,
                target, input_range) -> tuple[ConvShape, schedules.ConvPlan]:
    shape = _conv_shape(shape_in, weight_shape, stride, padding, dilation, groups)
    _check_dtype(weight_dtype)
    kind, offset = _dot_kind(target, weight_dtype, input_range, shape.cg)
    return shape, schedules.conv_plan(shape, kind, offset, target)


def byte_dot_products(target, weight_dtype: str, input_range, reduction: int) -> bool:
    """Whether a direct layer of ``weight_dtype`` weights, activations in ``input_range`` and
    ``reduction`` products per group and output runs on VNNI byte dot products (``vpdpbusd``)."""
    return _dot_kind(target, weight_dtype, input_range, reduction)[0] is vnni.U8S8


def _dot_kind(target, dtype: str, input_range, reduction: int
              ) -> tuple[vnni.DotKind | None, int]:
    """The VNNI kind and activation offset for these operands, or ``(None, 0)``."""
    if input_range is None or not vnni.available(target):
        return None, 0
    low, high = (int(v) for v in input_range)
    if low > high:
        raise ConfigError(f"input_range must be (low, high) with low <= high, got {input_range}")
    if dtype == "int8" and high - low <= 255 and reduction >= 2:
        return vnni.U8S8, 0 if 0 <= low and high <= 255 else -low
    if dtype in ("int8", "int16") and -(2**15) <= low and high < 2**15 and reduction >= 2:
        return vnni.S16S16, 0
    return None, 0


def _conv_shape(shape_in, weight_shape, stride, padding, dilation, groups) -> ConvShape:
    n, c, h, w = _positive(shape_in, 4, "conv input")
    k, cg, kh, kw = _positive(weight_shape, 4, "conv weight")
    groups = int(groups)
    if groups < 1 or c % groups or k % groups or cg != c // groups:
        raise ConfigError(f"conv weight {tuple(weight_shape)} with groups={groups} does not fit "
                          f"{c} input channels: expected (K, {c} / groups, kh, kw), K and "
                          "C divisible by groups")
    shape = ConvShape(n, c, h, w, k, kh, kw, groups, _pair(stride, "stride", 1),
                      _pair(padding, "padding", 0), _pair(dilation, "dilation", 1))
    if min(shape.out) < 1:
        raise ConfigError(f"conv of a {h}x{w} input with a {kh}x{kw} kernel, padding "
                          f"{shape.padding} and dilation {shape.dilation} has no output pixel")
    return shape


def _check_dtype(dtype: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")


def _positive(shape, rank: int, what: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) != rank or min(shape) < 1:
        raise ConfigError(f"{what} shape must be {rank} positive sizes, got {shape}")
    return shape


def _pair(value, name: str, low: int) -> tuple[int, int]:
    pair = (int(value),) * 2 if np.ndim(value) == 0 else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < low:
        raise ConfigError(f"conv2d {name} must be an int >= {low} or an (h, w) pair of them, "
                          f"got {value!r}")
    return pair


def _finish(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
    """Name the kernel and mark it scheduled and opaque, so Relax neither re-schedules
    (dlight skips ``tirx.is_scheduled``) nor fuses it (``op_pattern`` 8 is opaque)."""
    return func.with_attrs({"global_symbol": name, "tirx.is_scheduled": True, "op_pattern": 8})
