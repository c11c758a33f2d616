"""Command-line commands that live beside their library module.

Each module here has `add_parser(sub, common)` which registers one `felixscan` subcommand and
sets `handler=run` on it; `run(args) -> int` parses nothing itself and calls the library.
`scanner.app.cli` stays the one place that turns errors into messages and exit codes.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)]
