"""The training loop: learning on real data, parameter groups, inputs, LR schedules, metrics."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qcompile
from qcompile.errors import ConfigError
from qcompile.models import SmallCNN
from qcompile.qat import Distillation, ProgressiveActivations, Schedule, train
from qcompile.qat.optim import OptimConfig, parameter_groups
from qcompile.qat.quantizers import model_input_quantizers
from qcompile.quant import make_quantizer
from qcompile.quant.layers import quantizable_layers
from tiny_runs import (RandomToggle, assert_same_weights, digits, quantized_model, quantizers,
                       train_pair, val_pair, weights)




def test_quantized_small_cnn_learns_digits():
    data = digits()
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, classes=10, width=8)
    qm = qcompile.quantize(model, (data.train_x[:1],), bits=4, method="lsq",
                           calib_data=[(data.train_x[:64],)])
    history = train(qm, (data.train_x, data.train_y), (data.test_x, data.test_y), epochs=2,
                    lr=3e-3, batch_size=32, progress=False)
    assert history.initial_val_accuracy < 0.3
    assert history.final_val_accuracy > 0.85
    assert history.best_val_accuracy >= history.final_val_accuracy
    assert [r["epoch"] for r in history.records] == [1, 2]
    assert history.records[1]["train_loss"] < history.records[0]["train_loss"]
    assert history.median_step_seconds > 0 and history.seconds > 0
    assert not qm.training


def test_parameter_groups_follow_the_papers():
    qm = quantized_model()
    groups = {g["name"]: g for g in parameter_groups(qm, OptimConfig(1e-3, 5e-2, 1e-4, "adam",
                                                                          "cosine"))}
    names = {id(p): n for n, p in qm.named_parameters()}
    in_group = {key: {names[id(p)] for p in g["params"]} for key, g in groups.items()}
    quantizer_params = {names[id(p)] for q in quantizers(qm) for p in q.parameters()}
    assert quantizer_params and in_group["quantizers"] == quantizer_params
    assert groups["quantizers"]["lr"] == 5e-2 and groups["quantizers"]["weight_decay"] == 0
    assert all(n.endswith("bias") or ".bn." in n for n in in_group["no_decay"])
    assert any(".bn." in n for n in in_group["no_decay"])
    assert groups["no_decay"]["weight_decay"] == 0
    assert all(n.endswith("weight") and ".bn." not in n for n in in_group["weights"])
    assert groups["weights"]["weight_decay"] == 1e-4 and groups["weights"]["lr"] == 1e-3
    assert set().union(*in_group.values()) == set(names.values())


@pytest.mark.parametrize("learn_inputs", [False, True])
def test_quantizer_lr_is_the_only_lr_at_work_when_lr_is_zero(learn_inputs):
    """Only quantizer parameters move; those of the model's own input only when asked to, and
    a frozen input quantizer is trainable again once the run is over."""
    qm = quantized_model()
    before = dict(qm.named_parameters())
    before = {name: p.detach().clone() for name, p in before.items()}
    train(qm, train_pair(), epochs=1, lr=0.0, quantizer_lr=1e-2, lr_schedule="constant",
          weight_decay=0.1, progress=False, learn_input_quantizers=learn_inputs)
    inputs = {id(p) for q in model_input_quantizers(qm) for p in q.parameters()}
    assert inputs, "the model's input has a quantizer"
    quantizer_params = {n for n, p in qm.named_parameters()
                        if any(n.startswith(q) for q in _quantizer_names(qm))
                        and (learn_inputs or id(p) not in inputs)}
    for name, param in qm.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in quantizer_params), name
        assert param.requires_grad


def _quantizer_names(model):
    from qcompile.quant import Quantizer

    return [name + "." for name, m in model.named_modules() if isinstance(m, Quantizer)]


def test_dataloader_dataset_examples_and_array_pairs_train_alike():
    """A list of examples and a pair of NumPy arrays (float64, as NumPy makes them) train as
    the tensors they hold do."""
    x, y = train_pair()
    runs = []
    for data in [(x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=32),
                 list(zip(x, y.tolist(), strict=True)), (x.double().numpy(), y.numpy())]:
        qm = quantized_model()
        train(qm, data, epochs=1, batch_size=32 if not isinstance(data, DataLoader) else 999,
              progress=False)
        runs.append(qm)
    for other in runs[1:]:
        assert_same_weights(runs[0], other)
    assert not torch.equal(weights(runs[0])["classifier.layer.weight"],
                           weights(quantized_model())["classifier.layer.weight"])


def test_a_loader_of_labelled_batches_recalibrates_as_its_inputs_do():
    """calib_data for the schedules in the forms qcompile.quantize takes: a DataLoader's
    (inputs, labels) batches give their inputs (the labels reached the model as a second
    input), and only the 64 examples recalibration reads are kept."""
    x, y = train_pair()
    runs, kept = [], []

    class Look(Schedule):
        may_leave_parameters_unused = False

        def on_train_start(self, state):
            kept.append([tuple(t.shape) for batch in state.calib_data for t in batch])

    for calib in ([(x[:64],)], DataLoader(TensorDataset(x, y), batch_size=16)):
        qm = quantized_model()
        train(qm, (x, y), epochs=2, batch_size=32, progress=False, calib_data=calib,
              schedules=[ProgressiveActivations(0.5), Look()])
        runs.append(qm)
    assert_same_weights(runs[0], runs[1])
    assert kept[1] == [(16, *x.shape[1:])] * 4 and len(x) > 64


@pytest.mark.parametrize("bad, fragment", [
    (dict(optimizer="rmsprop"), "optimizer"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(epochs=0), "epochs"),
    (dict(lr=-1.0), "lr"),
    (dict(resume=True), "checkpoint_dir"),
    (dict(seed="7"), "seed must be an integer, got '7'"),
])
def test_bad_settings_are_config_errors(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        train(quantized_model(), train_pair(), progress=False, **bad)


@pytest.mark.parametrize("bad, fragment", [
    (dict(lr="0.1"), "lr must be a finite non-negative number, got '0.1'"),
    (dict(lr=math.inf), "lr must be a finite non-negative number, got inf"),
    (dict(quantizer_lr=math.nan), "quantizer_lr must be a finite non-negative number, got nan"),
    (dict(weight_decay=-1e-4), "weight_decay must be a finite non-negative number, got -0.0001"),
    (dict(schedules=["freeze"]), "schedules holds a str; a schedule subclasses"),
    (dict(teacher="float.pt"), "teacher must be an nn.Module"),
    (dict(teacher=SmallCNN(classes=5)), r"teacher's outputs have shape \(5,\) and the model's "
                                        r"\(10,\)"),
    (dict(teacher=SmallCNN(in_channels=3)), "teacher does not run on train_data's inputs"),
    pytest.param(dict(device="cuda"), "no usable CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is here: device='cuda' is valid")),
])
def test_arguments_torch_would_fail_on_later_are_config_errors(bad, fragment):
    """Each of these failed inside torch (a TypeError, an AttributeError, a shape mismatch in
    the KL term, a driver error) without naming the argument."""
    with pytest.raises(ConfigError, match=fragment):
        train(quantized_model(), train_pair(), epochs=1, progress=False, **bad)


def test_bad_data_is_a_config_error():
    with pytest.raises(ConfigError, match="Dataset"):
        train(quantized_model(), {"x": 1}, progress=False)
    with pytest.raises(ConfigError, match=r"example must be an \(input, label\) pair"):
        train(quantized_model(), [1, 2, 3], progress=False)
    x, y = train_pair()
    with pytest.raises(ConfigError, match="labels"):
        train(quantized_model(), (x, y[:10]), progress=False)


@pytest.mark.parametrize("what, data, fragment", [
    ("train_data", lambda x, y: (x.repeat(1, 3, 1, 1), y),
     r"train_data: the model does not run on its inputs \(one of shape \(3, "),
    ("train_data", lambda x, y: (x, y.float()), "train_data: labels must be class indices"),
    ("val_data", lambda x, y: (x, y + 5), r"val_data: labels run from 5 to 14, and the model "
                                          r"has 10 outputs"),
    ("val_data", lambda x, y: TensorDataset(x, y - 1), "val_data: labels run from -1"),
])
def test_data_the_model_cannot_train_on_fails_before_the_first_step(what, data, fragment,
                                                                    tmp_path):
    """Inputs the model does not take, labels that are not class indices or lie beyond its
    outputs: torch would fail inside the first step (or the first validation, after an epoch)
    without naming the argument; here a ConfigError says which, before anything is written."""
    x, y = train_pair()
    model = quantized_model().train()
    arguments = dict(train_data=(x, y), val_data=(x, y))
    arguments[what] = data(x, y)
    with pytest.raises(ConfigError, match=fragment):
        train(model, **arguments, epochs=1, progress=False, checkpoint_dir=tmp_path / "run")
    assert model.training and not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_lr_schedules(schedule):
    history = train(quantized_model(), train_pair(), epochs=2, lr=1e-2, lr_schedule=schedule,
                    optimizer="sgd", progress=False)
    lrs = [r["lr"] for r in history.records]
    if schedule == "constant":
        assert lrs == [1e-2, 1e-2]
    elif schedule == "cosine":
        assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(0.0, abs=1e-12)
    else:
        assert lrs[1] < lrs[0] < 1e-2


class ReplaceQuantizer(Schedule):
    """In its ``hook`` of the first epoch's end or the second epoch's start or first step, gives
    the classifier a fresh weight quantizer (new parameters); sets ``structure_changed`` when it
    ``declares`` the change."""

    name = "replace"

    def __init__(self, hook="on_epoch_start", declares=True):
        self.hook, self.declares, self.initial = hook, declares, None
        setattr(self, hook, self.replace)

    def replace(self, state):
        second_epoch = state.epoch == 1 and state.batch == 0
        if self.initial is None and (second_epoch or self.hook == "on_epoch_end"):
            layer = state.model.get_submodule("classifier")
            fresh = make_quantizer("lsq", "weight", 4, signed=True, per_channel=True,
                                   channels=10)
            fresh.initialize(layer.layer.weight.detach())
            layer.weight_quantizer = fresh
            self.initial = fresh.step.detach().clone()
            state.structure_changed = state.structure_changed or self.declares
        return {}


@pytest.mark.parametrize("hook", ["on_epoch_end", "on_epoch_start", "on_step_start"])
@pytest.mark.parametrize("declares", [True, False])
def test_structure_change_rebuilds_the_optimizer(hook, declares):
    """Declared or not (a schedule that forgets ``structure_changed``), the new quantizer's
    parameters are trained in the epoch after the swap."""
    schedule = ReplaceQuantizer(hook, declares)
    qm = quantized_model()
    train(qm, train_pair(), epochs=2, lr=1e-2, progress=False, schedules=[schedule])
    step = qm.get_submodule("classifier").weight_quantizer.step
    assert schedule.initial is not None
    assert not torch.equal(step.detach(), schedule.initial)


class Reassign(Schedule):
    """Assigns every quantizer module to where it already is before each step: registrations
    that change no parameter."""

    name = "reassign"

    def on_step_start(self, state):
        for layer in quantizable_layers(state.model):
            layer.module.weight_quantizer = layer.module.weight_quantizer


def test_registrations_that_add_no_parameter_keep_the_optimizer(monkeypatch):
    builds = []
    build = qcompile.qat.loop.Run.build_optimizer
    monkeypatch.setattr(qcompile.qat.loop.Run, "build_optimizer",
                        lambda run: (builds.append(run.state.step), build(run)))
    train(quantized_model(), train_pair(), epochs=2, lr=1e-2, progress=False,
          schedules=[Reassign()])
    assert builds == [0]


def test_metrics_file_has_one_line_per_epoch(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    history = train(quantized_model(), train_pair(), val_pair(), epochs=3, metrics_path=path,
                    schedules=[RandomToggle()], progress=False)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert [line["step"] for line in lines] == [4, 8, 12]
    assert [line["steps_seen"] for line in lines] == [4, 8, 12]
    for line, record in zip(lines, history.records):
        assert line == pytest.approx(record)
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds",
                    "samples_per_second"):
            assert isinstance(line[key], float), key
    assert history.best_val_accuracy == max(line["val_accuracy"] for line in lines)


def test_checkpoint_dir_gets_metrics_by_default_and_progress_bars_run(tmp_path, capsys):
    train(quantized_model(), train_pair(), val_pair(), epochs=1, checkpoint_dir=tmp_path,
          progress=True)
    assert (tmp_path / "last.pt").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert "epoch 1/1" in capsys.readouterr().err


def test_loader_draws_nothing_from_the_global_rng():
    from qcompile.qat.loaders import EpochBatches, as_source

    batches = EpochBatches(as_source(train_pair(), 32), seed=3)
    state = torch.get_rng_state()
    order = [b[1] for b in batches.loader(epoch=1)]
    assert torch.equal(torch.get_rng_state(), state)
    again = [b[1] for b in batches.loader(epoch=1)]
    other = [b[1] for b in batches.loader(epoch=2)]
    assert all(torch.equal(a, b) for a, b in zip(order, again))
    assert not all(torch.equal(a, b) for a, b in zip(order, other))
    skipped = [b[1] for b in batches.loader(epoch=1, skip=3)]
    assert all(torch.equal(a, b) for a, b in zip(order[3:], skipped)) and len(skipped) == 5


def test_a_module_that_is_not_a_graph_is_a_config_error():
    """A plain module (here the float CNN itself) is refused by name, with the way to trace
    it, before any training starts."""
    with pytest.raises(ConfigError, match=r"qcompile.trace\(model, example_inputs\).*SmallCNN"):
        train(SmallCNN(1, 10, width=4), train_pair(), progress=False)


def test_no_trainable_parameters_is_a_config_error():
    qm = quantized_model()
    for param in qm.parameters():
        param.requires_grad_(False)
    with pytest.raises(ConfigError, match="trainable"):
        train(qm, train_pair(), progress=False)


def test_model_with_a_plain_module_tail_trains():
    qm = quantized_model()
    qm.extra = nn.Linear(3, 3)
    history = train(qm, train_pair(), epochs=1, progress=False)
    assert len(history.records) == 1


def test_teacher_shorthand_distils_and_logs_the_loss_parts():
    torch.manual_seed(1)
    teacher = SmallCNN(in_channels=1, classes=10, width=4).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    history = train(quantized_model(), train_pair(), epochs=1, teacher=teacher, progress=False)
    assert {"ce", "kl"} <= history.records[0].keys()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ConfigError, match="not both"):
        train(quantized_model(), train_pair(), teacher=teacher,
              distillation=Distillation(teacher), progress=False)


def test_a_jointly_trained_teacher_learns_in_its_own_group():
    torch.manual_seed(1)
    teacher = SmallCNN(in_channels=1, classes=10, width=4)
    before = teacher.features[0][0].weight.detach().clone()
    history = train(quantized_model(), train_pair(), epochs=1, progress=False,
                    distillation=Distillation(teacher, joint=True))
    assert not torch.equal(teacher.features[0][0].weight, before)
    assert "teacher_ce" in history.records[0] and not teacher.training


class Rebuild(Schedule):
    """Asks for a rebuild at the second epoch without changing anything."""

    def on_epoch_start(self, state):
        state.structure_changed = state.epoch == 1


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_rebuilt_lr_schedule_continues_where_it_was(schedule):
    def lrs(schedules):
        history = train(quantized_model(), train_pair(), epochs=3, lr_schedule=schedule,
                        schedules=schedules, progress=False)
        return [record["lr"] for record in history.records]

    assert lrs([Rebuild()]) == pytest.approx(lrs([]), rel=1e-12)


def test_a_checkpoint_folder_that_cannot_be_written_fails_before_the_first_step(tmp_path):
    """A file where the folder should be, or a folder that cannot be made: said before any
    training (the first checkpoint, an epoch later, raised the OS error and lost the epoch)."""
    (tmp_path / "taken").write_text("")
    started = []

    class Started(Schedule):
        may_leave_parameters_unused = False

        def on_train_start(self, state):
            started.append(True)

    settings = dict(epochs=1, progress=False, schedules=[Started()])
    with pytest.raises(ConfigError, match=r"checkpoint_dir \S+taken is a file; give a folder"):
        train(quantized_model(), train_pair(), checkpoint_dir=tmp_path / "taken", **settings)
    with pytest.raises(ConfigError, match=r"metrics_path \S+: cannot make that folder"):
        train(quantized_model(), train_pair(), metrics_path=tmp_path / "taken" / "m" / "x.jsonl",
              **settings)
    assert not started
    train(quantized_model(), train_pair(), checkpoint_dir=tmp_path / "new" / "run", **settings)
    assert started and (tmp_path / "new" / "run" / "last.pt").is_file()
