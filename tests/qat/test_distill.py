import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.errors import ConfigError
from qcompile.models import SmallCNN
from qcompile.qat.distill import Distillation
from real_data import digits




def teacher_and_student(seed=0):
    torch.manual_seed(seed)
    teacher = SmallCNN().eval()
    x = digits().train_x[:64]
    student = qcompile.quantize(copy.deepcopy(teacher), (x[:8],), bits=2, method="lsq",
                                calib_data=[(x,)])
    return teacher, student


class FixedLogits(nn.Module):
    """A teacher whose logits are a known function of the input: ``x @ W``."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize("temperature,weight", [(4.0, 0.5), (1.0, 0.9), (2.5, 0.0)])
def test_loss_is_the_weighted_sum_of_cross_entropy_and_softened_kl(temperature, weight):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=gen), torch.tensor([0, 1, 2, 3, 1, 0])
    teacher = FixedLogits(torch.randn(5, 4, generator=gen))
    student_logits = torch.randn(6, 4, generator=gen, requires_grad=True)
    loss, figures = Distillation(teacher, temperature, weight).loss(x, y, student_logits)

    s, t = student_logits.detach().double(), (x @ teacher.weight.detach()).double()
    ce = -torch.stack([s[i, y[i]] - torch.logsumexp(s[i], 0) for i in range(6)]).mean()
    p_t = torch.exp(t / temperature) / torch.exp(t / temperature).sum(1, keepdim=True)
    p_s = torch.exp(s / temperature) / torch.exp(s / temperature).sum(1, keepdim=True)
    kl = temperature**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    expected = (1 - weight) * ce + weight * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert figures["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert figures["kl"] == pytest.approx(kl.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    assert student_logits.grad is not None and teacher.weight.grad is None


def train(student, distillation, steps=4, lr=0.05):
    params = list(student.parameters()) + distillation.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=lr)
    student.train()
    for step in range(steps):
        batch = slice(step * 32, (step + 1) * 32)
        x, y = digits().train_x[batch], digits().train_y[batch]
        loss, figures = distillation.loss(x, y, student(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return figures


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_a_frozen_teacher_never_changes():
    teacher, student = teacher_and_student()
    teacher.train()  # even handed over in training mode: batch norm must not update
    before, student_before = snapshot(teacher), snapshot(student)
    distillation = Distillation(teacher)
    assert distillation.trainable_parameters() == []
    figures = train(student, distillation)
    after = snapshot(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training
    assert any(not torch.equal(student_before[k], v) for k, v in snapshot(student).items())
    assert set(figures) == {"ce", "kl"}
    assert distillation.state_dict() == {}


def test_a_joint_teacher_trains_on_its_own_mirrored_loss():
    teacher, student = teacher_and_student()
    before = snapshot(teacher)
    distillation = Distillation(teacher, temperature=3.0, weight=0.4, joint=True)
    assert len(distillation.trainable_parameters()) == len(list(teacher.parameters()))
    figures = train(student, distillation)
    assert any(not torch.equal(before[k], v) for k, v in snapshot(teacher).items())
    assert {"teacher_ce", "teacher_kl"} <= set(figures)
    restored = Distillation(copy.deepcopy(SmallCNN()), joint=True)
    restored.load_state_dict(distillation.state_dict())
    assert all(torch.equal(v, restored.teacher.state_dict()[k])
               for k, v in teacher.state_dict().items())


def test_joint_losses_send_each_network_only_its_own_gradient():
    """The student's gradient is that of its own loss; the teacher's that of the mirrored one."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    teacher = FixedLogits(torch.randn(5, 3, generator=gen))
    logits = torch.randn(8, 3, generator=gen, requires_grad=True)
    distillation = Distillation(teacher, temperature=2.0, weight=0.3, joint=True)
    loss, _ = distillation.loss(x, y, logits)
    loss.backward()

    s = logits.detach().clone().requires_grad_(True)
    t = (x @ teacher.weight.detach().clone()).requires_grad_(True)

    def kl(target, source):
        return 4.0 * F.kl_div(F.log_softmax(source / 2.0, 1), F.softmax(target / 2.0, 1),
                              reduction="batchmean")

    student_loss = 0.7 * F.cross_entropy(s, y) + 0.3 * kl(t.detach(), s)
    teacher_loss = 0.7 * F.cross_entropy(t, y) + 0.3 * kl(s.detach(), t)
    student_loss.backward()
    teacher_loss.backward()
    torch.testing.assert_close(logits.grad, s.grad)
    torch.testing.assert_close(teacher.weight.grad, x.t() @ t.grad)


def test_hints_add_a_mean_squared_error_that_vanishes_for_identical_features():
    teacher, _ = teacher_and_student()
    twin = copy.deepcopy(teacher)
    x, y = digits().train_x[:16], digits().train_y[:16]
    plain, _ = Distillation(teacher).loss(x, y, twin(x))
    hinted = Distillation(teacher, hints=[("features.1", "features.1")], hint_weight=10.0)
    loss, figures = hinted.attach(twin).loss(x, y, twin(x))
    assert figures["hint"] == 0.0
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_hints_match_a_quantized_wrapper_to_the_teacher_layer():
    teacher, student = teacher_and_student()
    x, y = digits().train_x[:16], digits().train_y[:16]
    seen = {}
    student.get_submodule("features.1.0").register_forward_hook(
        lambda m, a, out: seen.__setitem__("student", out.detach()))
    teacher.get_submodule("features.1.1").register_forward_hook(
        lambda m, a, out: seen.__setitem__("teacher", out.detach()))
    # the fused conv-BN in the student stands where the teacher's conv and BN are
    distillation = Distillation(teacher, hints=[("features.1.0", "features.1.1")],
                                hint_weight=2.0).attach(student.eval())
    plain, _ = Distillation(teacher).loss(x, y, student(x))
    loss, figures = distillation.loss(x, y, student(x))
    expected = F.mse_loss(seen["student"], seen["teacher"]).item()
    assert expected > 0 and figures["hint"] == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(plain.item() + 2.0 * expected, rel=1e-5)
    student.train()
    student.zero_grad()
    distillation.loss(x, y, student(x))[0].backward()
    assert student.get_submodule("features.0.0").layer.weight.grad.abs().sum() > 0


def test_hint_mistakes_are_reported():
    teacher, student = teacher_and_student()
    x, y = digits().train_x[:8], digits().train_y[:8]
    with pytest.raises(ConfigError, match="no module"):
        Distillation(teacher, hints=[("features.1.0", "nowhere")])
    hinted = Distillation(teacher, hints=[("features.1.0", "features.1.1")])
    with pytest.raises(ConfigError, match="attach"):
        hinted.loss(x, y, student(x))
    mismatched = Distillation(teacher, hints=[("features.1.0", "features.2.1")]).attach(student)
    with pytest.raises(ConfigError, match="shapes"):
        mismatched.loss(x, y, student(x))
    with pytest.raises(ConfigError, match="weight"):
        Distillation(teacher, weight=1.5)


class Noisy(torch.utils.data.Dataset):
    """Digits with fresh noise at every read: an example is not the same twice."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


def teacher_examples(distillation, data, epochs=2, **settings):
    """Train a fresh student from ``distillation``; the examples its teacher saw, the student."""
    seen = []
    hook = distillation.teacher.register_forward_hook(lambda m, args, out: seen.append(len(out)))
    _, student = teacher_and_student()
    qcompile.train(student, data, epochs=epochs, batch_size=48, lr=0.01, seed=1, progress=False,
                   distillation=distillation, **settings)
    hook.remove()
    return sum(seen), student


def test_a_frozen_teacher_runs_once_per_example_and_training_is_unchanged():
    """Tensor data: the teacher's logits are computed in one pass and looked up by index; the
    student ends where the teacher run at every step takes it, up to float rounding (a batched
    forward's last bits depend on which examples share the batch: 1e-8 here, 2e-4 relative in
    the most sensitive quantizer step after 8 steps)."""
    teacher, _ = teacher_and_student()
    data = digits().train_x[:200], digits().train_y[:200]
    cached = Distillation(teacher)
    seen_cached, student_cached = teacher_examples(cached, data)
    seen_live, student_live = teacher_examples(Distillation(teacher, cache=False), data)
    assert seen_cached == 200
    assert seen_live == 2 * 4 * 48  # 2 epochs of 4 full batches
    live, cached_weights = snapshot(student_live), snapshot(student_cached)
    for name, value in cached_weights.items():
        torch.testing.assert_close(value, live[name], rtol=1e-3, atol=1e-5, msg=name)
    moved = snapshot(teacher_and_student()[1])
    assert any(not torch.allclose(v, moved[k], rtol=1e-3, atol=1e-5)
               for k, v in cached_weights.items())
    assert cached._cached is None  # dropped when the run ends: another run may bring other data


def test_a_dataset_that_may_draw_new_examples_keeps_the_live_teacher():
    teacher, _ = teacher_and_student()
    data = Noisy(digits().train_x[:100], digits().train_y[:100])
    assert teacher_examples(Distillation(teacher), data, epochs=1)[0] == 2 * 48
    assert teacher_examples(Distillation(teacher, cache=True), data, epochs=1)[0] == 100


def test_cached_logits_are_the_teachers_of_the_indexed_examples():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(96, 5, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    teacher = FixedLogits(torch.randn(5, 3, generator=gen))
    distillation = Distillation(teacher)
    distillation.fill_cache(x.split(40))
    pick = torch.tensor([90, 3, 41, 3, 77])
    logits = torch.randn(5, 3, generator=gen)
    live, live_figures = Distillation(teacher).loss(x[pick], y[pick], logits)
    looked_up, figures = distillation.loss(x[pick], y[pick], logits, pick)
    assert looked_up.item() == pytest.approx(live.item(), rel=1e-6)
    assert figures["kl"] == pytest.approx(live_figures["kl"], rel=1e-6)
    shifted, _ = distillation.loss(x[pick], y[pick], logits, pick + 1)
    assert shifted.item() != pytest.approx(live.item(), rel=1e-3)


def test_a_cache_is_refused_where_the_teacher_must_run():
    teacher, _ = teacher_and_student()
    with pytest.raises(ConfigError, match="frozen teacher without hints"):
        Distillation(teacher, joint=True, cache=True)
    with pytest.raises(ConfigError, match="frozen teacher without hints"):
        Distillation(teacher, hints=[("features.1", "features.1")], cache=True)
    data = torch.utils.data.TensorDataset(digits().train_x[:8], digits().train_y[:8])
    assert not Distillation(teacher, joint=True).caches(data)
    assert not Distillation(teacher, cache=False).caches(data)
    assert Distillation(teacher).caches(torch.utils.data.Subset(data, [1, 2]))
    assert not Distillation(teacher).caches(data, collate_fn=lambda batch: batch)
    assert Distillation(teacher, cache=True).caches(data, collate_fn=lambda batch: batch)
