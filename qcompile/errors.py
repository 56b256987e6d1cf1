"""The exceptions qcompile raises for problems a user can act on.

Every error a user can cause (a model fx cannot trace, an unknown pass name, a file that is not a
model) is one of these types, with a message that says what went wrong and what to do about it.
The CLI turns any of them into one line on stderr and exit code 2.
"""


class QcompileError(Exception):
    """Base class of every error qcompile raises on purpose."""


class TraceError(QcompileError):
    """The model cannot be traced into the fx IR."""


class PassError(QcompileError):
    """A pass failed, or left a graph that does not lint or does not run."""


class PipelineError(QcompileError):
    """A pipeline names an unknown pass or has a malformed spec."""


class ModelLoadError(QcompileError):
    """A model file cannot be read, or is not the kind of model its options say."""


class ConfigError(QcompileError):
    """An option has a value qcompile cannot use."""


class NotDeployableError(QcompileError):
    """A quantized layer cannot state its integer meaning, so no backend can compile it."""


class IntegerizeError(QcompileError):
    """A quantized graph, or part of one, cannot be turned into integer operations."""


class ArtifactError(QcompileError):
    """A ``.qc`` artifact cannot be written, read or run (missing, corrupt, another version)."""


class InputError(QcompileError):
    """An input has a shape or dtype the model cannot take: an example input to trace with, or
    an input given to a compiled model."""


class CheckpointError(QcompileError):
    """A training checkpoint cannot be written (a full disk, a folder gone); the last complete
    one, if any, is kept."""


class TrainingInterrupted(QcompileError):
    """Training was stopped (Ctrl-C, SIGTERM); ``checkpoint`` is where progress was saved, if any.

    The message says how to continue; the CLI prints it and exits like any other qcompile error.
    """

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
