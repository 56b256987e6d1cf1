"""The pass registry and the pass manager.

A pass is a plain function ``(gm, ctx) -> gm`` registered by name with :func:`register_pass`. A
pipeline is a list of names or a spec string such as ``"canonicalize,fold-bn{mode=qat}"``; names
of presets (``default``, ``qat``) expand to their passes. The manager runs every listed pass or
raises: after each one it lints and recompiles the graph and, given example inputs, runs the model
on them (which also refreshes the recorded shapes). An error names the failing pass and the passes
before it. Each pass's time, node counts and notes are kept in ``ctx.records`` and logged.
"""

import copy
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import PassError, PipelineError, QcompileError
from qcompile.ir.shapes import propagate_shapes
from qcompile.ir.trace import example_tuple

log = logging.getLogger("qcompile.pipeline")

PassFunction = Callable[[fx.GraphModule, "PassContext"], fx.GraphModule]

_registry: dict[str, PassFunction] = {}
_presets: dict[str, list[str]] = {}


def register_pass(name: str) -> Callable[[PassFunction], PassFunction]:
    """Register a pass under ``name`` so pipelines (Python or CLI ``--passes``) can use it."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise PipelineError(
            f"pass name {name!r} is not valid: use lower-case letters, digits, '-' and '_'"
        )

    def decorate(fn: PassFunction) -> PassFunction:
        known = _registry.get(name)
        if known is not None and _origin(known) != _origin(fn):
            raise PipelineError(
                f"pass name {name!r} is already registered by {_origin(known)}; choose another name"
            )
        if name in _presets:
            raise PipelineError(f"{name!r} is the name of a preset pipeline; choose another name")
        _registry[name] = fn
        return fn

    return decorate


def register_preset(name: str, passes: Sequence[str]) -> None:
    """Name a pipeline (a list of pass names, options allowed) so it can be used as one name."""
    if name in _registry:
        raise PipelineError(f"{name!r} is already the name of a pass; choose another preset name")
    _presets[name] = list(passes)


def available_passes() -> list[str]:
    return sorted(_registry)


def available_presets() -> dict[str, list[str]]:
    return {name: list(passes) for name, passes in _presets.items()}


def get_pass(name: str) -> PassFunction:
    try:
        return _registry[name]
    except KeyError:
        raise PipelineError(
            f"unknown pass {name!r}; known passes: {', '.join(available_passes())}; "
            f"presets: {', '.join(sorted(_presets))}. A pass of your own must be registered with "
            "@qcompile.register_pass (CLI: load its module with --plugin)"
        ) from None


def _origin(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


@dataclass(frozen=True)
class PassSpec:
    """One step of a pipeline: a registered pass name and its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


_STEP = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(spec: str | Sequence[str | PassSpec]) -> list[PassSpec]:
    """Turn a spec string or a list of names/specs into PassSpecs, expanding presets.

    ``"canonicalize,fold-bn{mode=qat}"`` gives two steps, the second with ``{"mode": "qat"}``.
    Option values are read as bool (true/false), int, float, else kept as strings.
    """
    items = _split_spec(spec) if isinstance(spec, str) else list(spec)
    steps: list[PassSpec] = []
    for item in items:
        step = item if isinstance(item, PassSpec) else _parse_step(item)
        if step.name in _presets:
            if step.options:
                raise PipelineError(f"preset {step.name!r} takes no options; list its passes instead")
            steps.extend(parse_pipeline(_presets[step.name]))
        else:
            get_pass(step.name)
            steps.append(step)
    if not steps:
        raise PipelineError("the pipeline is empty: name at least one pass")
    return steps


def _split_spec(spec: str) -> list[str]:
    parts, position = [], 0
    spec = spec.strip()
    while position < len(spec):
        match = _STEP.match(spec, position)
        if match is None or match.end() == position:
            raise PipelineError(
                f"cannot parse pipeline {spec!r} at {spec[position:]!r}; expected "
                "'name' or 'name{key=value,...}' separated by commas"
            )
        parts.append(match.group(0).strip().rstrip(","))
        position = match.end()
    return parts


def _parse_step(text: str) -> PassSpec:
    match = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*(?:\{([^{}]*)\})?\s*", text)
    if match is None:
        raise PipelineError(f"cannot parse pipeline step {text!r}; expected 'name{{key=value}}'")
    options = {}
    for pair in filter(None, (p.strip() for p in (match.group(2) or "").split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"option {pair!r} of pass {match.group(1)!r} is not key=value")
        options[key.strip()] = _parse_value(value.strip())
    return PassSpec(match.group(1), options)


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class PassRecord:
    """What one pass did: its options, time, node counts and notes it left."""

    name: str
    options: dict[str, Any]
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = (
            f"{self.name}: {self.seconds * 1000:.1f} ms, "
            f"{self.nodes_before} -> {self.nodes_after} nodes"
        )
        return "; ".join([line, *self.notes])


@dataclass
class PassContext:
    """What a pass may read: the configuration, example inputs, and what earlier passes did."""

    example_inputs: tuple[torch.Tensor, ...] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    records: list[PassRecord] = field(default_factory=list)

    @property
    def options(self) -> dict[str, Any]:
        """The running pass's own options from the pipeline spec."""
        return self.records[-1].options if self.records else {}

    def option(self, key: str, default: Any = None) -> Any:
        """The running pass's option ``key``, else the pipeline configuration's, else default."""
        if key in self.options:
            return self.options[key]
        return self.config.get(key, default)

    def note(self, message: str) -> None:
        """Leave a line in the running pass's record (shown in logs and reports)."""
        if not self.records:
            raise PassError("ctx.note() is only for use inside a running pass")
        self.records[-1].notes.append(message)

    def record_of(self, name: str) -> PassRecord | None:
        """The record of the last run of pass ``name``, or None if it has not run."""
        return next((r for r in reversed(self.records) if r.name == name), None)


class PassManager:
    """Runs a pipeline of registered passes, checking the graph after each one.

    ``print_after`` names passes (or ``"all"``) whose output graph is printed; ``dump_dir`` writes
    each pass's output code to ``NN-<pass>.py`` there; ``check=False`` skips the run check.
    """

    def __init__(
        self,
        passes: str | Sequence[str | PassSpec] = "default",
        *,
        print_after: str | Iterable[str] = (),
        dump_dir: str | Path | None = None,
        check: bool = True,
        printer: Callable[[str], None] = print,
    ):
        self.steps = parse_pipeline(passes)
        self.print_after = {print_after} if isinstance(print_after, str) else set(print_after)
        unknown = self.print_after - {s.name for s in self.steps} - {"all"}
        if unknown:
            raise PipelineError(
                f"print_after names {', '.join(sorted(unknown))}, which the pipeline does not run"
            )
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.check = check
        self.printer = printer

    def run(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[torch.Tensor] | None = None,
        ctx: PassContext | None = None,
        **config: Any,
    ) -> fx.GraphModule:
        """Run every pass on a copy of ``gm`` and return the result; ``gm`` itself is left alone."""
        if ctx is None:
            ctx = PassContext(example_tuple(example_inputs) if example_inputs is not None
                              else None)
        elif example_inputs is not None:
            ctx.example_inputs = example_tuple(example_inputs)
        ctx.config.update(config)
        gm = copy.deepcopy(gm)
        for index, step in enumerate(self.steps):
            gm = self._run_step(index, step, gm, ctx)
        return gm

    def _run_step(self, index: int, step: PassSpec, gm, ctx: PassContext) -> fx.GraphModule:
        record = PassRecord(step.name, dict(step.options), nodes_before=len(gm.graph.nodes))
        ctx.records.append(record)
        where = self._where(index)
        start = time.perf_counter()
        try:
            result = get_pass(step.name)(gm, ctx)
        except QcompileError as error:
            raise type(error)(f"pass '{step.name}'{where} failed: {error}") from error
        except Exception as error:
            raise PassError(
                f"pass '{step.name}'{where} failed: {type(error).__name__}: {error}"
            ) from error
        if not isinstance(result, fx.GraphModule):
            raise PassError(
                f"pass '{step.name}'{where} returned {type(result).__name__}; "
                "a pass must return the GraphModule"
            )
        self._verify(result, step.name, where, ctx)
        record.seconds = time.perf_counter() - start
        record.nodes_after = len(result.graph.nodes)
        log.info("pass %s", record.summary())
        self._show(index, step.name, result)
        return result

    def _where(self, index: int) -> str:
        before = [s.name for s in self.steps[:index]]
        return f" (after {', '.join(before)})" if before else " (first pass)"

    def _verify(self, gm: fx.GraphModule, name: str, where: str, ctx: PassContext) -> None:
        try:
            gm.graph.lint()
            gm.recompile()
        except Exception as error:
            raise PassError(f"pass '{name}'{where} left an invalid graph: {error}") from error
        if self.check and ctx.example_inputs is not None:
            try:
                propagate_shapes(gm, ctx.example_inputs)
            except Exception as error:
                raise PassError(
                    f"after pass '{name}'{where} the model no longer runs on the example "
                    f"inputs: {type(error).__name__}: {error}"
                ) from error

    def _show(self, index: int, name: str, gm: fx.GraphModule) -> None:
        if name in self.print_after or "all" in self.print_after:
            self.printer(f"# graph after pass '{name}'\n{gm.code.strip()}\n")
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{index:02d}-{name}.py").write_text(gm.code)
