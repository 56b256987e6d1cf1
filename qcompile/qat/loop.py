"""The training loop: epochs of steps, schedule hooks, validation, records, interrupts.

Each step: the schedules' ``on_step_start``, forward, the loss (cross-entropy, or the
distillation's, whose frozen teacher's logits are computed once before the first step where the
data allow: :mod:`~qcompile.qat.distill`), backward, gradient clipping, the optimizer step and
the per-step learning-rate step. Each epoch ends with the schedules' ``on_epoch_end``,
batch-norm re-estimation when asked for (:mod:`~qcompile.qat.batchnorm`), validation, a record
in the history and the metrics file, and a checkpoint. Checkpoint saving and restoring live in
:class:`~qcompile.qat.session.Session`.
"""

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qcompile.errors import TrainingInterrupted
from qcompile.qat import checkpoint, distributed
from qcompile.qat.batchnorm import reestimate_batch_norms
from qcompile.qat.interrupt import StopRequests
from qcompile.qat.loaders import (
    EpochBatches,
    Source,
    check_examples,
    evaluation_loader,
    split_batch,
)
from qcompile.qat.metrics import EpochMeter, History, MetricsLog
from qcompile.qat.optim import OptimConfig, make_lr_schedule, make_optimizer, parameter_groups
from qcompile.qat.quantizers import (
    attach_gates,
    detach_gates,
    drop_gated_off_gradients,
    freeze_model_input_quantizers,
    refresh_windows,
    sync_gates,
    window_quantizers,
)
from qcompile.qat.session import Session
from qcompile.qat.state import Schedule, TrainState, noticing_parameter_changes

log = logging.getLogger("qcompile.qat")


@dataclass(frozen=True)
class RunConfig:
    epochs: int
    seed: int
    grad_clip: float | None
    optim: OptimConfig
    progress: bool
    checkpoint: Path | None
    compile: bool = False
    learn_input_quantizers: bool = False
    bn_examples: int = 0


class Run(Session):
    """One call of :func:`train`: the loop itself (checkpoint state lives in :class:`Session`)."""

    def __init__(self, model: fx.GraphModule, train: Source, val: Source | None, config: RunConfig,
                 schedules: list[Schedule], distillation, world: distributed.Distributed,
                 calib_data: list[tuple[torch.Tensor, ...]]):
        self.model = model.to(world.device)
        self.quantizers = checkpoint.quantizer_settings(self.model)
        check_examples(self.model, train, world.device, "train_data")
        if val is not None:
            check_examples(self.model, val, world.device, "val_data")
        self.val = val
        self.config = config
        self.schedules = schedules
        self.distillation = distillation
        self.world = world
        self.batches = EpochBatches(train, config.seed, world.world_size, world.rank)
        self.state = TrainState(self.model, config.epochs, len(self.batches), config.seed,
                                calib_data=calib_data,
                                reestimate_batch_norms=self.reestimate_batch_norms
                                if config.bn_examples else None,
                                synchronize=lambda: world.broadcast_state(self.model))
        self.history = History()
        self.meter = EpochMeter()
        self.metrics: MetricsLog | None = None
        self.opened = False
        self.safe = False
        self.before_hooks = None
        self.frozen: list[nn.Parameter] = []
        self.teacher = None if distillation is None else distillation.teacher.to(world.device)
        self.cached = False
        self.gated: list = []
        self.windowed: list = []

    def fit(self, resume: bool) -> History:
        """Train from the start or from the checkpoint; the teacher, when trained jointly under
        ``torchrun``, is wrapped in DDP for the run so that its gradients are averaged too."""
        if self.distillation is not None and self.distillation.trainable_parameters():
            self.distillation.teacher = self.world.wrap(self.teacher)
        try:
            self.train_all(resume)
        finally:
            if self.distillation is not None:
                self.distillation.teacher = self.teacher
            if self.cached:
                self.distillation.drop_cache()
            for param in self.frozen:
                param.requires_grad_(True)
            detach_gates(self.gated)
        self.world.broadcast_buffers(self.model)
        if self.distillation is not None and self.distillation.trainable_parameters():
            self.world.broadcast_buffers(self.teacher)
        self.model.eval()
        self.set_teacher_mode(training=False)
        self.history.seconds = self.elapsed()
        return self.history

    def train_all(self, resume: bool) -> None:
        started = time.perf_counter()
        self.clock = (started, 0.0)
        if resume:
            self.resume()
        else:
            self.start()
        self.clock = (started, self.history.seconds)
        self.cache_teacher()
        with StopRequests() as stop, graph_room(self.config.compile):
            try:
                self.safe = True
                while self.state.epoch < self.config.epochs:
                    self.run_epoch(stop)
            except (KeyboardInterrupt, _StopRequested) as interrupt:
                self.interrupted(collective=isinstance(interrupt, _StopRequested))

    def start(self) -> None:
        if self.val is not None:
            self.history.initial_val_accuracy = self.evaluate()[1]
        seed = self.config.seed + self.world.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        for schedule in self.schedules:
            schedule.on_train_start(self.state)
        self.build_optimizer()
        if self.metrics is not None:
            self.metrics.restart([])

    def cache_teacher(self) -> None:
        """The frozen teacher's logits of every training example, computed once when the
        distillation caches them for this data (:mod:`.distill`); each process computes all."""
        source = self.batches.source
        self.cached = (hasattr(self.distillation, "caches")
                       and self.distillation.caches(source.dataset, source.collate_fn))
        if self.cached:
            batches = tqdm(evaluation_loader(self.batches.source), unit="batch", leave=False,
                           desc="teacher logits", dynamic_ncols=True,
                           disable=not (self.config.progress and self.world.is_main))
            with batches:
                self.distillation.fill_cache(split_batch(batch, self.world.device)[0]
                                             for batch in batches)

    def build_optimizer(self) -> None:
        """A fresh optimizer and LR schedule (advanced to the current step) over the model's
        current parameters, and the DDP wrapper over them."""
        self.state.structure_changed = False
        self.model.to(self.world.device)
        if not self.config.learn_input_quantizers:
            self.frozen += freeze_model_input_quantizers(self.model)
        teacher = self.distillation.trainable_parameters() if self.distillation else []
        groups = parameter_groups(self.model, self.config.optim, teacher)
        self.parameters = [p for group in groups for p in group["params"]]
        self.model_parameters = [p for group in groups if group["name"] != "teacher"
                                 for p in group["params"]]
        self.optimizer = make_optimizer(groups, self.config.optim)
        self.lr_schedule = make_lr_schedule(self.optimizer, self.config.optim,
                                            self.state.total_steps, self.state.step)
        self.windowed = window_quantizers(self.model)
        if self.config.compile and any(getattr(schedule, "switches_every_step", False)
                                       for schedule in self.schedules):
            self.gated = attach_gates(self.model, self.world.device)
        unused = self.world.enabled and (
            any(schedule.may_leave_parameters_unused for schedule in self.schedules)
            or not distributed.every_parameter_used(self.model))
        self.forward_model = self.world.wrap(self.model, unused_parameters=unused)
        if self.config.compile:
            self.forward_model = compiled(self.forward_model, self.world.device)
        if self.distillation is not None and hasattr(self.distillation, "attach"):
            self.distillation.attach(self.model)

    def run_epoch(self, stop: StopRequests) -> None:
        state = self.state
        if not self.opened:
            self.call_hooks("on_epoch_start")
            self.opened = True
        if state.structure_changed:
            self.build_optimizer()
        self.model.train()
        self.set_teacher_mode(training=True)
        bar = tqdm(total=state.steps_per_epoch, initial=state.batch, unit="step", leave=False,
                   desc=f"epoch {state.epoch + 1}/{state.epochs}", dynamic_ncols=True,
                   disable=not (self.config.progress and self.world.is_main))
        with bar:
            batches = iter(self.batches.loader(state.epoch, skip=state.batch))
            order = iter(self.batches.indices(state.epoch)[state.batch:])
            while True:
                if self.world.any(stop.requested):
                    raise _StopRequested
                started = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                indices = next(order)
                self.step(*split_batch(batch, self.world.device), started,
                          torch.tensor(indices) if self.cached else None)
                bar.update(1)
                bar.set_postfix(loss=f"{self.meter.loss:.3f}", acc=f"{self.meter.accuracy:.1%}",
                                samples_s=f"{self.meter.count / self.meter.seconds:.0f}",
                                refresh=False)
        self.close_epoch()

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, started: float,
             indices: torch.Tensor | None = None) -> None:
        state = self.state
        self.call_hooks("on_step_start")
        if state.structure_changed:
            self.build_optimizer()
        if self.config.compile:
            refresh_windows(self.windowed)
            sync_gates(self.gated)
        self.safe = False
        logits = self.forward_model(inputs)
        if self.distillation is not None:
            loss, figures = (self.distillation.loss(inputs, labels, logits, indices)
                             if indices is not None else
                             self.distillation.loss(inputs, labels, logits))
        else:
            loss, figures = F.cross_entropy(logits, labels), {}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        drop_gated_off_gradients(self.gated)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        state.step += 1
        state.batch += 1
        correct = int((logits.detach().argmax(dim=1) == labels).sum())
        seconds = time.perf_counter() - started
        self.meter.add(float(loss.detach()), correct, len(labels), figures)
        self.meter.seconds += seconds
        self.history.step_seconds.append(seconds)
        self.safe = True

    def call_hooks(self, hook: str) -> None:
        """Call ``hook`` of every schedule. Should one of them raise KeyboardInterrupt, the
        checkpoint holds the schedules' states from before any of them ran, since the resumed run
        calls the hooks again (module switches they flipped are set again by those calls)."""
        if not self.schedules:
            return
        self.before_hooks = self.schedule_states()
        with noticing_parameter_changes(self.state, self.model_parameters):
            for schedule in self.schedules:
                getattr(schedule, hook)(self.state)
        self.before_hooks = None

    def close_epoch(self) -> None:
        """Schedules' epoch-end figures, validation, the epoch's record and the checkpoint."""
        self.safe = False
        state = self.state
        figures = {}
        with noticing_parameter_changes(state, self.model_parameters):
            for schedule in self.schedules:
                for key, value in (schedule.on_epoch_end(state) or {}).items():
                    figures[f"{schedule.name}.{key}" if key in figures else key] = value
        reestimated = self.reestimate_batch_norms()
        if reestimated:
            figures["bn_reestimated"] = reestimated
        val_loss, val_accuracy = self.evaluate() if self.val is not None else (None, None)
        totals = self.meter.totals(self.world.all_reduce_sum)
        record = dict(epoch=state.epoch + 1, step=state.step,
                      train_loss=totals.pop("train_loss"),
                      train_accuracy=totals.pop("train_accuracy"), val_loss=val_loss,
                      val_accuracy=val_accuracy, lr=self.optimizer.param_groups[0]["lr"],
                      seconds=self.meter.seconds,
                      samples_per_second=totals.pop("samples_per_second"))
        record.update(totals)
        record.update({key: value for key, value in figures.items() if key not in record})
        self.history.records.append(record)
        if self.metrics is not None:
            self.metrics.append(record)
        if self.config.progress and self.world.is_main:
            tqdm.write(_summary(record, state.epochs))
        state.epoch += 1
        state.batch = 0
        self.opened = False
        self.meter = EpochMeter()
        if self.config.checkpoint is not None:
            self.save()
        self.safe = True

    def reestimate_batch_norms(self) -> int:
        """Running statistics of the updating batch norms recomputed from the first
        ``bn_examples`` training examples of this epoch's order (:mod:`.batchnorm`); returns the
        examples this process used (0 when the run does not re-estimate)."""
        if not self.config.bn_examples:
            return 0
        examples = -(-self.config.bn_examples // self.world.world_size)
        batches = (split_batch(batch, self.world.device)[0]
                   for batch in self.batches.loader(self.state.epoch))
        return reestimate_batch_norms(self.model, batches, examples,
                                      self.world.average_ if self.world.enabled else None)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Cross-entropy and top-1 accuracy on the validation data (every process's share)."""
        self.world.broadcast_buffers(self.model)
        self.model.eval()
        self.set_teacher_mode(training=False)
        loss_sum = correct = count = 0.0
        for batch in evaluation_loader(self.val, self.world.world_size, self.world.rank):
            inputs, labels = split_batch(batch, self.world.device)
            logits = self.model(inputs)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += len(labels)
        loss_sum, correct, count = self.world.all_reduce_sum([loss_sum, correct, count])
        self.model.train()
        self.set_teacher_mode(training=True)
        return loss_sum / max(count, 1), correct / max(count, 1)

    def set_teacher_mode(self, training: bool) -> None:
        """A teacher trained jointly follows the student's mode; a fixed one stays in eval."""
        if self.distillation is not None:
            joint = bool(self.distillation.trainable_parameters())
            self.distillation.teacher.train(training and joint)

    def interrupted(self, collective: bool) -> None:
        """Save what can be resumed exactly, say how to continue, raise TrainingInterrupted."""
        state, path = self.state, self.config.checkpoint
        where = (f"training interrupted at epoch {state.epoch + 1}/{state.epochs}, batch "
                 f"{state.batch}/{state.steps_per_epoch} (step {state.step})")
        unsaved = ("in the middle of a step or an epoch's end" if not self.safe else
                   "on this process alone (a checkpoint needs every process)")
        if path is None:
            message = (f"{where}; progress was not saved (no checkpoint_dir): pass "
                       "checkpoint_dir to make training resumable")
        elif self.safe and (collective or not self.world.enabled):
            self.save()
            message = (f"{where}; progress saved to {path}: run again with resume=True "
                       "(CLI: --resume) to continue")
        elif path.is_file():
            message = (f"{where}, {unsaved}; the last complete checkpoint {path} is kept: run "
                       "again with resume=True (CLI: --resume) to continue from it")
        else:
            message = f"{where}, {unsaved}, before any checkpoint; progress was not saved"
        log.info(message)  # the exception carries it; the CLI prints it as its one error line
        saved = str(path) if path is not None and path.is_file() else None
        raise TrainingInterrupted(message, checkpoint=saved) from None


def compiled(module: nn.Module, device: torch.device) -> nn.Module:
    """``module``'s training forward compiled by ``torch.compile`` (inductor), with static shapes.

    The wrapper only calls ``module``, whose state (parameters, buffers, flags the schedules set)
    stays the one the run saves and loads. DDP goes inside it, as the torch.compile docs ask.
    Static shapes give every batch size its own graph (the short last batch compiles once), so
    which graph a full batch runs never depends on the batch sizes seen before, in this process
    or in a resumed one, which keeps resumed runs bit for bit. Changed module settings (a
    quantizer switched off, hard mode, frozen batch norm, new quantizers) recompile as guards
    fail (:func:`graph_room`). Schedules that switch quantizers every step (stochastic precision)
    get gates instead (:func:`attach_gates`): the switches are tensors the one graph reads.

    On the CPU the backward graph gets inductor's layout optimization as the forward graph does
    (``force_layout_optimization``; on the CPU inductor gives it to every graph with a
    convolution, and the backward graph holds only ``convolution_backward`` nodes). Without it,
    inductor orders a convolution's output gradient by the strides of its weight gradient, and
    the channels-last weight of a one-channel convolution (16x1x3x3: strides 9, 1, 3, 1) ties
    two of them: the small CNN's first convolution then received a 64x16x28x28 gradient in an
    order neither channels-last nor contiguous, which ``aten.convolution_backward`` copied on
    every step (0.2-1.3 ms). A parameter weight keeps contiguous strides, so float models never
    met it; compiled quantized steps, float and all six methods in one process: 0.5-0.9 ms
    faster, float the same (``benchmarks/RESULTS.md``). Elsewhere inductor decides as usual.
    """
    options = {"force_layout_optimization": True} if device.type == "cpu" else None
    graph = torch.compile(module, dynamic=False, options=options)
    return OneChannelChannelsLast(graph) if device.type == "cpu" else graph


class OneChannelChannelsLast(nn.Module):
    """Calls ``module`` with a one-channel image batch (N, 1, H, W) given channels-last strides
    (H*W, 1, W, 1): the same memory, a view (:func:`compiled`, on the CPU).

    The strides of a dimension of size 1 mean nothing to torch, which takes a contiguous
    one-channel batch, strides (H*W, H*W, W, 1), as channels-last already, so inductor's layout
    optimization hands it to the first convolution as it is. oneDNN's convolution reads the
    input's strides to choose its memory format, and with those it chose the plain one in the
    backward pass: it copied the channels-last output gradient (64x16x28x28 on the small CNN)
    to its own layout and computed the weight gradient there, 3-4x slower. A quantized model
    never met it, since its first convolution reads the input quantizer's output, which inductor
    lays out itself; the float model did, on every step: its compiled step was 0.6-1 ms slower
    than it needs to be on the small CNN (``benchmarks/RESULTS.md``).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inputs):
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.shape[1] == 1 \
                and inputs.is_contiguous():
            height, width = inputs.shape[2:]
            inputs = inputs.as_strided(inputs.shape, (height * width, 1, width, 1))
        return self.module(inputs)


COMPILED_GRAPHS = 64
"""How many graphs of the training forward a compiled run may build (:func:`graph_room`)."""


def graph_room(compile: bool):
    """Dynamo's recompile limit raised to :data:`COMPILED_GRAPHS` for the training loop when it
    compiles (a context manager; the process's own setting is back afterwards, and kept when it
    is higher already).

    Past dynamo's default limit of 8 graphs per function, each new combination of settings would
    run eagerly for the rest of the process, and the graphs a run makes multiply: one per batch
    size (a short last batch), per QN window size (the full sum, the window of 2, the nearest
    threshold; at 6-8 bits up to four more), per state of each schedule (batch norm frozen or
    not, each progressive bit-width, quantizers set hard). A QN W4A4 run on the MNIST benchmark
    makes 4 (three window sizes, then frozen batch norms); a short last batch doubles that, and
    progressive bit-widths multiply it again.
    """
    if not compile:
        return contextlib.nullcontext()
    limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS)
    return torch._dynamo.config.patch(recompile_limit=limit)


class _StopRequested(Exception):
    """Every process saw a stop request (Ctrl-C, SIGTERM) at a step boundary."""


def _summary(record: dict, epochs: int) -> str:
    text = (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, "
            f"accuracy {record['train_accuracy']:.2%}")
    if record["val_accuracy"] is not None:
        text += f"; val loss {record['val_loss']:.4f}, accuracy {record['val_accuracy']:.2%}"
    if record["samples_per_second"]:
        text += f"; {record['samples_per_second']:.0f} samples/s"
    return text
