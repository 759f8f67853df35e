"""Commands on suites, runs and registries: ``suites``, ``runs``, ``list``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer

from diffaudit.commands import app

suites_app = typer.Typer(help="Prompt suites: list them, show one expanded.", no_args_is_help=True)
runs_app = typer.Typer(help="Run folders: list them, show one.", no_args_is_help=True)
app.add_typer(suites_app, name="suites")
app.add_typer(runs_app, name="runs")


def console():
    from rich.console import Console

    return Console()


@suites_app.command("list")
def suites_list() -> None:
    """List the built-in prompt suites with their size and sources."""
    from rich.table import Table

    from prompts.suites import list_suites, load_suite

    table = Table("suite", "templates", "subjects", "edits", "description")
    for name in list_suites():
        s = load_suite(name)
        table.add_row(name, str(len(s.templates)), str(len(s.subjects)), str(len(s.edits)), s.description)
    console().print(table)


@suites_app.command("show")
def suites_show(
    suite: str = typer.Argument(..., help="Suite name or path to a .yaml file."),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", "-n", min=1),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the expanded requests as JSON lines."),
) -> None:
    """Show a suite's sources and its expanded prompts."""
    from prompts.suites import expand, load_suite, suite_path

    s = load_suite(suite)
    requests = expand(suite, images_per_prompt=images_per_prompt, seed=seed)
    if any(subject.bls for subject in s.subjects):
        from audit.reference import subject_reference

        subject_reference(suite)  # a bls: field that is not a BLS row is an error here, not after generation
    if as_json:
        for r in requests:
            typer.echo(json.dumps(r.model_dump()))
        return
    c = console()
    c.print(f"[bold]{s.name}[/bold] ({suite_path(suite)}): {s.description}")
    for src in s.sources:
        c.print(f"  source: {src}")
    c.print(f"{len(requests)} prompts x {images_per_prompt} images = {len(requests) * images_per_prompt} images")
    for r in requests:
        extra = f" [{r.mode} {r.source_image} strength={r.strength}]" if r.mode != "txt2img" else ""
        c.print(f"  {r.prompt_id}: {r.prompt}{extra}", markup=False)


@runs_app.command("list")
def runs_list(runs_dir: Path = typer.Argument(Path("runs"), help="Folder holding run folders.")) -> None:
    """List runs with model, suite, image count and the stages done."""
    from rich.table import Table

    from diffaudit.runs import list_runs

    runs = list_runs(runs_dir)
    if not runs:
        typer.echo(f"no runs in {runs_dir}")
        return
    table = Table("run", "model", "suite", "images", "stages", "created")
    for run in runs:
        info = run.info
        gen = info.get("generation", {})
        n = len(run.read_table("generations")) if run.has_table("generations") else 0
        table.add_row(run.name, str(gen.get("model", "-")), str(gen.get("suite", "-")), str(n),
                      ", ".join(info.get("stages", {})) or "-", info.get("created", "-"))
    console().print(table)


@runs_app.command("show")
def runs_show(run: Path = typer.Argument(..., help="A run folder, or a name that `runs list` prints."),
              as_json: bool = typer.Option(False, "--json", help="Print run.json as is.")) -> None:
    """Show a run's config snapshot, stages with wall times, and tables with row counts."""
    from diffaudit.runs import Run

    if not run.exists() and len(run.parts) == 1 and Run.is_run(Path("runs") / run):
        run = Path("runs") / run  # the name `runs list` prints for ./runs
    r = Run.open(run)
    info = r.info
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    c = console()
    c.print(f"[bold]{r.name}[/bold]  created {info.get('created')}  ({r.root})")
    for key, value in info.items():
        if isinstance(value, dict) and key != "stages":
            c.print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()), markup=False)
    for stage, entry in info.get("stages", {}).items():
        c.print(f"stage {stage}: {entry.get('seconds')} s, finished {entry.get('finished')}", markup=False)
    for table in r.tables():
        c.print(f"table {table}: {len(r.read_table(table))} rows", markup=False)


class Kind(StrEnum):
    probes = "probes"
    hashes = "hashes"
    watermarks = "watermarks"
    suites = "suites"


@app.command("list")
def list_plugins(kind: Kind = typer.Argument(..., help="probes, hashes, watermarks or suites")) -> None:
    """List the registered plugins of one kind."""
    if kind is Kind.suites:
        from prompts.suites import list_suites

        for name in list_suites():
            typer.echo(name)
        return
    from diffaudit.registry import REGISTRIES

    reg = REGISTRIES[kind.value]
    for name in reg:
        typer.echo(f"{name}\t{reg[name]}")
