"""Checkpoints and resume: bit-exact continuation, interrupts, refused and damaged checkpoints."""

import json
import os
import signal

import pytest
import torch

from qcompile.errors import CheckpointError, ConfigError, TrainingInterrupted
from qcompile.qat import (Distillation, FreezeBatchNorm, ProgressiveActivations, ProgressiveBits,
                          Schedule, StochasticPrecision, TemperatureAnnealing, train)
from qcompile.qat import checkpoint as checkpoint_module
from qcompile.quant import make_quantizer
from qcompile.quant.qn import fix_thresholds
from tiny_runs import (DropoutCNN, FreezeStatisticsAt, InterruptAt, RandomToggle,
                       assert_same_weights, quantized_model, train_pair, val_pair)

EPOCHS = 3
STEPS_PER_EPOCH = 4  # 256 examples, batches of 64
SETTINGS = dict(epochs=EPOCHS, lr=5e-3, seed=7, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread throughout: the runs compared bit for bit must reduce in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(checkpoint_dir=None, *extra_schedules, resume=False, **settings):
    """A fresh quantized model trained with a stateful random schedule, batch-norm statistics
    frozen from the second epoch on, and the ``extra`` schedules."""
    model = quantized_model()
    schedules = [RandomToggle(), FreezeStatisticsAt(1), *extra_schedules]
    history = train(model, train_pair(), val_pair(), checkpoint_dir=checkpoint_dir,
                    resume=resume, schedules=schedules, **{**SETTINGS, **settings})
    return model, history


@pytest.fixture(scope="module")
def uninterrupted():
    return run()


def comparable(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
            for r in records]


@pytest.mark.parametrize("stop_step", [3, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH + 1])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, uninterrupted, stop_step):
    with pytest.raises(TrainingInterrupted, match="resume=True") as stopped:
        run(tmp_path, InterruptAt(stop_step))
    assert stopped.value.checkpoint == str(tmp_path / "last.pt")
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["position"]["step"] == stop_step
    assert saved["position"]["batch"] == stop_step % STEPS_PER_EPOCH
    model, history = run(tmp_path, InterruptAt(None), resume=True)
    expected_model, expected_history = uninterrupted
    assert_same_weights(model, expected_model)
    assert comparable(history.records) == comparable(expected_history.records)
    assert history.initial_val_accuracy == expected_history.initial_val_accuracy
    assert len(history.step_seconds) == EPOCHS * STEPS_PER_EPOCH
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


class Crash(Schedule):
    """Raises a plain error (no checkpoint is written for it) as epoch ``epoch`` starts."""

    def __init__(self, epoch: int | None):
        self.epoch = epoch

    def on_epoch_start(self, state):
        if state.epoch == self.epoch:
            raise RuntimeError("power cut")


def test_crash_after_an_epoch_resumes_from_its_checkpoint(tmp_path, uninterrupted):
    with pytest.raises(RuntimeError, match="power cut"):
        run(tmp_path, Crash(2))
    with (tmp_path / "metrics.jsonl").open("a") as log:  # a line the checkpoint never saw
        log.write(json.dumps({"epoch": 3, "step": 12}) + "\n")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["position"]["epoch"] == 2
    model, history = run(tmp_path, Crash(None), resume=True)
    assert_same_weights(model, uninterrupted[0])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert comparable(lines) == comparable(history.records)
    assert comparable(lines) == comparable(uninterrupted[1].records)


class CtrlC(Schedule):
    """Sends this process a real SIGINT as step ``step`` starts."""

    def __init__(self, step: int | None):
        self.step = step

    def on_step_start(self, state):
        if state.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_sigint_stops_at_a_step_boundary_and_resumes(tmp_path, uninterrupted):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        run(tmp_path, CtrlC(6))
    position = torch.load(tmp_path / "last.pt", weights_only=True)["position"]
    assert position["step"] == 7  # the step under way when the signal came was completed
    assert "batch 3/4" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    model, _ = run(tmp_path, CtrlC(None), resume=True)
    assert_same_weights(model, uninterrupted[0])


def test_interrupt_without_checkpoint_dir_says_progress_is_lost():
    with pytest.raises(TrainingInterrupted, match="not saved") as stopped:
        run(None, InterruptAt(2))
    assert stopped.value.checkpoint is None


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_the_last_one_resumes(
        tmp_path, monkeypatch, uninterrupted):
    """The disk fills after the first epoch: the run stops with the reason and the kept
    checkpoint (it ended with the OS error, in the CLI an internal error), and resumes from
    that checkpoint to the uninterrupted run's weights."""
    write = checkpoint_module.save
    writes = []

    def full_after_one(path, state):
        writes.append(state["position"]["epoch"])
        if len(writes) > 1:
            raise OSError(28, "No space left on device")
        write(path, state)

    monkeypatch.setattr(checkpoint_module, "save", full_after_one)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint \S+last.pt after "
                       r"epoch 2/3 \(No space left on device\); the last complete checkpoint "
                       r"\S+ is kept: .* resume=True"):
        run(tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["position"]["epoch"] == 1
    monkeypatch.setattr(checkpoint_module, "save", write)
    model, _ = run(tmp_path, resume=True)
    assert_same_weights(model, uninterrupted[0])


def test_a_fresh_run_does_not_overwrite_an_unfinished_ones_checkpoint(tmp_path):
    """Run again without resume=True after an interruption, the first epoch's checkpoint
    would have replaced the interrupted run's: refused before any training, saying where it
    stopped; resumed, it finishes, and then a fresh run may take the folder."""
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, InterruptAt(STEPS_PER_EPOCH + 2))
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"last.pt holds an unfinished run \(stopped in epoch "
                       r"2/3, batch 2\), which a fresh run would overwrite: continue it with "
                       r"resume=True \(CLI: --resume\)"):
        run(tmp_path, InterruptAt(None))
    assert (tmp_path / "last.pt").read_bytes() == before
    run(tmp_path, InterruptAt(None), resume=True)
    _, history = run(tmp_path)
    assert [record["epoch"] for record in history.records] == [1, 2, 3]


def test_resuming_a_finished_run_trains_no_more(tmp_path):
    model, history = run(tmp_path)
    again, resumed = run(tmp_path, resume=True)
    assert_same_weights(again, model)
    assert comparable(resumed.records) == comparable(history.records)


@pytest.mark.parametrize("change, key", [
    (dict(epochs=EPOCHS + 1), "epochs"), (dict(seed=8), "seed"), (dict(lr=1e-3), "lr")])
def test_resume_with_other_settings_is_refused(tmp_path, change, key):
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, InterruptAt(5))
    with pytest.raises(ConfigError, match=rf"{key}: checkpoint"):
        run(tmp_path, InterruptAt(None), resume=True, **change)


def test_resume_with_another_number_of_processes_says_how_many_to_start():
    saved = dict(epochs=EPOCHS, world_size=2)
    with pytest.raises(ConfigError, match=r"world_size: checkpoint 2, now 1\); resume with the "
                       r"checkpoint's settings \(2 processes: torchrun --nproc-per-node 2\)"):
        checkpoint_module.check_fingerprint(saved, {**saved, "world_size": 1}, "x")
    with pytest.raises(ConfigError, match=r"\(one process: without torchrun\)"):
        checkpoint_module.check_fingerprint({**saved, "world_size": 1}, saved, "x")
    with pytest.raises(ConfigError) as other:
        checkpoint_module.check_fingerprint(saved, {**saved, "epochs": EPOCHS + 1}, "x")
    assert "torchrun" not in str(other.value)


def test_resume_with_other_qn_thresholds_is_refused_and_with_the_same_continues(tmp_path):
    """A run with fixed QN thresholds resumed with learned ones (or the other way) would train
    other parameters than the checkpoint's optimizer holds: refused with the setting named; with
    the same setting it continues. A checkpoint from before the setting reads as learned."""
    def qn_run(fixed, stop, resume=False):
        model = quantized_model(method="qn")
        if fixed:
            fix_thresholds(model)
        return train(model, train_pair(), checkpoint_dir=tmp_path, schedules=[InterruptAt(stop)],
                     resume=resume, **SETTINGS)

    with pytest.raises(TrainingInterrupted):
        qn_run(True, 5)
    with pytest.raises(ConfigError, match="fixed_thresholds: checkpoint True, now False"):
        qn_run(False, None, resume=True)
    assert qn_run(True, None, resume=True).records[-1]["epoch"] == EPOCHS
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    del saved["fingerprint"]["fixed_thresholds"]
    checkpoint_module.check_fingerprint(saved["fingerprint"], {**saved["fingerprint"],
                                                               "fixed_thresholds": False}, "x")


def test_resume_with_other_bit_widths_is_refused(tmp_path):
    """The quantizers' parameters have the same shapes at 2 bits as at 4, so the checkpoint's
    weights would load into a model quantized otherwise: refused, the quantizers named. A
    checkpoint from before the entry resumes as before."""
    def bits_run(bits, stop, resume=False):
        model = quantized_model(bits=bits)
        return train(model, train_pair(), checkpoint_dir=tmp_path, schedules=[InterruptAt(stop)],
                     resume=resume, **SETTINGS)

    with pytest.raises(TrainingInterrupted):
        bits_run(2, 5)
    with pytest.raises(ConfigError, match=r"quantizers: \S+ LSQ\w+ 2-bit -> LSQ\w+ 4-bit") \
            as error:
        bits_run(4, None, resume=True)
    assert "features.3.weight_quantizer" in str(error.value)  # the middle layer's two
    assert "input_quantizers.features_3_input" in str(error.value)
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["fingerprint"]
    current = {**saved, "quantizers": {}}
    with pytest.raises(ConfigError, match="quantizers: "):
        checkpoint_module.check_fingerprint(saved, current, "x")
    del saved["quantizers"]
    checkpoint_module.check_fingerprint(saved, current, "x")
    assert bits_run(2, None, resume=True).records[-1]["epoch"] == EPOCHS


def test_missing_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(tmp_path, resume=True)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_damaged_checkpoint_is_a_config_error(tmp_path, damage):
    path = tmp_path / "last.pt"
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "foreign":
        torch.save({"model": {}}, path)
    else:
        run(tmp_path, epochs=1)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="not a qcompile training checkpoint"):
        run(tmp_path, resume=True)


def test_a_failed_write_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    run(tmp_path, epochs=1)
    good = (tmp_path / "last.pt").read_bytes()

    def failing_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"\(disk full\); the last complete checkpoint"):
        run(tmp_path, epochs=1)
    assert (tmp_path / "last.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]


def real_schedules(kind: str) -> list[Schedule]:
    if kind == "stochastic":
        return [StochasticPrecision(start=0.5), FreezeBatchNorm(at=0.5)]
    if kind == "temperature":
        return [TemperatureAnnealing(start=1.0, end=20.0)]
    return [ProgressiveBits(stages=(8, 4), boundaries=(0.4,)), ProgressiveActivations(0.25)]


@pytest.mark.parametrize("kind, method", [
    ("stochastic", "lsq"), ("temperature", "qn"), ("progressive", "lsq")])
def test_the_library_schedules_and_joint_distillation_resume_bit_for_bit(tmp_path, kind, method):
    """The real schedules, some of which rebuild quantizers mid-run, and a jointly trained
    teacher: stopped mid-epoch after the structure changed, resumed, equal to one run."""
    calibration = [(train_pair()[0][:64],)]

    def once(stop_step, resume=False):
        torch.manual_seed(3)
        teacher = DropoutCNN(width=4)
        model = quantized_model(bits=2, method=method)
        history = train(model, train_pair(), val_pair(), checkpoint_dir=tmp_path / "run",
                        resume=resume, calib_data=calibration,
                        schedules=[*real_schedules(kind), InterruptAt(stop_step)],
                        distillation=Distillation(teacher, joint=True), **SETTINGS)
        return model, teacher, history

    whole, whole_teacher, whole_history = once(None)
    (tmp_path / "run" / "last.pt").unlink()
    with pytest.raises(TrainingInterrupted):
        once(7)
    model, teacher, history = once(None, resume=True)
    assert_same_weights(model, whole)
    assert_same_weights(teacher, whole_teacher)
    assert comparable(history.records) == comparable(whole_history.records)
    assert "kl" in history.records[-1] and "teacher_ce" in history.records[-1]


def test_a_frozen_teachers_cached_logits_resume_bit_for_bit(tmp_path):
    """The frozen teacher's logits are computed once per run (tensor data) and looked up by
    index: a run stopped mid-epoch and resumed computes them again, equal to one run."""
    def once(stop_step, resume=False):
        torch.manual_seed(3)
        teacher = DropoutCNN(width=4)
        distillation = Distillation(teacher)
        calls = []
        teacher.register_forward_hook(lambda m, args, out: calls.append(len(out)))
        model = quantized_model(bits=2)
        history = train(model, train_pair(), val_pair(), checkpoint_dir=tmp_path / "run",
                        resume=resume, schedules=[InterruptAt(stop_step)],
                        distillation=distillation, **SETTINGS)
        return model, history, sum(calls)

    whole, whole_history, whole_calls = once(None)
    (tmp_path / "run" / "last.pt").unlink()
    with pytest.raises(TrainingInterrupted):
        once(6)
    model, history, calls = once(None, resume=True)
    assert whole_calls == calls == len(train_pair()[0])
    assert_same_weights(model, whole)
    assert comparable(history.records) == comparable(whole_history.records)
    assert "kl" in history.records[-1]


def test_an_interrupt_inside_a_step_keeps_the_last_complete_checkpoint(tmp_path, uninterrupted):
    """A KeyboardInterrupt in the forward pass (a second Ctrl-C) leaves a half-done step: no
    checkpoint of it is written, and resuming from the last epoch's checkpoint is still exact."""
    model = quantized_model()
    calls = []

    def second_ctrl_c(module, args):
        calls.append(module.training)
        if sum(calls) == STEPS_PER_EPOCH + 2:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(second_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="last complete checkpoint") as stopped:
        train(model, train_pair(), val_pair(), checkpoint_dir=tmp_path,
              schedules=[RandomToggle(), FreezeStatisticsAt(1)], **SETTINGS)
    assert stopped.value.checkpoint == str(tmp_path / "last.pt")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["position"]["step"] == 4
    resumed, _ = run(tmp_path, resume=True)
    assert_same_weights(resumed, uninterrupted[0])


class DropStepSize(Schedule):
    """From the second epoch on, the classifier's weights quantize with DoReFa (no parameters)
    instead of LSQ (a step size), and the schedule does not set ``structure_changed``: the
    optimizer must drop the step size all the same, or a resumed run (which swaps the quantizer
    in ``prepare_for_resume`` and builds its optimizer after) cannot load the saved one."""

    name = "drop-step-size"

    def on_epoch_start(self, state):
        if state.epoch == 1:
            self.swap(state.model)

    def prepare_for_resume(self, state):
        if state.step >= STEPS_PER_EPOCH:
            self.swap(state.model)

    @staticmethod
    def swap(model):
        layer = model.get_submodule("classifier")
        layer.weight_quantizer = make_quantizer("dorefa", "weight", 4, signed=True,
                                                per_channel=True, channels=10)


def test_a_schedule_that_drops_parameters_unannounced_still_resumes_bit_for_bit(tmp_path):
    expected, _ = run(None, DropStepSize())
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, DropStepSize(), InterruptAt(2 * STEPS_PER_EPOCH + 1))
    model, history = run(tmp_path, DropStepSize(), InterruptAt(None), resume=True)
    assert_same_weights(model, expected)
    assert len(history.records) == EPOCHS
