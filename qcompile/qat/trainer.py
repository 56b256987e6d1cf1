"""``qcompile.train``: quantization-aware training of a quantized graph, in one call.

Turns the arguments into the loop's parts (data sources, optimizer settings, distillation, the
process group under ``torchrun``) and runs :class:`~qcompile.qat.loop.Run`. One loop for every
quantizer and schedule: it owns the batch order, so with the checkpoint of
:mod:`qcompile.qat.checkpoint` a run that is stopped and resumed ends with the same weights, bit
for bit, as one that never stopped.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from qcompile.errors import ConfigError
from qcompile.qat import checkpoint, distributed
from qcompile.qat.loaders import as_source
from qcompile.qat.loop import Run, RunConfig
from qcompile.qat.metrics import History, MetricsLog
from qcompile.qat.optim import OptimConfig
from qcompile.qat.state import Schedule
from qcompile.quant.calibration import CALIB_EXAMPLES, calibration_batches


def train(
    qmodel: fx.GraphModule,
    train_data,
    val_data=None,
    *,
    epochs: int = 8,
    lr: float = 1e-3,
    quantizer_lr: float | None = None,
    weight_decay: float = 1e-4,
    optimizer: str = "adam",
    lr_schedule: str = "cosine",
    grad_clip: float | None = 1.0,
    batch_size: int = 64,
    teacher: nn.Module | None = None,
    distillation=None,
    schedules: Sequence[Schedule] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    calib_data: Iterable | None = None,
    device: str | torch.device | None = None,
    compile: bool = False,
    learn_input_quantizers: bool = False,
    bn_reestimation: int = 0,
) -> History:
    """Train the quantized graph ``qmodel`` in place; return the per-epoch :class:`History`.

    ``train_data``/``val_data``: a map-style Dataset, a DataLoader over one (its dataset, batch
    size and collate function are used), a list of ``(input, label)`` examples, or an
    ``(inputs, labels)`` pair of tensors or NumPy arrays (:mod:`.loaders`). The loss is
    cross-entropy, or ``distillation.loss`` when ``teacher=`` (shorthand for
    ``Distillation(teacher)``) or a configured ``distillation=`` is given; a frozen teacher's
    logits of tensor training data are computed once and looked up by index
    (:mod:`qcompile.qat.distill`; ``Distillation(teacher, cache=...)`` to choose). Quantizer
    parameters train at ``quantizer_lr`` (default ``lr``) without weight decay, as do biases and
    batch norm at ``lr``; the learning rate follows ``lr_schedule`` per optimizer step. ``schedules`` are
    :class:`Schedule` objects called at their hooks (None: ``default_schedules(qmodel)``,
    temperature annealing and batch-norm freezing where the model has them; pass a list to
    choose exactly); ``calib_data`` (input batches, in the forms ``qcompile.quantize`` takes;
    the first 64 examples) is theirs.

    With ``checkpoint_dir`` every epoch ends with ``checkpoint_dir/last.pt`` and a line in
    ``metrics.jsonl`` (or ``metrics_path``; a fresh run starts the file afresh), and
    ``resume=True`` continues from the checkpoint exactly. Ctrl-C stops at the next step
    boundary, saves a checkpoint there and raises :class:`~qcompile.errors.TrainingInterrupted`.
    Under ``torchrun`` the run is data-parallel (DDP), rank 0 logs and checkpoints. A fresh run
    seeds the global RNGs with ``seed`` (plus the rank); the model is left in eval mode.

    ``compile=True`` runs the training forward (and so its backward) through ``torch.compile``
    (inductor): on a small network the quantizers' many small elementwise operations cost more
    in dispatch than in arithmetic, and fused they cost little. The first steps and every batch
    size or module setting not seen before wait for a compilation; the model, its state dict
    and the checkpoints stay those of ``qmodel``, so a compiled run resumes exactly (when it
    resumes compiled). Validation runs eagerly.

    The quantizers of the model's own inputs keep their calibrated parameters for the run unless
    ``learn_input_quantizers=True`` (:func:`~qcompile.qat.quantizers.\
freeze_model_input_quantizers` says why); a quantizer the caller froze stays frozen either way.

    With ``bn_reestimation=N`` each epoch ends by recomputing the running statistics of the batch
    norms still updating them from ``N`` training examples (all processes together), with the
    model as validation runs it (:mod:`qcompile.qat.batchnorm`); the default 0 keeps the moving
    averages (re-estimating moves a fused conv-BN's weight codes, which follow the running
    variance: measured worse on mnist5k, benchmarks/RESULTS.md).
    """
    if not isinstance(qmodel, fx.GraphModule):
        raise ConfigError(f"train takes a graph: the one qcompile.quantize returns, or "
                          f"qcompile.trace(model, example_inputs) to train the float model; got "
                          f"a {type(qmodel).__name__}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if grad_clip is not None and grad_clip < 0:
        raise ConfigError(f"grad_clip must be positive (or None to disable), got {grad_clip!r}")
    if not isinstance(bn_reestimation, int) or bn_reestimation < 0:
        raise ConfigError(f"bn_reestimation is a number of training examples (0 to keep the "
                          f"moving averages), got {bn_reestimation!r}")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir of the run to resume")
    if teacher is not None:
        if distillation is not None:
            raise ConfigError("pass either teacher= or distillation=, not both")
        from qcompile.qat.distill import Distillation

        distillation = Distillation(teacher)
    optim = OptimConfig(lr, quantizer_lr, weight_decay, optimizer, lr_schedule)
    train_source = as_source(train_data, batch_size, "train_data")
    val_source = None if val_data is None else as_source(val_data, batch_size, "val_data")
    if metrics_path is None and checkpoint_dir is not None:
        metrics_path = Path(checkpoint_dir) / "metrics.jsonl"
    world = distributed.setup(device)
    try:
        config = RunConfig(epochs, seed, grad_clip, optim, progress,
                           None if checkpoint_dir is None else checkpoint.checkpoint_path(
                               checkpoint_dir), compile, learn_input_quantizers,
                           bn_reestimation)
        if schedules is None:
            from qcompile.qat.schedules import default_schedules

            schedules = default_schedules(qmodel)
        for schedule in schedules:
            if not isinstance(schedule, Schedule):
                raise ConfigError(f"schedules holds a {type(schedule).__name__}; a schedule "
                                  "subclasses qcompile.qat.Schedule (its hooks, state_dict and "
                                  "load_state_dict)")
        run = Run(qmodel, train_source, val_source, config, list(schedules), distillation, world,
                  _calibration(calib_data, qmodel, world.device))
        problem = (_output_problem(config.checkpoint, metrics_path, resume) if world.is_main
                   else None)
        if world.any(problem is not None):
            raise ConfigError(problem or "the first process cannot start this run: see its error")
        if metrics_path is not None and world.is_main:
            run.metrics = MetricsLog(metrics_path)
        return run.fit(resume)
    finally:
        world.close()


def _output_problem(path: Path | None, metrics_path, resume: bool) -> str | None:
    """What keeps the run from writing its checkpoint and metrics, said before the first step
    (None: nothing): a folder that cannot be made or written, or, on a fresh run, a checkpoint
    of an unfinished run that the first epoch's would overwrite."""
    for folder, what in ((path and path.parent, "checkpoint_dir"),
                         (metrics_path and Path(metrics_path).parent, "metrics_path")):
        problem = None if folder is None else checkpoint.folder_problem(folder, what)
        if problem is not None:
            return problem
    stopped = None if path is None or resume else checkpoint.unfinished_run(path)
    if stopped is None:
        return None
    return (f"{path} holds an unfinished run (stopped {stopped}), which a fresh run would "
            "overwrite: continue it with resume=True (CLI: --resume), or start afresh in another "
            "checkpoint_dir (CLI: --checkpoint-dir) or once that file is deleted")


def _calibration(calib_data, model: fx.GraphModule, device: torch.device) -> list[tuple]:
    """The batches schedules recalibrate from, on ``device``: as many as the recalibration
    reads, in the forms :func:`~qcompile.quant.calibration.calibration_batches` takes."""
    inputs = sum(node.op == "placeholder" for node in model.graph.nodes)
    return [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)
            for batch in calibration_batches(calib_data, CALIB_EXAMPLES, inputs)]
