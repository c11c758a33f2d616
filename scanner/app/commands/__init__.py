"""The `felixscan` subcommands: one module each, registered the same way.

Each module has `register(sub)`, which adds one subcommand to the parser (its shared options come
from `scanner.app.options`) and sets `handler=run` on it; `run(args) -> int` parses nothing
itself and calls one library function. `scanner.app.cli` is the one place that turns errors
into messages and exit codes. To add a command: write the module, add it to COMMANDS.
"""

from __future__ import annotations

from types import ModuleType

from scanner.app.commands import (
    completion,
    db,
    demo,
    node_check,
    remediate,
    report,
    scan,
    serve,
    trend,
)

# In the order `felixscan --help` lists them.
COMMANDS: tuple[ModuleType, ...] = (scan, node_check, report, demo, completion, remediate,
                                    serve, trend, db)
