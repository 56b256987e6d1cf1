"""The command line's training stage: data, calibration, QAT with the chosen schedules, summary.

``qcompile MODEL --data mnist5k --epochs 8 [--distill] [--progressive] [--stochastic-precision]
[--compile]`` quantizes the model with calibration on the training data, trains it, and prints
the float accuracy and the quantized accuracy before and after QAT. ``--resume`` rebuilds the
same quantized graph and continues from the run's checkpoint.
"""

import argparse
import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.fx as fx

from qcompile.data import Datasets, load_data
from qcompile.errors import ConfigError, QcompileError, TrainingInterrupted

CALIBRATION_EXAMPLES = 256
DEFAULTS = {"epochs": 8, "lr": 1e-3, "batch_size": 64}
"""The training numbers an option leaves unset takes (set by :func:`check_training_flags`, so
that one given without --data can be told from the default)."""
PROGRESSIVE_CHOICES = ("bits", "weights-first", "both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (QAT)")
    group.add_argument("--data", help="train on: mnist5k, digits, imagefolder:PATH or a .npz file")
    group.add_argument("--epochs", type=int, help=f"QAT epochs (default {DEFAULTS['epochs']})")
    group.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULTS['lr']})")
    group.add_argument("--batch-size", type=int,
                       help=f"batch size (default {DEFAULTS['batch_size']})")
    group.add_argument("--distill", action="store_true",
                       help="distil from the float model (knowledge distillation)")
    group.add_argument("--progressive", nargs="?", const="bits", choices=PROGRESSIVE_CHOICES,
                       help="progressive quantization: bit-width 8 -> 4 -> --bits ('bits', the "
                       "default), weights before activations ('weights-first'), or 'both'")
    group.add_argument("--stochastic-precision", action="store_true",
                       help="run a random subset of layers in full precision, fewer over time")
    group.add_argument("--fixed-thresholds", action="store_true",
                       help="QN: keep the thresholds at the midpoints between levels and learn "
                       "the scales alone, as the paper's released code does (faster at 4 bits)")
    group.add_argument("--compile", action="store_true",
                       help="run the training step through torch.compile: steps 2-3x faster on "
                       "CPU after a compilation of seconds to a minute; resume a compiled run "
                       "with --compile too, for the same weights bit for bit")
    group.add_argument("--checkpoint-dir", type=Path,
                       help="where checkpoints and metrics go (default: MODEL's name + .qat)")
    group.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")


def check_training_flags(args: argparse.Namespace) -> None:
    """Training options without --data, counts that are not positive or a learning rate that is
    not a non-negative number: ConfigError, before anything runs. Sets the unset numbers to
    :data:`DEFAULTS`."""
    if args.data is None:
        for flag in ("epochs", "lr", "batch_size", "checkpoint_dir", "distill", "progressive",
                     "stochastic_precision", "resume", "compile", "fixed_thresholds"):
            if getattr(args, flag) not in (None, False):
                raise ConfigError(f"--{flag.replace('_', '-')} trains the model: give --data too")
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.epochs < 1 or args.batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be positive integers")
    if not (math.isfinite(args.lr) and args.lr >= 0):
        raise ConfigError(f"--lr must be a finite non-negative number, got {args.lr}")


def load_training_data(args: argparse.Namespace, channels: int | None = None,
                       shape: tuple[int, ...] | None = None) -> Datasets | None:
    """The --data datasets (None without --data), their images given the model's ``channels``
    when known (:func:`~qcompile.data.load_data`); :func:`check_training_flags` comes first.

    ``shape``: the (N, C, H, W) input the model is to take, from --input-shape or a model that
    fixes it; an ``imagefolder`` is resized to its height and width (without one, to the first
    image's size), since image folders seldom hold images of one size."""
    if args.data is None:
        return None
    size = tuple(shape[2:]) if shape is not None and len(shape) == 4 else None
    return load_data(args.data, channels=channels, image_size=size)


def input_channels(model: torch.nn.Module, shape: tuple[int, ...] | None) -> int | None:
    """The image channels ``model`` reads: from its (N, C, H, W) input ``shape`` when known,
    else those of its first 2-d convolution (in module order, where a network's stem comes
    first), else None."""
    if shape is not None:
        return shape[1] if len(shape) == 4 else None
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return None if first is None else first.in_channels


def required_shape(given: tuple[int, ...] | None, model: tuple[int, ...] | None,
                   fixed: bool) -> tuple[int, ...] | None:
    """The input shape asked for: ``given`` (--input-shape), else the model's where it takes
    that shape only (``fixed``), else None."""
    return given or (model if fixed else None)


def example_shape(data: Datasets | None, given: tuple[int, ...] | None,
                  model: tuple[int, ...] | None, fixed: bool) -> tuple[int, ...] | None:
    """The shape of the example input the model is traced with: ``given`` (--input-shape),
    else the model's (``fixed``: the only one it takes), else, with --data, the data's.

    With --data the model is trained and deployed on the data, so the data decides where the
    model's shape is only the usual one (a torchvision classifier's 3x224x224 takes MNIST's
    28x28 as well); a shape that --input-shape gives or the model fixes must agree with it."""
    if data is None:
        return given or model
    shape = (1, *data.input_shape)
    wanted = required_shape(given, model, fixed)
    if wanted is not None and tuple(wanted[1:]) != shape[1:]:
        if given:
            raise ConfigError(f"--input-shape {','.join(map(str, given))} does not fit --data "
                              f"{data.name}, whose inputs are {_size(shape[1:])}; leave "
                              "--input-shape out to take the data's")
        raise ConfigError(f"the model takes only inputs of {_size(wanted[1:])} and --data "
                          f"{data.name} has {_size(shape[1:])}; export the model for the data's "
                          "size, or give data of the model's")
    return (wanted[0], *shape[1:]) if wanted is not None else shape


def _size(shape) -> str:
    return "x".join(map(str, shape))


def calibration_batches(data: Datasets, batch_size: int) -> list[tuple[torch.Tensor]]:
    count = min(CALIBRATION_EXAMPLES, len(data.train))
    inputs = torch.stack([data.train[i][0] for i in range(count)])
    return [(batch,) for batch in inputs.split(batch_size)]


def check_progressive(args: argparse.Namespace) -> None:
    """Progressive bit-widths lower every middle layer to --bits; a budget's mix would be lost."""
    if args.progressive in ("bits", "both") and (
        args.budget_size is not None or args.budget_bops is not None
    ):
        raise ConfigError("--progressive bits and a mixed-precision budget do not combine")


def checkpoint_dir(args: argparse.Namespace) -> Path:
    """Where the run's checkpoints go: ``--checkpoint-dir``, else MODEL's name + ``.qat``."""
    return args.checkpoint_dir or Path(f"{Path(args.model).stem}.qat")


@contextlib.contextmanager
def trained_model_kept(args: argparse.Namespace | None) -> Iterator[None]:
    """Around what the command writes after training (``args`` None: nothing was trained): an
    error or Ctrl-C there also says that the trained model is in the run's checkpoint, from
    which ``--resume`` writes the outputs without training again."""
    try:
        yield
    except (QcompileError, KeyboardInterrupt) as error:
        if args is None or isinstance(error, TrainingInterrupted):
            raise
        kept = (f"the trained model is kept in {checkpoint_dir(args)}: run again with --resume "
                "to write the outputs without training again")
        if isinstance(error, KeyboardInterrupt):
            raise TrainingInterrupted(f"interrupted after training; {kept}") from None
        error.args = (f"{error}; {kept}",)
        raise


def run_training(args, float_model: fx.GraphModule, quantized: fx.GraphModule, data: Datasets,
                 calibration) -> None:
    from qcompile.qat import (
        ProgressiveActivations,
        ProgressiveBits,
        StochasticPrecision,
        default_schedules,
        train,
    )

    from qcompile.quant.qn import fix_thresholds

    if args.fixed_thresholds and not fix_thresholds(quantized):
        raise ConfigError("--fixed-thresholds keeps the thresholds of QN's quantizers, and this "
                          f"model has none (--method {args.method}): use it with --method qn")
    schedules = default_schedules(quantized)
    if args.progressive in ("bits", "both") and args.bits < 8:
        stages = tuple(sorted({8, 4, args.bits} & set(range(args.bits, 9)), reverse=True))
        schedules.append(ProgressiveBits(stages=stages))
    if args.progressive in ("weights-first", "both"):
        schedules.append(ProgressiveActivations())
    if args.stochastic_precision:
        schedules.append(StochasticPrecision())
    checkpoints = checkpoint_dir(args)
    float_accuracy = accuracy(float_model, data.val, args.batch_size)
    history = train(quantized, data.train, data.val, epochs=args.epochs, lr=args.lr,
                    batch_size=args.batch_size, teacher=float_model if args.distill else None,
                    schedules=schedules, checkpoint_dir=checkpoints, resume=args.resume,
                    calib_data=calibration, compile=args.compile)
    print(f"summary: float accuracy {float_accuracy:.2%}; quantized "
          f"{_percent(history.initial_val_accuracy)} before QAT -> "
          f"{_percent(history.final_val_accuracy)} after {args.epochs} "
          f"epoch{'s' * (args.epochs != 1)} "
          f"(checkpoints and metrics.jsonl in {checkpoints})")


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset, batch_size: int) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(batch_size, 256))
    correct = total = 0
    for inputs, labels in loader:
        correct += int((model(inputs).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
