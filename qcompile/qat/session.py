"""Saving and restoring a training run: what goes into a checkpoint and the order it comes back.

Restoring follows the order of the schedule protocol (:mod:`qcompile.qat.state`), which makes a
resumed run retrace the interrupted one exactly:

1. the position (epoch, batch, step) and each schedule's ``load_state_dict``, then its
   ``prepare_for_resume``, which rebuilds any structure it had changed (other bit-widths, new
   quantizers) so that
2. the model's weights and module settings load, then the distillation's state, then the
   optimizer and the learning-rate schedule (built over the parameters as they are now) and
   their states, the epoch's running sums and the history;
3. each schedule's ``on_train_start``, and last the global RNG states.
"""

import logging
import time

from qcompile.errors import CheckpointError, ConfigError
from qcompile.qat import checkpoint
from qcompile.qat.metrics import EpochMeter, History
from qcompile.qat.state import noticing_parameter_changes

log = logging.getLogger("qcompile.qat")


class Session:
    """Checkpoint side of a training run; mixed into the loop, which owns the attributes used."""

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        optim, config = self.config.optim, self.config
        return dict(epochs=config.epochs, seed=config.seed, lr=optim.lr,
                    quantizer_lr=optim.quantizer_lr, weight_decay=optim.weight_decay,
                    optimizer=optim.optimizer, lr_schedule=optim.lr_schedule,
                    grad_clip=config.grad_clip, batch_size=self.batches.source.batch_size,
                    train_examples=len(self.batches.source), world_size=self.world.world_size,
                    schedules=[type(s).__name__ for s in self.schedules],
                    distillation=None if self.distillation is None
                    else type(self.distillation).__name__,
                    fixed_thresholds=any(getattr(module, "thresholds_learned", True) is False
                                         for module in self.model.modules()),
                    quantizers=self.quantizers)

    def schedule_states(self) -> list[dict]:
        """Each schedule's ``state_dict`` as of now (a snapshot: the protocol's state dicts are
        fresh containers, as ``list(self.history)``, that later hooks do not change)."""
        return [dict(name=s.name, state=s.state_dict()) for s in self.schedules]

    def elapsed(self) -> float:
        started, before = self.clock
        return before + time.perf_counter() - started

    def save(self) -> None:
        """Write the checkpoint (rank 0; every process sends its RNG states and running sums)."""
        processes = self.world.all_gather(dict(rng=checkpoint.rng_state(),
                                               meter=self.meter.state_dict()))
        failure = None
        if self.world.is_main:
            try:
                self._write(processes)
            except OSError as error:
                failure = error
        # a collective: the other processes also wait here until rank 0 has written
        if self.world.any(failure is not None):
            raise self._unsaved(failure)

    def _unsaved(self, failure: OSError | None) -> CheckpointError:
        """The error that stops a run whose checkpoint could not be written (on rank 0: why)."""
        path, state = self.config.checkpoint, self.state
        reason = (f"{failure.strerror or failure}" if failure is not None
                  else "on the first process")
        kept = (f"the last complete checkpoint {path} is kept: once it can be written, run "
                "again with resume=True (CLI: --resume) to continue from it" if path.is_file()
                else "no checkpoint was saved before")
        where = (f"after epoch {state.epoch}/{state.epochs}" if state.batch == 0 else
                 f"in epoch {state.epoch + 1}/{state.epochs}, batch {state.batch}")
        return CheckpointError(f"cannot write the checkpoint {path} {where} ({reason}); {kept}")

    def _write(self, processes: list) -> None:
        state = self.state
        schedules = self.before_hooks or self.schedule_states()
        self.history.seconds = self.elapsed()
        checkpoint.save(self.config.checkpoint, dict(
            fingerprint=self.fingerprint(),
            position=dict(epoch=state.epoch, batch=state.batch, step=state.step,
                          opened=self.opened),
            model=self.model.state_dict(),
            module_settings=checkpoint.module_settings(self.model),
            distillation=self._distillation_state(),
            optimizer=self.optimizer.state_dict(),
            lr_schedule=self.lr_schedule.state_dict(),
            schedules=schedules,
            processes=processes,
            history=self.history.state_dict(),
        ))

    def resume(self) -> None:
        path = self.config.checkpoint
        saved = checkpoint.load(path)
        checkpoint.check_fingerprint(saved["fingerprint"], self.fingerprint(), path)
        position = saved["position"]
        self.state.epoch, self.state.batch = position["epoch"], position["batch"]
        self.state.step, self.opened = position["step"], position["opened"]
        for schedule, entry in zip(self.schedules, saved["schedules"]):
            schedule.load_state_dict(entry["state"])
            schedule.prepare_for_resume(self.state)
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as error:
            raise ConfigError(f"cannot resume from {path}: the checkpoint's weights do not fit "
                              f"this model ({str(error).splitlines()[0]}); resume with the model "
                              "the run started from") from None
        checkpoint.load_module_settings(self.model, saved.get("module_settings", {}))
        if self.distillation is not None and saved.get("distillation") is not None:
            self._distillation_owner().load_state_dict(saved["distillation"])
        self.build_optimizer()
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_schedule.load_state_dict(saved["lr_schedule"])
        self.history = History.from_state_dict(saved["history"])
        process = saved["processes"][self.world.rank]
        self.meter = EpochMeter.from_state_dict(process["meter"])
        with noticing_parameter_changes(self.state, self.model_parameters):
            for schedule in self.schedules:
                schedule.on_train_start(self.state)
        if self.state.structure_changed:
            log.warning("a schedule changed the model's structure in on_train_start after a "
                        "resume; its optimizer state starts afresh")
            self.build_optimizer()
        checkpoint.set_rng_state(process["rng"])
        if self.metrics is not None:
            self.metrics.restart(self.history.records)

    def _distillation_owner(self):
        """What holds the distillation's learnable state: the object itself when it is a module
        (or has a state dict), else its teacher."""
        if hasattr(self.distillation, "state_dict"):
            return self.distillation
        return self.distillation.teacher

    def _distillation_state(self):
        if self.distillation is None or not self.distillation.trainable_parameters():
            return None
        return self._distillation_owner().state_dict()
