"""The bit-serial kernels against torch int64 convolution, on random shapes, forms and epilogues."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from kernel_cases import epilogues
from qcompile.backends.tvm.kernels.bitserial import (Epilogue, conv2d_kernel, dense_kernel,
                                                     pack_codes, packed_shape, unpack_codes)
from qcompile.errors import ConfigError
from qcompile.packing import pack_bits
from qcompile.requantization import apply_staircase

CPU = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                         "num-cores": 2})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
FORMS = ("unsigned", "signed", "bipolar")
LEVELS = st.integers(1, 15)
"""Code counts of the epilogues here: packed outputs hold at most 4 bits."""


def weight_integers(codes: np.ndarray, bits: int, form: str) -> np.ndarray:
    return {"unsigned": codes, "signed": codes - 2 ** (bits - 1),
            "bipolar": 2 * codes - (2**bits - 1)}[form]


def run(func: tvm.tirx.PrimFunc, target, arrays: list[np.ndarray], out_shape,
        out_dtype=np.int32) -> np.ndarray:
    device = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
    executable = tvm.compile(tvm.IRModule({"main": func}), target)
    args = [tvm.runtime.tensor(a, device) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype), device)
    executable.mod[func.attrs["global_symbol"]](*args, out)
    return out.numpy()


@st.composite
def conv_cases(draw, out_channels=st.integers(1, 40),
               kinds=("none", "thresholds", "fixed_point")):
    kernel, dilation = draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 2)))
    padding, stride = draw(st.sampled_from((0, 1))), draw(st.sampled_from((1, 2)))
    span = (kernel - 1) * dilation + 1 - 2 * padding
    h, w = (draw(st.integers(max(1, span), 12)) for _ in range(2))
    n, c, k = draw(st.integers(1, 2)), draw(st.integers(1, 80)), draw(out_channels)
    a_bits, w_bits, form = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(
        st.sampled_from(FORMS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.integers(0, 2**a_bits, (n, c, h, w)).astype(np.int32)
    codes = rng.integers(0, 2**w_bits, (k, c, kernel, kernel))
    acc = F.conv2d(torch.from_numpy(data).long(),
                   torch.from_numpy(weight_integers(codes, w_bits, form)).long(),
                   stride=stride, padding=padding, dilation=dilation)
    bound = int(acc.abs().max()) + 1
    epilogue, extra, reference = draw(epilogues(k, bound, kinds, LEVELS))
    return dict(data=data, codes=codes, a_bits=a_bits, w_bits=w_bits, form=form,
                stride=stride, padding=padding, dilation=dilation, epilogue=epilogue,
                extra=extra, expected=reference(acc).numpy())


def conv_func(case, target):
    return conv2d_kernel(case["data"].shape, case["codes"].shape, case["a_bits"], case["w_bits"],
                         case["form"], case["stride"], case["padding"], case["dilation"],
                         case["epilogue"], target)


def conv_arrays(case) -> list[np.ndarray]:
    return [case["data"], pack_bits(case["codes"], case["w_bits"], axis=1), *case["extra"]]


@settings(max_examples=25, deadline=None)
@given(conv_cases())
def test_conv2d_matches_torch(case):
    got = run(conv_func(case, CPU), CPU, conv_arrays(case), case["expected"].shape)
    np.testing.assert_array_equal(got, case["expected"])


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_dense_matches_torch(data):
    n, c, k = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 100)), data.draw(
        st.integers(1, 40))
    a_bits, w_bits = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    form = data.draw(st.sampled_from(FORMS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(0, 2**a_bits, (n, c)).astype(np.int32)
    codes = rng.integers(0, 2**w_bits, (k, c))
    acc = F.linear(torch.from_numpy(x).long(),
                   torch.from_numpy(weight_integers(codes, w_bits, form)).long())
    epilogue, extra, reference = data.draw(epilogues(k, int(acc.abs().max()) + 1,
                                                     levels=LEVELS))
    func = dense_kernel(x.shape, (w_bits, k, -(-c // 32)), a_bits, w_bits, form, epilogue, CPU)
    got = run(func, CPU, [x, pack_bits(codes, w_bits, axis=1), *extra], (n, k))
    np.testing.assert_array_equal(got, reference(acc).numpy())


@pytest.mark.parametrize("width, stride, form, a_bits, w_bits", [
    (40, 1, "signed", 2, 2),     # a row of 5 vectors: one tile, no accumulator classes
    (70, 1, "bipolar", 1, 1),    # 9 vectors: two tiles per row, a row not a multiple of 8
    (145, 2, "unsigned", 3, 2),  # stride 2 on a wide row
])
def test_wide_rows_match_torch(width, stride, form, a_bits, w_bits):
    """Rows wider than the hypothesis shapes take the other tilings of the CPU plan."""
    rng = np.random.default_rng(width)
    data = rng.integers(0, 2**a_bits, (1, 33, 3, width)).astype(np.int32)
    codes = rng.integers(0, 2**w_bits, (12, 33, 3, 3))
    acc = F.conv2d(torch.from_numpy(data).long(),
                   torch.from_numpy(weight_integers(codes, w_bits, form)).long(),
                   stride=stride, padding=1)
    case = dict(data=data, codes=codes, a_bits=a_bits, w_bits=w_bits, form=form,
                stride=stride, padding=1, dilation=1, epilogue=Epilogue("none"), extra=[])
    got = run(conv_func(case, CPU), CPU, conv_arrays(case), acc.shape)
    np.testing.assert_array_equal(got, acc.numpy())


def resnet_case(form="signed", epilogue=Epilogue("none")):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4, (1, 64, 8, 8)).astype(np.int32)
    codes = rng.integers(0, 4, (32, 64, 3, 3))
    acc = F.conv2d(torch.from_numpy(data).long(),
                   torch.from_numpy(weight_integers(codes, 2, form)).long(), padding=1)
    return dict(data=data, codes=codes, a_bits=2, w_bits=2, form=form, stride=1, padding=1,
                dilation=1, epilogue=epilogue, extra=[], expected=acc.numpy())


def test_kernel_runs_inside_a_relax_module():
    """Added with ``bb.add_func`` and called with ``call_tir``, as the lowering does."""
    case = resnet_case()
    func = conv_func(case, CPU)
    bb = relax.BlockBuilder()
    symbol = bb.add_func(func, func.attrs["global_symbol"])
    x = relax.Var("x", relax.TensorType(case["data"].shape, "int32"))
    wt = relax.Var("w", relax.TensorType(pack_bits(case["codes"], 2, axis=1).shape, "uint32"))
    with bb.function("main", [x, wt]):
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(symbol, [x, wt], relax.TensorType(
                case["expected"].shape, "int32")))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), CPU), tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(a) for a in conv_arrays(case)))
    np.testing.assert_array_equal(got.numpy(), case["expected"])


def test_kernel_names_differ_by_configuration():
    names = {conv_func(resnet_case(form), CPU).attrs["global_symbol"] for form in FORMS}
    assert len(names) == 3


def cuda_source(module) -> str:
    """The CUDA source among ``module`` and its imports (nested under the host module when the
    kernel was built inside a Relax module)."""
    if module.kind == "cuda":
        return module.inspect_source("")
    return "".join(cuda_source(m) for m in module.imports)


def test_cuda_kernel_uses_popc():
    """CUDA codegen needs no GPU: NVRTC compiles the source, which must count with ``__popc``."""
    source = cuda_source(tvm.compile(tvm.IRModule({"main": conv_func(resnet_case(), CUDA)}),
                                     CUDA).mod)
    assert "__popc" in source
    assert "blockIdx.x" in source


@pytest.mark.gpu
def test_cuda_kernel_matches_torch():
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA device")
    case = resnet_case("bipolar")
    np.testing.assert_array_equal(run(conv_func(case, CUDA), CUDA, conv_arrays(case),
                                      case["expected"].shape), case["expected"])


@pytest.mark.parametrize("change, message", [
    (dict(form="table"), "weight form"),
    (dict(w_bits=9), "weight bits"),
    (dict(weight_shape=(2, 8, 3, 3, 5)), "does not fit"),
    (dict(shape_in=(1, 64, 1, 1), padding=0), "no output pixel"),
])
def test_bad_configurations_say_what_is_wrong(change, message):
    args = dict(shape_in=(1, 64, 8, 8), weight_shape=(2, 8, 3, 3, 2), a_bits=2, w_bits=2,
                form="signed", stride=1, padding=1, dilation=1, epilogue=Epilogue("none"),
                target=CPU) | change
    with pytest.raises(ConfigError, match=message):
        conv2d_kernel(**args)


def packed(codes: np.ndarray, bits: int, target=CPU) -> np.ndarray:
    """The packed activation layout built from :func:`pack_bits`: its 32-bit words along the
    channels, read in pairs as 64-bit words on the CPU, moved to ``(N, bits, words, *spatial)``."""
    word = 32 if target.kind.name == "cuda" else 64
    planes = pack_bits(codes, bits, axis=1)
    words = -(-codes.shape[1] // word) * word // 32
    planes = np.concatenate([planes, np.zeros((*planes.shape[:-1], words - planes.shape[-1]),
                                              np.uint32)], axis=-1)
    wide = planes.view(np.uint64) if word == 64 else planes
    return np.ascontiguousarray(np.swapaxes(np.moveaxis(wide, -1, 2), 0, 1))


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_pack_codes_round_trips(data):
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 130)),
             *data.draw(st.lists(st.integers(1, 9), max_size=2)))
    bits = data.draw(st.integers(1, 8))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, 2**bits, shape).astype(np.int32)
    words = run(pack_codes(shape, bits, CPU), CPU, [codes], packed_shape(shape, bits, CPU),
                np.uint64)
    np.testing.assert_array_equal(words, packed(codes, bits))
    np.testing.assert_array_equal(run(unpack_codes(shape, bits, CPU), CPU, [words], shape), codes)


LAYOUTS = {"in": (True, False), "out": (False, True), "both": (True, True)}


@settings(max_examples=25, deadline=None)
@given(conv_cases(st.one_of(st.integers(1, 64), st.just(128)), ("thresholds", "fixed_point")),
       st.sampled_from(sorted(LAYOUTS)))
def test_packed_conv2d_matches_torch(case, layout):
    """Packed input, output or both against the int32 reference, re-laid out."""
    packed_input, packed_output = LAYOUTS[layout]
    func = conv2d_kernel(case["data"].shape, case["codes"].shape, case["a_bits"], case["w_bits"],
                         case["form"], case["stride"], case["padding"], case["dilation"],
                         case["epilogue"], CPU, packed_input=packed_input,
                         packed_output=packed_output)
    arrays = conv_arrays(case)
    if packed_input:
        arrays[0] = packed(case["data"], case["a_bits"])
    expected, out_bits = case["expected"], case["epilogue"].levels.bit_length()
    if packed_output:
        got = run(func, CPU, arrays, packed_shape(expected.shape, out_bits, CPU), np.uint64)
        np.testing.assert_array_equal(got, packed(expected, out_bits))
    else:
        np.testing.assert_array_equal(run(func, CPU, arrays, expected.shape), expected)


def quartiles(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor thresholds and direction that split ``acc`` into four codes of similar
    counts."""
    return np.quantile(acc, [0.25, 0.5, 0.75])[None].astype(np.int64), np.ones(1, np.int64)


def test_packed_output_takes_more_planes_than_the_codes_need():
    """Planes past the codes' bits are zero: the next layer may read more activation bits."""
    epilogue = Epilogue("thresholds", 3, False)
    case = resnet_case(epilogue=epilogue)
    thresholds, direction = quartiles(case["expected"])
    func = conv2d_kernel(case["data"].shape, case["codes"].shape, 2, 2, "signed", 1, 1, 1,
                         epilogue, CPU, packed_input=True, packed_output=4)
    arrays = [packed(case["data"], 2), pack_bits(case["codes"], 2, axis=1), thresholds,
              direction]
    got = run(func, CPU, arrays, packed_shape(case["expected"].shape, 4, CPU), np.uint64)
    expected = apply_staircase(torch.from_numpy(case["expected"]), torch.from_numpy(thresholds),
                               torch.from_numpy(direction)).numpy()
    np.testing.assert_array_equal(got, packed(expected, 4))
    assert not got[:, 2:].any() and got[:, 0].any() and got[:, 1].any()


@pytest.mark.parametrize("width, stride", [(70, 1), (145, 2)])
def test_packed_wide_rows_match_torch(width, stride):
    """Rows of several tiles, not a multiple of 8 pixels, packed in and out."""
    rng = np.random.default_rng(width)
    data = rng.integers(0, 4, (1, 40, 3, width)).astype(np.int32)
    codes = rng.integers(0, 2, (64, 40, 3, 3))
    acc = F.conv2d(torch.from_numpy(data).long(),
                   torch.from_numpy(weight_integers(codes, 1, "bipolar")).long(),
                   stride=stride, padding=1).numpy()
    thresholds, direction = quartiles(acc)
    func = conv2d_kernel(data.shape, codes.shape, 2, 1, "bipolar", stride, 1, 1,
                         Epilogue("thresholds", 3, False), CPU, packed_input=True,
                         packed_output=True)
    arrays = [packed(data, 2), pack_bits(codes, 1, axis=1), thresholds, direction]
    got = run(func, CPU, arrays, packed_shape(acc.shape, 2, CPU), np.uint64)
    expected = apply_staircase(torch.from_numpy(acc), torch.from_numpy(thresholds),
                               torch.from_numpy(direction)).numpy()
    np.testing.assert_array_equal(got, packed(expected, 2))


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_packed_dense_input_matches_torch(data):
    n, c, k = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 150)), data.draw(
        st.integers(1, 20))
    a_bits, w_bits = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(0, 2**a_bits, (n, c)).astype(np.int32)
    codes = rng.integers(0, 2**w_bits, (k, c))
    acc = F.linear(torch.from_numpy(x).long(),
                   torch.from_numpy(weight_integers(codes, w_bits, "bipolar")).long())
    func = dense_kernel(x.shape, codes.shape, a_bits, w_bits, "bipolar", Epilogue("none"), CPU,
                        packed_input=True)
    got = run(func, CPU, [packed(x, a_bits), pack_bits(codes, w_bits, axis=1)], (n, k))
    np.testing.assert_array_equal(got, acc.numpy())


def test_cuda_packed_kernels_use_popc():
    """A packed-in, packed-out conv on CUDA counts with ``__popc`` on 32-bit words."""
    func = conv2d_kernel((1, 64, 8, 8), (64, 64, 3, 3), 2, 2, "signed", 1, 1, 1,
                         Epilogue("fixed_point", 3, True, 16), CUDA, packed_input=True,
                         packed_output=True)
    script = func.script()
    for name in ("data", "opack"):
        assert f'{name}: T.Buffer((1, 2, 2, 8, 8), "uint32")' in script
    source = cuda_source(tvm.compile(tvm.IRModule({"main": func}), CUDA).mod)
    assert "__popc(" in source and "__popcll" not in source
    assert "blockIdx.x" in source


@pytest.mark.gpu
def test_cuda_packed_conv_matches_torch():
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA device")
    epilogue = Epilogue("thresholds", 3, False)
    case = resnet_case("bipolar", epilogue)
    thresholds, direction = quartiles(case["expected"])
    func = conv2d_kernel(case["data"].shape, case["codes"].shape, 2, 2, "bipolar", 1, 1, 1,
                         epilogue, CUDA, packed_input=True, packed_output=True)
    arrays = [packed(case["data"], 2, CUDA), pack_bits(case["codes"], 2, axis=1), thresholds,
              direction]
    got = run(func, CUDA, arrays, packed_shape(case["expected"].shape, 2, CUDA), np.uint32)
    expected = apply_staircase(torch.from_numpy(case["expected"]), torch.from_numpy(thresholds),
                               torch.from_numpy(direction)).numpy()
    np.testing.assert_array_equal(got, packed(expected, 2, CUDA))


@pytest.mark.parametrize("change, message", [
    (dict(epilogue=Epilogue("none")), "requantized codes"),
    (dict(packed_output=1), "need 2 to 8"),
    (dict(weight_shape=(96, 64, 3, 3)), "multiple of 64"),
])
def test_bad_packed_configurations_say_what_is_wrong(change, message):
    args = dict(shape_in=(1, 64, 8, 8), weight_shape=(64, 64, 3, 3), a_bits=2, w_bits=2,
                form="signed", stride=1, padding=1, dilation=1,
                epilogue=Epilogue("fixed_point", 3, True, 8), target=CPU,
                packed_output=True) | change
    with pytest.raises(ConfigError, match=message):
        conv2d_kernel(**args)
