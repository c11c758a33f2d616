"""felixscan: proves the Calico Felix metrics endpoint is disabled and unreachable on every node."""

from __future__ import annotations

from typing import Any

__version__: str  # read when first asked for, by __getattr__


def __getattr__(name: str) -> Any:
    # `__version__` is read from the installed metadata when first asked for: importing
    # importlib.metadata costs more than a command that never shows the version should pay.
    if name != "__version__":
        raise AttributeError(f"module 'scanner' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("felixscan")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+src"
    globals()["__version__"] = found
    return found
