"""Knowledge distillation from a full-precision teacher, optionally trained jointly.

Zhuang et al. guide the low-precision network with a full-precision one ("Towards Effective
Low-bitwidth Convolutional Neural Networks", CVPR 2018, sec. 3.3, "guided training"; "joint
knowledge distillation" in the TPAMI 2021 version, arXiv:1908.04680): both networks learn at once,
each from the labels and from the other, so the teacher's knowledge is shaped to what the
low-precision student can follow. The student's loss here is Hinton et al.'s distillation loss
(2015) on the logits,

    L_s = (1 - w) * CE(s, y) + w * T^2 * KL(softmax(t / T) || softmax(s / T)),

plus, for each hint pair, ``hint_weight`` times the mean squared difference of the two features
(the paper's guidance term on intermediate feature maps). With ``joint=True`` the teacher trains
alongside with the mirrored loss, ``(1 - w) * CE(t, y) + w * T^2 * KL(softmax(s / T) ||
softmax(t / T))``, and the hint term reaches both networks, as in the paper's joint training;
each network's KL target is detached, so each learns from the other without being pulled by it
through the target. Without ``joint`` the teacher is frozen: eval mode, no gradients, never
changed.

A frozen teacher gives each training example the same logits in every epoch, so where the
examples themselves are fixed (tensors batched by the default collate function, not a dataset
or collate function that draws random augmentations) the loop computes them once, in a pass
over the training data before the first step, and each step looks its batch's logits up instead
of running the teacher (the soft labels of offline distillation). ``cache=None`` does this for
tensor-backed training data, ``True`` for any data (the caller vouches that its examples do not
change between epochs), ``False`` never.
"""

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from qcompile.errors import ConfigError


class Distillation:
    """The training loss with a teacher: ``loss(x, y, student_logits) -> (loss, figures)``.

    ``hints`` are pairs ``(student path, teacher path)`` of submodules whose outputs are matched
    (shapes must agree); a student path may name the fused or quantized wrapper the passes put at
    the original layer's path. The student's hint modules are watched through forward hooks set by
    :meth:`attach`, which the loop calls once with the model it trains (again after the model's
    structure changes), before the forward pass whose outputs ``loss`` receives; a jointly trained
teacher also follows the attached student's train/eval mode. ``figures`` holds
    the loss parts as floats: ``ce``, ``kl`` (the student's, before weighting), ``hint`` when there
    are hints, and ``teacher_ce``, ``teacher_kl`` when joint.

    ``cache`` (frozen teacher, no hints): whether the loop may compute the teacher's logits of
    every training example once and look them up (module docstring); None decides by the data.
    """

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 4.0,
        weight: float = 0.5,
        joint: bool = False,
        hints: Sequence[tuple[str, str]] = (),
        hint_weight: float = 1.0,
        cache: bool | None = None,
    ):
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"the teacher must be an nn.Module (the float model), not "
                              f"{type(teacher).__name__}")
        if cache and (joint or hints):
            raise ConfigError("Distillation(cache=True) needs a frozen teacher without hints: a "
                              "jointly trained teacher's logits change every step, and hints "
                              "need its features of each batch; pass cache=None or False")
        if not temperature > 0 or not 0 <= weight <= 1 or not hint_weight >= 0:
            raise ConfigError("Distillation needs temperature > 0, weight in [0, 1] and "
                              f"hint_weight >= 0; got temperature={temperature!r}, "
                              f"weight={weight!r}, hint_weight={hint_weight!r}")
        self.teacher = teacher
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.joint = joint
        self.hints = [tuple(pair) for pair in hints]
        self.hint_weight = float(hint_weight)
        self.cache = cache
        self._cached: torch.Tensor | None = None
        self._student_features: dict[str, torch.Tensor] = {}
        self._teacher_features: dict[str, torch.Tensor] = {}
        self._student_hooks: list = []
        self._student: nn.Module | None = None
        self._teacher_hooks = [
            _module(teacher, path, "teacher").register_forward_hook(
                _recorder(self._teacher_features, path))
            for _, path in self.hints]
        if not joint:
            teacher.eval()

    def attach(self, student: nn.Module) -> "Distillation":
        """Watch the student's hint modules (replacing any earlier watch)."""
        for hook in self._student_hooks:
            hook.remove()
        self._student = student
        self._student_hooks = [
            _module(student, path, "student").register_forward_hook(
                _recorder(self._student_features, path))
            for path, _ in self.hints]
        return self

    def to(self, device: torch.device | str) -> "Distillation":
        """Move the teacher to ``device`` (where the student's batches are)."""
        self.teacher.to(device)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The teacher's parameters when it trains jointly, else none."""
        return [p for p in self.teacher.parameters() if p.requires_grad] if self.joint else []

    def caches(self, dataset: Dataset, collate_fn=None) -> bool:
        """Whether a run over ``dataset``, batched by ``collate_fn`` (None: torch's default),
        should look the teacher's logits up (class docstring). Automatically only for tensors
        batched by the default collate: a collate function of one's own may augment."""
        if self.joint or self.hints or self.cache is False:
            return False
        plain = collate_fn is None or collate_fn is default_collate
        return bool(self.cache) or (plain and _fixed_examples(dataset))

    @torch.no_grad()
    def fill_cache(self, inputs: Iterable[torch.Tensor]) -> None:
        """Compute the teacher's logits of every training example, given in index order by
        ``inputs`` (batches), for :meth:`loss` to look up by index."""
        self.teacher.eval()
        self._cached = torch.cat([self._run_teacher(x) for x in inputs])

    def drop_cache(self) -> None:
        """Forget the cached logits (the loop does at the end of a run: the next run may train
        on other data)."""
        self._cached = None

    def loss(self, x: torch.Tensor, y: torch.Tensor, student_logits: torch.Tensor,
             indices: torch.Tensor | None = None):
        """The distillation loss of a batch whose student forward gave ``student_logits``;
        ``indices``, the batch's positions in the training data, select cached teacher logits
        when :meth:`fill_cache` has run (else the teacher runs on ``x``)."""
        if self.hints and not self._student_hooks:
            raise ConfigError("Distillation with hints: call attach(model) before training, so "
                              "the student's hint features are recorded")
        if indices is not None and self._cached is not None:
            teacher_logits = self._cached[indices.to(self._cached.device)]
        else:
            teacher_logits = self._teacher_logits(x)
        if teacher_logits.shape != student_logits.shape:
            raise ConfigError(f"the teacher's outputs have shape {tuple(teacher_logits.shape[1:])} "
                              f"and the model's {tuple(student_logits.shape[1:])}; distillation "
                              "compares the two: give a teacher with the model's outputs (the "
                              "float model it came from)")
        ce = F.cross_entropy(student_logits, y)
        kl = self.kl(teacher_logits.detach(), student_logits)
        total = (1 - self.weight) * ce + self.weight * kl
        figures: dict[str, Any] = {"ce": ce.item(), "kl": kl.item()}
        if self.joint:
            teacher_ce = F.cross_entropy(teacher_logits, y)
            teacher_kl = self.kl(student_logits.detach(), teacher_logits)
            total = total + (1 - self.weight) * teacher_ce + self.weight * teacher_kl
            figures.update(teacher_ce=teacher_ce.item(), teacher_kl=teacher_kl.item())
        if self.hints:
            hint = self.hint_loss()
            total = total + self.hint_weight * hint
            figures["hint"] = hint.item()
        return total, figures

    def kl(self, target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(softmax(target / T) || softmax(logits / T))``, averaged over the batch."""
        t = self.temperature
        return t * t * F.kl_div(F.log_softmax(logits / t, dim=-1),
                                F.log_softmax(target_logits / t, dim=-1),
                                log_target=True, reduction="batchmean")

    def hint_loss(self) -> torch.Tensor:
        """Sum over hint pairs of the mean squared difference of the last recorded features."""
        terms = []
        for student_path, teacher_path in self.hints:
            student = self._student_features.get(student_path)
            teacher = self._teacher_features.get(teacher_path)
            if student is None or teacher is None:
                raise ConfigError(f"hint ({student_path!r}, {teacher_path!r}) saw no output: "
                                  "is the module called in the forward pass?")
            if student.shape != teacher.shape:
                raise ConfigError(f"hint ({student_path!r}, {teacher_path!r}): shapes "
                                  f"{tuple(student.shape)} and {tuple(teacher.shape)} differ")
            terms.append(F.mse_loss(student, teacher if self.joint else teacher.detach()))
        return torch.stack(terms).sum()

    def state_dict(self) -> dict[str, Any]:
        """The jointly trained teacher's weights (a frozen teacher never changes: nothing)."""
        return {"teacher": self._bare_teacher().state_dict()} if self.joint else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.joint and "teacher" in state:
            self._bare_teacher().load_state_dict(state["teacher"])

    def _bare_teacher(self) -> nn.Module:
        """The teacher itself, also while a data-parallel wrapper holds it (``.module``)."""
        return getattr(self.teacher, "module", self.teacher)

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.joint:
            self.teacher.train(self._student.training if self._student is not None else True)
            return self._run_teacher(x)
        self.teacher.eval()
        with torch.no_grad():
            return self._run_teacher(x)

    def _run_teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's output for the training inputs ``x``; one it cannot compute is a
        ConfigError (a teacher for other inputs than the student's), not torch's error from
        inside the step."""
        try:
            return self.teacher(x)
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            raise ConfigError(f"the teacher does not run on train_data's inputs (of shape "
                              f"{tuple(x.shape[1:])}): {type(error).__name__}: {error}") from error


def _fixed_examples(dataset: Dataset) -> bool:
    """Whether ``dataset`` returns the same example for an index every time: tensors, or a
    subset of them (any other dataset may draw random augmentations)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset)


def _module(model: nn.Module, path: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name][:12]
        raise ConfigError(f"hint: the {role} has no module {path!r}; its modules include "
                          f"{', '.join(names)}") from None


def _recorder(store: dict[str, torch.Tensor], path: str):
    def record(module, args, output):
        store[path] = output
    return record
