"""Golden tests of the real ``qcompile`` command: what it prints, exits with and writes."""

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torchvision

import qcompile
from plugins.models import Branchy, SmallNet, WrapsBranchy
from qcompile import cli
from qcompile.ir.export_frontend import from_exported_program
from plugins.user_passes import relu_to_leaky  # noqa: F401  (registers 'relu-to-leaky')

TESTS_DIR = Path(__file__).parent
SMALL_ARCH = "plugins.models:SmallNet"
SMALL_SHAPE = "1,3,16,16"


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.pop("QCOMPILE_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-m", "qcompile.cli", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qcompile: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def run_main(monkeypatch, capsys, cwd: Path, *args) -> tuple[int, str, str]:
    """The command in this process (for cases that need no fresh interpreter)."""
    monkeypatch.chdir(cwd)
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load_folder(folder: Path) -> torch.nn.Module:
    """Import a folder written with --out, as a user would, and build its module."""
    name = f"written_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package.FxModule().eval()


def pass_log(stdout: str) -> list[str]:
    """The lines of the pass log: after 'passes:', up to the table header."""
    after = stdout.split("\npasses:\n", 1)[1].splitlines()
    end = next(index for index, line in enumerate(after) if line.startswith("layer"))
    return [line.strip() for line in after[:end]]


def table_rows(stdout: str) -> list[str]:
    """The layer rows of the printed table: between its dashed rule and its total line."""
    lines = stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("-----"))
    total = next(i for i, line in enumerate(lines) if line.startswith("total:"))
    return lines[rule + 1:total]


def leftovers(directory: Path, out_name: str) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(f".{out_name}.")]


@pytest.fixture
def small_weights(tmp_path):
    torch.manual_seed(0)
    model = SmallNet().eval()
    torch.save(model.state_dict(), tmp_path / "small.pt")
    return model


def test_user_pass_from_plugin_runs_and_shows_in_written_graph(tmp_path, small_weights):
    out = tmp_path / "leaky"
    result = run_cli(
        "small.pt", "--arch", SMALL_ARCH, "--input-shape", SMALL_SHAPE,
        "--plugin", "plugins.user_passes",
        "--passes", "canonicalize,fold-bn,relu-to-leaky{slope=0.25}",
        "--print-after", "relu-to-leaky", "--out", out, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "# graph after pass 'relu-to-leaky'" in result.stdout
    log = pass_log(result.stdout)
    assert [line.split(":")[0] for line in log] == ["canonicalize", "fold-bn", "relu-to-leaky"]
    assert "2 relu -> leaky_relu(0.25)" in log[-1]
    assert "leaky_relu" in (out / "module.py").read_text()

    x = torch.randn(2, 3, 16, 16)
    manager = qcompile.PassManager("canonicalize,fold-bn,relu-to-leaky{slope=0.25}")
    example = (torch.randn(1, 3, 16, 16),)
    expected = manager.run(qcompile.trace(small_weights, example), example_inputs=example)
    with torch.no_grad():
        torch.testing.assert_close(load_folder(out)(x), expected.eval()(x))


def test_user_pass_from_py_file_path(tmp_path, small_weights, monkeypatch, capsys):
    plugin = tmp_path / "scale_passes.py"
    plugin.write_text(
        "import qcompile\n"
        "@qcompile.register_pass('cli-test-note')\n"
        "def note(gm, ctx):\n"
        "    ctx.note('plugin from a file ran')\n"
        "    return gm\n"
    )
    code, out, _ = run_main(monkeypatch, capsys, tmp_path, "small.pt", "--arch", SMALL_ARCH,
                            "--input-shape", SMALL_SHAPE, "--plugin", plugin,
                            "--passes", "cli-test-note")
    assert code == 0
    assert "cli-test-note:" in out and "plugin from a file ran" in out


def test_user_pass_without_its_plugin_is_rejected(tmp_path, small_weights):
    result = run_cli("small.pt", "--arch", SMALL_ARCH, "--passes", "relu-to-leaky", cwd=tmp_path)
    line = assert_one_line_error(result, "unknown pass 'relu-to-leaky'", "known passes:")
    assert "fold-bn" in line and "--plugin" in line


def test_untraceable_model_is_one_line_naming_the_source_line(tmp_path):
    torch.save(Branchy().state_dict(), tmp_path / "b.pt")
    result = run_cli("b.pt", "--arch", "plugins.models:Branchy", "--input-shape", SMALL_SHAPE,
                     cwd=tmp_path)
    assert_one_line_error(result, "models.py:", "if y.sum() > 0:", "--leaf")


def test_pickled_module_needs_trust_pickle(tmp_path):
    torch.save(SmallNet(), tmp_path / "whole.pt")
    refused = run_cli("whole.pt", "--input-shape", SMALL_SHAPE, cwd=tmp_path)
    assert_one_line_error(refused, "--trust-pickle", "plugins.models.SmallNet")

    trusted = run_cli("whole.pt", "--trust-pickle", "--input-shape", SMALL_SHAPE, cwd=tmp_path)
    assert trusted.returncode == 0, trusted.stderr
    assert "pickled SmallNet" in trusted.stdout and "fold-bn:" in trusted.stdout


def cli_example(shape: tuple[int, ...]) -> tuple[torch.Tensor]:
    """The example input the command builds for ``shape``."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(cli.INPUT_SEED)),)


def test_resnet18_state_dict_to_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    out = tmp_path / "compiled" / "r18"
    result = run_cli("r18.pt", "--arch", "torchvision:resnet18", "--input-shape", "1,3,64,64",
                     "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\npasses:\n")[1]
    assert "layer4.1.conv2" in table and "total: 21 layers" in table

    example = cli_example((1, 3, 64, 64))
    rewritten = qcompile.PassManager("default").run(qcompile.trace(model, example), example)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_folder(out)(x), rewritten.eval()(x))
    assert leftovers(out.parent, "r18") == []


def test_exported_program_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = SmallNet().eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 16, 16),))
    torch.export.save(ep, tmp_path / "small.pt2")
    out = tmp_path / "from_pt2"
    result = run_cli("small.pt2", "--passes", "canonicalize,fold-bn", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "input 2x3x16x16" in result.stdout
    assert [row.split()[:2] for row in table_rows(result.stdout)] == [
        ["conv1", "Conv2d"], ["conv2", "Conv2d"], ["fc", "Linear"]
    ]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_folder(out)(x), model(x), rtol=1e-5, atol=1e-5)


def test_exported_program_through_the_default_pipeline(tmp_path, monkeypatch, capsys):
    model = SmallNet().eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 16, 16),))
    torch.export.save(ep, tmp_path / "small.pt2")
    code, out, _ = run_main(monkeypatch, capsys, tmp_path, "small.pt2", "--out", "q")
    assert code == 0
    example = cli_example((2, 3, 16, 16))
    lifted = qcompile.trace(from_exported_program(ep), example)
    rewritten = qcompile.PassManager("default").run(lifted, example)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_folder(tmp_path / "q")(x), rewritten.eval()(x))


def test_output_whose_parent_is_a_file_leaves_nothing(tmp_path, small_weights):
    (tmp_path / "blocker").write_text("a file, not a folder")
    out = tmp_path / "blocker" / "model"
    result = run_cli("small.pt", "--arch", SMALL_ARCH, "--input-shape", SMALL_SHAPE,
                     "--out", out, cwd=tmp_path)
    assert_one_line_error(result, "blocker is not a folder qcompile can write in")
    assert (tmp_path / "blocker").read_text() == "a file, not a folder"
    assert leftovers(tmp_path, "blocker") == []


def test_failed_write_keeps_the_previous_output_and_no_temporary_folder(
    tmp_path, small_weights, monkeypatch, capsys
):
    out = tmp_path / "model"
    out.mkdir()
    (out / "previous.txt").write_text("earlier result")
    broken = run_cli("small.pt", "--arch", SMALL_ARCH, "--input-shape", SMALL_SHAPE,
                     "--plugin", "plugins.user_passes", "--passes", "call-plugin-function",
                     "--out", out, cwd=tmp_path)
    assert_one_line_error(broken, "does not load back")
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert leftovers(tmp_path, "model") == []

    code, _, _ = run_main(monkeypatch, capsys, tmp_path, "small.pt", "--arch", SMALL_ARCH,
                          "--input-shape", SMALL_SHAPE, "--out", out)
    assert code == 0
    assert not (out / "previous.txt").exists() and (out / "module.py").exists()
    assert leftovers(tmp_path, "model") == []


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["small.pt", "--bits", "9"], ["--bits", "1 to 8", "'9'"]),
        (["missing.pt"], ["'missing.pt' does not exist"]),
        (["small.pt", "--arch", "torchvision:resnet19"], ["resnet19", "did you mean resnet18"]),
    ],
)
def test_bad_options_are_one_line(tmp_path, small_weights, args, fragments):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *fragments)


def test_leaf_keeps_an_untraceable_block_whole(tmp_path, monkeypatch, capsys):
    torch.save(WrapsBranchy().state_dict(), tmp_path / "w.pt")
    common = ["w.pt", "--arch", "plugins.models:WrapsBranchy", "--input-shape", SMALL_SHAPE]
    code, _, err = run_main(monkeypatch, capsys, tmp_path, *common)
    assert code == 2 and "module 'block'" in err
    code, out, _ = run_main(monkeypatch, capsys, tmp_path, *common, "--leaf", "Branchy",
                            "--print-after", "fold-bn")
    assert code == 0
    assert "block = self.block(x)" in out


def test_bits_reach_the_pipeline_and_the_table(tmp_path, small_weights, monkeypatch, capsys):
    passes = "canonicalize,fold-bn{mode=qat},assign-bits,insert-quantizers"
    code, out, _ = run_main(monkeypatch, capsys, tmp_path, "small.pt", "--arch", SMALL_ARCH,
                            "--input-shape", SMALL_SHAPE, "--passes", passes, "--bits", "3")
    assert code == 0
    table = out.split("\npasses:\n")[1].splitlines()
    header = next(line for line in table if line.startswith("layer "))
    conv2 = next(line for line in table if line.startswith("conv2 "))
    assert conv2.split()[1] == "ConvBatchNorm(Conv2d)"
    assert conv2[header.index("method"):].split()[:3] == ["qil", "3", "3"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--input-shape", "1,three"], "--input-shape: expected comma-separated"),
        (["--input-shape", "1,0,4"], "--input-shape: expected comma-separated"),
        ([], "pass --input-shape"),
        (["--input-shape", "1,5,16,16"], "does not run on its example inputs (1x5x16x16) at "
         "'conv1' (Conv2d): RuntimeError: Given groups=1"),
        (["--passes", "fold-bn{", "--input-shape", SMALL_SHAPE], "cannot parse pipeline"),
        (["--print-after", "quantize", "--input-shape", SMALL_SHAPE], "print_after"),
        (["--leaf", "Nothing", "--input-shape", SMALL_SHAPE], "--leaf 'Nothing'"),
        (["--fixed-thresholds", "--method", "qn", "--input-shape", SMALL_SHAPE],
         "--fixed-thresholds trains the model: give --data too"),
        (["--epochs", "3", "--input-shape", SMALL_SHAPE], "--epochs trains the model: give --data"),
        (["--lr", "0.01", "--input-shape", SMALL_SHAPE], "--lr trains the model: give --data"),
        (["--checkpoint-dir", "run", "--input-shape", SMALL_SHAPE],
         "--checkpoint-dir trains the model: give --data"),
    ],
)
def test_option_errors_are_one_line(tmp_path, small_weights, monkeypatch, capsys, args, fragment):
    code, _, err = run_main(monkeypatch, capsys, tmp_path, "small.pt", "--arch", SMALL_ARCH, *args)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("qcompile: error: ") and fragment in line


@pytest.mark.parametrize("lr", ["-1", "nan", "inf"])
def test_a_learning_rate_that_cannot_train_is_refused_before_any_pass(tmp_path, small_weights,
                                                                      monkeypatch, capsys, lr):
    code, out, err = run_main(monkeypatch, capsys, tmp_path, "small.pt", "--arch", SMALL_ARCH,
                              "--data", "digits", f"--lr={lr}")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line == f"qcompile: error: --lr must be a finite non-negative number, got {float(lr)}"


def test_internal_error_is_one_line_with_traceback_on_request(monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "load_model", crash)
    monkeypatch.delenv("QCOMPILE_TRACEBACK", raising=False)
    assert cli.main(["model.pt"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "internal error: RuntimeError: boom" in line and "QCOMPILE_TRACEBACK=1" in line

    monkeypatch.setenv("QCOMPILE_TRACEBACK", "1")
    assert cli.main(["model.pt"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in crash" in err


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_model", interrupt)
    assert cli.main(["model.pt"]) == 130
    assert capsys.readouterr().err.strip() == "qcompile: error: interrupted"


def test_subcommands_are_dispatched_by_first_argument(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.SUBCOMMANDS, "inspect", lambda argv: seen.append(argv) or 0)
    assert cli.main(["inspect", "model.qc"]) == 0
    assert seen == [["model.qc"]]


def test_method_and_size_budget_reach_the_table(tmp_path, small_weights, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, tmp_path, "small.pt", "--arch", SMALL_ARCH,
                            "--input-shape", SMALL_SHAPE, "--method", "lsq",
                            "--budget-size", "0.2", "--bits-choices", "2,4,8")
    assert code == 0
    table = out.split("\npasses:\n")[1].splitlines()
    header = next(line for line in table if line.startswith("layer "))
    rows = [line for line in table if line.startswith(("conv", "fc"))]
    columns = [line[header.index("method"):].split()[:4] for line in rows]
    assert {c[0] for c in columns} == {"lsq"} and all(c[1] in ("2", "4", "8") for c in columns)
    assert all(c[3] != "-" for c in columns), "the sensitivity column is filled"
    assert "sensitivity: size" in out


def test_unknown_method_is_one_line(tmp_path, small_weights, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, tmp_path, "small.pt", "--arch", SMALL_ARCH,
                            "--method", "nope")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "qil" in err


@pytest.mark.parametrize(("method", "flags", "edge"), [
    ("qil", ["--first-last-method", "lsq"], "lsq"),
    ("qn", [], "lsq"),  # QN's own default for 8-bit first and last layers
    ("qn", ["--first-last-method", "qn"], "qn"),
])
def test_first_last_method_reaches_the_table(tmp_path, small_weights, monkeypatch, capsys,
                                             method, flags, edge):
    code, out, _ = run_main(monkeypatch, capsys, tmp_path, "small.pt", "--arch", SMALL_ARCH,
                            "--input-shape", SMALL_SHAPE, "--method", method, *flags)
    assert code == 0
    table = out.split("\npasses:\n")[1].splitlines()
    header = next(line for line in table if line.startswith("layer "))
    rows = [line for line in table if line.startswith(("conv", "fc"))]
    methods = [line[header.index("method"):].split()[0] for line in rows]
    assert methods[0] == methods[-1] == edge and set(methods[1:-1]) == {method}
