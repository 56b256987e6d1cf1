"""Loading a model file into an ``nn.Module`` (or a GraphModule, for exported programs).

A model file is one of:

* a state dict (or a checkpoint dict holding one under ``state_dict`` / ``model``) plus an
  architecture, ``torchvision:<name>`` or ``package.module:ClassName`` (built with no
  arguments, or with the keyword arguments the name ends in: ``package.module:ClassName(
  classes=3)``); read with ``torch.load(weights_only=True)``, which cannot run code from the
  file;
* an ExportedProgram saved with ``torch.export.save`` (``.pt2``), lifted to our IR by
  :func:`qcompile.ir.export_frontend.from_exported_program`;
* a whole module saved with ``torch.save(model)``. Unpickling it runs code named in the file, so
  it is read only when the caller says the file is trusted (``trust_pickle=True``).

Every failure is a :class:`~qcompile.errors.ModelLoadError` (or ``ConfigError`` for a malformed
option) whose message says what to do.
"""

import ast
import difflib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile.errors import ConfigError, ModelLoadError
from qcompile.ir.export_frontend import from_exported_program
from qcompile.user_code import import_object

IMAGENET_INPUT_SHAPE = (1, 3, 224, 224)
_CHECKPOINT_KEYS = ("state_dict", "model")
_SHOWN_KEYS = 5
_DEFAULT_CLASSES = 1000
"""The class count torchvision builds its classifiers with."""


@dataclass
class LoadedModel:
    """A loaded model, the input shape it is known to take (or None), and where it came from.

    ``shape_is_fixed`` says whether the model takes only that shape (an exported program, traced
    for it) or the shape is just the usual one (a torchvision classifier's 3x224x224, which
    reads any image size from the data it is trained on)."""

    module: nn.Module
    example_input_shape: tuple[int, ...] | None
    description: str
    shape_is_fixed: bool = False


def load_model(
    path: str | os.PathLike, *, arch: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Read the model in ``path``; see the module docstring for the forms it accepts."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is not a file; give the model file itself")
    if _is_exported_program(path):
        _refuse_arch(arch, path, "an exported program, which carries its own architecture")
        return _load_exported_program(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise _unreadable(path, error) from error
        if trust_pickle:
            return _load_pickled_module(path, arch)
        raise _untrusted(path, error) from None
    except Exception as error:
        raise _unreadable(path, error) from error
    return _load_state_dict(path, content, arch)


def _is_exported_program(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/archive_format") for name in archive.namelist())


def _load_exported_program(path: Path) -> LoadedModel:
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with open(path, "rb") as file:
            program = torch.export.load(file)
    except Exception as error:
        raise ModelLoadError(
            f"cannot read the exported program '{path}': {type(error).__name__}: {error}; "
            "write it again with torch.export.save(torch.export.export(model, args), path)"
        ) from error
    finally:
        logging.disable(previous)
    return LoadedModel(
        module=from_exported_program(program),
        example_input_shape=_program_input_shape(program),
        description=f"exported program {path.name}",
        shape_is_fixed=True,
    )


def _program_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    names = program.graph_signature.user_inputs
    if len(names) != 1:
        return None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == names[0]:
            value = node.meta.get("val")
            try:
                return tuple(int(size) for size in value.shape)
            except (AttributeError, TypeError):
                return None
    return None


def _untrusted(path: Path, error: pickle.UnpicklingError) -> ModelLoadError:
    """The safe unpickler refused ``path``: say why, and how to load it if it is trusted."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(error))
    if refused is None:
        return ModelLoadError(
            f"cannot read '{path}': the weights-only unpickler stopped "
            f"({_unpickler_detail(error)}); the file is damaged, or a pickle that needs "
            "--trust-pickle if you trust its source"
        )
    return ModelLoadError(
        f"'{path}' is a pickled Python object ({refused.group(1)}), and unpickling it runs "
        "code named in the file. If you trust its source, re-run with --trust-pickle "
        "(load_model(..., trust_pickle=True)); otherwise save a state dict "
        "(torch.save(model.state_dict(), path)) and pass --arch, or a torch.export program "
        "(torch.export.save)"
    )


def _unpickler_detail(error: Exception) -> str:
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(error), re.DOTALL)
    return " ".join((detail.group(1) if detail else str(error)).split())[:200]


def _load_pickled_module(path: Path, arch: str | None) -> LoadedModel:
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(
            f"cannot unpickle '{path}': {error}. The file names classes by module path; run "
            "where the code that defines them can be imported (add its folder to PYTHONPATH)"
        ) from error
    except Exception as error:
        raise _unreadable(path, error) from error
    if isinstance(content, nn.Module):
        _refuse_arch(arch, path, "a whole pickled module, which carries its own architecture")
        return LoadedModel(content, None, f"pickled {type(content).__name__} from {path.name}")
    return _load_state_dict(path, content, arch)


def _load_state_dict(path: Path, content, arch: str | None) -> LoadedModel:
    state = _unwrap_checkpoint(content)
    if state is None:
        raise ModelLoadError(
            f"'{path}' holds a {type(content).__name__}, not a model: expected a state dict, "
            "a checkpoint dict with a 'state_dict' or 'model' entry, a torch.export program, "
            "or a pickled nn.Module"
        )
    if arch is None:
        raise ModelLoadError(
            f"'{path}' is a state dict (weights only); say which model it belongs to with "
            "--arch torchvision:<name> or --arch package.module:ClassName"
        )
    model, input_shape = build_architecture(arch)
    classes = _classes_of_state(model, state, arch)
    if classes is not None:
        model, input_shape = build_architecture(arch, num_classes=classes)
        arch = f"{arch} ({classes} classes)"
    _check_keys(model, state, path, arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise ModelLoadError(f"the weights in '{path}' do not fit {arch}: {detail}") from error
    return LoadedModel(model.eval(), input_shape, f"state dict {path.name} with {arch}")


def _unwrap_checkpoint(content) -> Mapping[str, torch.Tensor] | None:
    if isinstance(content, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if isinstance(content, Mapping) and content and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()
    ):
        return content
    return None


def _check_keys(model: nn.Module, state: Mapping, path: Path, arch: str) -> None:
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:_SHOWN_KEYS])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:_SHOWN_KEYS])})")
    hint = ""
    if unexpected and all(key.startswith("module.") for key in state):
        hint = "; the keys start with 'module.' (saved from DataParallel): strip that prefix"
    raise ModelLoadError(
        f"the state dict in '{path}' does not match {arch}: {'; '.join(parts)}{hint}. "
        "Check that --arch names the model these weights were saved from"
    )


def _refuse_arch(arch: str | None, path: Path, what: str) -> None:
    if arch is not None:
        raise ConfigError(f"--arch is for state-dict files, but '{path}' is {what}; drop --arch")


def _unreadable(path: Path, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read '{path}' as a PyTorch file ({type(error).__name__}: "
        f"{_unpickler_detail(error) or 'no data'}); expected a state dict or module saved with "
        "torch.save, or a program saved with torch.export.save"
    )


def _classes_of_state(model: nn.Module, state: Mapping, arch: str) -> int | None:
    """The class count of a torchvision classifier's weights in ``state`` when it is not the
    count ``model`` was built with (1000), else None.

    Read from the tensors whose first axis is the built model's class count and differs in
    ``state``, the rest of their shape the same (the classifier's weight and bias): a
    ``resnet18(num_classes=10)`` saved for MNIST loads as such with ``--arch
    torchvision:resnet18``. Any other difference is left to the usual error.
    """
    if not arch.startswith("torchvision:"):
        return None
    found = set()
    for key, tensor in model.state_dict().items():
        saved = state.get(key)
        if not isinstance(saved, torch.Tensor) or saved.shape == tensor.shape:
            continue
        if tensor.dim() == 0 or tensor.shape[0] != _DEFAULT_CLASSES or saved.dim() != tensor.dim() \
                or saved.shape[1:] != tensor.shape[1:] or saved.shape[0] < 1:
            return None
        found.add(saved.shape[0])
    return found.pop() if len(found) == 1 else None


def build_architecture(arch: str, **options) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The untrained model ``arch`` names, and its usual input shape if known.

    ``torchvision:<name>`` builds ``torchvision.models.get_model(name, weights=None,
    **options)`` (input 1x3x224x224 for the classification models; ``num_classes=10`` is an
    option); ``package.module:ClassName`` imports the class and calls it with ``options``.
    Either may end in keyword arguments written as in Python, literals only:
    ``package.module:ClassName(classes=3, width=32)``, ``torchvision:resnet18(num_classes=10)``.
    """
    spec, given = _split_arguments(arch)
    options = {**given, **options}
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ConfigError(
            f"--arch {arch!r} is not 'torchvision:<name>' or 'package.module:ClassName'"
        )
    if source == "torchvision":
        return _torchvision_model(name, **options)
    factory = import_object(f"{source}:{name}", what="architecture")
    try:
        model = factory(**options)
    except Exception as error:
        called = "no arguments" if not options else _call_text(options)
        raise ModelLoadError(
            f"cannot build {arch} with {called}: {type(error).__name__}: {error}; an --arch "
            "class is called as ClassName() or with the keyword arguments --arch gives, "
            "e.g. ClassName(classes=3)"
        ) from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{arch} built a {type(model).__name__}, not an nn.Module")
    return model, None


def _split_arguments(arch: str) -> tuple[str, dict[str, Any]]:
    """``name(key=literal, ...)`` as ``name`` and the keyword arguments (:func:`build_
    architecture`); a plain name as itself and none."""
    if "(" not in arch:
        return arch, {}
    spec, _, call = arch.partition("(")
    wanted = f"keyword arguments with literal values, as in {spec.strip()}(classes=10, width=32)"
    try:
        tree = ast.parse(f"f({call}", mode="eval").body
    except SyntaxError:
        tree = None
    if not isinstance(tree, ast.Call) or tree.args or any(k.arg is None for k in tree.keywords):
        raise ConfigError(f"--arch {arch!r}: give the class {wanted}")
    options = {}
    for keyword in tree.keywords:
        try:
            options[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise ConfigError(f"--arch {arch!r}: {keyword.arg}={ast.unparse(keyword.value)} is not "
                              f"a literal (a number, string, tuple, list or dict); give "
                              f"{wanted}") from None
    return spec.strip(), options


def _call_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


def _torchvision_model(name: str, **options) -> tuple[nn.Module, tuple[int, ...] | None]:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        suggestion = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"torchvision has no model {name!r}{suggestion} "
            "(torchvision.models.list_models() lists them)"
        )
    classifiers = set(torchvision.models.list_models(module=torchvision.models))
    try:
        model = torchvision.models.get_model(name, weights=None, **options)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"cannot build torchvision:{name} with {_call_text(options)}: "
                             f"{error}") from error
    return model, IMAGENET_INPUT_SHAPE if name in classifiers else None
