"""The typer app and its command groups. Each stage's commands live in one module here and import
their stage lazily, inside the command, so ``diffaudit --help`` never pays for torch."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="diffaudit",
    help="Audit text-to-image diffusion models: bias probes, memorization checks, C2PA provenance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
audit_app = typer.Typer(help="Run audits on a run folder (bias, memorization) or end to end.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug
