"""Command-line entry point. Errors of the ``DiffauditError`` family print one line and exit 2;
``--debug`` shows the traceback. Command modules are imported here; stages are imported inside commands."""

from __future__ import annotations

import importlib
import sys

from diffaudit.commands import STATE, app
from diffaudit.errors import DiffauditError

COMMAND_MODULES = ("core", "generate", "importing", "bias", "stats", "memorization", "provenance", "dashboard",
                   "audit")

for _name in COMMAND_MODULES:  # each registers its commands on the app
    importlib.import_module(f"diffaudit.commands.{_name}")


INTERRUPTED = "interrupted; finished work is saved, rerun the same command to resume"


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="diffaudit")
    except DiffauditError as e:
        if STATE["debug"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except SystemExit as e:  # typer turns Ctrl-C inside a command into exit 130 before the clause above sees it
        if e.code == 130:
            print(INTERRUPTED, file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
