"""``qcompile run`` and ``qcompile inspect``: use and describe a compiled ``.qc`` artifact.

``qcompile run model.qc --input x.npy [--output y.npy] [--profile [CALLS]]`` runs the model on a
saved array (the compiled input shape, or a batch of a multiple of it; float32, float64, or
uint8 images, scaled to [0, 1] as ``--data`` scales them) and prints the top class of each row;
with ``--profile`` it then times every kernel call over CALLS calls (default 20) on the first
compiled batch and prints the slowest
(:meth:`~qcompile.backends.tvm.compiled.CompiledModule.profile`); ``qcompile inspect model.qc``
prints the manifest: versions, target, shapes, per-layer bits and kernels, sizes.
"""

import argparse
from pathlib import Path

import numpy as np

from qcompile.data import float_inputs
from qcompile.errors import ConfigError, InputError
from qcompile.report import size_ratio


def run_command(argv: list[str]) -> int:
    parser = _parser("run", "run a compiled .qc model on an input array")
    parser.add_argument("artifact", help="a .qc file written by qcompile ... --out model.qc")
    parser.add_argument("--input", required=True,
                        help=".npy array of the compiled input shape, or a batch of a multiple "
                             "of it")
    parser.add_argument("--output", help="write the output array here (.npy)")
    parser.add_argument("--profile", nargs="?", const=20, type=int, metavar="CALLS",
                        help="then time every kernel call over CALLS calls (default 20) and "
                             "print the slowest")
    args = parser.parse_args(argv)
    from qcompile.api import load

    module = load(args.artifact)
    x = _array(args.input)
    y = module(x)
    if args.output:
        _save(args.output, y)
    for row, scores in enumerate(y.reshape(y.shape[0], -1)):
        print(f"{row}: class {int(scores.argmax())} (score {float(scores.max()):.4f})")
    if args.profile is not None:
        print(module.profile(x[:module.input_shape[0]], calls=args.profile).table())
    return 0


def inspect_command(argv: list[str]) -> int:
    parser = _parser("inspect", "describe a compiled .qc model")
    parser.add_argument("artifact")
    args = parser.parse_args(argv)
    from qcompile.api import load

    manifest = load(args.artifact).manifest
    versions = ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())
    print(f"{args.artifact}: compiled by {versions}")
    print(f"target: {manifest['target']}")
    print(f"input {manifest['input']['shape']} {manifest['input']['dtype']} -> output "
          f"{manifest['output']['shape']} {manifest['output']['dtype']}")
    print(f"{'layer':32} {'w bits':>6} {'a bits':>6}  kernel")
    for layer in manifest["layers"]:
        print(f"{layer['layer']:32} {layer['weight_bits']:6d} {layer['input_bits']:6d}  "
              f"{layer['kernel']}")
    sizes = manifest["bytes"]
    print(f"parameters {sizes['params']} bytes, float32 weights {sizes['fp32_weights']} bytes "
          f"({size_ratio(sizes['params'], sizes['fp32_weights'])}); compiled in "
          f"{manifest['compile_seconds']} s")
    return 0


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    from qcompile.cli import _Parser

    return _Parser(prog=f"qcompile {name}", description=description)


def _array(path: str) -> np.ndarray:
    if not Path(path).is_file():
        raise ConfigError(f"--input {path}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise InputError(f"--input {path} is not a .npy array ({error})") from None
    if array.dtype in (np.float64, np.uint8):  # uint8 images scaled as --data scales them
        array = float_inputs(array)
    return array


def _save(path: str, array: np.ndarray) -> None:
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
    temporary.replace(target)
