"""Names a package exports from submodules that are imported on first use (PEP 562).

    __getattr__, __dir__ = lazy_exports(__name__, {"Machine": "labkit.vmm.machine"}, globals())

keeps ``import labkit`` fast: matplotlib, Unicorn or the monitors load only when
a name that needs them is used.  A loaded name is stored in the package, so the
second lookup is an ordinary attribute.
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str],
                 namespace: dict) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose ``exports`` map a name to its module."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
