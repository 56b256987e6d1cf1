"""The glue kernels (pooling, add, requantize, reshape, concat) against torch on random shapes,
windows and thresholds, built for this CPU; pooling's windows in closed form against torch's;
affine terms and table requantization against the reference staircase."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.backends.tvm.kernels import amx, glue, pooling
from qcompile.backends.tvm.kernels.bitserial_packed import pack_codes, packed_shape, unpack_codes
from qcompile.backends.tvm.kernels.epilogue import Epilogue
from qcompile.requantization import apply_fixed_point, apply_staircase

CPU = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                         "num-cores": 2})
EXAMPLES = settings(max_examples=8, deadline=None)


def run(func, *arrays, out_shape, dtype="int32") -> np.ndarray:
    built = tvm.compile(tvm.IRModule({"main": func}), CPU)
    device = tvm.cpu(0)
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype), device)
    built["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays], out)
    return out.numpy()


@given(length=st.integers(1, 40), size=st.integers(1, 12))
def test_adaptive_windows_are_torchs(length, size):
    """On a ramp, torch's adaptive max pool finds each window's last position, and its max of
    the negated ramp the first."""
    ramp = torch.arange(length, dtype=torch.float64).reshape(1, 1, length)
    stops = F.adaptive_max_pool1d(ramp, size).reshape(-1).long() + 1
    starts = -F.adaptive_max_pool1d(-ramp, size).reshape(-1).long()
    assert pooling.adaptive_windows(length, size).bounds() == list(
        zip(starts.tolist(), stops.tolist()))


@st.composite
def fixed_pools(draw):
    kernel = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, kernel // 2))
    h, w = draw(st.integers(kernel, 13)), draw(st.integers(kernel, 13))
    return (h, w), kernel, stride, padding, draw(st.booleans())


@EXAMPLES
@given(pool=fixed_pools(), channels=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_max_pool_is_torchs(pool, channels, seed):
    (h, w), kernel, stride, padding, ceil_mode = pool
    x = np.random.default_rng(seed).integers(-2**20, 2**20, (1, channels, h, w)).astype("int32")
    expected = F.max_pool2d(torch.from_numpy(x).double(), kernel, stride, padding,
                            ceil_mode=ceil_mode).numpy()
    windows = [pooling.fixed_windows(n, kernel, stride, padding, 1, ceil_mode) for n in (h, w)]
    func = pooling.window_pool(x.shape, windows, "max", CPU, "maxpool")
    np.testing.assert_array_equal(run(func, x, out_shape=expected.shape), expected)


@EXAMPLES
@given(pool=fixed_pools(), channels=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_fixed_max_pool_is_torchs(pool, channels, seed):
    """The padded, vectorized max pool, with values down to INT32_MIN (odd sizes, ceil mode,
    rows that are and are not a multiple of the vector)."""
    (h, w), kernel, stride, padding, ceil_mode = pool
    x = np.random.default_rng(seed).integers(-2**31, 2**31, (2, channels, h, w)).astype("int32")
    expected = F.max_pool2d(torch.from_numpy(x).double(), kernel, stride, padding,
                            ceil_mode=ceil_mode).numpy()
    counts = tuple(pooling.fixed_windows(n, kernel, stride, padding, 1, ceil_mode).count
                   for n in (h, w))
    func = pooling.fixed_pool(x.shape, (kernel,) * 2, (stride,) * 2, (padding,) * 2, counts,
                              "max", CPU, "maxpool")
    np.testing.assert_array_equal(run(func, x, out_shape=expected.shape), expected)


@EXAMPLES
@given(pool=fixed_pools(), channels=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_signed_max_pool_is_torchs_of_the_signed_input(pool, channels, seed):
    """A per-channel sign before the max: the minimum where the sign is -1."""
    (h, w), kernel, stride, padding, ceil_mode = pool
    rng = np.random.default_rng(seed)
    x = rng.integers(-2**30, 2**30, (1, channels, h, w)).astype("int32")
    sign = rng.choice([-1, 1], channels).astype("int32")
    signed = torch.from_numpy(x * sign.reshape(1, -1, 1, 1)).double()
    expected = F.max_pool2d(signed, kernel, stride, padding, ceil_mode=ceil_mode).numpy()
    func = pooling.fixed_pool(x.shape, (kernel,) * 2, (stride,) * 2, (padding,) * 2,
                              expected.shape[2:], "max", CPU, "maxpool", signed=True)
    np.testing.assert_array_equal(run(func, x, sign, out_shape=expected.shape), expected)


@EXAMPLES
@given(pool=fixed_pools(), scale=st.integers(-3, 3), offset=st.integers(-200, 200),
       seed=st.integers(0, 2**31 - 1))
def test_fixed_sum_pool_of_terms_is_torchs(pool, scale, offset, seed):
    """Sum pooling of ``scale * x + offset``: the padding counts as 0, not as ``offset``."""
    (h, w), kernel, stride, padding, _ = pool
    x = np.random.default_rng(seed).integers(0, 256, (1, 3, h, w)).astype("int32")
    integers = torch.from_numpy(x).double() * scale + offset
    expected = F.avg_pool2d(integers, kernel, stride, padding, divisor_override=1).numpy()
    counts = expected.shape[2:]
    func = pooling.fixed_pool(x.shape, (kernel,) * 2, (stride,) * 2, (padding,) * 2, counts,
                              "sum", CPU, "sumpool", glue.Terms((scale,), offset))
    np.testing.assert_array_equal(run(func, x, out_shape=expected.shape), expected)


@EXAMPLES
@given(length=st.integers(1, 9), size=st.integers(1, 4), scale=st.integers(-2, 2),
       offset=st.integers(-128, 128), seed=st.integers(0, 2**31 - 1))
def test_adaptive_sum_pool_of_terms_is_exact(length, size, scale, offset, seed):
    size = min(size, length)
    x = np.random.default_rng(seed).integers(0, 256, (1, 2, length, length)).astype("int32")
    windows = [pooling.adaptive_windows(length, size)] * 2
    bounds = windows[0].bounds()
    integers = x.astype(np.int64) * scale + offset
    expected = np.array([[[[integers[0, c, r0:r1, c0:c1].sum() for c0, c1 in bounds]
                           for r0, r1 in bounds] for c in range(2)]])
    func = pooling.window_pool(x.shape, windows, "sum", CPU, "sumpool",
                               glue.Terms((scale,), offset))
    np.testing.assert_array_equal(run(func, x, out_shape=expected.shape), expected)


@EXAMPLES
@given(pool=fixed_pools(), adaptive=st.booleans(), channels=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_sum_pool_is_torchs(pool, adaptive, channels, seed):
    (h, w), kernel, stride, padding, _ = pool
    x = np.random.default_rng(seed).integers(-2**12, 2**12, (2, channels, h, w)).astype("int32")
    t = torch.from_numpy(x).double()
    if adaptive:
        size = (max(1, h // 2), max(1, w // 3))
        windows = [pooling.adaptive_windows(length, n) for length, n in zip((h, w), size)]
        rows, cols = (w_.bounds() for w_ in windows)
        expected = np.array([[[[x[b, c, r0:r1, c0:c1].astype(np.int64).sum()
                                for c0, c1 in cols] for r0, r1 in rows]
                              for c in range(channels)] for b in range(2)])
    else:
        expected = F.avg_pool2d(t, kernel, stride, padding, divisor_override=1).numpy()
        windows = [pooling.fixed_windows(n, kernel, stride, padding, 1, False) for n in (h, w)]
    func = pooling.window_pool(x.shape, windows, "sum", CPU, "sumpool")
    np.testing.assert_array_equal(run(func, x, out_shape=expected.shape), expected)


@EXAMPLES
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 9),
                       st.integers(1, 9)),
       scales=st.lists(st.integers(-2, 2), min_size=1, max_size=3),
       offset=st.integers(-2**20, 2**20), seed=st.integers(0, 2**31 - 1))
def test_add_of_terms_is_exact(shape, scales, offset, seed):
    """Codes whose levels are ``a u + b`` summed without a lookup: ``sum a_k x_k + b``."""
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(-2**26, 2**26, shape).astype("int32") for _ in scales]
    func = glue.add(shape, glue.Terms(tuple(scales), offset), CPU, "add")
    expected = sum(a * x.astype(np.int64) for a, x in zip(scales, inputs)) + offset
    np.testing.assert_array_equal(run(func, *inputs, out_shape=shape), expected)


@EXAMPLES
@given(channels=st.integers(1, 6), levels=st.sampled_from((1, 3, 15, 255)),
       per_channel=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_table_requantize_of_an_add_is_the_reference_staircase(channels, levels, per_channel,
                                                              seed):
    """``table[row, V - low]`` with the table from the staircase on the whole range, ``V`` a
    folded add of two code tensors (levels ``u - 128``)."""
    rng = np.random.default_rng(seed)
    shape = (1, channels, 4, 5)
    codes = [rng.integers(0, 256, shape).astype("int32") for _ in range(2)]
    terms = glue.Terms((1, 1), -256)
    v = torch.from_numpy(codes[0].astype(np.int64) + codes[1] - 256)
    rows = channels if per_channel else 1
    thresholds = torch.from_numpy(np.sort(rng.integers(-300, 300, (rows, levels)), axis=1))
    direction = torch.from_numpy(rng.choice([-1, 1], rows))
    values = torch.arange(-256, 255).expand(1, rows, 511)
    table = glue.narrow(apply_staircase(values, thresholds, direction)[0].numpy())
    assert table.dtype == np.uint8
    func = glue.requantize_table(shape, terms, -256, table.shape, str(table.dtype), CPU, "table")
    expected = apply_staircase(v, thresholds, direction).numpy()
    np.testing.assert_array_equal(run(func, *codes, table, out_shape=shape), expected)


@EXAMPLES
@given(channels=st.integers(1, 6), levels=st.sampled_from((1, 3, 15, 40, 255)),
       per_channel=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_requantize_is_the_reference_staircase(channels, levels, per_channel, seed):
    rng = np.random.default_rng(seed)
    shape = (1, channels, 5, 7)
    acc = rng.integers(-3000, 3000, shape).astype("int32")
    rows = channels if per_channel else 1
    thresholds = np.sort(rng.integers(-3000, 3000, (rows, levels)), axis=1).astype("int64")
    direction = rng.choice([-1, 1], rows).astype("int64")
    func = glue.requantize(shape, Epilogue("thresholds", levels, per_channel), channels, CPU,
                           "requantize")
    expected = apply_staircase(torch.from_numpy(acc).long(), torch.from_numpy(thresholds),
                               torch.from_numpy(direction)).numpy()
    np.testing.assert_array_equal(run(func, acc, thresholds, direction, out_shape=shape),
                                  expected)


def requantization_of_an_add(rng, shape, levels: int, table: bool, **stored):
    """A requantization (by per-channel thresholds, or by a table of them) of a folded add of
    two code tensors, stored as ``stored`` says; its inputs; the reference staircase's codes."""
    channels = shape[1]
    codes = [rng.integers(0, 256, shape).astype("int32") for _ in range(2)]
    terms = glue.Terms((1, 1), -256)
    v = torch.from_numpy(codes[0].astype(np.int64) + codes[1] - 256)
    thresholds = torch.from_numpy(np.sort(rng.integers(-300, 300, (channels, levels)), axis=1))
    direction = torch.from_numpy(rng.choice([-1, 1], channels))
    expected = apply_staircase(v, thresholds, direction).numpy()
    if table:
        values = torch.arange(-256, 255).expand(1, channels, 511)
        lookup = glue.narrow(apply_staircase(values, thresholds, direction)[0].numpy())
        func = glue.requantize_table(shape, terms, -256, lookup.shape, str(lookup.dtype), CPU,
                                     "table", **stored)
        return func, [*codes, lookup], expected
    func = glue.requantize(shape, Epilogue("thresholds", levels, True), channels, CPU,
                           "requantize", terms, **stored)
    return func, [*codes, thresholds.numpy(), direction.numpy()], expected


@settings(max_examples=12, deadline=None)
@given(channels=st.sampled_from((1, 5, 64, 65, 128)),
       spatial=st.lists(st.integers(1, 17), max_size=2), levels=st.sampled_from((1, 3, 7, 15)),
       table=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_packed_requantize_stores_the_reference_codes_as_packed_planes(channels, spatial, levels,
                                                                       table, seed):
    """A requantization of a folded add, by thresholds or by a table, stored as the packed planes
    that bit-serial layers read: the words are those of the reference staircase's codes."""
    shape = (1, channels, *spatial)
    bits = levels.bit_length()
    func, inputs, expected = requantization_of_an_add(np.random.default_rng(seed), shape, levels,
                                                      table, packed_bits=bits)
    expected = expected.astype("int32")
    words = run(func, *inputs, out_shape=packed_shape(shape, bits, CPU), dtype="uint64")
    reference = run(pack_codes(shape, bits, CPU), expected,
                    out_shape=packed_shape(shape, bits, CPU), dtype="uint64")
    np.testing.assert_array_equal(words, reference)
    np.testing.assert_array_equal(
        run(unpack_codes(shape, bits, CPU), words, out_shape=shape), expected)


@settings(max_examples=12, deadline=None)
@given(channels=st.sampled_from((1, 5, 64, 65)), h=st.integers(1, 9), w=st.integers(1, 9),
       pad=st.integers(0, 2), levels=st.sampled_from((1, 3, 15, 255)), table=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_requantize_stores_the_reference_codes_in_an_amx_layout(channels, h, w, pad, levels,
                                                                table, seed):
    """A requantization of a folded add, by thresholds or by a table, stored in the padded
    channels-last layout AMX convs read (no AMX instruction: it runs on any CPU): the codes of
    the reference staircase (the border is the packing kernel's, tested with it)."""
    shape = (1, channels, h, w)
    layout = amx.Layout(1, channels, h, w, pad, (h + 2 * pad) * (w + 2 * pad) + 7)
    func, inputs, expected = requantization_of_an_add(np.random.default_rng(seed), shape, levels,
                                                      table, layout=layout)
    stored = run(func, *inputs, out_shape=layout.shape, dtype="uint8")
    image = layout.image_rows
    np.testing.assert_array_equal(stored[:, :image], layout.to_layout(expected)[:, :image])


@EXAMPLES
@given(channels=st.integers(1, 6), shift=st.integers(0, 12), seed=st.integers(0, 2**31 - 1))
def test_fixed_point_requantize_of_terms_is_the_reference(channels, shift, seed):
    rng = np.random.default_rng(seed)
    shape = (1, channels, 3, 8)
    codes = [rng.integers(0, 256, shape).astype("int32") for _ in range(2)]
    multiplier = rng.integers(1, 2**12, channels)
    offset = rng.integers(-2**16, 2**16, channels)
    direction = rng.choice([-1, 1], channels)
    v = torch.from_numpy(codes[0].astype(np.int64) - 2 * codes[1] + 7)
    expected = apply_fixed_point(v, *(torch.from_numpy(a) for a in (direction, multiplier,
                                                                      offset)), shift, 15)
    func = glue.requantize(shape, Epilogue("fixed_point", 15, True, shift), channels, CPU,
                           "requantize", glue.Terms((1, -2), 7))
    got = run(func, *codes, multiplier, offset, direction, out_shape=shape)
    np.testing.assert_array_equal(got, expected.numpy())


@EXAMPLES
@given(scale=st.floats(1e-3, 1.0), zero_point=st.integers(-3, 3), seed=st.integers(0, 2**31 - 1))
def test_input_quantize_rounds_as_the_float32_reference(scale, zero_point, seed):
    """Inputs at and one float32 step either side of every rounding tie ``(k + 1/2) scale``:
    the kernel divides in float32, as the reference's 0-d scale makes torch do."""
    ties = ((np.arange(-140, 140) + 0.5) * scale).astype("float32")
    near = np.concatenate([np.nextafter(ties, -np.inf), ties, np.nextafter(ties, np.inf)])
    rng = np.random.default_rng(seed)
    x = np.concatenate([near, rng.standard_normal(60).astype("float32") * 100 * scale])
    x = x.reshape(1, 1, 1, -1)
    quantized = torch.round(torch.from_numpy(x) / torch.tensor(scale, dtype=torch.float64))
    expected = torch.clamp(quantized + zero_point, -128, 127).numpy().astype(np.int64) + 128
    func = glue.quantize_affine(x.shape, scale, zero_point, -128, 127, -128, -np.inf, np.inf,
                                CPU, "quantize")
    np.testing.assert_array_equal(run(func, x, out_shape=x.shape), expected)


def assert_counts_thresholds_reached(thresholds, clamp, rng, form="line"):
    """The input quantization by ``thresholds`` counts those a float32 input reaches: at each
    threshold, one float32 step either side, at random and far outside."""
    count = len(thresholds)
    spacing = (thresholds.max() - thresholds.min()) / (count - 1)
    line = thresholds.min() + spacing * np.arange(count)
    guess = glue.threshold_line(thresholds)
    assert (guess is not None) == (form == "line")
    at = thresholds.astype("float32")
    x = np.concatenate([np.nextafter(at, -np.inf), at, np.nextafter(at, np.inf),
                        (rng.standard_normal(50) * spacing * count).astype("float32"),
                        np.float32([-1e30, 1e30, line[0] - 3 * spacing, line[-1] + 3 * spacing])])
    x = x.astype("float32").reshape(1, 1, 1, -1)
    low, high = (float(line[count // 4]), float(line[3 * count // 4])) if clamp else (
        -np.inf, np.inf)
    expected = (np.clip(x.astype("float64"), low, high)[..., None] >= thresholds).sum(-1)
    func = glue.quantize_thresholds(x.shape, count, low, high, CPU, "quantize",
                                    ordered=form != "unsorted", line=guess)
    np.testing.assert_array_equal(run(func, x, thresholds, out_shape=x.shape), expected)


@pytest.mark.parametrize("jitter", ["none", "alternating", "random"])
@pytest.mark.parametrize("clamp", [False, True])
def test_input_quantize_guesses_from_a_line_of_thresholds(jitter, clamp):
    """Thresholds up to a fifth of their spacing off the line (the ends on it): the guess and
    its window count exactly where a threshold sits above or below its place on the line."""
    rng = np.random.default_rng(0)
    count, spacing = 255, 0.0123
    offsets = {"none": np.zeros(count), "alternating": 0.2 * (-1.0) ** np.arange(count),
               "random": rng.uniform(-0.2, 0.2, count)}[jitter]
    offsets[[0, -1]] = 0
    thresholds = -1.3 + spacing * (np.arange(count) + offsets)
    assert_counts_thresholds_reached(thresholds, clamp, rng)


@EXAMPLES
@given(count=st.integers(17, 255), form=st.sampled_from(["sorted", "unsorted"]),
       clamp=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_input_quantize_by_thresholds_off_a_line_counts_those_reached(count, form, clamp, seed):
    """Sorted thresholds in two levels, others one by one."""
    rng = np.random.default_rng(seed)
    thresholds = rng.uniform(-10, 10, count)
    assert_counts_thresholds_reached(np.sort(thresholds) if form == "sorted" else thresholds,
                                     clamp, rng, form)


def test_thresholds_off_their_line_are_not_guessed_from_it():
    line = 0.5 * np.arange(40)
    assert glue.threshold_line(line) == (0.0, 0.5)
    moved = line.copy()
    moved[20] += 0.13  # more than a quarter of the spacing off
    assert glue.threshold_line(moved) is None
    assert glue.threshold_line(line[:16]) is None  # few enough to compare one by one


def test_input_quantize_loads_rows_as_vectors():
    """Each row is loaded as whole vectors: a rounding that TVM's vectorizer leaves as scalar
    calls made LLVM revectorize across the row's vectors with gathers (ResNet-18's input
    quantization took ten times as long)."""
    func = glue.quantize_affine((1, 3, 8, 64), 0.02, 0.0, -128, 127, -128, -np.inf, np.inf, CPU,
                                "quantize")
    assembly = tvm.compile(tvm.IRModule({"main": func}), CPU).mod.inspect_source("asm")
    assert "vrndscaleps" in assembly or "roundps" in assembly
    assert "gather" not in assembly


@EXAMPLES
@given(shapes=st.lists(st.integers(1, 4), min_size=2, max_size=3), dim=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_concat_and_flatten_move_values_as_torch_does(shapes, dim, seed):
    rng = np.random.default_rng(seed)
    inputs = []
    for size in shapes:
        shape = [1, 3, 4, 5]
        shape[dim] = size
        inputs.append(rng.integers(-100, 100, shape).astype("int32"))
    joined = np.concatenate(inputs, axis=dim)
    func = glue.concat([a.shape for a in inputs], dim, CPU, "concat")
    np.testing.assert_array_equal(run(func, *inputs, out_shape=joined.shape), joined)
    flat = (1, joined.size)
    func = glue.reshape(joined.shape, flat, CPU, "flatten")
    np.testing.assert_array_equal(run(func, joined, out_shape=flat), joined.reshape(flat))


def test_fixed_pool_builds_for_cuda_without_a_gpu():
    """The separable pool's stages (padded plane, rows reduced, windows reduced) build as CUDA
    kernels; code generation needs no GPU."""
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    func = pooling.fixed_pool((1, 4, 9, 9), (3, 3), (2, 2), (1, 1), (5, 5), "max", target,
                              "maxpool")
    built = tvm.compile(tvm.IRModule({"main": func}), target)
    source = "\n".join(m.inspect_source("") for m in built.mod.imports if m.kind == "cuda")
    assert "__global__" in source and "max(" in source


def test_packed_requantize_builds_for_cuda_without_a_gpu():
    """On CUDA the codes are inlined into one thread per packed word; the source is generated
    without a GPU."""
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    func = glue.requantize((1, 40, 6, 6), Epilogue("thresholds", 3, True), 40, target,
                           "requantize_packed", glue.Terms((1, 1), -256), packed_bits=2)
    built = tvm.compile(tvm.IRModule({"main": func}), target)
    source = "\n".join(m.inspect_source("") for m in built.mod.imports if m.kind == "cuda")
    assert "__global__" in source and "threadIdx.x" in source
