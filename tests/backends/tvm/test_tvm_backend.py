"""The TVM backend end to end: bit-exact with the reference backend, and a deployable artifact."""

import json
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
import torch
import torchvision

import qcompile
from batch_norms import randomize_batch_norms
from cpu_targets import TARGETS, low_bit_kernel
from qcompile.data import load_builtin
from qcompile.errors import ArtifactError, ConfigError, InputError
from qcompile.models import SmallCNN


def small(method: str, bits: int):
    data = load_builtin("mnist5k")
    torch.manual_seed(0)
    model = randomize_batch_norms(SmallCNN(1, 10, width=8), bits)
    x = data.test_x[:8]
    qm = qcompile.quantize(model.eval(), (x[:1],), bits=bits, method=method, calib_data=[(x,)])
    return qm, x


def assert_bit_exact(qm, x, compiled=None, target="llvm"):
    """Every value the compiled module computes equals the reference backend's, and the
    compiled module passes the fidelity check against the simulated model."""
    graph = qcompile.integerize(qm)
    compiled = compiled or qcompile.compile(graph, target, input_shape=tuple(x[:1].shape))
    for sample in x.split(1):
        produced = compiled.integer_activations(sample)
        expected = graph.integer_activations(sample)
        assert produced, "nothing traced"
        for name, value in produced.items():
            if ":" in name:
                continue
            reference = expected[name]
            if reference.is_floating_point():
                torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(value, reference), name
    report = qcompile.verify(qm, compiled, x[:1])
    assert report.unexplained == 0 and report.argmax_agreement == 1.0, report.format()
    return compiled


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("method", "bits"), [("lsq", 2), ("qil", 2), ("dq", 4), ("lsq", 1),
                                               ("dorefa", 3)])
def test_small_cnn_is_bit_exact_with_the_reference(method, bits, target):
    qm, x = small(method, bits)
    compiled = assert_bit_exact(qm, x[:2], target=target)
    kernels = {layer["kernel"] for layer in compiled.manifest["layers"]}
    if bits <= 4 and (method != "dq" or low_bit_kernel(target) == "amx"):
        assert low_bit_kernel(target, bits) in kernels, compiled.manifest["layers"]


NO_VNNI = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}
"""AVX-512 without VNNI (and without AMX): runs on any AVX-512 CPU."""


@pytest.mark.parametrize(("bits", "vnni_kernel"), [(2, "bit-serial"), (3, "direct int8"),
                                                   (4, "direct int8")])
def test_layers_of_many_plane_pairs_run_on_vnni_bytes(bits, vnni_kernel):
    """Bit-serial work grows with code bits times weight bits, a byte dot product's does not:
    W3A3 and W4A4 layers run on VNNI bytes where the CPU has VNNI (and no AMX), W2A2 and every
    layer on a CPU without VNNI bit-serial; each bit-exact with the reference."""
    qm, x = small("lsq", bits)
    targets = [("llvm", vnni_kernel)] if low_bit_kernel("llvm") == "bit-serial" else []
    targets += [(NO_VNNI, "bit-serial")]
    for target, kernel in targets:
        compiled = assert_bit_exact(qm, x[:2], target=target)
        kinds = [layer["kernel"] for layer in compiled.manifest["layers"]]
        assert kinds[1:3] == [kernel, kernel], (target, kinds)


@pytest.mark.parametrize("target", TARGETS)
def test_threshold_tables_are_int32_and_bit_exact(target):
    """Integer thresholds lie within one of the accumulator's range, so an int32 accumulator's
    table is stored and compared in int32 (half the bytes of int64)."""
    qm, x = small("qn", 4)
    quantizer = qm.get_submodule("input_quantizers.features_1_0_input")
    with torch.no_grad():
        quantizer.biases[0, 7] += 0.3  # off the thresholds' line: a table, no fixed point
    compiled = assert_bit_exact(qm, x[:2], target=target)
    kernels = {call["value"]: call["kernel"] for call in compiled.manifest["program"]}
    assert "_t15ci32_" in kernels["input_quantizers_features_1_0_input"], kernels


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_are_bit_exact(arch, bits, target):
    torch.manual_seed(0)
    model = randomize_batch_norms(getattr(torchvision.models, arch)(weights=None), bits)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    method = "lsq" if bits > 1 else "dorefa"
    qm = qcompile.quantize(model.eval(), (x[:1],), bits=bits, method=method, calib_data=[(x,)])
    assert_bit_exact(qm, x, target=target)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    qm, x = small("lsq", 2)
    compiled = qcompile.compile(qm, "llvm")
    path = tmp_path_factory.mktemp("artifact") / "model.qc"
    compiled.save(path)
    return compiled, path, x[:1]


def test_a_saved_artifact_runs_in_a_fresh_process(saved, tmp_path):
    compiled, path, x = saved
    np.save(tmp_path / "x.npy", x.numpy())
    script = ("import sys, numpy as np, qcompile\n"
              "m = qcompile.load(sys.argv[1])\n"
              "np.save(sys.argv[3], m(np.load(sys.argv[2])))\n")
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, capture_output=True)
    assert np.array_equal(np.load(tmp_path / "y.npy"), compiled(x.numpy()))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_loading_leaves_no_files_behind(saved, tmp_path, monkeypatch):
    """The unpacked artifact is removed once loaded, whether loading succeeds or fails; the
    loaded module keeps running without it."""
    compiled, path, x = saved
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded = qcompile.load(path)
    assert not list(scratch.iterdir())
    assert np.array_equal(loaded(x.numpy()), compiled(x.numpy()))
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp_path / "bad.qc", "w") as target:
        for name in source.namelist():
            target.writestr(name, b"junk" if name == "model.so" else source.read(name))
    with pytest.raises(ArtifactError, match="cannot load its library"):
        qcompile.load(tmp_path / "bad.qc")
    assert not list(scratch.iterdir())


def test_the_artifact_holds_manifest_library_and_packed_params(saved):
    compiled, path, _ = saved
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("manifest.json"))
    assert {"manifest.json", "model.so", "params.npz"} <= names
    assert manifest["input"]["shape"] == [1, 1, 28, 28]
    assert [layer["weight_bits"] for layer in manifest["layers"]] == [8, 2, 2, 8]
    assert manifest["bytes"]["params"] < manifest["bytes"]["fp32_weights"]
    assert manifest["versions"]["qcompile"] == qcompile.__version__


def test_torch_and_numpy_inputs_and_their_errors(saved):
    compiled, _, x = saved
    out = compiled(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 10)
    assert isinstance(compiled(x.numpy()), np.ndarray)
    with pytest.raises(InputError, match=r"shape must be \(1, 1, 28, 28\).*multiple of 1"):
        compiled(np.zeros((1, 1, 28, 27), np.float32))
    with pytest.raises(InputError, match=r"got \(0, 1, 28, 28\)"):
        compiled(np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(InputError, match="float32"):
        compiled(x.double())
    with pytest.raises(InputError, match="numpy array or torch tensor"):
        compiled([[0.0]])


def test_a_batch_of_inputs_runs_one_compiled_batch_at_a_time(saved):
    compiled, _, _ = saved
    x = load_builtin("mnist5k").test_x[:5]
    rows = np.concatenate([compiled(x[k:k + 1].numpy()) for k in range(5)])
    assert rows.shape == (5, 10) and len({tuple(row) for row in rows}) > 1
    assert np.array_equal(compiled(x.numpy()), rows)
    assert torch.equal(compiled(x), torch.from_numpy(rows))


def test_profile_times_every_kernel_call_of_the_program(saved):
    compiled, path, x = saved
    for module in (compiled, qcompile.load(path)):
        profile = module.profile(x.numpy(), calls=3)
        program = module.manifest["program"]
        # every listed call but the flatten, which TVM runs as its reshape builtin
        listed = [k for k, step in enumerate(program) if not step["kernel"].startswith("reshape")]
        assert len(listed) == len(program) - 1 > 4
        assert [k.position for k in profile.kernels] == listed
        assert [k.kernel for k in profile.kernels] == [program[k]["kernel"] for k in listed]
        assert [k.value for k in profile.kernels] == [program[k]["value"] for k in listed]
        assert all(k.seconds > 0 for k in profile.kernels) and profile.call_seconds > 0
    lines = profile.table(top=3).splitlines()
    assert lines[0].startswith("profile: median of 3 calls") and len(lines) == 2 + 3 + 1
    shown = [float(line.split()[1]) for line in lines[2:5]]
    assert shown == sorted(shown, reverse=True)
    assert lines[5].endswith(f"({len(listed) - 3} more kernel calls)")
    assert len(profile.table(top=None).splitlines()) == 2 + len(listed)
    older = qcompile.load(path)  # an artifact saved before manifests listed the program
    del older.manifest["program"]
    unnamed = older.profile(x.numpy(), calls=1).kernels
    assert [k.position for k in unnamed] == list(range(len(listed)))
    assert [k.kernel for k in unnamed] == [k.kernel for k in profile.kernels]
    assert {k.value for k in unnamed} == {""}
    with pytest.raises(ConfigError, match="at least one call"):
        compiled.profile(calls=0)
    with pytest.raises(InputError, match="shape must be"):
        compiled.profile(np.zeros((2, 1, 28, 28), np.float32))


def test_corrupt_or_foreign_artifacts_are_clear_errors(saved, tmp_path):
    _, path, _ = saved
    truncated = tmp_path / "truncated.qc"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="not a qcompile artifact or is damaged"):
        qcompile.load(truncated)
    with pytest.raises(ArtifactError, match="no such artifact"):
        qcompile.load(tmp_path / "missing.qc")
    other = tmp_path / "other.qc"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(other, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "manifest.json":
                manifest = json.loads(data)
                manifest["versions"]["tvm"] = "0.0.1"
                data = json.dumps(manifest)
            target.writestr(name, data)
    with pytest.raises(ArtifactError, match="compiled with TVM 0.0.1"):
        qcompile.load(other)


def test_an_unknown_target_is_a_config_error():
    qm, _ = small("lsq", 2)
    with pytest.raises(ConfigError, match="unknown target"):
        qcompile.compile(qm, "fpga")


def test_cuda_code_generation_needs_no_gpu():
    """The whole small CNN builds for CUDA here; its bit-serial kernels use __popc."""
    qm, _ = small("lsq", 2)
    compiled = qcompile.compile(qm, "cuda")
    assert "__popc" in cuda_source(compiled.executable.mod)
    assert compiled.manifest["target"]["kind"] == "cuda"


def cuda_source(module) -> str:
    """The CUDA source among ``module``'s imports, however deep."""
    found = [module.inspect_source("")] if module.kind == "cuda" else []
    for child in module.imports:
        found.append(cuda_source(child))
    return "\n".join(found)


@pytest.mark.gpu
def test_cuda_execution_matches_the_reference():
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine")
    qm, x = small("lsq", 2)
    graph = qcompile.integerize(qm)
    compiled = qcompile.compile(graph, "cuda", input_shape=tuple(x[:1].shape))
    assert_bit_exact(qm, x[:1], compiled)
    profile = compiled.profile(x[:1].numpy(), calls=2)
    program = [step["kernel"] for step in compiled.manifest["program"]]
    kernels = [k for k in program if not k.startswith("reshape")]
    assert [k.kernel for k in profile.kernels] == kernels
