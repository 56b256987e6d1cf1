"""The command line's training stage, run as a user would: progress, summary, Ctrl-C, --resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import qcompile
from qcompile import cli
from qcompile.data import load_builtin
from qcompile.models import SmallCNN

ARCH = "qcompile.models:SmallCNN"


def command(tmp_path: Path, *extra: str) -> list[str]:
    torch.manual_seed(0)
    torch.save(SmallCNN().state_dict(), tmp_path / "small.pt")
    return [sys.executable, "-m", "qcompile.cli", "small.pt", "--arch", ARCH, "--data", "digits",
            "--bits", "2", "--batch-size", "32", "--checkpoint-dir", "run", *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_training_shows_progress_and_ends_with_the_summary(tmp_path):
    result = subprocess.run(command(tmp_path, "--epochs", "2", "--distill"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode == 0, result.stderr
    assert "epoch 2/2" in result.stderr and "step/s" in result.stderr  # tqdm bars
    summary = next(line for line in result.stdout.splitlines() if line.startswith("summary:"))
    assert "float accuracy" in summary and "before QAT" in summary and "after 2 epochs" in summary
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_fixed_thresholds_without_qn_is_one_line_and_writes_nothing(tmp_path):
    result = subprocess.run(command(tmp_path, "--epochs", "1", "--method", "lsq",
                                    "--fixed-thresholds"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=environment())
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("qcompile: error: --fixed-thresholds") and "--method qn" in line
    assert not (tmp_path / "run").exists()


def test_a_compiled_qn_run_prints_no_torch_notices(tmp_path):
    """QN compiled at 2 bits traces a selective checkpoint, for which torch warns about
    in-place operations (QN's hold none); the CLI drops that notice (``cli.TORCH_NOTICES``)
    and keeps its own output: progress, summary, and no ``W``-prefixed torch lines."""
    result = subprocess.run(command(tmp_path, "--epochs", "1", "--method", "qn", "--compile"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=environment())
    assert result.returncode == 0, result.stderr
    assert "summary:" in result.stdout
    for text in cli.TORCH_NOTICES.values():
        assert text not in result.stderr, result.stderr
    assert "torch/_logging" not in result.stderr, result.stderr


@pytest.mark.parametrize("switching", [False, True])
def test_compile_trains_through_torch_compile(tmp_path, monkeypatch, capsys, switching):
    """``--compile``: the training step runs compiled (dynamo compiled a graph in this
    process), and the run ends as any other (records, summary). With stochastic precision,
    whose draws switch layers every step, still one graph per batch size."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    monkeypatch.chdir(tmp_path)
    extra = ["--stochastic-precision"] if switching else []
    code = cli.main(command(tmp_path, "--epochs", "1", "--distill", "--compile", *extra)[3:])
    out = capsys.readouterr().out
    assert code == 0
    train_size = len(load_builtin("digits").train_x)
    batch_sizes = {32, train_size % 32} - {0}  # --batch-size 32 and the short last batch
    assert counters["stats"]["unique_graphs"] == len(batch_sizes)
    summary = next(line for line in out.splitlines() if line.startswith("summary:"))
    assert "after 1 epoch " in summary
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and record["train_loss"] > 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_command_line_under_torchrun_reports_and_writes_once(tmp_path):
    """Two processes train one model (``torchrun -m qcompile.cli``); the first alone prints the
    report and writes ``--out``, as it alone shows progress bars."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = command(tmp_path, "--epochs", "1", "--out", "graph")[3:]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                             "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                             "--master-port", str(port), "-m", "qcompile.cli", *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=environment())
    assert result.returncode == 0, result.stderr[-2000:]
    # no schedule switches a quantizer off, so DDP is not asked to look for unused parameters
    # (it warned on every process that it found none, inside the progress bar)
    assert "find_unused_parameters" not in result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("model: ") for line in lines) == 1
    assert sum(line.startswith("summary: ") for line in lines) == 1
    assert sum(line.startswith("wrote graph") for line in lines) == 1
    assert (tmp_path / "graph").is_dir()
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in records] == [1]


def test_sigint_mid_epoch_then_resume_finishes(tmp_path):
    args = command(tmp_path, "--epochs", "3")
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environment())
    seen, deadline = "", time.monotonic() + 240
    while "epoch 2/3:  " not in seen and time.monotonic() < deadline:
        seen += process.stderr.read(64)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    err = seen + err
    assert process.returncode == 130, err
    message = [line for line in err.replace("\r", "\n").splitlines() if "qcompile: error" in line]
    assert len(message) == 1 and "--resume" in message[0]
    assert err.count("training interrupted at") == 1, err  # said once, as the error line
    assert "Traceback" not in err
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint is not None

    resumed = subprocess.run(args + ["--resume"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env=environment())
    assert resumed.returncode == 0, resumed.stderr
    assert "after 3 epochs" in resumed.stdout
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_a_torchvision_model_trains_on_one_channel_digits(tmp_path, monkeypatch, capsys):
    """A resnet18 saved with ``num_classes=10`` (``--arch torchvision:resnet18``) on ``--data
    digits``: built with 10 classes, traced at the data's 8x8 (not its usual 224x224), the
    grayscale digits repeated to its 3 channels, trained, and summarised."""
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["r18.pt", "--arch", "torchvision:resnet18", "--data", "digits",
                     "--bits", "4", "--method", "lsq", "--epochs", "1", "--batch-size", "128",
                     "--checkpoint-dir", "run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "torchvision:resnet18 (10 classes), input 1x3x8x8" in out
    assert "data: digits, one-channel images repeated to the model's 3 channels" in out
    assert "after 1 epoch " in next(line for line in out.splitlines()
                                    if line.startswith("summary:"))


def image_folder(root: Path, sizes=((12, 12),)) -> str:
    """Two classes of ten RGB images, of the (width, height) ``sizes`` in turn; the --data spec."""
    from PIL import Image

    for label, colour in enumerate([(250, 20, 20), (20, 250, 20)]):
        (root / f"class{label}").mkdir(parents=True)
        for k in range(10):
            Image.new("RGB", sizes[k % len(sizes)], (*colour[:2], 12 * k)).save(
                root / f"class{label}" / f"{k}.png")
    return f"imagefolder:{root}"


def test_a_one_channel_model_reads_an_image_folder_in_grayscale(tmp_path, monkeypatch, capsys):
    """``--arch package.module:Class`` says no input shape: the model's first convolution does
    (one channel for SmallCNN), so the RGB folder is read as grayscale rather than failing to
    trace at 3 channels."""
    data = image_folder(tmp_path / "images")
    torch.manual_seed(0)
    torch.save(SmallCNN().state_dict(), tmp_path / "small.pt")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["small.pt", "--arch", ARCH, "--data", data, "--epochs", "1",
                     "--checkpoint-dir", "run"])
    out = capsys.readouterr().out
    assert code == 0 and "input 1x1x12x12" in out and "after 1 epoch " in out


def test_an_image_folder_is_resized_to_the_input_shape_asked_for(tmp_path, monkeypatch, capsys):
    """Images of assorted sizes take the size of --input-shape, or of a model that takes one
    size only, rather than the first image's."""
    data = image_folder(tmp_path / "images", sizes=((12, 12), (20, 14), (9, 30)))
    model = SmallCNN().eval()
    torch.save(model.state_dict(), tmp_path / "small.pt")
    program = torch.export.export(model, (torch.randn(1, 1, 20, 20),))
    torch.export.save(program, tmp_path / "small.pt2")
    monkeypatch.chdir(tmp_path)
    for argv, shape in ((["small.pt", "--arch", ARCH, "--input-shape", "2,1,16,16"],
                         (2, 1, 16, 16)), (["small.pt2"], (1, 1, 20, 20))):
        run = f"run{shape[-1]}"
        code = cli.main([*argv, "--data", data, "--epochs", "1", "--checkpoint-dir", run,
                         "--out", f"{run}.qc"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert f"input {'x'.join(map(str, shape))}" in out
        assert qcompile.load(f"{run}.qc").input_shape == shape


def fails_before_training(tmp_path, capsys, *argv: str) -> str:
    """Run the command line; it must exit 2 with one error line and no checkpoint folder."""
    code = cli.main([*argv, "--data", "digits", "--epochs", "1", "--checkpoint-dir",
                     str(tmp_path / "run")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith("qcompile: error: ")
    assert not (tmp_path / "run").exists()
    return line


def test_a_model_with_fewer_outputs_than_classes_fails_before_training(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "r5.pt")
    line = fails_before_training(tmp_path, capsys, str(tmp_path / "r5.pt"), "--arch",
                                 "torchvision:resnet18")
    assert "labels run from 0 to 9, and the model has 5 outputs" in line


def test_input_shapes_that_do_not_fit_the_data_fail_before_training(tmp_path, capsys):
    model = SmallCNN().eval()
    program = torch.export.export(model, (torch.randn(1, 1, 28, 28),))
    torch.export.save(program, tmp_path / "small.pt2")
    line = fails_before_training(tmp_path, capsys, str(tmp_path / "small.pt2"))
    assert "takes only inputs of 1x28x28 and --data digits has 1x8x8" in line
    torch.save(model.state_dict(), tmp_path / "small.pt")
    line = fails_before_training(tmp_path, capsys, str(tmp_path / "small.pt"), "--arch", ARCH,
                                 "--input-shape", "1,1,28,28")
    assert "--input-shape 1,1,28,28 does not fit --data digits" in line


def test_data_of_a_form_the_model_does_not_take_names_the_data(tmp_path, capsys):
    """Flat vectors for a CNN: the trace fails on the data's shape, and the error says the data
    is what does not fit (not --input-shape, which was not given)."""
    generator = torch.Generator().manual_seed(0)
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=torch.rand(40, 64, generator=generator).numpy(),
             y=torch.randint(0, 3, (40,), generator=generator).numpy())
    torch.save(SmallCNN().state_dict(), tmp_path / "small.pt")
    code = cli.main([str(tmp_path / "small.pt"), "--arch", ARCH, "--data", str(flat),
                     "--epochs", "1", "--checkpoint-dir", str(tmp_path / "run")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"the inputs of --data {flat} are 64: give data the model takes" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("outputs, fragment", [
    (["--export-onnx", "missing/m.onnx"], "--export-onnx missing/m.onnx: the folder missing "
                                          "does not exist"),
    (["--export-onnx", "."], "--export-onnx . is a folder"),
    (["--out", "taken/m.qc"], "--out taken/m.qc: taken is not a folder qcompile can write in"),
    (["--out", "m.qc", "--target", "tpu"], "unknown target 'tpu'"),
])
def test_outputs_that_cannot_be_written_fail_before_training(tmp_path, monkeypatch, capsys,
                                                             outputs, fragment):
    """Each of these was found only once training had ended."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("")
    code = cli.main(command(tmp_path, "--epochs", "1", *outputs)[3:])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and fragment in line
    assert not (tmp_path / "run").exists()


def test_an_output_that_fails_after_training_says_resume_writes_it(tmp_path, monkeypatch,
                                                                   capsys):
    """The run's checkpoint holds the trained model: --resume writes the outputs from it
    without training again."""
    monkeypatch.chdir(tmp_path)
    args = command(tmp_path, "--epochs", "1", "--export-onnx", "m.onnx")[3:]

    def broken(*_, **__):
        raise cli.ConfigError("the exporter failed")

    with monkeypatch.context() as patch:
        patch.setattr(cli, "export_onnx", broken)
        assert cli.main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert line == ("qcompile: error: the exporter failed; the trained model is kept in run: "
                    "run again with --resume to write the outputs without training again")
    trained = (tmp_path / "run" / "last.pt").read_bytes()

    def stopped(*_, **__):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cli, "export_onnx", stopped)
        assert cli.main([*args, "--resume"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qcompile: error: interrupted after training; the trained model is kept in run: run "
        "again with --resume to write the outputs without training again")
    assert cli.main([*args, "--resume"]) == 0
    assert (tmp_path / "m.onnx").is_file()
    assert (tmp_path / "run" / "last.pt").read_bytes() == trained  # no step taken
