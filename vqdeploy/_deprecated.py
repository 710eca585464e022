"""Import paths kept for code written against vqdeploy 0.x, each a thin alias that warns once used.

`vqdeploy.verify` (the module) became the package `vqdeploy.parity` so that the name
`vqdeploy.verify` is only the function; `vqdeploy.polygraphy_check` became
`vqdeploy.parity.polygraphy_adapter`; `vqdeploy.ops.nearest_code` (the module) became
`vqdeploy.ops.contract`, so that `vqdeploy.ops.nearest_code` is only the op. `from OLD import name`
keeps working, with a DeprecationWarning naming the new path.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

# old module path -> the modules its names now live in (searched in order)
ALIASES = {
    "vqdeploy.verify": ("vqdeploy.parity",),
    "vqdeploy.polygraphy_check": ("vqdeploy.parity.polygraphy_adapter",),
    "vqdeploy.ops.nearest_code": ("vqdeploy.ops.contract", "vqdeploy.ops.custom_op"),
}


class _AliasModule(types.ModuleType):
    """A module object whose attributes are read, with a warning, from the module that replaced it."""

    def __init__(self, old: str, new: tuple[str, ...]) -> None:
        super().__init__(old, f"Deprecated alias of {' and '.join(new)}.")
        self.__dict__["_new"] = new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for new in self.__dict__["_new"]:
            module = importlib.import_module(new)
            if hasattr(module, name):
                warnings.warn(f"{self.__name__} is deprecated; import {name} from {new}", DeprecationWarning,
                              stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for new in self.__dict__["_new"] for n in dir(importlib.import_module(new))})


def install_aliases() -> None:
    """Register every alias in sys.modules (cheap: nothing is imported until an attribute is read)."""
    for old, new in ALIASES.items():
        sys.modules.setdefault(old, _AliasModule(old, new))
