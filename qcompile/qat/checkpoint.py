"""Training checkpoints: everything a resumed run needs to continue bit for bit, written atomically.

A checkpoint holds the model's ``state_dict`` and its modules' plain settings (a quantizer's
``enabled``/``hard``/``bits``, a ConvBatchNorm's ``statistics_frozen``: switches schedules flip
that live outside the state dict), the optimizer and learning-rate schedule, each schedule's
``state_dict``, the position (epoch, batch within it, step), the history so far, each process's
running sums of the current epoch and global RNG states, and a fingerprint of the run's
configuration so that a resume with other settings is refused instead of silently diverging.

The file is written to a temporary name in the same folder and moved into place with
``os.replace``, so ``last.pt`` is always a complete checkpoint, never a half-written one. It loads
with ``torch.load(weights_only=True)``: reading it runs no code from the file.
"""

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompile.errors import ConfigError
from qcompile.quant.base import Quantizer

FORMAT = 1
FILENAME = "last.pt"
_SETTING_TYPES = (bool, int, float, str)
_REQUIRED = ("format", "fingerprint", "position", "model", "optimizer", "lr_schedule",
             "schedules", "processes", "history")


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / FILENAME


def unfinished_run(path: Path) -> str | None:
    """Where the run whose checkpoint is at ``path`` stopped ("after epoch 2/8", "in epoch 3/8,
    batch 5"), if it did not finish; None when there is no checkpoint, it is of a finished run,
    or not ours."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        position, epochs = saved["position"], saved["fingerprint"]["epochs"]
    except Exception:
        return None
    if position["epoch"] >= epochs:
        return None
    if position["batch"]:
        return f"in epoch {position['epoch'] + 1}/{epochs}, batch {position['batch']}"
    return f"after epoch {position['epoch']}/{epochs}"


def folder_problem(folder: Path, what: str) -> str | None:
    """Make ``folder`` (and its parents) unless it exists; what keeps files from being written
    there, or None. Asked before the first step, so that no epoch is trained only to find it
    cannot be saved."""
    if folder.exists() and not folder.is_dir():
        return f"{what} {folder} is a file; give a folder (made if missing)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return (f"{what} {folder}: cannot make that folder ({error.strerror}); give a folder "
                "qcompile can write to")
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{what} {folder}: that folder is not writable; give a folder qcompile can write to"
    return None


def save(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(dict(checkpoint, format=FORMAT), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint ``save`` wrote; a missing, damaged or foreign file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"cannot resume: no checkpoint at {path}; train without resume=True "
                          "(CLI: without --resume) to start afresh")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"cannot resume: {path} is damaged or not a qcompile training "
                          f"checkpoint ({type(error).__name__}: {str(error)[:200]}); delete it "
                          "to start afresh") from None
    if not isinstance(checkpoint, dict):
        checkpoint = {}
    missing = [key for key in _REQUIRED if key not in checkpoint]
    if missing or checkpoint.get("format") != FORMAT:
        raise ConfigError(f"cannot resume: {path} is not a qcompile training checkpoint of format "
                          f"{FORMAT} (missing {', '.join(missing) or 'nothing'}); delete it to "
                          "start afresh")
    return checkpoint


FINGERPRINT_DEFAULTS = {"fixed_thresholds": False}
"""The values of fingerprint entries that checkpoints written before them lack; an entry such a
checkpoint lacks and that has no default here (``quantizers``) is not compared."""
SHOWN_DIFFERENCES = 3
"""How many differing entries of a mapping (one per quantizer) an error names."""


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run whose configuration differs from the checkpoint's."""
    saved = {**FINGERPRINT_DEFAULTS, **saved}
    keys = sorted(saved)
    differences = [_difference(key, saved.get(key), current.get(key))
                   for key in keys if saved.get(key) != current.get(key)]
    if differences:
        raise ConfigError(f"cannot resume from {path}: the run's settings differ "
                          f"({'; '.join(differences)}); resume with the checkpoint's settings"
                          f"{_processes_hint(saved, current)}, or start afresh: without "
                          "resume=True (CLI: without --resume), or in another checkpoint_dir "
                          "(CLI: --checkpoint-dir)")


def _processes_hint(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """How to start as many processes as the checkpoint's run had, when they differ."""
    processes = saved.get("world_size")
    if processes == current.get("world_size") or not isinstance(processes, int):
        return ""
    if processes == 1:
        return " (one process: without torchrun)"
    return f" ({processes} processes: torchrun --nproc-per-node {processes})"


def _difference(key: str, saved, current) -> str:
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return f"{key}: checkpoint {saved!r}, now {current!r}"
    names = [name for name in sorted(set(saved) | set(current))
             if saved.get(name) != current.get(name)]
    shown = ", ".join(f"{name} {saved.get(name)} -> {current.get(name)}"
                      for name in names[:SHOWN_DIFFERENCES])
    more = f" and {len(names) - SHOWN_DIFFERENCES} more" if len(names) > SHOWN_DIFFERENCES else ""
    return f"{key}: {shown}{more}"


def quantizer_settings(model: nn.Module) -> dict[str, str]:
    """Each quantizer of ``model`` by module name: its class and bit-width, as ``quantize`` built
    it (recorded before any schedule changes one), for a resumed run to check that it quantizes
    the model as the run that wrote the checkpoint did. The weights alone do not tell: a
    quantizer's parameters have the same shapes at 2 bits and at 4."""
    return {name: f"{type(module).__name__} {module.bits}-bit"
            for name, module in model.named_modules() if isinstance(module, Quantizer)}


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, numpy, python) as plain tensors and tuples."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = dict(torch=torch.get_rng_state(),
                 numpy=(kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
                 python=random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def module_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's plain public attributes (bools, numbers, strings), by module name."""
    return {name: {key: value for key, value in vars(module).items()
                   if not key.startswith("_") and type(value) in _SETTING_TYPES}
            for name, module in model.named_modules()}


def load_module_settings(model: nn.Module, settings: dict[str, dict[str, Any]]) -> None:
    """Set back what :func:`module_settings` saved, on the modules and attributes still there."""
    modules = dict(model.named_modules())
    for name, values in settings.items():
        module = modules.get(name)
        for key, value in values.items() if module is not None else ():
            if key in vars(module) and type(vars(module)[key]) is type(value):
                setattr(module, key, value)


def _as_tuples(value):
    """``random.setstate`` wants nested tuples; a checkpoint round trip may yield lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
