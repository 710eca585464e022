"""vqdeploy: train vector quantizers in PyTorch, export them to ONNX, serve them with token parity."""

from vqdeploy import _deprecated

_deprecated.install_aliases()  # `from vqdeploy.verify import verify` and other 0.x paths, with a warning

from vqdeploy._version import __version__  # noqa: E402
from vqdeploy.compat.convert import convert  # noqa: E402
from vqdeploy.errors import VQDeployError  # noqa: E402  (after the aliases: a module below may still use one)
from vqdeploy.export import export_onnx, read_metadata  # noqa: E402
from vqdeploy.nn import (  # noqa: E402
    FactorizedResidualVQ,
    GroupedResidualVQ,
    ResidualVQ,
    SplitResidualVQ,
    TrainingOptions,
    VectorQuantize,
    load_quantizer,
    save_quantizer,
)
from vqdeploy.parity import ParityReport, verify  # noqa: E402

__all__ = [
    "FactorizedResidualVQ",
    "GroupedResidualVQ",
    "ParityReport",
    "ResidualVQ",
    "SplitResidualVQ",
    "TrainingOptions",
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
