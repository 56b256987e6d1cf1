"""Training-step time of every method at W4A4 and W2A2 against the float model, eager and compiled.

Quantizes the small CNN (1x28x28 MNIST digits, first and last layer 8-bit as ``quantize`` does)
with each method and trains every model, and the float model, with ``qcompile.train`` itself:
batch 64, 2 threads, no schedules (so every step trains the same graph: no batch-norm freezing,
no switch to hard quantizers halfway), no distillation (a teacher's forward would add the same
cost to every method). The runs are interleaved: each round trains every configuration for one
short epoch in turn, so a load that comes and goes on the machine is shared by all of them.
Round 0 is the warm-up (it holds the compilation, reported as ``warm-up s``) and is left out, as
is the first step of every later round. The table gives median step times and their ratios to the
float model's step in the same mode (compiled against compiled) and to the eager float step.
Quantizers with a temperature (Quantization Networks) keep the one given by ``--temperature``
(default 1, the first epoch of the default annealing, where the sigmoids are widest and the
soft function costs most; 19 is the second epoch of a 12-epoch run, from which on every quantizer
sums only a few sigmoids per element).
A method written ``qil:lsq`` quantizes the first and last layers with the second method
(``quantize(first_last_method=...)``); plain ``qn`` gives them LSQ, QN's default for 8-bit first
and last layers, and ``qn:qn`` keeps QN there; ``qn+fixed`` keeps QN's thresholds fixed, as the
paper's released code does (``qcompile.quant.qn.fix_thresholds``).
Usage: ``python benchmarks/step_time.py [--methods lsq,qil,qn:qn] [--bits 4,2] [--rounds 5]
[--steps 12] [--modes eager,compiled] [--temperature 1] [--learn-input-quantizers]``.
"""

import argparse
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

import qcompile
from qcompile.data import load_builtin
from qcompile.models import SmallCNN
from qcompile.qat.quantizers import annealable_quantizers
from qat_mnist import quantized as quantized_by

BATCH = 64


@dataclass
class Config:
    """One model trained in one mode, and the step times measured for it."""

    method: str
    bits: int | None
    model: torch.nn.Module
    compiled: bool
    learn_inputs: bool = False
    steps: list[float] = field(default_factory=list)
    warmup: float = 0.0

    @property
    def name(self) -> str:
        return self.method if self.bits is None else f"{self.method} W{self.bits}A{self.bits}"

    def train(self, data, seed: int) -> list[float]:
        history = qcompile.train(self.model, data, epochs=1, batch_size=BATCH, lr=1e-3,
                                 schedules=[], seed=seed, progress=False, compile=self.compiled,
                                 learn_input_quantizers=self.learn_inputs)
        return history.step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(qcompile.quant.available_methods()))
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds after warm-up")
    parser.add_argument("--steps", type=int, default=12, help="training steps per round")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="temperature of quantizers that have one (QN)")
    parser.add_argument("--learn-input-quantizers", action="store_true",
                        help="train(learn_input_quantizers=True)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    digits = load_builtin("mnist5k")
    count = args.steps * BATCH
    data = (digits.train_x[:count], digits.train_y[:count])
    calibration = [(batch,) for batch in digits.train_x[:256].split(BATCH)]
    example = (digits.train_x[:1],)
    modes = [mode == "compiled" for mode in args.modes.split(",")]

    model = SmallCNN(in_channels=1, classes=digits.classes)
    configs = []
    for compiled in modes:
        configs.append(Config("float", None, qcompile.trace(model, example), compiled))
        for bits in (int(b) for b in args.bits.split(",")):
            for method in args.methods.split(","):
                quantized = quantized_by(model, example, bits, method, calibration)
                for quantizer in annealable_quantizers(quantized):
                    quantizer.set_temperature(args.temperature)
                configs.append(Config(method, bits, quantized, compiled,
                                      args.learn_input_quantizers))

    for round_ in range(args.rounds + 1):
        for config in configs:
            start = time.perf_counter()
            seconds = config.train(data, seed=round_)
            if round_ == 0:
                config.warmup = time.perf_counter() - start
            else:
                config.steps.extend(seconds[1:])
        print(f"round {round_}/{args.rounds} done", flush=True)
    report(configs)


def report(configs: list[Config]) -> None:
    median = {(c.name, c.compiled): statistics.median(c.steps) for c in configs}
    eager_float = median.get(("float", False))
    print(f"\n{'model':16} {'mode':9} {'step ms':>8} {'/ float':>8} {'/ eager float':>13} "
          f"{'warm-up s':>9}")
    for config in configs:
        step = median[(config.name, config.compiled)]
        same_mode = median[("float", config.compiled)]
        versus_eager = f"{step / eager_float:13.2f}" if eager_float else f"{'-':>13}"
        print(f"{config.name:16} {'compiled' if config.compiled else 'eager':9} "
              f"{step * 1000:8.1f} {step / same_mode:8.2f} {versus_eager} {config.warmup:9.1f}")
    print(f"\nmachine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(configs[0].steps)} steps per median")


if __name__ == "__main__":
    main()
