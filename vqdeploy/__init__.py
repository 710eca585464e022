"""vqdeploy: train vector quantizers in PyTorch, export them to ONNX, serve them with token parity."""

from importlib.metadata import PackageNotFoundError, version

from vqdeploy.compat.convert import convert
from vqdeploy.errors import VQDeployError
from vqdeploy.export import export_onnx, read_metadata
from vqdeploy.nn import (
    FactorizedResidualVQ,
    ResidualVQ,
    SplitResidualVQ,
    VectorQuantize,
    load_quantizer,
    save_quantizer,
)
from vqdeploy.verify import ParityReport, verify  # noqa: E402  (the function shadows the module name on purpose)

try:
    __version__ = version("vqdeploy")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = [
    "FactorizedResidualVQ",
    "ParityReport",
    "ResidualVQ",
    "SplitResidualVQ",
    "VQDeployError",
    "VectorQuantize",
    "__version__",
    "convert",
    "export_onnx",
    "load_quantizer",
    "read_metadata",
    "save_quantizer",
    "verify",
]
