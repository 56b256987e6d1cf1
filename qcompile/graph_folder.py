"""Writing a rewritten graph as an importable Python folder, all or nothing.

``torch.fx.GraphModule.to_folder`` writes ``module.py`` (the graph's code and its layers),
``state_dict.pt`` and ``__init__.py``; layers it cannot write as code are pickled next to them.
We build that folder beside the destination, make it relocatable, load it back and compare its
output with the graph's, and only then rename it into place.
"""

import importlib.util
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from qcompile.errors import ConfigError, QcompileError
from qcompile.ir.shapes import inference_mode_of

OUTPUT_CLASS = "FxModule"
"""The class a written folder exports: ``from <folder> import FxModule``."""


def write_graph_folder(gm: fx.GraphModule, out: Path, example: tuple[torch.Tensor, ...]) -> None:
    """Write ``gm`` as an importable folder at ``out``, all or nothing.

    The folder is built and loaded back (its output must equal ``gm``'s) in a temporary folder
    beside ``out``, then renamed into place; an existing ``out`` is replaced only then. On any
    failure nothing new is left at ``out`` and the temporary folder is removed.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
    except OSError as error:
        raise ConfigError(f"cannot write the graph to '{out}': {error}") from error
    try:
        _to_folder(gm, staging)
        _check_folder(gm, staging, example)
        _move_into_place(staging, out)
    except OSError as error:
        raise ConfigError(f"cannot write the graph to '{out}': {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _to_folder(gm: fx.GraphModule, folder: Path) -> None:
    """``gm.to_folder``, made relocatable: torch writes the folder's absolute path into the
    code that loads the weights; point it at the module's own folder instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.to_folder(folder, OUTPUT_CLASS)
    code_file = folder / "module.py"
    code = code_file.read_text().replace(f"r'{folder}", "_HERE + r'")
    if str(folder) in code:
        raise QcompileError(f"cannot make the written graph relocatable (path {folder})")
    header = "import os\n_HERE = os.path.dirname(os.path.abspath(__file__))\n"
    code_file.write_text(header + code)


def _check_folder(gm: fx.GraphModule, folder: Path, example: tuple[torch.Tensor, ...]) -> None:
    name = f"_qcompile_written_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
        written = getattr(package, OUTPUT_CLASS)()
        with inference_mode_of(written), inference_mode_of(gm):
            expected, got = pytree.tree_leaves(gm(*example)), pytree.tree_leaves(written(*example))
    except Exception as error:
        raise QcompileError(
            f"the graph written by torch.fx to_folder does not load back: "
            f"{type(error).__name__}: {error}. to_folder writes torch functions and modules as "
            "code; a plain Python function of your own called in the graph is not written, so "
            "make it an nn.Module (kept as a leaf) instead"
        ) from error
    finally:
        for module_name in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module_name]
    if len(expected) != len(got) or not all(map(_same_tensor, expected, got)):
        raise QcompileError("the graph written by torch.fx to_folder computes different outputs")


def _same_tensor(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a == b


def _move_into_place(staging: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        os.replace(staging, out)
        return
    previous = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
    previous.mkdir()
    os.replace(out, previous / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(previous / out.name, out)
        previous.rmdir()
        raise
    shutil.rmtree(previous, ignore_errors=True)
