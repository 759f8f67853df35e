"""Provenance commands: ``keys init|show``, ``stamp``, ``verify``, ``provenance robustness``.

Only typer and the standard library at import time; the stage is imported inside each command, and
``verify`` never imports torch.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer

from diffaudit.commands import app

keys_app = typer.Typer(help="Signing identities for C2PA: create a development one, show one.",
                       no_args_is_help=True)
provenance_app = typer.Typer(help="Provenance reports: watermark and C2PA robustness.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(provenance_app, name="provenance")


class WatermarkChoice(StrEnum):
    dwtDctSvd = "dwtDctSvd"
    ssTile = "ssTile"
    rivaGan = "rivaGan"
    dwtDct = "dwtDct"
    none = "none"


def _console():
    from rich.console import Console

    return Console()


@keys_app.command("init")
def keys_init(
    folder: Path = typer.Option(None, "--dir", help="Identity folder (default $DIFFAUDIT_HOME/identity or "
                                "~/.config/diffaudit/identity)."),
    common_name: str = typer.Option("diffaudit signer", "--name", help="Signer name shown by verifiers."),
    force: bool = typer.Option(False, "--force", help="Replace an existing identity in the folder."),
) -> None:
    """Create a development root CA, an intermediate and an ES256 signing certificate (keys 0600)."""
    from provenance.keys import default_identity_dir, init_identity

    folder = folder or default_identity_dir()
    ident = init_identity(folder, common_name=common_name, force=force)
    typer.echo(f"signing identity created in {folder} (signer: {ident.signer_name})")
    typer.echo(f"give verifiers the root as trust anchor: --trust-anchors {folder / 'root-ca.pem'}")
    typer.echo("this is a development CA: for published content use a certificate from a C2PA-trusted CA")


@keys_app.command("show")
def keys_show(folder: Path = typer.Option(None, "--dir", help="Identity folder."),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Print subjects, issuers, validity and SHA-256 fingerprints of an identity's certificates."""
    from provenance.keys import describe

    rows = describe(folder)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['role']}: {r['subject']}\n  issuer    {r['issuer']}\n"
                   f"  valid     {r['not_before']} .. {r['not_after']}\n  sha256    {r['sha256']}")


@app.command("stamp")
def stamp(
    targets: list[Path] = typer.Argument(..., help="A run folder, or image files/folders."),
    watermark: WatermarkChoice = typer.Option(WatermarkChoice.dwtDctSvd, "--watermark"),
    identity: Path = typer.Option(None, "--identity", help="Identity folder (default: the default identity, "
                                  "created on first use)."),
    cert: Path = typer.Option(None, "--cert", help="Your PEM chain (leaf first), with --key."),
    key: Path = typer.Option(None, "--key", help="Your PEM private key, with --cert."),
    store: Path = typer.Option(None, "--store", help="Manifest store (default $DIFFAUDIT_HOME/manifests.sqlite)."),
    out: Path = typer.Option(Path("stamped"), "--out", help="Output folder when stamping files."),
    model: str = typer.Option(None, "--model", help="Model name recorded for loose files."),
) -> None:
    """Stamp a run's images (or files): watermark + signed C2PA manifest, written as copies."""
    from diffaudit.errors import InputError
    from diffaudit.runs import Run
    from provenance.keys import default_identity_dir, from_pem, load_identity

    if (cert is None) != (key is None):
        raise InputError("--cert and --key go together")
    if len(targets) == 1 and Run.is_run(targets[0]):  # go on with what the run was stamped with before
        before = (Run.open(targets[0]).info.get("stages") or {}).get("stamp") or {}
        if identity is None and cert is None and before.get("identity") and Path(before["identity"]).is_dir():
            identity = Path(before["identity"])
            typer.echo(f"signing with the identity this run was stamped with: {identity}")
        if store is None and before.get("store"):
            store = Path(before["store"])
    ident = from_pem(cert, key) if cert else (load_identity(identity) if identity else None)
    if ident is None and not (default_identity_dir() / "signer.pem").is_file():
        typer.echo(f"no signing identity yet: creating a development one in {default_identity_dir()} "
                   "(see `diffaudit keys show`)")
    if len(targets) == 1 and Run.is_run(targets[0]):
        from provenance.stamp import stamp_run

        summary = stamp_run(targets[0], identity=ident, watermark=watermark.value, store=store)
        typer.echo(f"stamped {summary['stamped']} image(s), {summary['skipped']} already done, "
                   f"{summary['images_per_s'] or '-'} img/s; status {summary['status']}")
        typer.echo(f"table {summary['stamps']}; store {summary['store']}")
        return
    from provenance.stamp import stamp_files

    for r in stamp_files(targets, out, identity=ident, watermark=watermark.value, store=store, model=model):
        typer.echo(f"{r['stamped']}: {r['status']} watermark={r['payload'] or '-'}")


@app.command("verify")
def verify(
    paths: list[Path] = typer.Argument(..., help="Image files or folders."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per file."),
    trust_anchors: Path = typer.Option(None, "--trust-anchors", help="PEM bundle, trust list or folder of "
                                       "PEMs; without it a valid signature is reported as untrusted."),
    store: Path = typer.Option(None, "--store", help="Manifest store to recover stripped credentials from."),
) -> None:
    """Verify content credentials offline: Trusted / Valid / Invalid / none, with every failure code."""
    from provenance.stamp import verify_paths

    def show(r) -> None:
        if as_json:
            typer.echo(json.dumps(r.to_dict(), default=str))
            return
        c = r.credentials
        line = f"{r.path}: {r.status}"
        if r.problem:
            line += f" ({r.problem})"
        typer.echo(line)
        if c.get("signer"):
            s = c["signer"]
            typer.echo(f"  signer    {s.get('common_name')} (issuer {s.get('issuer')}, {s.get('alg')})")
        if c.get("failure_codes"):
            typer.echo(f"  failures  {', '.join(c['failure_codes'])}")
        if c.get("generation"):
            g = c["generation"]  # loose files record no seed or prompt: print only what is known
            known = [f"by {g['model']}" if g.get("model") else "",
                     f"seed={g['seed']}" if g.get("seed") is not None else "",
                     f"prompt={g['prompt']!r}" if g.get("prompt") else ""]
            if any(known):
                typer.echo("  generated " + " ".join(k for k in known if k))
        for ing in c.get("ingredients") or []:
            typer.echo(f"  ingredient {ing['title']} ({ing['relationship']})")
        if r.watermark:
            w = r.watermark
            typer.echo(f"  watermark {w['method']} payload={w['payload']} confidence={w['confidence']}")
        if r.recovered:
            m = r.recovered
            how = m["how"] + (f" distance {m['distance']}" if m["how"] == "phash" else "")
            rc = m["credentials"]
            typer.echo(f"  recovered from the store by {how}: {m['manifest_label']} "
                       f"(was {rc.get('status')}, image {m.get('image_id')}, run {m.get('run')})")

    results = verify_paths(paths, trust_anchors=trust_anchors, store=store, on_result=show)
    if not as_json:
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))


@provenance_app.command("robustness")
def robustness(
    targets: list[Path] = typer.Argument(None, help="A run folder, image files or folders (default: a sample of "
                                         "the held-out corpus, images no test or threshold uses)."),
    methods: str = typer.Option("ssTile,dwtDctSvd", "--methods", help="Comma-separated; add rivaGan (slow on "
                                "a CPU: ~1 s per image and attack)."),
    limit: int = typer.Option(24, "--limit", min=1, help="At most this many images."),
    attacks: str = typer.Option(None, "--attacks", help="Comma-separated subset of the fixed grid (default: all)."),
    identity: Path = typer.Option(None, "--identity"),
    seed: int = typer.Option(0, "--seed", help="Which held-out sample, when no targets are given."),
) -> None:
    """Stamp copies, attack them (JPEG, resize, crop, rotate, brightness, blur, noise, screenshot, flip, ...)
    and tabulate what the robust decoder still reads, with 95% intervals and the false-positive bound."""
    from rich.table import Table

    from diffaudit.errors import InputError
    from diffaudit.runs import Run
    from provenance.attacks import robustness as run_attacks
    from provenance.keys import load_identity
    from provenance.stamp import _expand, encode_image

    run = Run.open(targets[0]) if targets and len(targets) == 1 and Run.is_run(targets[0]) else None
    if run is not None:
        images = [Path(f).read_bytes() for f in run.images()["file"][:limit]]
    elif targets:
        images = [p.read_bytes() for p, _ in list(_expand(targets))[:limit]]
    else:
        from diffaudit.corpus import corpus

        images = [encode_image(s.rgb, "png") for s in corpus(limit, split="heldout", seed=seed, max_side=1024)]
        typer.echo(f"measuring on {len(images)} held-out corpus images (photo crops, documents, graphics, flat, "
                   "textures, patterns; 256-1024 px)")
    if not images:
        raise InputError("no images to attack")
    table = run_attacks(images, methods=[m.strip() for m in methods.split(",") if m.strip()],
                        identity=load_identity(identity) if identity else None,
                        attacks=[a.strip() for a in attacks.split(",") if a.strip()] if attacks else None)
    if run is not None:
        path = run.write_table("provenance/robustness", table)
        typer.echo(f"wrote {path}")
    t = Table("method", "attack", "images", "decoded (95% CI)", "bit accuracy", "PSNR", "C2PA survives",
              "credentials found", "FP bound")
    for r in table.itertuples():
        t.add_row(r.method, r.attack, str(r.images),
                  f"{r.detection_rate:.0%} ({r.detection_low:.0%}-{r.detection_high:.0%})", f"{r.bit_accuracy:.3f}",
                  _num(r.psnr, ".1f"),
                  f"{r.c2pa_survives:.0%}", f"{r.credentials_recovered:.0%}",
                  _num(r.false_positive_bound, ".1e"))
    _console().print(t)


def _num(value, fmt: str) -> str:
    """A number formatted, or "-" where it is missing (None or NaN)."""
    return "-" if value is None or value != value else format(value, fmt)
