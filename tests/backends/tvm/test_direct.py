"""The direct kernels against torch int64 convolution and linear: random shapes (grouped,
depthwise, strided, dilated), operand ranges, weight tables and epilogues; every VNNI layout;
Relax ``call_tir``; CUDA code generation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from kernel_cases import epilogues, run
from qcompile.backends.tvm.kernels import vnni
from qcompile.backends.tvm.kernels.direct import (
    Epilogue,
    conv2d_kernel,
    dense_kernel,
    pack_conv2d_weight,
    weight_dtype,
)
from qcompile.errors import ConfigError
from qcompile.requantization import apply_fixed_point, apply_staircase

CPU = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                         "num-cores": 2})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
HAS_VNNI = vnni.available(CPU)
ACTIVATIONS = {"signed8": (-128, 127), "unsigned8": (0, 255), "unsigned2": (0, 3),
               "bipolar8": (-255, 255), "wide": (-40000, 40000)}


def weights(rng, kind: str, shape) -> np.ndarray:
    """int8 codes, odd integers of a half-integer zero point, or a per-channel level table,
    in the dtype :func:`weight_dtype` picks for them."""
    if kind == "int8":
        values = rng.integers(-128, 128, shape)
    elif kind == "odd":
        values = 2 * rng.integers(0, 256, shape) - 255
    else:
        levels = rng.integers(-127, 128, (shape[0], 5))
        codes = rng.integers(0, 5, (shape[0], int(np.prod(shape[1:]))))
        values = np.take_along_axis(levels, codes, 1).reshape(shape)
    return values.astype(weight_dtype(values))


@st.composite
def conv_cases(draw):
    kernel, dilation = draw(st.sampled_from((1, 3, 7))), draw(st.sampled_from((1, 2)))
    padding, stride = draw(st.sampled_from((0, 1, 3))), draw(st.sampled_from((1, 2)))
    span = (kernel - 1) * dilation + 1 - 2 * padding
    h, w = (draw(st.integers(max(1, span), max(span, 1) + 12)) for _ in range(2))
    if draw(st.booleans()):
        w = 15 * stride + span  # rows of 16 output pixels, as the VNNI columns layout needs
    grouping = draw(st.sampled_from(("one", "grouped", "depthwise")))
    groups = {"one": 1, "grouped": draw(st.integers(2, 4)),
              "depthwise": draw(st.integers(1, 24))}[grouping]
    cg = 1 if grouping == "depthwise" else draw(st.integers(1, 12))
    kg = draw(st.integers(1, 2)) if grouping == "depthwise" else draw(st.integers(1, 40))
    n, activation = draw(st.integers(1, 2)), draw(st.sampled_from(sorted(ACTIVATIONS)))
    low, high = ACTIVATIONS[activation]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.integers(low, high + 1, (n, groups * cg, h, w)).astype(np.int32)
    weight = weights(rng, draw(st.sampled_from(("int8", "odd", "table"))),
                     (groups * kg, cg, kernel, kernel))
    acc = F.conv2d(torch.from_numpy(data).long(), torch.from_numpy(weight).long(), None, stride,
                   padding, dilation, groups)
    epilogue, extra, reference = draw(epilogues(groups * kg, int(acc.abs().max()) + 1))
    known = draw(st.booleans())
    return {"data": data, "weight": weight, "stride": stride, "padding": padding,
            "dilation": dilation, "groups": groups, "input_range": (low, high) if known else None,
            "epilogue": epilogue, "extra": extra, "expected": reference(acc).numpy(),
            "prepacked": draw(st.booleans())}


@settings(max_examples=30, deadline=None)
@given(conv_cases())
def test_conv_matches_torch(case):
    geometry = (case["stride"], case["padding"], case["dilation"], case["groups"])
    weight = case["weight"]
    if case["prepacked"]:
        weight = pack_conv2d_weight(weight, case["data"].shape, *geometry, CPU,
                                    input_range=case["input_range"])
    func = conv2d_kernel(case["data"].shape, case["weight"].shape, weight_dtype(case["weight"]),
                         *geometry, case["epilogue"], CPU, input_range=case["input_range"],
                         prepacked=case["prepacked"])
    got = run(func, CPU, [case["data"], weight, *case["extra"]], case["expected"].shape)
    np.testing.assert_array_equal(got, case["expected"])


@st.composite
def dense_cases(draw):
    n, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 200)), draw(st.integers(1, 40))
    low, high = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.integers(low, high + 1, (n, c)).astype(np.int32)
    weight = weights(rng, draw(st.sampled_from(("int8", "odd", "table"))), (k, c))
    acc = F.linear(torch.from_numpy(data).long(), torch.from_numpy(weight).long())
    epilogue, extra, reference = draw(epilogues(k, int(acc.abs().max()) + 1))
    known = draw(st.booleans())
    return {"data": data, "weight": weight, "input_range": (low, high) if known else None,
            "epilogue": epilogue, "extra": extra, "expected": reference(acc).numpy()}


@settings(max_examples=25, deadline=None)
@given(dense_cases())
def test_dense_matches_torch(case):
    func = dense_kernel(case["data"].shape, case["weight"].shape, weight_dtype(case["weight"]),
                        case["epilogue"], CPU, input_range=case["input_range"])
    got = run(func, CPU, [case["data"], case["weight"], *case["extra"]], case["expected"].shape)
    np.testing.assert_array_equal(got, case["expected"])


@pytest.mark.parametrize("levels", [15, 255])
def test_int32_threshold_tables_count_as_int64_ones_do(levels):
    """Thresholds at and around every accumulator of a wide dense layer (sums near +-2^31),
    stored int32 and int64: the same codes as the reference."""
    rng = np.random.default_rng(levels)
    rows, columns = rng.choice([-1, 1], (4, 1)), rng.choice([-1, 1], (6, 1))
    data = (rows * rng.integers(30000, 40001, (4, 512))).astype(np.int32)
    weight = (columns * rng.integers(80, 101, (6, 512))).astype(np.int16)
    acc = torch.from_numpy(data).long() @ torch.from_numpy(weight).long().T
    picked = rng.choice(acc.reshape(-1).numpy(), (6, levels)) + rng.integers(-1, 2, (6, levels))
    limit = int(acc.abs().max()) + 1
    assert 2**30 < int(acc.abs().min()) and limit < 2**31
    thresholds = np.sort(np.clip(picked, -limit, limit), axis=1)
    direction = rng.choice([-1, 1], 6).astype(np.int64)
    expected = apply_staircase(acc, torch.from_numpy(thresholds), torch.from_numpy(direction))
    for table in ("int64", "int32"):
        func = dense_kernel(data.shape, weight.shape, "int16",
                            Epilogue("thresholds", levels, True, table=table), CPU,
                            input_range=(-40000, 40000))
        got = run(func, CPU, [data, weight, thresholds.astype(table), direction], acc.shape)
        np.testing.assert_array_equal(got, expected.numpy())


LAYOUTS = [  # input, weight, stride, padding, groups, range, weight kind, layout in the symbol
    ((1, 3, 64, 64), (16, 3, 7, 7), 2, 3, 1, (-128, 127), "int8", "u8s8o128co"),
    ((1, 32, 7, 7), (64, 32, 3, 3), 1, 1, 1, (0, 255), "int8", "u8s8o0ch"),
    ((2, 16, 16, 16), (24, 16, 3, 3), 1, 1, 1, (-255, 255), "odd", "s16s16o0co"),
    ((1, 32, 9, 9), (64, 16, 3, 3), 2, 1, 2, (-7, 7), "table", "u8s8o7ch"),
    ((1, 24, 16, 16), (48, 8, 1, 1), 1, 0, 3, (0, 3), "int8", "u8s8o0co"),
    ((1, 16, 12, 12), (16, 1, 3, 3), 2, 1, 16, (-128, 127), "int8", "i32"),
    ((1, 8, 12, 12), (16, 8, 3, 3), 1, 1, 1, None, "int8", "i32"),
]


@pytest.mark.parametrize("shape_in,shape_w,stride,padding,groups,bounds,kind,layout", LAYOUTS)
def test_conv_layouts(shape_in, shape_w, stride, padding, groups, bounds, kind, layout):
    rng = np.random.default_rng(0)
    low, high = bounds or (-1000, 1000)
    data = rng.integers(low, high + 1, shape_in).astype(np.int32)
    weight = weights(rng, kind, shape_w)
    expected = F.conv2d(torch.from_numpy(data).long(), torch.from_numpy(weight).long(), None,
                        stride, padding, 1, groups).numpy()
    for prepacked in (False, True):
        packed = pack_conv2d_weight(weight, shape_in, stride, padding, 1, groups, CPU,
                                    input_range=bounds) if prepacked else weight
        func = conv2d_kernel(shape_in, shape_w, weight_dtype(weight), stride, padding, 1, groups,
                             Epilogue(), CPU, input_range=bounds, prepacked=prepacked)
        np.testing.assert_array_equal(run(func, CPU, [data, packed], expected.shape), expected)
        assert f"_{layout if HAS_VNNI else 'i32'}" in func.attrs["global_symbol"]


@pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("bounds,dtype,instruction", [((-128, 127), "int8", "vpdpbusd"),
                                                      ((-255, 255), "int16", "vpdpwssd")])
def test_vnni_instructions(bounds, dtype, instruction):
    conv = conv2d_kernel((1, 8, 16, 16), (32, 8, 3, 3), dtype, 1, 1, 1, 1, Epilogue(), CPU,
                         input_range=bounds)
    dense = dense_kernel((1, 256), (64, 256), dtype, Epilogue(), CPU, input_range=bounds)
    for func in (conv, dense):
        assembly = tvm.compile(tvm.IRModule({"main": func}), CPU).mod.inspect_source("asm")
        assert instruction in assembly


@pytest.mark.slow
def test_resnet18_first_and_last_layers():
    rng = np.random.default_rng(1)
    image = rng.integers(-128, 128, (1, 3, 224, 224)).astype(np.int32)
    conv_w = rng.integers(-128, 128, (64, 3, 7, 7)).astype(np.int8)
    conv = conv2d_kernel(image.shape, conv_w.shape, "int8", 2, 3, 1, 1, Epilogue(), CPU,
                         input_range=(-128, 127))
    expected = F.conv2d(torch.from_numpy(image).long(), torch.from_numpy(conv_w).long(), None,
                        2, 3).numpy()
    np.testing.assert_array_equal(run(conv, CPU, [image, conv_w], expected.shape), expected)
    features = rng.integers(0, 256, (1, 512)).astype(np.int32)
    fc_w = rng.integers(-128, 128, (1000, 512)).astype(np.int8)
    fc = dense_kernel(features.shape, fc_w.shape, "int8", Epilogue(), CPU, input_range=(0, 255))
    expected = F.linear(torch.from_numpy(features).long(), torch.from_numpy(fc_w).long()).numpy()
    np.testing.assert_array_equal(run(fc, CPU, [features, fc_w], expected.shape), expected)


def test_kernels_run_through_relax_call_tir():
    """Two kernels added to one Relax module (``bb.add_func``) and chained by ``call_tir``."""
    rng = np.random.default_rng(2)
    image = rng.integers(-128, 128, (1, 3, 12, 12)).astype(np.int32)
    conv_w = rng.integers(-128, 128, (8, 3, 3, 3)).astype(np.int8)
    fc_w = rng.integers(-128, 128, (5, 8 * 6 * 6)).astype(np.int8)
    thresholds = np.sort(rng.integers(-3000, 3000, (8, 3)), axis=1).astype(np.int64)
    direction = np.ones(8, np.int64)
    conv = conv2d_kernel(image.shape, conv_w.shape, "int8", 2, 1, 1, 1,
                         Epilogue("thresholds", 3), CPU, input_range=(-128, 127))
    fc = dense_kernel((1, 288), fc_w.shape, "int8", Epilogue(), CPU, input_range=(0, 3))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(image.shape, "int32"))
    params = [relax.const(a, str(a.dtype)) for a in (conv_w, thresholds, direction, fc_w)]
    with bb.function("main", [x]):
        with bb.dataflow():
            codes = bb.emit(relax.call_tir(bb.add_func(conv, "conv"), [x, *params[:3]],
                                           relax.TensorType((1, 8, 6, 6), "int32")))
            flat = bb.emit(relax.op.reshape(codes, (1, 288)))
            logits = bb.emit(relax.call_tir(bb.add_func(fc, "fc"), [flat, params[3]],
                                            relax.TensorType((1, 5), "int32")))
            output = bb.emit_output(logits)
        bb.emit_func_output(output)
    executable = tvm.compile(bb.get(), CPU)
    machine = relax.VirtualMachine(executable, tvm.cpu())
    got = machine["main"](tvm.runtime.tensor(image)).numpy()
    acc = F.conv2d(torch.from_numpy(image).long(), torch.from_numpy(conv_w).long(), None, 2, 1)
    codes = apply_staircase(acc, torch.from_numpy(thresholds), torch.from_numpy(direction))
    expected = F.linear(codes.reshape(1, -1), torch.from_numpy(fc_w).long()).numpy()
    np.testing.assert_array_equal(got, expected)


CUDA_CASES = [  # conv input, weight, groups, epilogue; dense input, weight, epilogue
    ((1, 3, 32, 32), (16, 3, 7, 7), 1, Epilogue()),
    ((2, 16, 14, 14), (16, 1, 3, 3), 16, Epilogue("thresholds", 3, False)),
    ((1, 8, 9, 9), (12, 4, 3, 3), 2, Epilogue("fixed_point", 15, True, 12)),
]


@pytest.mark.parametrize("shape_in,shape_w,groups,epilogue", CUDA_CASES)
def test_cuda_code_generation(shape_in, shape_w, groups, epilogue):
    conv = conv2d_kernel(shape_in, shape_w, "int8", 1, 1, 1, groups, epilogue, CUDA,
                         input_range=(-128, 127))
    dense = dense_kernel((2, 300), (40, 300), "int16", epilogue, CUDA)
    for func in (conv, dense):
        source = tvm.compile(tvm.IRModule({"main": func}), CUDA).mod.imports[0].inspect_source("")
        assert f"{func.attrs['global_symbol']}_kernel" in source
        assert "threadIdx.x" in source


@pytest.mark.gpu
@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA device")
@pytest.mark.parametrize("shape_in,shape_w,groups,epilogue", CUDA_CASES)
def test_cuda_matches_torch(shape_in, shape_w, groups, epilogue):
    rng = np.random.default_rng(3)
    data = rng.integers(-128, 128, shape_in).astype(np.int32)
    weight = rng.integers(-128, 128, shape_w).astype(np.int8)
    acc = F.conv2d(torch.from_numpy(data).long(), torch.from_numpy(weight).long(), None, 1, 1, 1,
                   groups)
    rows = shape_w[0] if epilogue.per_channel else 1
    extra = {"none": [],
             "thresholds": [np.sort(rng.integers(-5000, 5000, (rows, epilogue.levels)), 1),
                            np.ones(rows, np.int64)],
             "fixed_point": [np.full(rows, 300), np.full(rows, 2**11), np.ones(rows, np.int64)],
             }[epilogue.kind]
    extra = [a.astype(np.int64) for a in extra]
    if epilogue.kind == "thresholds":
        expected = apply_staircase(acc, *map(torch.from_numpy, extra))
    elif epilogue.kind == "fixed_point":
        expected = apply_fixed_point(acc, torch.from_numpy(extra[2]), torch.from_numpy(extra[0]),
                                     torch.from_numpy(extra[1]), epilogue.shift, epilogue.levels)
    else:
        expected = acc
    func = conv2d_kernel(shape_in, shape_w, "int8", 1, 1, 1, groups, epilogue, CUDA)
    got = run(func, CUDA, [data, weight, *extra], tuple(expected.shape))
    np.testing.assert_array_equal(got, expected.numpy())
    features = data.reshape(shape_in[0], -1)
    fc_w = rng.integers(-300, 300, (40, features.shape[1])).astype(np.int16)
    dense = dense_kernel(features.shape, fc_w.shape, "int16", Epilogue(), CUDA)
    expected = F.linear(torch.from_numpy(features).long(), torch.from_numpy(fc_w).long())
    np.testing.assert_array_equal(run(dense, CUDA, [features, fc_w], (shape_in[0], 40)),
                                  expected.numpy())


@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=20))
def test_weight_dtype_is_the_smallest_that_holds_the_weights(values):
    dtype = weight_dtype(np.array(values))
    info = np.iinfo(dtype)
    assert info.min <= min(values) and max(values) <= info.max
    smaller = {"int8": None, "int16": "int8", "int32": "int16"}[dtype]
    if smaller is not None:
        info = np.iinfo(smaller)
        assert min(values) < info.min or max(values) > info.max


@pytest.mark.parametrize("call", [
    lambda: conv2d_kernel((1, 6, 8, 8), (4, 4, 3, 3), "int8", 1, 1, 1, 2, Epilogue(), CPU),
    lambda: conv2d_kernel((1, 4, 8, 8), (4, 4, 3, 3), "int8", 0, 1, 1, 1, Epilogue(), CPU),
    lambda: conv2d_kernel((1, 4, 2, 2), (4, 4, 5, 5), "int8", 1, 0, 1, 1, Epilogue(), CPU),
    lambda: conv2d_kernel((1, 4, 8, 8), (4, 4, 3, 3), "uint8", 1, 1, 1, 1, Epilogue(), CPU),
    lambda: dense_kernel((1, 10), (4, 12), "int8", Epilogue(), CPU),
    lambda: dense_kernel((1, 10), (4, 10), "int8", Epilogue(), CPU, input_range=(5, 1)),
])
def test_bad_arguments_raise_config_errors(call):
    with pytest.raises(ConfigError):
        call()
