"""Lowering of conv and linear layers: which kernel computes a layer, and with which parameters.

A conv runs on AMX (:mod:`.kernels.amx`) where the target has it and its codes and weights fit
bytes (:func:`.glue_plan.on_amx`), reading its input's AMX layout and writing its readers' where
the plan passes it between AMX convs. Otherwise a layer runs bit-serial
(:mod:`.kernels.bitserial`) when both operands are low-bit codes that stand for themselves
(:func:`.glue_plan.bit_serial`), reading and writing packed bit planes where the plan passes them
between bit-serial layers; else direct (:mod:`.kernels.direct`) on the integers its input codes
stand for, with the weight packed ahead of time. Always the requantization that is the layer's
only reader is its epilogue.
"""

import numpy as np

from qcompile import integer_ir as ir
from qcompile.backends.tvm import glue_plan
from qcompile.backends.tvm.kernels import amx, bitserial, bitserial_packed, direct
from qcompile.backends.tvm.kernels.epilogue import Epilogue
from qcompile.backends.tvm.stored_params import AmxWeight
from qcompile.errors import NotDeployableError


def plan_layer(builder, op, value: str, epilogue: Epilogue, extra: list) -> None:
    """Record the kernel call that computes conv or linear ``op`` into ``value``, its
    requantization ``epilogue`` (with its parameter arrays ``extra``) fused in: bit-serial when
    :func:`.glue_plan.bit_serial` allows, with packed planes in or out where the plan passes
    them, else a direct integer kernel on the materialized integers."""
    fmt = builder.graph.values[op.input]
    weight = op.weight
    shape_in = builder.shapes[op.input]
    conv = isinstance(op, ir.Conv)
    if conv and len(weight.shape) != 4:
        raise NotDeployableError(f"{op.layer}: the TVM backend compiles 2-d convolutions")
    tag = f"{shape_tag(shape_in)}_{shape_tag(weight.shape)}_{epilogue.tag}"
    if glue_plan.on_amx(op, builder.graph, builder.target):
        _plan_amx(builder, op, value, epilogue, extra)
        return
    if glue_plan.bit_serial(op, builder.graph, builder.target):
        alpha, beta = weight.affine
        packed_in, packed_out = op.input in builder.packed, value in builder.packed
        out_bits = builder.graph.values[value].bits if packed_out else 0
        layout = ("_pi" if packed_in else "") + (f"_po{out_bits}" if packed_out else "")
        symbol = f"bitserial_{'conv' if conv else 'dense'}_a{fmt.bits}w{weight.bits}" \
                 f"x{alpha}m{beta}_{tag}{layout}"
        if conv:
            build = lambda: bitserial.conv2d_kernel(  # noqa: E731
                shape_in, weight.words.shape, fmt.bits, weight.bits, weight.affine, op.stride,
                op.padding, op.dilation, epilogue, builder.target, packed_input=packed_in,
                packed_output=out_bits or False)
        else:
            build = lambda: bitserial.dense_kernel(  # noqa: E731
                shape_in, weight.words.shape, fmt.bits, weight.bits, weight.affine, epilogue,
                builder.target, packed_input=packed_in)
        builder.kernel_kinds[op.layer] = "bit-serial"
        data = f"{op.input}:packed" if packed_in else op.input
        words = np.ascontiguousarray(weight.words)
        if not packed_out:
            builder.call(value, symbol, build, [data, words, *extra])
            return
        builder.emit_packed(value, out_bits, lambda packed: builder.call(
            packed, symbol, build, [data, words, *extra], bitserial_packed.packed_dtype(
                builder.target), traced=False))
        return
    data = builder.materialized(op.input)
    integers = weight.integers.numpy()
    dtype = direct.weight_dtype(integers)
    span = (int(fmt.levels.min()), int(fmt.levels.max()))
    symbol = f"direct_{'conv' if conv else 'dense'}_{dtype}_{tag}_r{span[0]}_{span[1]}" + (
        f"_g{op.groups}s{shape_tag(op.stride)}p{shape_tag(op.padding)}"
        f"d{shape_tag(op.dilation)}" if conv else "")
    if conv:
        settings = (op.stride, op.padding, op.dilation, op.groups, builder.target, span)
        stored = direct.pack_conv2d_weight(integers.astype(dtype), shape_in, *settings)
        build = lambda: direct.conv2d_kernel(  # noqa: E731
            shape_in, integers.shape, dtype, op.stride, op.padding, op.dilation, op.groups,
            epilogue, builder.target, input_range=span, prepacked=True)
    else:
        stored = integers.astype(dtype)
        build = lambda: direct.dense_kernel(  # noqa: E731
            shape_in, integers.shape, dtype, epilogue, builder.target, input_range=span)
    builder.kernel_kinds[op.layer] = f"direct {dtype}"
    builder.call(value, symbol, build, [data, np.ascontiguousarray(stored), *extra])


def _plan_amx(builder, op, value: str, epilogue: Epilogue, extra: list) -> None:
    """An AMX conv from its input's layout into int32 NCHW or, where the plan stores the
    codes only that way, into its readers' layout."""
    conv = glue_plan.amx_geometry(op, builder.amx_layouts[op.input])
    output = builder.amx_layouts[value] if value in builder.amx_only else None
    symbol = f"amx_conv_{conv.tag}_{epilogue.tag}" + (f"_to_{output.tag}" if output else "")
    packed = op.weight
    stored = AmxWeight(packed.bits, tuple(packed.shape), packed.words,
                       packed.levels.numpy().astype(np.int8), conv.source.padded_channels,
                       conv.padded_out_channels)
    weight = stored.array()
    if sum(a.nbytes for a in stored.stored().values()) < weight.nbytes:
        builder.stored[id(weight)] = stored  # else the array itself is stored: 7 bits, C 33-64
    build = lambda: amx.conv2d_kernel(conv, epilogue, output, symbol)  # noqa: E731
    args = [builder.amx_input(op.input), weight, *extra]
    builder.kernel_kinds[op.layer] = "amx"
    if output is None:
        builder.call(value, symbol, build, args)
        return
    builder.emit_amx_layout(value, lambda stored: builder.call(
        stored, symbol, build, args, "uint8", traced=False))


def shape_tag(shape) -> str:
    """A shape as part of a kernel's symbol: ``1x64x56x56``, ``s`` for a scalar."""
    return "x".join(str(int(s)) for s in shape) if len(shape) else "s"
