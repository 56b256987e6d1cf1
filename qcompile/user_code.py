"""Importing the user's own code by name: pass plugins, model classes, leaf module types.

Names are resolved as ``python -m`` would: the working directory is searched too, so a plugin or
model class in the folder the command runs from is found without setting PYTHONPATH.
"""

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from torch import nn

from qcompile.errors import ConfigError, ModelLoadError, QcompileError


def import_object(spec: str, *, what: str):
    """The object ``package.module:Name`` names, importing the module (the working directory
    is searched too, as ``python -m`` would)."""
    module_name, _, attribute = spec.partition(":")
    module = _import_module(module_name, what, spec, ModelLoadError)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ModelLoadError(
            f"{what} {spec!r}: module '{module_name}' has no attribute {attribute!r}"
        ) from None


def load_plugin(spec: str) -> ModuleType:
    """Import a plugin by dotted module name or ``.py`` path, so the passes it registers exist."""
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"plugin file '{spec}' does not exist")
        name = "qcompile_plugin_" + re.sub(r"\W", "_", path.stem)
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        _run_plugin(lambda: module_spec.loader.exec_module(module), spec)
        return module
    return _run_plugin(lambda: _import_module(spec, "plugin", spec, ConfigError), spec)


def _run_plugin(load, spec: str):
    try:
        return load()
    except QcompileError:
        raise
    except Exception as error:
        raise ConfigError(
            f"plugin '{spec}' failed while importing: {type(error).__name__}: {error}"
        ) from error


def _import_module(
    module_name: str, what: str, spec: str, error_type: type[QcompileError]
) -> ModuleType:
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name + ".").startswith(error.name + "."):
            raise error_type(
                f"cannot import {what} {spec!r}: no module named '{error.name}'; give a dotted "
                "module importable from the working directory or PYTHONPATH"
                + (", or a path to a .py file" if what == "plugin" else "")
            ) from error
        raise error_type(f"importing {what} {spec!r} failed: {error}") from error
    except Exception as error:
        raise error_type(
            f"importing {what} {spec!r} failed: {type(error).__name__}: {error}"
        ) from error


def resolve_leaf(model: nn.Module, name: str) -> type[nn.Module] | str:
    """What ``--leaf name`` means for ``model``: a module path in it, else a module type.

    A type is named by its class name (``BasicBlock``), its qualified name
    (``torchvision.models.resnet.BasicBlock``) or ``package.module:ClassName``.
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return name
    for module in modules.values():
        cls = type(module)
        if name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            return cls
    if ":" in name:
        found = import_object(name, what="leaf type")
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
    raise ConfigError(
        f"--leaf {name!r} is neither a module path in the model (e.g. "
        f"{', '.join(list(modules)[1:4]) or 'none'}) nor the type of one of its modules"
    )
