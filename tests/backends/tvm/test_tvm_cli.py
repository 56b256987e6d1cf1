"""The deployment commands: ``qcompile MODEL --out model.qc``, ``run`` and ``inspect``."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qcompile
from cpu_targets import low_bit_kernel
from qcompile.models import SmallCNN


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QCOMPILE_TRACEBACK"}
    return subprocess.run([sys.executable, "-m", "qcompile.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    torch.save(SmallCNN(1, 10).state_dict(), folder / "model.pt")
    result = run_cli("model.pt", "--arch", "qcompile.models:SmallCNN", "--input-shape",
                     "1,1,28,28", "--bits", "2", "--method", "lsq", "--out", "model.qc",
                     cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, result.stdout


def test_compile_writes_a_verified_artifact(artifact):
    folder, out = artifact
    assert (folder / "model.qc").is_file()
    assert "output argmax agreement 100%\n" in out
    assert "wrote model.qc (llvm" in out


def test_inspect_describes_the_artifact(artifact):
    folder, _ = artifact
    result = run_cli("inspect", "model.qc", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "input [1, 1, 28, 28] float32" in result.stdout
    assert low_bit_kernel("llvm") in result.stdout and "features.1.0" in result.stdout


def test_run_prints_classes_and_writes_the_output(artifact):
    folder, _ = artifact
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.save(folder / "x.npy", x)
    result = run_cli("run", "model.qc", "--input", "x.npy", "--output", "y.npy", cwd=folder)
    assert result.returncode == 0, result.stderr
    y = np.load(folder / "y.npy")
    assert [line.split(" (")[0] for line in result.stdout.splitlines()] == [
        f"{k}: class {int(row.argmax())}" for k, row in enumerate(y)]
    module = qcompile.load(folder / "model.qc")  # compiled for one input: three calls
    assert np.array_equal(y, np.concatenate([module(x[k:k + 1]) for k in range(3)]))


def test_run_scales_uint8_images_as_training_data_is_scaled(artifact):
    folder, _ = artifact
    pixels = np.random.default_rng(1).integers(0, 256, (2, 1, 28, 28)).astype(np.uint8)
    np.save(folder / "pixels.npy", pixels)
    result = run_cli("run", "model.qc", "--input", "pixels.npy", "--output", "yp.npy",
                     cwd=folder)
    assert result.returncode == 0, result.stderr
    expected = qcompile.load(folder / "model.qc")(pixels.astype(np.float32) / np.float32(255))
    assert np.array_equal(np.load(folder / "yp.npy"), expected)


def test_run_profiles_the_kernels_on_request(artifact):
    folder, _ = artifact
    np.save(folder / "xp.npy", np.zeros((2, 1, 28, 28), np.float32))
    result = run_cli("run", "model.qc", "--input", "xp.npy", "--profile", "2", cwd=folder)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("1: class ") and lines[2].startswith("profile: median of 2 calls")
    symbol = "amx_conv" if low_bit_kernel("llvm") == "amx" else "bitserial_conv"
    assert any(symbol in line for line in lines[4:])
    one_line_error(run_cli("run", "model.qc", "--input", "xp.npy", "--profile", "0",
                           cwd=folder), "at least one call")


def test_run_rejects_a_wrong_input_in_one_line(artifact):
    folder, _ = artifact
    np.save(folder / "wrong.npy", np.zeros((2, 1, 28, 27), np.float32))
    one_line_error(run_cli("run", "model.qc", "--input", "wrong.npy", cwd=folder),
                   "input shape must be (1, 1, 28, 28) (compiled for it), or a batch of a "
                   "multiple of 1 such inputs, got (2, 1, 28, 27)")
    (folder / "broken.qc").write_bytes(b"not an artifact")
    np.save(folder / "x1.npy", np.zeros((1, 1, 28, 28), np.float32))
    one_line_error(run_cli("run", "broken.qc", "--input", "x1.npy", cwd=folder),
                   "not a qcompile artifact")
