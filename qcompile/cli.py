"""The ``qcompile`` command line.

``qcompile MODEL [options]`` loads a model file, traces it, runs a pipeline of passes, prints the
pass log and a per-layer table, with ``--data`` trains the quantized graph (QAT, see
:mod:`qcompile.training_run`), and with ``--out`` writes the rewritten graph as a Python folder
(``torch.fx.GraphModule.to_folder``). Further commands (``qcompile run model.qc``,
``qcompile inspect model.qc``) join :data:`SUBCOMMANDS`; a first argument that is not one of
their names is the model of the compile command.

Any error a user can cause is one line on stderr (``qcompile: error: ...``) and exit code 2;
Ctrl-C exits 130; anything else is reported as an internal error, exit 1, and
``QCOMPILE_TRACEBACK=1`` shows its traceback.
"""

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.fx as fx

from qcompile import training_run
from qcompile.backends.onnx import FORMATS as ONNX_FORMATS
from qcompile.backends.onnx import export_onnx
from qcompile.errors import (
    ConfigError,
    InputError,
    QcompileError,
    TrainingInterrupted,
)
from qcompile.graph_folder import OUTPUT_CLASS, write_graph_folder
from qcompile.ir import trace
from qcompile.loading import load_model
from qcompile.pipeline import PassContext, PassManager
from qcompile.quant import available_methods
from qcompile.report import format_table, layer_report
from qcompile.user_code import load_plugin, resolve_leaf

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL_ERROR = 1
INPUT_SEED = 0

SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {}
"""Subcommand name -> handler taking the remaining arguments and returning the exit code."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = compile_command
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = SUBCOMMANDS[argv[0]], argv[1:]
    try:
        return command(argv)
    except TrainingInterrupted as stopped:
        return _fail(str(stopped), EXIT_INTERRUPTED)
    except QcompileError as error:
        return _fail(str(error), EXIT_USER_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERNAL_ERROR
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 0
    except Exception as error:
        return _fail(
            f"internal error: {type(error).__name__}: {error} "
            "(set QCOMPILE_TRACEBACK=1 to see the traceback)",
            EXIT_INTERNAL_ERROR,
        )


TORCH_NOTICES = {
    "torch._higher_order_ops.wrap": "context_fn is passed to torch.utils.checkpoint",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
"""Warnings torch logs during a compiled training run that ask nothing of the user, by logger:
that a selective checkpoint under ``torch.compile`` must hold no in-place operation (QN's
compiled quantizers use two, which hold none), and that a CUDA build of torch found no CUDA
runtime when inductor built its CPU kernels. Dropped unless ``--verbose``."""


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_torch_notices() -> None:
    for name, text in TORCH_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.text == text for f in logger.filters):
            logger.addFilter(_DropNotice(text))


def _fail(message: str, code: int) -> int:
    if _traceback_requested():
        traceback.print_exc()
    print(f"qcompile: error: {' '.join(message.split())}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one-line ConfigErrors, not usage dumps."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        bits = 0
    if not 1 <= bits <= 8:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 1 to 8, got {text!r}")
    return bits


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(size) for size in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive sizes such as 1,3,224,224, got {text!r}"
        )
    return shape


def _compile_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qcompile",
        description="Trace a PyTorch model, run a pipeline of rewrite passes, report its layers.",
    )
    parser.add_argument("model", help="state dict (.pt, with --arch), torch.export program "
                        "(.pt2) or pickled module (with --trust-pickle)")
    parser.add_argument("--arch", help="architecture of a state dict: torchvision:<name> or "
                        "package.module:ClassName, optionally with keyword arguments, e.g. "
                        "'package.module:ClassName(classes=3)'")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load a whole pickled module (unpickling runs code from the file)")
    parser.add_argument("--bits", type=_bits, default=2, help="bit-width, 1 to 8 (default 2)")
    parser.add_argument("--method", default="qil", choices=available_methods(),
                        help="quantization method (default qil)")
    parser.add_argument("--first-last-bits", type=_bits, default=8,
                        help="bit-width of the first and last layers (default 8)")
    parser.add_argument("--first-last-method", choices=available_methods(),
                        help="quantization method of the first and last layers (default: "
                        "--method, but lsq for --method qn when they have more than 4 bits)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="one weight scale per layer instead of per output channel")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-size", type=float, metavar="FRACTION",
                        help="mixed precision: weight bytes as a fraction of fp32, e.g. 0.1")
    budget.add_argument("--budget-bops", type=float, metavar="FRACTION",
                        help="mixed precision: bit operations as a fraction of fp32 x fp32")
    parser.add_argument("--bits-choices", default="2,3,4,8", metavar="B,B,...",
                        help="bit-widths mixed precision chooses from (default 2,3,4,8)")
    parser.add_argument("--passes", default="default",
                        help="pipeline spec, e.g. 'canonicalize,fold-bn{mode=qat}' "
                        "(default: the preset 'default')")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import a module (dotted name or .py path) that registers passes")
    parser.add_argument("--leaf", action="append", default=[], metavar="TYPE_OR_PATH",
                        help="keep a module type or module path whole when tracing")
    parser.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                        help="shape of the example input (default: what the model file says)")
    parser.add_argument("--out", type=Path,
                        help="write the rewritten graph to this folder, or, for a path ending "
                        "in .qc, the model compiled for --target (a deployable artifact)")
    parser.add_argument("--target", default="llvm",
                        help="compile target for --out model.qc: llvm (this CPU, with AMX "
                        "where it has it), llvm:CPU, cuda, cuda:sm_XX (default llvm)")
    parser.add_argument("--export-onnx", type=Path, metavar="PATH",
                        help="write the quantized model as an ONNX file")
    parser.add_argument("--onnx-format", choices=ONNX_FORMATS, default="qdq",
                        help="qdq (QuantizeLinear/DequantizeLinear, for onnxruntime) or qonnx "
                        "(QONNX Quant, for FINN) (default qdq)")
    parser.add_argument("--print-after", action="append", default=[], metavar="PASS",
                        help="print the graph after this pass ('all' for every pass)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    training_run.add_arguments(parser)
    return parser


def compile_command(argv: list[str]) -> int:
    """``qcompile MODEL ...``: load, trace, run the passes, report, optionally write.

    Under ``torchrun`` every process runs the command and trains its share of each batch; the
    first (``RANK`` 0) alone prints the report and writes the outputs, as it alone shows
    progress bars."""
    if os.environ.get("RANK", "0") != "0":
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return _compile(argv, write=False)
    return _compile(argv, write=True)


def _compile(argv: list[str], write: bool) -> int:
    args = _compile_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    else:
        _quiet_torch_notices()
    for plugin in args.plugin:
        load_plugin(plugin)
    manager = PassManager(args.passes, print_after=args.print_after)
    training_run.check_training_flags(args)
    _check_outputs(args)
    loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
    channels = training_run.input_channels(loaded.module,
                                           args.input_shape or loaded.example_input_shape)
    data = training_run.load_training_data(args, channels, training_run.required_shape(
        args.input_shape, loaded.example_input_shape, loaded.shape_is_fixed))
    shape = training_run.example_shape(data, args.input_shape, loaded.example_input_shape,
                                       loaded.shape_is_fixed)
    if shape is None:
        raise ConfigError(f"the input shape of {loaded.description} is not known; pass "
                          "--input-shape, e.g. --input-shape 1,3,224,224")
    example = (torch.randn(shape, generator=torch.Generator().manual_seed(INPUT_SEED)),)
    leaves = [resolve_leaf(loaded.module, name) for name in args.leaf]
    print(f"model: {loaded.description}, input {'x'.join(map(str, shape))}")
    if data is not None and data.repeated_channels:
        print(f"data: {data.name}, one-channel images repeated to the model's "
              f"{data.repeated_channels} channels")
    ctx = PassContext(example)
    hint = ("check --input-shape" if data is None or args.input_shape else
            f"the inputs of --data {data.name} are {'x'.join(map(str, shape[1:]))}: give data "
            "the model takes")
    gm = _trace(loaded.module, example, leaves, hint)
    options = _quantization_options(args)
    if data is not None:
        calibration = training_run.calibration_batches(data, args.batch_size)
        training_run.check_progressive(args)
        options.update(calib_data=calibration)
    result = manager.run(gm, example, ctx=ctx, **options)
    print("passes:")
    for record in ctx.records:
        print(f"  {record.summary()}")
    if data is not None:
        training_run.run_training(args, gm, result, data, calibration)
    print(format_table(layer_report(result)))
    if not write:
        return 0
    with training_run.trained_model_kept(args if data is not None else None):
        if args.out is not None and args.out.suffix == ".qc":
            _write_artifact(result, args.out, args.target, example)
        elif args.out is not None:
            write_graph_folder(result, args.out, example)
            print(f"wrote {args.out} (from {args.out.name} import {OUTPUT_CLASS}; call .eval())")
        if args.export_onnx is not None:
            export_onnx(result, args.export_onnx, example, format=args.onnx_format)
            print(f"wrote {args.export_onnx} (ONNX, {args.onnx_format})")
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Where ``--out`` and ``--export-onnx`` write, and ``--target`` for a ``.qc``, checked
    before anything runs, so that no training run ends in an output it cannot write. ``--out``
    makes missing folders above it; the ONNX file's folder must exist."""
    for flag, path in (("--out", args.out), ("--export-onnx", args.export_onnx)):
        if path is None:
            continue
        if (flag == "--export-onnx" or path.suffix == ".qc") and path.is_dir():
            raise ConfigError(f"{flag} {path} is a folder; give the path of the file to write")
        folder = path.parent
        if flag == "--export-onnx" and not folder.is_dir():
            raise ConfigError(f"{flag} {path}: the folder {folder} does not exist; create it "
                              "first")
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: {existing} is not a folder qcompile can write "
                              "in")
    if args.out is not None and args.out.suffix == ".qc":
        from qcompile.backends.tvm.target import resolve_target

        resolve_target(args.target)


def _write_artifact(result: fx.GraphModule, path: Path, target: str, example: tuple) -> None:
    """Compile ``result`` for ``target``, check it against the simulated model on the example
    input, and save the artifact."""
    from qcompile.api import compile as compile_model
    from qcompile.verify import verify

    compiled = compile_model(result, target, input_shape=tuple(example[0].shape))
    if compiled.device.exist:
        report = verify(result, compiled, example[0])
        print(f"integer program: {100 * report.min_match_fraction:.4f}% of codes equal the "
              f"simulated model's in the worst layer, output argmax agreement "
              f"{100 * report.argmax_agreement:.0f}%")
    compiled.save(path)
    sizes = compiled.manifest["bytes"]
    print(f"wrote {path} ({compiled.manifest['target']['kind']}, compiled in "
          f"{compiled.manifest['compile_seconds']} s; parameters {sizes['params']} bytes vs "
          f"{sizes['fp32_weights']} float32); run it with: qcompile run {path} --input x.npy")


def _quantization_options(args: argparse.Namespace) -> dict:
    options = dict(bits=args.bits, method=args.method, first_last_bits=args.first_last_bits,
                   per_channel=not args.per_tensor)
    if args.first_last_method:
        options["first_last_method"] = args.first_last_method
    if args.budget_size is not None or args.budget_bops is not None:
        options.update(budget_size=args.budget_size, budget_bops=args.budget_bops,
                       bits_choices=args.bits_choices)
    return options


def _trace(model, example, leaves, hint: str) -> fx.GraphModule:
    try:
        return trace(model, example, leaf_modules=leaves)
    except InputError as error:
        raise ConfigError(f"{error}; {hint}") from error


def _traceback_requested() -> bool:
    return os.environ.get("QCOMPILE_TRACEBACK") == "1"


def _register_subcommands() -> None:
    from qcompile import deploy_cli

    SUBCOMMANDS.update(run=deploy_cli.run_command, inspect=deploy_cli.inspect_command)


_register_subcommands()

if __name__ == "__main__":
    sys.exit(main())
