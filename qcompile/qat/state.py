"""What the training loop shares with its schedules: the training state and the schedule protocol.

A schedule (progressive quantization, stochastic precision, temperature annealing, batch-norm
freezing, ...) is an object with hooks the loop calls at fixed points. It changes the model only
through those hooks and keeps all of its own state in ``state_dict()``, so a resumed run replays
it exactly. Randomness a schedule needs comes from :meth:`TrainState.generator`, seeded by the
run's seed and the global step, never from the global RNG.

Order of the calls. A fresh run: ``on_train_start``; then per epoch ``on_epoch_start``, per step
``on_step_start`` (``state.step`` = steps done so far) before the forward pass, and
``on_epoch_end`` after the epoch's last step (after the last epoch ``state.step ==
state.total_steps``, ``state.progress == 1``). After any hook that sets ``structure_changed``,
the loop rebuilds the optimizer and resets the flag; it sets the flag itself when a hook changed
which of the model's parameters train (:func:`noticing_parameter_changes`). A resumed run: set
``state.epoch`` and ``state.step`` from the checkpoint, call each schedule's
``load_state_dict`` and then ``prepare_for_resume``, then load the model's state dict, build the
optimizer and load its state, then ``on_train_start``.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)


@dataclass
class TrainState:
    """Where training is: the model being trained, the position, and the run's fixed facts."""

    model: fx.GraphModule
    epochs: int
    steps_per_epoch: int
    seed: int = 0
    epoch: int = 0
    step: int = 0
    calib_data: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    structure_changed: bool = False
    """A schedule that replaces modules (new parameters) sets this; the loop then rebuilds the
    optimizer and learning-rate schedule over the new parameters."""
    batch: int = 0
    """Batches done in the current epoch (where a mid-epoch checkpoint resumes)."""
    reestimate_batch_norms: Callable[[], int] | None = None
    """Recomputes the running statistics of the batch norms still updating them from training
    data (:mod:`qcompile.qat.batchnorm`); set by the training loop."""
    synchronize: Callable[[], None] = lambda: None
    """Makes every process's model rank 0's, parameters and buffers (nothing in a single
    process): for a schedule that set parameters from what the processes see apart, such as
    activations computed with each one's own batch-norm running statistics; set by the loop."""

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(self.step / max(self.total_steps, 1), 1.0)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A generator seeded by (seed, step, salt): the same draws when a run is resumed."""
        return torch.Generator().manual_seed(hash((self.seed, self.step, salt)) & 0x7FFFFFFF)


class Schedule:
    """Base of every training schedule; each hook does nothing unless overridden."""

    name: str = "schedule"
    may_leave_parameters_unused: bool = True
    """Whether a step may run with some of the model's parameters out of the loss (a quantizer
    switched off). Under ``torchrun`` DDP then looks for such parameters after every backward
    pass, and warns on every process when it finds none; a schedule that never switches
    anything off says False."""

    def prepare_for_resume(self, state: TrainState) -> None:
        """On resume only: after :meth:`load_state_dict` and before the model's saved
        ``state_dict`` is loaded, bring the model's structure (which modules exist, their shapes)
        to where the saved run was, so that state dict loads. ``state.model`` is the model as
        freshly built (e.g. by ``qcompile.quantize``); the loop rebuilds its optimizer after."""

    def on_train_start(self, state: TrainState) -> None:
        """Before the first step (also after a resume, once the state has been loaded)."""

    def on_epoch_start(self, state: TrainState) -> None:
        """Before each epoch's first step."""

    def on_step_start(self, state: TrainState) -> None:
        """Before each optimizer step's forward pass."""

    def on_epoch_end(self, state: TrainState) -> dict[str, Any]:
        """After each epoch; returns figures to log (e.g. the current bit-width)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


@contextlib.contextmanager
def noticing_parameter_changes(state: TrainState,
                               trained: list[torch.nn.Parameter]) -> Iterator[None]:
    """Around schedule hooks: sets ``state.structure_changed`` when, after them, the parameters
    of ``state.model`` that require a gradient are no longer ``trained`` (the model's parameters
    in the optimizer). A schedule that replaced modules without setting the flag would otherwise
    train on with new parameters left out of the optimizer, and with removed ones left in it,
    whose optimizer state a resumed run (which rebuilds the structure and then the optimizer)
    could not load. It costs nothing unless a module or parameter is registered while it is open
    (torch's global registration hooks); only then are the two sets compared."""
    registered = []

    def note(*_) -> None:
        registered.append(True)

    handles = [register_module_module_registration_hook(note),
               register_module_parameter_registration_hook(note)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if registered and not state.structure_changed:
        now = {id(param) for param in state.model.parameters() if param.requires_grad}
        state.structure_changed = now != {id(param) for param in trained}
