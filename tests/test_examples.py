"""The examples run as a user runs them, and print what they promise."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_custom_pass_example():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_pass.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    before, after = out.split("# graph after pass 'bound-relu'")
    assert "hardtanh" not in before and "torch.relu(" in before
    python_part, cli_part = after.split("\n$ qcompile ")
    assert python_part.count("torch.nn.functional.hardtanh(") == 3
    assert "relu(" not in python_part.split("pass canonicalize")[0].replace("hardtanh(", "")
    assert "bounded 3 ReLU(s) at 4.0" in python_part
    assert "outputs match the hand-written bounded model" in python_part
    assert "--plugin" in cli_part and "bounded 3 ReLU(s) at 4.0" in cli_part
    assert "total: 4 layers" in cli_part and "conv3" in cli_part
