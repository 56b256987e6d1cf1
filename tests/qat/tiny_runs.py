"""Small real training runs shared by the training-loop tests: digits, a tiny quantized CNN."""

import torch
from torch import nn

import qcompile
from qcompile.fused import ConvBatchNorm
from qcompile.qat import Schedule, TrainState
from qcompile.quant import Quantizer
from real_data import digits  # noqa: F401  (re-exported to the tests)


def train_pair(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    data = digits()
    return data.train_x[:n], data.train_y[:n]


def val_pair(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    data = digits()
    return data.test_x[:n], data.test_y[:n]


class DropoutCNN(nn.Module):
    """Two conv-BN-ReLU blocks and a classifier behind dropout (which draws on the global RNG)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(2 * width * 16, 10)

    def forward(self, x):
        return self.classifier(self.dropout(torch.flatten(self.features(x), 1)))


def quantized_model(seed: int = 0, bits: int = 4, method: str = "lsq", width: int = 4):
    torch.manual_seed(seed)
    x = digits().train_x
    model = DropoutCNN(width).train()
    return qcompile.quantize(model, (x[:2],), bits=bits, method=method, calib_data=[(x[:64],)])


def quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"weights differ: {different}"


class RandomToggle(Schedule):
    """Switches one random quantizer off for each step (from ``state.generator``); counts steps
    in its own state and reports the count at each epoch's end."""

    name = "toggle"

    def __init__(self):
        self.steps_seen = 0

    def on_step_start(self, state: TrainState) -> None:
        qs = quantizers(state.model)
        off = int(torch.randint(len(qs), (1,), generator=state.generator()))
        for index, quantizer in enumerate(qs):
            quantizer.enabled = index != off
        self.steps_seen += 1

    def on_epoch_end(self, state: TrainState) -> dict:
        return {"steps_seen": self.steps_seen}

    def state_dict(self) -> dict:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict) -> None:
        self.steps_seen = state["steps_seen"]


class InterruptAt(Schedule):
    """Raises ``error`` (KeyboardInterrupt by default) before step ``step``'s forward pass."""

    name = "interrupt"

    def __init__(self, step: int, error: type[BaseException] = KeyboardInterrupt):
        self.step, self.error = step, error

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.step:
            raise self.error(f"stopped at step {state.step}")


class FreezeStatisticsAt(Schedule):
    """Freezes every ConvBatchNorm's statistics as epoch ``epoch`` starts: a plain module switch,
    outside the state dict, that a mid-epoch resume must bring back."""

    name = "freeze"

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, state: TrainState) -> None:
        if state.epoch == self.epoch:
            for module in state.model.modules():
                if isinstance(module, ConvBatchNorm):
                    module.freeze_statistics()
