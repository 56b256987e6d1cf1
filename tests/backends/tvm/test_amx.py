"""The AMX kernels: layouts and weight order against numpy, packing kernels everywhere, AMX
code generation on any machine, and every conv against torch's int64 convolution (random
shapes, strides, paddings, code widths, weights and epilogues, both output forms) where the CPU
has AMX; an artifact's stored AMX weights, and the refusal to run AMX kernels without AMX."""

import json
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from cpu_targets import AMX_CPU, BIT_SERIAL, HOST_HAS_AMX
from kernel_cases import epilogues, run
from qcompile.backends.tvm import amx_host
from qcompile.backends.tvm.compiled import CompiledModule
from qcompile.backends.tvm.kernels import amx
from qcompile.backends.tvm.kernels.epilogue import Epilogue
from qcompile.backends.tvm.stored_params import AmxWeight, from_recipe
from qcompile.backends.tvm.target import resolve_target, without_amx
from qcompile.errors import ArtifactError
from qcompile.packing import pack_bits

CASES = settings(max_examples=30, deadline=None)
needs_amx = pytest.mark.skipif(not HOST_HAS_AMX, reason="this CPU or its kernel has no AMX-INT8")


@st.composite
def conv_cases(draw):
    """A conv over a layout padded at least as much as the conv: its geometry, codes, int8
    weights and the int64 sums torch computes from them."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    pad = max(ph, pw) + draw(st.integers(0, 1))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 40))
    n, c, k = draw(st.integers(1, 2)), draw(st.integers(1, 80)), draw(st.integers(1, 70))
    bits = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, 2**bits, (n, c, h, w)).astype(np.int32)
    low, high = draw(st.sampled_from(((-128, 127), (-2, 1), (-1, 1), (0, 1))))
    weight = rng.integers(low, high + 1, (k, c, kh, kw)).astype(np.int8)
    probe = amx.Layout(n, c, h, w, pad, 0)
    conv = amx.Conv(probe, k, (kh, kw), stride, (ph, pw))
    layout = amx.Layout(n, c, h, w, pad, max(probe.image_rows, conv.rows_read)
                        + draw(st.integers(0, 40)))
    conv = amx.Conv(layout, k, (kh, kw), stride, (ph, pw))
    acc = F.conv2d(torch.from_numpy(codes).long(), torch.from_numpy(weight).long(),
                   stride=stride, padding=(ph, pw))
    return conv, codes, weight, acc


def layout_arrays(conv: amx.Conv, codes: np.ndarray, weight: np.ndarray, seed: int = 0):
    """The kernel's data (garbage in the tail and the padded channels, which it must ignore)
    and weight arrays."""
    layout = conv.source
    data = layout.to_layout(codes)
    garbage = np.random.default_rng(seed).integers(0, 256, data.shape).astype(np.uint8)
    view = data[:, :layout.image_rows].reshape(layout.batch, -1, layout.padded_width,
                                               layout.padded_channels)
    view[..., layout.channels:] = garbage[:, :layout.image_rows].reshape(view.shape)[
        ..., layout.channels:]
    data[:, layout.image_rows:] = garbage[:, layout.image_rows:]
    return data, amx.pack_weight(weight, layout.padded_channels, conv.padded_out_channels)


@CASES
@given(n=st.integers(1, 2), c=st.integers(1, 130), h=st.integers(1, 9), w=st.integers(1, 9),
       pad=st.integers(0, 2), extra=st.integers(0, 20), seed=st.integers(0, 2**32 - 1))
def test_layouts_round_trip_with_a_zero_border(n, c, h, w, pad, extra, seed):
    layout = amx.Layout(n, c, h, w, pad, (h + 2 * pad) * (w + 2 * pad) + extra)
    codes = np.random.default_rng(seed).integers(0, 256, (n, c, h, w))
    stored = layout.to_layout(codes)
    assert stored.shape == (n, layout.rows, -(-c // 64) * 64) and stored.dtype == np.uint8
    np.testing.assert_array_equal(layout.from_layout(stored), codes)
    image = stored[:, :layout.image_rows].reshape(n, h + 2 * pad, w + 2 * pad, -1)
    assert int(image.sum()) == int(codes.sum()), "something besides the codes is not zero"


@CASES
@given(k=st.integers(1, 70), c=st.integers(1, 130), kh=st.integers(1, 3),
       kw=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_weights_are_interleaved_by_four_input_channels(k, c, kh, kw, seed):
    weight = np.random.default_rng(seed).integers(-128, 128, (k, c, kh, kw)).astype(np.int8)
    cp, kp = -(-c // 64) * 64, -(-k // 32) * 32
    packed = amx.pack_weight(weight, cp, kp)
    assert packed.shape == (kp // 32, kh * kw, cp // 64, 2, 16, 64)
    out, channel, tap = np.meshgrid(np.arange(kp), np.arange(cp), np.arange(kh * kw),
                                    indexing="ij")
    expected = np.zeros((kp, cp, kh, kw), np.int8)
    expected[:k, :c] = weight
    got = packed[out // 32, tap, channel // 64, out % 32 // 16, channel % 64 // 4,
                 4 * (out % 16) + channel % 4]
    np.testing.assert_array_equal(got, expected.reshape(kp, cp, kh * kw))


@CASES
@given(n=st.integers(1, 2), c=st.integers(1, 70), h=st.integers(1, 9), w=st.integers(1, 9),
       pad=st.integers(0, 2), extra=st.integers(0, 20), seed=st.integers(0, 2**32 - 1))
def test_pack_and_unpack_kernels_match_the_layout(n, c, h, w, pad, extra, seed):
    """No AMX instruction in these two: they run on any CPU."""
    layout = amx.Layout(n, c, h, w, pad, (h + 2 * pad) * (w + 2 * pad) + extra)
    codes = np.random.default_rng(seed).integers(0, 256, (n, c, h, w)).astype(np.int32)
    target = resolve_target(BIT_SERIAL)
    pack = tvm.compile(tvm.IRModule({"main": amx.pack_kernel(codes.shape, layout, "pack")}),
                       target)["pack"]
    stored = tvm.runtime.tensor(np.full(layout.shape, 99, np.uint8))
    pack(tvm.runtime.tensor(codes), stored)
    image_rows = layout.image_rows
    np.testing.assert_array_equal(stored.numpy()[:, :image_rows],
                                  layout.to_layout(codes)[:, :image_rows])
    unpack = tvm.compile(tvm.IRModule({"main": amx.unpack_kernel(layout, "unpack")}),
                         target)["unpack"]
    np.testing.assert_array_equal(run_unpack(unpack, stored, codes.shape), codes)


def run_unpack(kernel, stored, shape) -> np.ndarray:
    out = tvm.runtime.tensor(np.full(shape, -1, np.int32))
    kernel(stored, out)
    return out.numpy()


@pytest.mark.parametrize("table", ["int64", "int32"])
def test_llvm_emits_amx_instructions_for_an_amx_cpu_on_any_machine(table):
    layout = amx.Layout(1, 64, 8, 8, 1, 200)
    conv = amx.Conv(layout, 64, (3, 3), 1, (1, 1))
    func = amx.conv2d_kernel(conv, Epilogue("thresholds", 3, True, table=table), None,
                             "amx_codegen")
    module = tvm.compile(tvm.IRModule({"main": func}), resolve_target(AMX_CPU))
    assembly = module.mod.imports[0].inspect_source("asm") if module.mod.imports else \
        module.mod.inspect_source("asm")
    for instruction in ("ldtilecfg", "tileloadd", "tdpbusd", "tilestored", "tilerelease"):
        assert instruction in assembly, instruction


def test_the_host_target_has_amx_exactly_when_the_process_may_use_it(monkeypatch):
    assert amx.available(resolve_target("llvm")) == amx_host.enabled()
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    explicit = resolve_target(f"llvm:{cpu}")
    assert "mattr" not in explicit.export() or not explicit.export()["mattr"]
    for cpu, granted in (("sapphirerapids", False), ("icelake-server", True),
                         ("sapphirerapids", True), ("icelake-server", False)):
        monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu", lambda cpu=cpu: cpu)
        monkeypatch.setattr(amx_host, "enabled", lambda granted=granted: granted)
        assert amx.available(resolve_target("llvm")) == granted, (cpu, granted)
        taken = resolve_target(without_amx(num_cores=3))
        assert not amx.available(taken), (cpu, granted)
        assert taken.export()["mcpu"] == cpu and taken.export()["num-cores"] == 3


def test_geometry_covers_every_output_pixel_once():
    """Tiles map onto the output pixels one to one (the rest are dropped), and no tile load
    reaches past the rows the layout keeps."""
    for stride, size in ((1, 7), (1, 56), (2, 56), (3, 10), (2, 7)):
        probe = amx.Layout(1, 8, size, size, 1, 0)
        conv = amx.Conv(probe, 8, (3, 3), stride, (1, 1))
        ho, wo = conv.out_size
        pixels = [conv.pixel(t, r) for t in range(conv.tiles) for r in range(16)]
        valid = [(int(y), int(x)) for y, x in pixels if y < ho and x < wo]
        assert sorted(valid) == [(y, x) for y in range(ho) for x in range(wo)]
        last = conv.start(conv.tiles - 1) + 15 * stride + 2 * probe.padded_width + 2
        assert conv.rows_read == last + 1


@needs_amx
@CASES
@given(case=conv_cases(), data=st.data())
def test_conv_matches_torch(case, data):
    conv, codes, weight, acc = case
    epilogue, extra, reference = data.draw(epilogues(conv.out_channels, int(acc.abs().max()) + 1))
    func = amx.conv2d_kernel(conv, epilogue, None, "amx_conv_case")
    arrays = [*layout_arrays(conv, codes, weight), *extra]
    got = run(func, resolve_target("llvm"), arrays, tuple(acc.shape))
    np.testing.assert_array_equal(got, reference(acc).numpy())


@needs_amx
@CASES
@given(case=conv_cases(), data=st.data())
def test_conv_writes_codes_in_the_next_layout(case, data):
    conv, codes, weight, acc = case
    epilogue, extra, reference = data.draw(
        epilogues(conv.out_channels, int(acc.abs().max()) + 1).filter(
            lambda e: e[0].kind != "none"))
    n, k, ho, wo = acc.shape
    pad = data.draw(st.integers(0, 2))
    output = amx.Layout(n, k, ho, wo, pad, (ho + 2 * pad) * (wo + 2 * pad)
                        + data.draw(st.integers(0, 30)))
    func = amx.conv2d_kernel(conv, epilogue, output, "amx_conv_layout_case")
    executable = tvm.compile(tvm.IRModule({"main": func}), resolve_target("llvm"))
    stored = tvm.runtime.tensor(np.full(output.shape, 0xA5, np.uint8))
    executable["amx_conv_layout_case"](
        *[tvm.runtime.tensor(a) for a in (*layout_arrays(conv, codes, weight), *extra)], stored)
    result = stored.numpy()
    expected = reference(acc).numpy()
    np.testing.assert_array_equal(output.from_layout(result), expected)
    image = result[:, :output.image_rows].reshape(n, ho + 2 * pad, wo + 2 * pad, -1)
    border = np.ones(image.shape[1:3], bool)
    border[pad:pad + ho, pad:pad + wo] = False
    assert not image[:, border].any(), "the border is not zero"


def test_bad_layouts_and_outputs_say_what_is_wrong():
    layout = amx.Layout(1, 8, 6, 6, 1, 100)
    with pytest.raises(ValueError, match="exceeds the layout"):
        amx.Conv(layout, 8, (5, 5), 1, (2, 2))
    conv = amx.Conv(layout, 8, (3, 3), 1, (1, 1))
    with pytest.raises(ValueError, match="cannot hold"):
        amx.conv2d_kernel(conv, Epilogue(), amx.Layout(1, 8, 6, 6, 1, 100), "bad")
    with pytest.raises(ValueError, match="cannot hold"):
        amx.conv2d_kernel(conv, Epilogue("thresholds", 3), amx.Layout(1, 9, 6, 6, 1, 100),
                          "bad")


@CASES
@given(k=st.integers(1, 40), c=st.integers(1, 70), bits=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_a_stored_weight_rebuilds_the_kernels_array(k, c, bits, seed):
    """An artifact keeps an AMX weight as packed codes and a level table; the recipe in its
    manifest and those arrays give back the int8 array the kernel reads."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (k, c, 3, 3))
    levels = np.sort(rng.integers(-128, 128, (k, 2**bits)), axis=1).astype(np.int8)
    cp, kp = -(-c // 64) * 64, -(-k // 32) * 32
    weight = AmxWeight(bits, (k, c, 3, 3), pack_bits(codes, bits, axis=1), levels, cp, kp)
    integers = np.take_along_axis(levels, codes.reshape(k, -1), 1).reshape(codes.shape)
    expected = amx.pack_weight(integers.astype(np.int8), cp, kp)
    np.testing.assert_array_equal(weight.array(), expected)
    stored = {name: a.copy() for name, a in weight.stored().items()}
    # up to 6 bits always smaller; at 7 the padding of 33-64 channels can outweigh the saving
    assert sum(a.nbytes for a in stored.values()) < expected.nbytes or bits >= 7
    rebuilt = from_recipe(json.loads(json.dumps(weight.recipe())), stored)
    np.testing.assert_array_equal(rebuilt.array(), expected)
    with pytest.raises(ArtifactError, match="unknown stored parameter"):
        from_recipe(dict(weight.recipe(), kind="other"), stored)


def test_a_module_with_amx_kernels_refuses_to_run_where_amx_is_not(monkeypatch):
    """Checked before the first call, on any machine: a manifest that lists AMX kernels and a
    process without AMX is an ArtifactError, not a SIGILL."""
    graph = qcompile.integerize(tiny_model())
    compiled = qcompile.compile(graph, BIT_SERIAL, input_shape=(1, 1, 12, 12))
    manifest = dict(compiled.manifest, layers=[dict(layer, kernel="amx")
                                               for layer in compiled.manifest["layers"]])
    foreign = CompiledModule(compiled.executable, compiled._params_numpy, manifest,
                             compiled.traced)
    monkeypatch.setattr(amx_host, "enabled", lambda: False)
    with pytest.raises(ArtifactError, match="does not provide AMX-INT8"):
        foreign(np.zeros((1, 1, 12, 12), np.float32))
    monkeypatch.setattr(amx_host, "enabled", lambda: True)
    assert foreign(np.zeros((1, 1, 12, 12), np.float32)).shape == (1, 4)


def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 4)).eval()
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    return qcompile.quantize(model, (x[:1],), bits=2, method="lsq", calib_data=[(x,)])


@pytest.mark.parametrize("bits, packed", [(2, True), (7, False)])
def test_an_amx_weight_is_stored_packed_only_where_that_is_smaller(tmp_path, bits, packed):
    """Compiled for an AMX CPU (on any machine): a 40-channel conv's codes as bit planes of
    64 channels and a level table per output channel are smaller than its int8 array at 2
    bits, larger at 7, where the artifact keeps the array."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 40, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(40, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 4)).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qm = qcompile.quantize(model, (x[:1],), bits=bits, method="lsq", calib_data=[(x,)])
    compiled = qcompile.compile(qcompile.integerize(qm), AMX_CPU, input_shape=(1, 3, 8, 8))
    assert [layer["kernel"] for layer in compiled.manifest["layers"]][1] == "amx"
    with zipfile.ZipFile(compiled.save(tmp_path / "model.qc")) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    shapes = [recipe["shape"] for recipe in manifest["stored"].values()]
    assert ([32, 40, 3, 3] in shapes) == packed, shapes
