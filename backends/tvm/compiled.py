"""``CompiledModule``: an integer program compiled by TVM, callable, saveable, loadable.

It runs on numpy or torch input of the compiled shape and dtype (float32) and returns the
same kind of array. The input is copied into one staging tensor that the module keeps: a fresh
tensor per call (600 KB for a 224x224 image) cost its page faults on every call, 3-5% of a
ResNet-18 W2A2 call. A module runs one call at a time, as TVM's virtual machine does.
``integer_activations`` runs the ``trace`` function and returns every value by name, which is
how :func:`qcompile.verify` checks it against the simulated model. ``profile`` times every
kernel call of the program (the Relax virtual machine's instrument hook) and returns a
:class:`Profile`, which ``qcompile run --profile`` prints. ``save`` writes a ``.qc``
artifact (:mod:`qcompile.artifact`): the exported library, the parameters as ``params.npz`` and
the manifest; :func:`load` runs it in any process that has qcompile and TVM.
"""

import collections
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

import qcompile
from qcompile import artifact
from qcompile.backends.tvm import amx_host, stored_params
from qcompile.errors import ArtifactError, ConfigError, InputError

LIBRARY = "model.so"
PARAMS = "params.npz"


@dataclass(frozen=True)
class KernelTime:
    """One kernel call of the program: its position, what it computes, and its median time."""

    position: int
    """The call's place in the program the manifest lists (``program``)."""
    kernel: str
    value: str
    """The value the call computes (a layer's output, a requantization, ...); empty for an
    artifact saved before manifests listed the program."""
    seconds: float


@dataclass(frozen=True)
class Profile:
    """Where a call's time goes: every kernel call, in program order, and the whole call."""

    kernels: list[KernelTime]
    call_seconds: float
    """Median wall time of a call made without the instrument hook."""
    calls: int

    @property
    def kernel_seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    def table(self, top: int | None = 15) -> str:
        """The ``top`` slowest kernel calls (all of them with ``top=None``) as text."""
        total = self.kernel_seconds
        ranked = sorted(self.kernels, key=lambda k: k.seconds, reverse=True)
        shown = ranked if top is None else ranked[:top]
        width = max([len("value"), *(len(k.value) for k in shown)])
        lines = [f"profile: median of {self.calls} calls; a call takes "
                 f"{self.call_seconds * 1e3:.3f} ms, its {len(self.kernels)} kernel calls "
                 f"{total * 1e3:.3f} ms",
                 f"{'#':>4} {'ms':>8} {'share':>6}  {'value':{width}} kernel"]
        for k in shown:
            lines.append(f"{k.position:4d} {k.seconds * 1e3:8.3f} {k.seconds / total:6.1%}  "
                         f"{k.value:{width}} {k.kernel}")
        rest = ranked[len(shown):]
        if rest:
            seconds = sum(k.seconds for k in rest)
            lines.append(f"     {seconds * 1e3:8.3f} {seconds / total:6.1%}  "
                         f"({len(rest)} more kernel calls)")
        return "\n".join(lines)


class CompiledModule:
    def __init__(self, executable, params: list[np.ndarray], manifest: dict,
                 traced: list[str], stored: dict | None = None):
        self.executable = executable
        self.manifest = manifest
        self.traced = traced
        self.device = tvm.cuda(0) if manifest["target"]["kind"] == "cuda" else tvm.cpu(0)
        self._vm = None
        self._params_numpy = params
        self._stored = stored or {}
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
            if uses_amx(self.manifest) and not amx_host.enabled():
                raise ArtifactError(
                    f"this module was compiled for {self.manifest['target']}, with AMX "
                    "kernels, and this CPU (or its operating system) does not provide AMX-INT8: "
                    "compile the model again on this machine")
            self._vm = relax.VirtualMachine(self.executable, self.device)
            self._params = [tvm.runtime.tensor(a, self.device) for a in self._params_numpy]
            self._staged = tvm.runtime.empty(self.input_shape, "float32", self.device)
        return self._vm

    def _array(self, x) -> tuple[np.ndarray, bool]:
        """``x`` as a float32 array, and whether it was a torch tensor."""
        is_torch = isinstance(x, torch.Tensor)
        array = x.detach().cpu().numpy() if is_torch else x
        if not isinstance(array, np.ndarray):
            raise InputError(f"input must be a numpy array or torch tensor, got "
                             f"{type(x).__name__}")
        if array.dtype != np.float32:
            raise InputError(f"input dtype must be float32, got {array.dtype}")
        return array, is_torch

    def _input(self, x) -> tuple[tvm.runtime.Tensor, bool]:
        array, is_torch = self._array(x)
        if tuple(array.shape) != self.input_shape:
            raise InputError(f"input shape must be {self.input_shape} (compiled for it), got "
                             f"{tuple(array.shape)}")
        self._staged.copyfrom(np.ascontiguousarray(array))
        return self._staged, is_torch

    def _batches(self, array: np.ndarray) -> list[np.ndarray]:
        """``array`` cut into inputs of the compiled shape: itself, or, where the output's first
        dimension is the compiled batch too, consecutive slices of a batch that is a multiple of
        the compiled one."""
        batch = self.input_shape[0] if self.input_shape else 0
        shape = tuple(array.shape)
        if shape == self.input_shape:
            return [array]
        batched = self.output_shape[:1] == self.input_shape[:1] and batch > 0
        if batched and shape[1:] == self.input_shape[1:] and shape[0] % batch == 0 and shape[0]:
            return [array[k:k + batch] for k in range(0, shape[0], batch)]
        more = f", or a batch of a multiple of {batch} such inputs" if batched else ""
        raise InputError(f"input shape must be {self.input_shape} (compiled for it){more}, got "
                         f"{shape}")

    def __call__(self, x):
        """The model's output on ``x`` (numpy in, numpy out; torch in, torch out). A batch of
        ``k`` times the compiled batch size runs as ``k`` calls, their outputs concatenated."""
        vm = self._machine()
        array, is_torch = self._array(x)
        outputs = []
        for part in self._batches(array):
            data, _ = self._input(part)
            outputs.append(vm["main"](data, *self._params).numpy())
        out = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
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

    def profile(self, x=None, calls: int = 20) -> Profile:
        """Time every kernel call of ``main`` on ``x`` (zeros of the input shape by default):
        the median over ``calls`` instrumented calls of each kernel call, timed around the call
        by the virtual machine's instrument hook (a few microseconds of hook each; on a GPU the
        hook waits for the device around each call), and the median of as many calls made
        without the hook, interleaved with them."""
        if calls < 1:
            raise ConfigError(f"profile needs at least one call, got calls={calls}")
        vm = self._machine()
        if x is None:
            x = np.zeros(self.input_shape, dtype=np.float32)
        data, _ = self._input(x)
        main = vm["main"]
        started: list[float] = []
        order: list[tuple[str, float]] = []
        gpu = self.manifest["target"]["kind"] == "cuda"

        def hook(func, symbol, before, ret, *args):
            if gpu:
                self.device.sync()
            if before:
                started.append(time.perf_counter())
            elif not symbol.startswith("vm.builtin."):
                order.append((symbol, time.perf_counter() - started.pop()))
            else:
                started.pop()

        main(data, *self._params)
        times: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
        plain = []
        try:
            for _ in range(calls):
                order.clear()
                vm.set_instrument(hook)
                main(data, *self._params)
                vm.set_instrument(None)
                for position, (symbol, seconds) in enumerate(order):
                    times[(position, symbol)].append(seconds)
                start = time.perf_counter()
                main(data, *self._params)
                if gpu:
                    self.device.sync()
                plain.append(time.perf_counter() - start)
        finally:
            vm.set_instrument(None)
        return Profile(self._named(times), statistics.median(plain), calls)

    def _named(self, times: dict[tuple[int, str], list[float]]) -> list[KernelTime]:
        """Kernel calls named by the program the manifest lists, whose positions they take.
        TVM runs some listed calls (a reshape) as a builtin, not a kernel, so the calls are
        matched in order; an artifact without the list keeps call numbers and no names."""
        program = self.manifest.get("program", [])
        kernels, step = [], 0
        for (number, symbol), seconds in sorted(times.items()):
            while step < len(program) and program[step]["kernel"] != symbol:
                step += 1
            listed = step < len(program)
            position, value = (step, program[step]["value"]) if listed else (number, "")
            kernels.append(KernelTime(position, symbol, value, statistics.median(seconds)))
            step += 1
        return kernels

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
            arrays = {}
            for k, array in enumerate(self._params_numpy):
                if k in self._stored:
                    arrays.update({f"arr_{k}_{name}": a
                                   for name, a in self._stored[k].stored().items()})
                else:
                    arrays[f"arr_{k}"] = array
            np.savez(params, **arrays)
            manifest = dict(self.manifest, traced=self.traced, params=len(self._params_numpy),
                            stored={str(k): w.recipe() for k, w in self._stored.items()})
            return artifact.write(path, manifest, {LIBRARY: library, PARAMS: params})


def load(path) -> CompiledModule:
    """The compiled module saved at ``path`` (a ``.qc`` artifact).

    The artifact is unpacked into a temporary folder that is removed before this returns: the
    library stays mapped once loaded and the parameters are read into memory."""
    with tempfile.TemporaryDirectory(prefix="qcompile-") as folder:
        manifest = artifact.read(path, folder)
        versions = manifest.get("versions", {})
        if versions.get("tvm") != tvm.__version__:
            raise ArtifactError(f"{path} was compiled with TVM {versions.get('tvm')}, this is "
                                f"TVM {tvm.__version__}: compile the model again")
        try:
            executable = tvm.runtime.load_module(str(Path(folder) / LIBRARY))
            with np.load(Path(folder) / PARAMS) as arrays:
                stored = {int(k): stored_params.from_recipe(recipe, _arrays_of(int(k), arrays))
                          for k, recipe in manifest.get("stored", {}).items()}
                params = [stored[k].array() if k in stored else arrays[f"arr_{k}"]
                          for k in range(manifest.get("params", len(arrays.files)))]
        except ArtifactError:
            raise
        except Exception as error:  # noqa: BLE001 - TVM and numpy raise many kinds here
            raise ArtifactError(f"{path}: cannot load its library or parameters ({error}); "
                                "compile the model again") from None
    return CompiledModule(executable, params, manifest, manifest["traced"], stored)


def _arrays_of(k: int, arrays) -> dict[str, np.ndarray]:
    """The arrays saved for parameter ``k``'s smaller form, by name."""
    prefix = f"arr_{k}_"
    return {name[len(prefix):]: arrays[name] for name in arrays.files if name.startswith(prefix)}


def stored_bytes(params: list[np.ndarray], stored: dict) -> int:
    """The bytes an artifact stores for ``params``, the smaller forms in ``stored`` counted in
    place of the arrays they rebuild."""
    return int(sum(sum(a.nbytes for a in stored[k].stored().values()) if k in stored
                   else a.nbytes for k, a in enumerate(params)))


def uses_amx(manifest: dict) -> bool:
    """Whether a compiled module runs AMX kernels (which need the process's permission)."""
    return any(layer.get("kernel") == "amx" for layer in manifest.get("layers", []))


def versions() -> dict:
    return {"qcompile": qcompile.__version__, "tvm": tvm.__version__, "torch": torch.__version__}
