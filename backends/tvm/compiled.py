"""``CompiledModule``: an integer program compiled by TVM, callable, saveable, loadable.

It runs on numpy or torch input of the compiled shape and dtype (float32) and returns the
same kind of array. The input is copied into one staging tensor that the module keeps: a fresh
tensor per call (600 KB for a 224x224 image) cost its page faults on every call, 3-5% of a
ResNet-18 W2A2 call. A module runs one call at a time, as TVM's virtual machine does.
``integer_activations`` runs the ``trace`` function and returns every value by name, which is
how :func:`qcompile.verify` checks it against the simulated model. ``save`` writes a ``.qc``
artifact (:mod:`qcompile.artifact`): the exported library, the parameters as ``params.npz`` and
the manifest; :func:`load` runs it in any process that has qcompile and TVM.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

import qcompile
from qcompile import artifact
from qcompile.errors import ArtifactError, InputError

LIBRARY = "model.so"
PARAMS = "params.npz"


class CompiledModule:
    def __init__(self, executable, params: list[np.ndarray], manifest: dict,
                 traced: list[str]):
        self.executable = executable
        self.manifest = manifest
        self.traced = traced
        self.device = tvm.cuda(0) if manifest["target"]["kind"] == "cuda" else tvm.cpu(0)
        self._vm = None
        self._params_numpy = params
        self._params = None
        self._staged = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["output"]["shape"])

    def _machine(self):
        if self._vm is None:
            if not self.device.exist:
                raise ArtifactError(f"this module was compiled for {self.manifest['target']}, "
                                    "and no such device is present")
            self._vm = relax.VirtualMachine(self.executable, self.device)
            self._params = [tvm.runtime.tensor(a, self.device) for a in self._params_numpy]
            self._staged = tvm.runtime.empty(self.input_shape, "float32", self.device)
        return self._vm

    def _input(self, x) -> tuple[tvm.runtime.Tensor, bool]:
        is_torch = isinstance(x, torch.Tensor)
        array = x.detach().cpu().numpy() if is_torch else x
        if not isinstance(array, np.ndarray):
            raise InputError(f"input must be a numpy array or torch tensor, got "
                             f"{type(x).__name__}")
        if array.dtype != np.float32:
            raise InputError(f"input dtype must be float32, got {array.dtype}")
        if tuple(array.shape) != self.input_shape:
            raise InputError(f"input shape must be {self.input_shape} (compiled for it), got "
                             f"{tuple(array.shape)}")
        self._staged.copyfrom(np.ascontiguousarray(array))
        return self._staged, is_torch

    def __call__(self, x):
        vm = self._machine()
        data, is_torch = self._input(x)
        out = vm["main"](data, *self._params).numpy()
        return torch.from_numpy(out) if is_torch else out

    def integer_activations(self, x) -> dict[str, torch.Tensor]:
        vm = self._machine()
        if isinstance(x, torch.Tensor):
            x = x.float()
        data, _ = self._input(x)
        values = vm["trace"](data, *self._params)
        result = {}
        for k, name in enumerate(self.traced):
            value = torch.from_numpy(values[k].numpy())
            result[name] = value if value.is_floating_point() else value.long()
        return result

    def benchmark(self, repeat: int = 20) -> float:
        """Median seconds of one call on zeros of the input shape."""
        x = np.zeros(self.input_shape, dtype=np.float32)
        self(x)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self(x)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def save(self, path) -> Path:
        with tempfile.TemporaryDirectory() as folder:
            library = Path(folder) / LIBRARY
            self.executable.export_library(str(library))
            params = Path(folder) / PARAMS
            np.savez(params, *self._params_numpy)
            manifest = dict(self.manifest, traced=self.traced)
            return artifact.write(path, manifest, {LIBRARY: library, PARAMS: params})


def load(path) -> CompiledModule:
    """The compiled module saved at ``path`` (a ``.qc`` artifact)."""
    folder = tempfile.mkdtemp(prefix="qcompile-")
    manifest = artifact.read(path, folder)
    versions = manifest.get("versions", {})
    if versions.get("tvm") != tvm.__version__:
        raise ArtifactError(f"{path} was compiled with TVM {versions.get('tvm')}, this is TVM "
                            f"{tvm.__version__}: compile the model again")
    try:
        executable = tvm.runtime.load_module(str(Path(folder) / LIBRARY))
        with np.load(Path(folder) / PARAMS) as stored:
            params = [stored[f"arr_{k}"] for k in range(len(stored.files))]
    except Exception as error:  # noqa: BLE001 - TVM and numpy raise many kinds here
        raise ArtifactError(f"{path}: cannot load its library or parameters ({error}); "
                            "compile the model again") from None
    return CompiledModule(executable, params, manifest, manifest["traced"])


def versions() -> dict:
    return {"qcompile": qcompile.__version__, "tvm": tvm.__version__, "torch": torch.__version__}
