"""Typed errors. Every error vqdeploy raises for bad input is a subclass of `VQDeployError`.

Each class also derives from the builtin exception a Python user would expect (`ValueError`,
`TypeError`, ...), so `except ValueError` keeps working.
"""

from __future__ import annotations


class VQDeployError(Exception):
    """Base class of every error raised by vqdeploy on purpose."""


class InputShapeError(VQDeployError, ValueError):
    """A tensor has the wrong rank or the wrong size along some axis."""


class InputDtypeError(VQDeployError, TypeError):
    """A tensor has a dtype the entry point does not accept."""


class NonFiniteInputError(VQDeployError, ValueError):
    """An input holds NaN or infinite values, or values that overflow the dtype the search sees."""


class InputTypeError(VQDeployError, TypeError):
    """An input that is not an array the entry point can read: not a numpy array or torch tensor, a
    sparse or meta tensor, a numpy array with negative strides or a non-native byte order."""


class IndexRangeError(VQDeployError, IndexError):
    """Indices passed to decode lie outside the codebook."""


class UninitializedCodebookError(VQDeployError, RuntimeError):
    """A k-means initialised codebook was used before it saw a training batch."""


class UnsupportedOptionError(VQDeployError, ValueError):
    """An option (argument, reference-library setting, export part...) is not supported."""


class NotAnArrayError(InputTypeError, UnsupportedOptionError):
    """The runtime was given something that is neither a numpy array nor a torch tensor (a list, a
    scalar...). Also an `UnsupportedOptionError`, as it was before `InputTypeError` existed."""


class ConfigError(VQDeployError, ValueError):
    """Constructor arguments that contradict each other or are out of range."""


class CheckpointError(VQDeployError, ValueError):
    """A file is not a vqdeploy checkpoint or does not match its config."""


class CheckpointConfigError(CheckpointError):
    """A vqdeploy checkpoint whose stored config is damaged: invalid JSON, an unknown key, a value
    out of range, or sizes that disagree with the stored weights."""


class CheckpointValuesError(CheckpointError):
    """A vqdeploy checkpoint whose weights hold NaN or infinite values."""


class NotAVQDeployModelError(VQDeployError, ValueError):
    """An ONNX file that was not written by `vqdeploy.export_onnx`."""


class MetadataError(NotAVQDeployModelError):
    """A vqdeploy export whose metadata is damaged or was changed: a field that does not parse, out
    of range, or that disagrees with the graph's own weights."""


class ModelValuesError(NotAVQDeployModelError):
    """A vqdeploy export whose weights (codebooks, projections) hold NaN or infinite values."""


class ExternalDataError(NotAVQDeployModelError):
    """An ONNX file whose external-data references point outside the model's folder, or are missing."""


class OutputExistsError(VQDeployError, FileExistsError):
    """Refusing to overwrite a file the user owns (pass overwrite=True / --force)."""


class OutputNotAFileError(OutputExistsError):
    """The output path names something that is not a regular file (a directory, a device, a FIFO,
    a symbolic link, dangling or not): never replaced, whatever overwrite says."""


class OutputWriteError(VQDeployError, OSError):
    """Writing an output failed (its folder cannot be made, the disk is full, no permission, a NUL
    in the path...); the target was left as it was."""


class ExportError(VQDeployError, RuntimeError):
    """The ONNX export itself failed."""


class BackendOutputError(VQDeployError, RuntimeError):
    """A backend returned outputs that do not fit the file's metadata (a graph that was changed)."""


class QuantizerClosedError(VQDeployError, RuntimeError):
    """A `Quantizer` used after (or while) `close()` released its backend."""


class BackendNotAvailableError(VQDeployError, ImportError):
    """A runtime backend whose package is not installed, or whose hardware is absent."""


class DeviceNotAvailableError(VQDeployError, RuntimeError):
    """The requested device does not exist on this machine."""


class DeviceMismatchError(VQDeployError, ValueError):
    """Tensors that must be on one device are on different ones."""


class ParityError(VQDeployError, AssertionError):
    """Backend tokens are not at parity with the eager model (docs/design.md section 4); raised by
    `ParityReport.raise_if_failed()`."""


class EngineBuildError(VQDeployError, RuntimeError):
    """TensorRT could not parse an export or build an engine from it."""


class EngineRunError(VQDeployError, RuntimeError):
    """A TensorRT engine could not be loaded or run (deserialisation, bindings, execution)."""


class PluginRegistrationError(VQDeployError, RuntimeError):
    """The TensorRT plugin exists here but TensorRT refused its definition."""


class ProcessGroupNotInitializedError(VQDeployError, RuntimeError):
    """sync_codebook=True in a training forward, but no torch.distributed process group is initialised."""


class UnreadableInputError(VQDeployError, ValueError):
    """An input file that is missing, of an unknown format, or without the column asked for."""


class ResumeMismatchError(VQDeployError, ValueError):
    """An output folder that holds another job's results (another model, inputs or settings)."""


class TokensDifferError(VQDeployError, AssertionError):
    """Tokens a job wrote differ from those the driver computes again for the same rows."""


class ShardsMissingError(VQDeployError, RuntimeError):
    """A tokenize job ended with shards of its plan not written (run it again to finish them)."""


class NotConvertibleError(VQDeployError, TypeError):
    """`vqdeploy.convert` was given a module of a class it has no converter for."""
