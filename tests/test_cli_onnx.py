"""``qcompile MODEL --export-onnx PATH [--onnx-format qdq|qonnx]``: what it writes and prints."""

import json

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from plugins.models import SmallNet
from qcompile import cli

SMALL = ("--arch", "plugins.models:SmallNet", "--input-shape", "1,3,16,16")


class CumulativeProduct(nn.Module):
    """A conv, then an op the ONNX export has no form for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.cumprod(self.conv(x), dim=1)


def run_main(monkeypatch, capsys, cwd, *args) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    torch.save(SmallNet().eval().state_dict(), tmp_path / "small.pt")
    return tmp_path / "small.pt"


def test_export_onnx_writes_a_qdq_model_onnxruntime_runs(tmp_path, weights, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, tmp_path, weights, *SMALL, "--bits", "4",
                              "--method", "lsq", "--export-onnx", "small.onnx")
    assert code == 0, err
    assert "wrote small.onnx (ONNX, qdq)" in out
    model = onnx.load(str(tmp_path / "small.onnx"))
    onnx.checker.check_model(model, full_check=True)
    layers = json.loads({p.key: p.value for p in model.metadata_props}["qcompile_layers"])
    assert [(r["weight_bits"], r["method"]) for r in layers.values()] == [
        (8, "lsq"), (4, "lsq"), (8, "lsq")]
    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=[
        "CPUExecutionProvider"])
    logits = session.run(None, {"x": torch.randn(3, 3, 16, 16).numpy()})[0]
    assert logits.shape == (3, 10)


def test_export_onnx_in_qonnx_format(tmp_path, weights, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, tmp_path, weights, *SMALL, "--bits", "2",
                              "--export-onnx", "small.onnx", "--onnx-format", "qonnx")
    assert code == 0, err
    assert "wrote small.onnx (ONNX, qonnx)" in out
    ops = {n.op_type for n in onnx.load(str(tmp_path / "small.onnx")).graph.node}
    assert {"Quant", "MultiThreshold"} <= ops


def test_export_onnx_of_an_unsupported_op_is_one_line_and_writes_nothing(tmp_path, monkeypatch,
                                                                          capsys):
    torch.save(CumulativeProduct().state_dict(), tmp_path / "cumprod.pt")
    code, out, err = run_main(monkeypatch, capsys, tmp_path, "cumprod.pt", "--arch",
                              "test_cli_onnx:CumulativeProduct", "--input-shape", "1,3,8,8",
                              "--export-onnx", "cumprod.onnx")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: node cumprod")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cumprod.pt"]


def test_unknown_onnx_format_is_one_line(tmp_path, weights, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, tmp_path, weights, *SMALL, "--export-onnx",
                            "m.onnx", "--onnx-format", "tflite")
    assert code == 2 and "invalid choice: 'tflite'" in err
