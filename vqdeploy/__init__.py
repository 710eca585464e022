"""vqdeploy: train vector quantizers in PyTorch, export them to ONNX, serve them with token parity."""

import importlib
from typing import Any

from vqdeploy import _deprecated

_deprecated.install_aliases()  # `from vqdeploy.verify import verify` and other 0.x paths, with a warning

from vqdeploy._version import __version__  # noqa: E402
from vqdeploy.errors import VQDeployError  # noqa: E402  (after the aliases: a module below may still use one)

# The public names are imported when first used (PEP 562): `import vqdeploy` stays cheap, so the
# command line starts (and a Ctrl-C during its start-up is caught by `vqdeploy.cli.main`) before
# torch and onnx load.
_LAZY = {
    "export_onnx": "vqdeploy.export", "read_metadata": "vqdeploy.export", "convert": "vqdeploy.compat.convert",
    "ResidualVQ": "vqdeploy.nn", "VectorQuantize": "vqdeploy.nn", "GroupedResidualVQ": "vqdeploy.nn",
    "FactorizedResidualVQ": "vqdeploy.nn", "SplitResidualVQ": "vqdeploy.nn", "TrainingOptions": "vqdeploy.nn",
    "load_quantizer": "vqdeploy.nn", "save_quantizer": "vqdeploy.nn",
    "ParityReport": "vqdeploy.parity", "verify": "vqdeploy.parity",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"vqdeploy.{name}")  # a subpackage: vqdeploy.runtime, ...
        except ModuleNotFoundError as error:
            if error.name != f"vqdeploy.{name}":
                raise
            raise AttributeError(f"module 'vqdeploy' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'vqdeploy' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
