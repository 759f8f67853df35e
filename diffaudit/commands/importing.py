"""``diffaudit import``: images made anywhere become a run; ``diffaudit compare``: a run against a reference run.

The import command is where two stages meet: ``generate.importer`` copies the images in, and the
provenance stage's C2PA reader (``provenance.c2pa.read_credentials``) judges each file's embedded
credentials on the way, through a callback, so the importer never imports the provenance stage.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from diffaudit.commands import app


class ImportKind(StrEnum):
    model = "model"
    reference = "reference"


@app.command("import")
def import_(
    source: Path = typer.Argument(..., help="A folder (flat, or one subfolder per subject) or a manifest "
                                            "(.csv, .jsonl, .parquet) with a path column."),
    out: Path = typer.Option(..., "--out", help="Run folder to create, or to add new images to."),
    kind: ImportKind = typer.Option(ImportKind.model, "--kind", help="model: a model's outputs; reference: real "
                                    "images to compare model runs against."),
    suite: str = typer.Option(None, "--suite", help="Prompt suite whose subjects (and BLS mappings) the images "
                              "belong to, e.g. occupations."),
    subject_column: str = typer.Option(None, "--subject-column", help="Manifest column holding the subject "
                                       "(default: subject)."),
    template: str = typer.Option(None, "--template", help="Suite template the images were prompted with "
                                 "(gives each its prompt)."),
    subject: str = typer.Option(None, "--subject", help="Subject of images that have none (a flat folder)."),
    model: str = typer.Option(None, "--model", help="Model that made the images, where neither the manifest "
                              "nor valid embedded credentials name one."),
    link: bool = typer.Option(False, "--link", help="Hard-link instead of copying (same file system; "
                              "editing an original then damages the run)."),
    trust_anchors: Path = typer.Option(None, "--trust-anchors", help="PEM bundle or folder of PEMs to judge "
                                       "embedded C2PA credentials Trusted."),
    credentials: bool = typer.Option(True, "--credentials/--no-credentials", help="Read embedded C2PA "
                                     "credentials."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Import images made elsewhere (or real photos, --kind reference) as a run; rerun to add new files."""
    from generate.importer import describe_skips, import_run

    reader = credential_reader(trust_anchors) if credentials else None
    s = import_run(out, source, kind=kind.value, suite=suite, subject_column=subject_column, template=template,
                   subject=subject, model=model, link=link, credentials=reader, progress=progress)
    how = f"{s['linked']} linked, {s['copied']} copied" if link else f"{s['copied']} copied"
    typer.echo(f"imported {s['imported']} of {s['found']} file(s) into {out} ({how}"
               + (f", {s['converted']} converted to PNG" if s["converted"] else "") + f"); the run holds "
               f"{s['images']} image(s); skipped: {describe_skips(s['skipped'])}")
    if reader is not None:
        typer.echo("embedded credentials: " + (", ".join(f"{k} {v}" for k, v in s["credentials"].items()) or "-"))
    for note in s["notes"]:
        typer.echo(f"note: {note}")


def credential_reader(trust_anchors: Path | None = None):
    """A callback for ``generate.importer``: a file's bytes -> what its embedded C2PA manifest says, judged
    offline by the provenance stage's reader (Trusted only against ``trust_anchors``)."""
    from diffaudit.errors import InputError
    from provenance.c2pa import read_credentials, reader_context

    trust = None
    if trust_anchors is not None:
        p = Path(trust_anchors)
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in {".pem", ".crt"}) if p.is_dir() else [p]
        try:
            text = "".join(f.read_text() for f in files)
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--trust-anchors {trust_anchors}: cannot read ({e})") from None
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise InputError(f"--trust-anchors {trust_anchors}: no PEM certificates found")
        trust = {"trust_anchors": text}
    context = reader_context(trust)

    def read(data: bytes):
        return embedded_credentials(read_credentials(data, context))

    return read


_GENERATED = ("trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia")


def embedded_credentials(creds: Any):
    """``provenance.c2pa.Credentials`` -> ``generate.importer.EmbeddedCredentials`` (status, claim generator,
    digitalSourceType, software agent, signer, and the model the manifest names)."""
    from generate.importer import EmbeddedCredentials

    actions = [a for a in (creds.actions or []) if isinstance(a, dict)]
    action = (next((a for a in actions if a.get("action") == "c2pa.created"), None)
              or next((a for a in actions if a.get("digitalSourceType")), None) or {})
    source_type = action.get("digitalSourceType")
    source_type = str(source_type).rstrip("/").rsplit("/", 1)[-1] if source_type else None
    agent = action.get("softwareAgent")
    name = version = None
    if isinstance(agent, dict):
        name, version = agent.get("name"), agent.get("version")
    elif agent:
        name = str(agent)
    agent_text = " ".join(str(v) for v in (name, version) if v) or None
    generation = creds.generation if isinstance(creds.generation, dict) else None
    model = str(name) if name and source_type in _GENERATED else None
    if model is None and generation and isinstance(generation.get("model"), str):
        model = generation["model"]
    signer = creds.signer if isinstance(creds.signer, dict) else {}
    return EmbeddedCredentials(
        status=creds.status, claim_generator=creds.claim_generator or None, source_type=source_type,
        software_agent=agent_text, signer=signer.get("common_name") or signer.get("issuer") or None,
        model=model, generation=generation)


@app.command("compare")
def compare(
    run: Path = typer.Argument(..., help="A probed run (e.g. a model's)."),
    reference: Path = typer.Option(..., "--reference", help="A probed reference run (e.g. real photos, "
                                   "imported with --kind reference)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Compare a run's perceived-attribute shares with a reference run's -> compare/reference (report, dashboard)."""
    from audit.compare import compare_runs

    s = compare_runs(run, reference)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    typer.echo(f"{s['rows']} (subject, label) rows in both runs; {s['significant']} differ at q < 0.05 "
               f"(Fisher's exact test, Benjamini-Hochberg); table {s['table']}")
