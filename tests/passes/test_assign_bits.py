import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.errors import ConfigError
from qcompile.quant.allocation import allocate_bits
from qcompile.quant.layers import quantizable_layers


class Chain(nn.Module):
    """Five linear layers; ``gain`` makes the loss sharply curved along fc2's weights.

    fc2's first ten outputs also reach the logits directly, times ``gain``, so a change of fc2's
    weights moves the loss far more than through the chain alone. Only fc1, held at 8 bits, lies
    upstream of fc2, so no other layer inherits that curvature.
    """

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.fc4, self.fc5 = nn.Linear(32, 32), nn.Linear(32, 10)
        self.gain = gain

    def forward(self, x):
        h2 = self.fc2(F.relu(self.fc1(x)))
        x = F.relu(self.fc4(F.relu(self.fc3(F.relu(h2)))))
        return self.fc5(x) + self.gain * h2[:, :10]


def assign(model, **config):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    gm = qcompile.trace(model.eval(), (x,))
    ctx = qcompile.PassContext()
    out = qcompile.PassManager(["assign-bits"]).run(gm, example_inputs=(x,), ctx=ctx, **config)
    sites = quantizable_layers(out)
    return {s.name: s.node.meta["quant"]["weight_bits"] for s in sites}, sites, ctx.records[0]


def test_uniform_policy_pins_first_and_last_layers():
    bits, _, record = assign(Chain(), bits=3)
    assert bits == {"fc1": 8, "fc2": 3, "fc3": 3, "fc4": 3, "fc5": 8}
    assert record.notes == ["uniform: 3 bits, first/last 8"]
    bits, _, _ = assign(Chain(), bits=4, first_last_bits=0)
    assert set(bits.values()) == {4}


@pytest.mark.parametrize("budget", [0.15, 0.2, 0.3, 0.5])
def test_size_budget_gives_a_feasible_assignment(budget):
    bits, sites, _ = assign(Chain(), budget_size=budget, bits_choices="2,4,8",
                            calib_data=[(torch.randn(32, 16),)], hutchinson_samples=4)
    size = sum(s.params * bits[s.name] / 8 for s in sites)
    assert size <= budget * sum(s.params * 4 for s in sites) + 1e-9
    assert bits["fc1"] == bits["fc5"] == 8
    assert set(bits.values()) <= {2, 4, 8}


def test_artificially_sensitive_layer_gets_more_bits():
    torch.manual_seed(1)
    model = Chain(gain=10.0)
    # room for fc1 and fc5 at 8 bits, one middle layer at 8 bits and two at 2 bits
    params = [16 * 32, 32 * 32, 32 * 32, 32 * 32, 32 * 10]
    allowed = (params[0] + params[4] + params[1]) * 8 / 8 + 2 * params[1] * 2 / 8
    budget = allowed / (sum(params) * 4)
    bits, _, record = assign(model, budget_size=budget, bits_choices="2,8",
                             calib_data=[(torch.randn(64, 16),)], hutchinson_samples=8)
    assert bits["fc2"] == 8 and bits["fc3"] == 2 and bits["fc4"] == 2
    assert "sensitivity" in record.notes[-1]
    # without the gain, fc2 is not the layer that gets the bits
    torch.manual_seed(1)
    plain, _, _ = assign(Chain(gain=0.0), budget_size=budget, bits_choices="2,8",
                         calib_data=[(torch.randn(64, 16),)], hutchinson_samples=8)
    assert plain["fc2"] == 2


def test_bops_budget_and_bad_options():
    bits, sites, _ = assign(Chain(), budget_bops=0.02, bits_choices="2,4,8", hutchinson_samples=2)
    bops = sum(s.macs * bits[s.name] ** 2 for s in sites)
    assert bops <= 0.02 * sum(s.macs * 32 * 32 for s in sites)
    with pytest.raises(ConfigError, match="no bit assignment fits"):
        assign(Chain(), budget_size=0.01, bits_choices="2,4", hutchinson_samples=1)
    with pytest.raises(ConfigError, match="bits must be an integer"):
        assign(Chain(), bits=9)
    with pytest.raises(ConfigError, match="fraction"):
        assign(Chain(), budget_size=2.0)
    with pytest.raises(ConfigError, match="not both"):
        assign(Chain(), budget_size=0.2, budget_bops=0.2)


def test_allocation_is_exact_against_brute_force():
    import itertools

    generator = torch.Generator().manual_seed(3)
    choices = [2, 4, 8]
    sensitivity = [{b: float(torch.rand(1, generator=generator)) / b for b in choices}
                   for _ in range(5)]
    cost = [{b: float(torch.randint(1, 10, (1,), generator=generator)) * b for b in choices}
            for _ in range(5)]
    budget = 60.0
    chosen = allocate_bits(sensitivity, cost, budget)
    best = min(
        (combo for combo in itertools.product(choices, repeat=5)
         if sum(cost[i][b] for i, b in enumerate(combo)) <= budget),
        key=lambda combo: sum(sensitivity[i][b] for i, b in enumerate(combo)),
    )
    total = lambda combo: sum(sensitivity[i][b] for i, b in enumerate(combo))  # noqa: E731
    assert total(chosen) == pytest.approx(total(best))
