"""Write a rewrite pass of your own, run it with the built-in ones, from Python and the CLI.

The pass here bounds every ReLU: ``relu(x)`` becomes ``hardtanh(x, 0, bound)``. A low-bit
activation quantizer covers a fixed range, and an unbounded ReLU lets a few large activations
stretch that range and waste levels; ReLU6 (MobileNet) fixes the bound at 6, PACT learns it.

Run it:  python examples/custom_pass.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qcompile


@qcompile.register_pass("bound-relu")
def bound_relu(gm: fx.GraphModule, ctx: qcompile.PassContext) -> fx.GraphModule:
    """Replace each ReLU by a ReLU clipped at ``bound`` (default 6; ``bound-relu{bound=4}``).

    Runs after ``canonicalize``, which turns every spelling of ReLU (``nn.ReLU``, ``torch.relu``,
    ``x.relu_()``...) into ``F.relu``, so matching that one function is enough.
    """
    bound = float(ctx.option("bound", 6.0))
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.relu:
            node.target = F.hardtanh
            node.args = (node.args[0], 0.0, bound)
            node.kwargs = {}
            count += 1
    if count == 0:
        ctx.note("found no F.relu: does canonicalize run before this pass?")
    ctx.note(f"bounded {count} ReLU(s) at {bound}")
    return gm


class TinyNet(nn.Module):
    """Three ReLUs, spelled three different ways."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = torch.relu(self.conv2(y) + y)
        y = F.relu(self.conv3(y))
        return self.fc(y.mean(dim=(2, 3)))


def bounded_by_hand(model: TinyNet, x: torch.Tensor, bound: float) -> torch.Tensor:
    """What TinyNet computes once every ReLU is clipped at ``bound``, written out by hand."""
    y = model.bn1(model.conv1(x)).clamp(0, bound)
    y = (model.conv2(y) + y).clamp(0, bound)
    y = model.conv3(y).clamp(0, bound)
    return model.fc(y.mean(dim=(2, 3)))


PIPELINE = "canonicalize,fold-bn,bound-relu{bound=4}"


def run_in_python() -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    example = (3 * torch.randn(2, 3, 16, 16),)

    gm = qcompile.trace(model, example)
    print(f"# graph before the pipeline\n{gm.code.strip()}\n")
    ctx = qcompile.PassContext()
    manager = qcompile.PassManager(PIPELINE, print_after=["bound-relu"])
    rewritten = manager.run(gm, example_inputs=example, ctx=ctx)
    for record in ctx.records:
        print(f"pass {record.summary()}")

    with torch.no_grad():
        got, expected = rewritten(*example), bounded_by_hand(model, *example, bound=4.0)
        changed = (model(*example) - expected).abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    print(f"outputs match the hand-written bounded model (bounding changed them by {changed:.3f})")


def run_from_cli() -> None:
    """The same pass from the command line: ``--plugin`` imports this file, which registers it."""
    with tempfile.TemporaryDirectory() as folder:
        program = Path(folder) / "tiny.pt2"
        model = TinyNet().eval()
        torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), program)
        command = ["qcompile", str(program), "--plugin", __file__, "--passes", PIPELINE]
        print(f"\n$ {' '.join(command[:-1])} '{PIPELINE}'")
        result = subprocess.run(
            [sys.executable, "-m", "qcompile.cli", *command[1:]], capture_output=True, text=True
        )
        print(result.stdout, end="")
        if result.returncode != 0:
            sys.exit(f"the CLI failed: {result.stderr.strip()}")


if __name__ == "__main__":
    run_in_python()
    run_from_cli()
