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
    trustMark = "trustMark"  # needs $DIFFAUDIT_TRUSTMARK (a folder with TrustMark's ONNX encoder/decoder)
    dwtDct = "dwtDct"
    none = "none"


def _console():
    from rich.console import Console

    return Console()


#: The MIME types the installed c2pa-python (0.38) reads (``c2pa.Reader.get_supported_mime_types()``;
#: a test keeps this list equal to the library's). Listed in ``verify --help``.
READ_MIME_TYPES = (
    "application/c2pa", "application/epub+zip", "application/mp4", "application/oxps", "application/pdf",
    "application/svg+xml", "application/vnd.ms-excel.sheet.macroenabled.12",
    "application/vnd.ms-powerpoint.presentation.macroenabled.12", "application/vnd.ms-word.document.macroenabled.12",
    "application/vnd.oasis.opendocument.graphics", "application/vnd.oasis.opendocument.graphics-template",
    "application/vnd.oasis.opendocument.presentation", "application/vnd.oasis.opendocument.presentation-template",
    "application/vnd.oasis.opendocument.spreadsheet", "application/vnd.oasis.opendocument.spreadsheet-template",
    "application/vnd.oasis.opendocument.text", "application/vnd.oasis.opendocument.text-template",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document", "application/x-c2pa-manifest-store",
    "application/x-troff-msvideo", "application/x-zip", "audio/flac", "audio/mp3", "audio/mp4", "audio/mpeg",
    "audio/mpeg3", "audio/vnd.wave", "audio/wav", "audio/wave", "audio/x-mp3", "audio/x-wav", "image/avif",
    "image/dng", "image/gif", "image/heic", "image/heif", "image/jpeg", "image/jxl", "image/png", "image/svg+xml",
    "image/tiff", "image/webp", "image/x-adobe-dng", "image/x-nikon-nef", "image/x-sony-arw", "image/x-webp",
    "video/avi", "video/mp4", "video/msvideo", "video/quicktime", "video/x-m4v", "video/x-msvideo",
)
_SHORT_TYPES = "PNG, JPEG, WebP, TIFF, GIF, AVIF, HEIC/HEIF, JPEG XL, DNG/NEF/ARW, SVG, PDF, MP4/MOV/M4V, AVI, " \
    "MP3/M4A/WAV/FLAC, EPUB, Office/OpenDocument files, OXPS and .c2pa manifest stores"


@keys_app.command("init")
def keys_init(
    folder: Path = typer.Option(None, "--dir", help="Identity folder (default $DIFFAUDIT_HOME/identity or "
                                "~/.config/diffaudit/identity)."),
    common_name: str = typer.Option("diffaudit signer", "--name", help="Signer name shown by verifiers."),
    force: bool = typer.Option(False, "--force", help="Replace an existing identity in the folder."),
    ca_keys: Path = typer.Option(None, "--ca-keys", help="Also keep the root and intermediate private keys, in "
                                 "this separate folder (move it offline). Default: they are not kept."),
) -> None:
    """Create a development root CA, an intermediate and an ES256 signing certificate (key 0600, folder 0700).
    The CA keys never sit beside the signing key."""
    from provenance.keys import default_identity_dir, init_identity

    folder = folder or default_identity_dir()
    ident = init_identity(folder, common_name=common_name, force=force, ca_keys=ca_keys)
    typer.echo(f"signing identity created in {folder} (signer: {ident.signer_name})")
    typer.echo(f"give verifiers the root as trust anchor: --trust-anchors {folder / 'root-ca.pem'}")
    if ca_keys:
        typer.echo(f"root and intermediate private keys written to {ca_keys}: move that folder offline")
    else:
        typer.echo("the root and intermediate private keys were not kept (pass --ca-keys DIR to keep them)")
    typer.echo("this is a development CA: for published content use a certificate from a C2PA-trusted CA")


@keys_app.command("show")
def keys_show(folder: Path = typer.Option(None, "--dir", help="Identity folder."),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Print subjects, issuers, validity and SHA-256 fingerprints of an identity's certificates."""
    from provenance.keys import describe, hygiene

    rows = describe(folder)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['role']}: {r['subject']}\n  issuer    {r['issuer']}\n"
                   f"  valid     {r['not_before']} .. {r['not_after']}\n  sha256    {r['sha256']}")
    for warning in hygiene(folder):
        typer.echo(f"warning: {warning}", err=True)


@app.command("stamp")
def stamp(
    targets: list[Path] = typer.Argument(..., help="A run folder, or image files/folders."),
    watermark: WatermarkChoice = typer.Option(WatermarkChoice.ssTile, "--watermark"),
    identity: Path = typer.Option(None, "--identity", help="Identity folder (default: the default identity, "
                                  "created on first use)."),
    cert: Path = typer.Option(None, "--cert", help="Your PEM chain (leaf first), with --key."),
    key: Path = typer.Option(None, "--key", help="Your PEM private key, with --cert."),
    store: Path = typer.Option(None, "--store", help="Manifest store (default $DIFFAUDIT_HOME/manifests.sqlite)."),
    out: Path = typer.Option(Path("stamped"), "--out", help="Output folder when stamping files."),
    model: str = typer.Option(None, "--model", help="Model name recorded for loose files."),
    tsa_url: str = typer.Option(None, "--tsa-url", help="RFC 3161 time-stamp authority: signatures get a trusted "
                                "time and stay valid after the signing certificate expires."),
) -> None:
    """Stamp a run's images (or files): watermark + signed C2PA manifest, written as copies. A file that
    already has credentials keeps them as the new manifest's parent ingredient."""
    from diffaudit.errors import InputError
    from diffaudit.runs import Run
    from provenance.keys import default_identity_dir, from_pem, hygiene, load_identity

    if (cert is None) != (key is None):
        raise InputError("--cert and --key go together")
    if len(targets) == 1 and Run.is_run(targets[0]):  # go on with what the run was stamped with before
        before = (Run.open(targets[0]).info.get("stages") or {}).get("stamp") or {}
        if identity is None and cert is None and before.get("identity") and Path(before["identity"]).is_dir():
            identity = Path(before["identity"])
            typer.echo(f"signing with the identity this run was stamped with: {identity}")
        if store is None and before.get("store"):
            store = Path(before["store"])
        if tsa_url is None and before.get("tsa_url"):
            tsa_url = before["tsa_url"]
    ident = from_pem(cert, key) if cert else (load_identity(identity) if identity else None)
    if ident is None and not (default_identity_dir() / "signer.pem").is_file():
        typer.echo(f"no signing identity yet: creating a development one in {default_identity_dir()} "
                   "(see `diffaudit keys show`)")
    for warning in hygiene(identity) if cert is None else []:
        typer.echo(f"warning: {warning}", err=True)
    if len(targets) == 1 and Run.is_run(targets[0]):
        from provenance.stamp import stamp_run

        summary = stamp_run(targets[0], identity=ident, watermark=watermark.value, store=store, tsa_url=tsa_url)
        typer.echo(f"stamped {summary['stamped']} image(s), {summary['skipped']} already done, "
                   f"{summary['images_per_s'] or '-'} img/s; status {summary['status']}")
        typer.echo(f"table {summary['stamps']}; store {summary['store']}")
        return
    from provenance.stamp import stamp_files

    for r in stamp_files(targets, out, identity=ident, watermark=watermark.value, store=store, model=model,
                         tsa_url=tsa_url):
        status = f"{r['status']} ({r['trust']})" if r.get("trust") else r["status"]
        typer.echo(f"{r['stamped']}: {status} watermark={r['payload'] or '-'}"
                   + (" (its earlier credentials kept as parent ingredient)" if r.get("restamped") else ""))


@app.command("verify", help=f"""Verify content credentials offline, and say what ties a file to a stamp.

Each file gets separate evidence (the embedded C2PA manifest checked now with your trust settings and
per-manifest failure codes; the watermark's payload, corrected bits, CRC and false-positive bound; the
stored stamps whose fingerprint and pixels agree) and one conclusion: credentials intact, tampered, same
image (credentials stripped), edited copy of a stamped image, source of a stamped edit, ambiguous, or no
evidence. A stored stamp's status is shown as recorded at stamp time, and re-checked now.

Reads what c2pa-python reads: {_SHORT_TYPES} (MIME types: {", ".join(READ_MIME_TYPES)}). Remote
manifests are named, never fetched. Folders are searched for those types; other files are skipped and
counted.

Exit codes: 0 when no file meets a --fail-on condition (and always without --fail-on), 1 when at least
one does, 2 on bad input (a missing path, an unreadable trust file).""")
def verify(
    paths: list[Path] = typer.Argument(..., help="Files or folders."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per file."),
    trust_anchors: Path = typer.Option(None, "--trust-anchors", help="PEM bundle, trust list or folder of "
                                       "PEMs; without it a valid signature is reported as untrusted."),
    allowed_list: Path = typer.Option(None, "--allowed-list", help="Signing certificates to trust as they are: "
                                      "PEM, or base64 SHA-256 hashes one per line (c2pa-rs format)."),
    trust_config: Path = typer.Option(None, "--trust-config", help="c2pa-rs style trust config: a settings file "
                                      "(JSON/TOML) with a [trust] table, or a store.cfg list of extra EKU OIDs."),
    store: Path = typer.Option(None, "--store", help="Manifest store to look for stripped credentials in "
                               "(default $DIFFAUDIT_HOME/manifests.sqlite when it exists); never written."),
    fail_on: str = typer.Option(None, "--fail-on", help="Comma-separated: invalid, untrusted, none. Exit 1 when "
                                "a file's embedded manifest is Invalid / Valid but untrusted / absent."),
) -> None:
    from diffaudit.errors import InputError
    from provenance.verify import FAIL_ON, iter_lines, verify_paths

    conditions = [c.strip() for c in (fail_on or "").split(",") if c.strip()]
    unknown = [c for c in conditions if c not in FAIL_ON]
    if unknown:
        raise InputError(f"--fail-on {','.join(unknown)}: choose among {', '.join(FAIL_ON)}")

    def show(r) -> None:
        if as_json:
            typer.echo(json.dumps(r.to_dict(), default=str))
        else:
            for line in iter_lines(r):
                typer.echo(line)

    skipped: list[Path] = []
    results = verify_paths(paths, trust_anchors=trust_anchors, allowed_list=allowed_list, trust_config=trust_config,
                           store=store, on_result=show, skipped=skipped)
    failing = [r for r in results if r.fails(conditions)]
    if not as_json:
        counts: dict[str, int] = {}
        for r in results:
            counts[r.conclusion] = counts.get(r.conclusion, 0) + 1
        line = ", ".join(f"{k}: {v}" for k, v in counts.items())
        if skipped:
            line += f"; skipped {len(skipped)} file(s) of a type C2PA does not read"
        if conditions:
            line += f"; {len(failing)} file(s) meet --fail-on {','.join(conditions)}"
        typer.echo(line)
    elif skipped:
        typer.echo(json.dumps({"skipped": [str(p) for p in skipped]}))
    if failing:
        raise typer.Exit(1)


@provenance_app.command("robustness")
def robustness(
    targets: list[Path] = typer.Argument(None, help="A run folder, image files or folders (default: a sample of "
                                         "the held-out corpus, images no test or threshold uses)."),
    methods: str = typer.Option("ssTile,dwtDctSvd", "--methods", help="Comma-separated; add rivaGan (slow on "
                                "a CPU: ~1 s per image and attack) or trustMark (weights from $DIFFAUDIT_TRUSTMARK)."),
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
