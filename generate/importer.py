"""Import images made anywhere (DALL-E, Midjourney, Firefly, an internal API, a folder of real photos) as a
run, so every stage audits them as it audits a run that ``diffaudit generate`` made.

A source is a folder (flat, or one subfolder per subject) or a manifest (CSV, JSONL or parquet with a
``path`` column and optional prompt, subject, template, model, seed, negative_prompt, mode, source_image).
Everything is validated before the run is touched: a bad manifest row is a one-line error naming its line.
Each image is then read once, hashed, decoded under the one pixel cap (``diffaudit.imaging``) and copied
(or hard-linked) byte for byte into ``images/<prompt_id>/<sha256[:16]>.<ext>``, so an embedded C2PA
manifest survives; formats other than PNG, JPEG and WebP are converted to PNG, as are deep-bit images (16-bit,
float) and photos with an EXIF orientation (stored as viewers show them). Unreadable, oversized and
duplicate files are skipped and counted, never half-imported (atomic writes, the run's lock); rerunning
imports only what is new. What the importer cannot know (seed, sampler, steps, often the prompt or the
model) stays null in ``generations``: the report says *unknown* instead of guessing.

Embedded credentials are read by a callback the caller passes (``credentials``), because reading C2PA is
the provenance stage's job and stages never import each other; the command wires the two together.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from diffaudit import imaging
from diffaudit.errors import ConfigError, InputError
from diffaudit.runs import Run, atomic_write_bytes, only_lock, sha256_bytes

IMPORTED = "imported"          # the ``origin`` of imported rows, and the template when none is known
UNSPECIFIED = "unspecified"    # the subject of images whose subject nobody gave
KINDS = ("model", "reference")  # a model's outputs, or real images to compare a model against
MODES = ("txt2img", "img2img", "inpaint")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
FIELDS = ("path", "prompt", "subject", "template", "model", "seed", "negative_prompt", "mode", "source_image")
_VERBATIM = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # formats every stage reads, kept byte for byte
_INT64 = (-(2**63), 2**63 - 1)
_FLUSH_SECONDS = 2.0
_CHUNK = 32
MAX_ID = 64                    # longest subject or template id


@dataclass(frozen=True)
class EmbeddedCredentials:
    """What a file's embedded C2PA manifest says, as the provenance stage judged it on import.

    ``model`` is the generator the manifest names (the software agent of its ``c2pa.created`` action, or
    a diffaudit generation assertion's model); ``generation`` is a diffaudit generation assertion, if any.
    """

    status: str                          # Trusted | Valid | Invalid | none
    claim_generator: str | None = None
    source_type: str | None = None       # digitalSourceType, short IPTC code
    software_agent: str | None = None
    signer: str | None = None
    model: str | None = None
    generation: dict[str, Any] | None = None

    @property
    def carried(self) -> bool:
        """The file carried a manifest (valid or not)."""
        return self.status != "none"

    @property
    def valid(self) -> bool:
        return self.status in ("Trusted", "Valid")


CredentialReader = Callable[[bytes], EmbeddedCredentials]


@dataclass(frozen=True)
class Item:
    """One file to import, validated: where it was named (for messages) and what is known about it."""

    file: Path
    where: str
    subject: str
    template: str
    prompt: str | None = None
    negative_prompt: str | None = None
    model: str | None = None
    seed: int | None = None
    mode: str | None = None
    source_image: Path | None = None
    custom_prompt: bool = False          # a prompt that is not the suite's expansion of (template, subject)

    @property
    def prompt_id(self) -> str:
        """``<template>-<subject>`` (as a generated run names the same prompt), plus a digest of the prompt
        when it is not the suite's expansion, so different prompts never share a prompt_id."""
        base = f"{self.template}-{self.subject}"
        if self.prompt is None or not self.custom_prompt:
            return base
        return f"{base}-p{hashlib.sha256(self.prompt.encode()).hexdigest()[:8]}"


@dataclass
class Plan:
    """A validated import: the items, the suite, and the manifest columns that were not used."""

    source: Path
    items: list[Item]
    suite: str | None                     # as given (a built-in name or a path): what stages load it by
    suite_name: str | None                # the suite's own name, as generated rows record it
    ignored_columns: list[str] = field(default_factory=list)


# -- names -------------------------------------------------------------------------------------------

def slug(value: str) -> str:
    """A safe id from free text: lower case ASCII, accents dropped, runs of other characters become '_'
    ("Nurse Practitioner" -> "nurse_practitioner", "Café owner" -> "cafe_owner"). Letters or digits that
    have no ASCII form ("看護師") add a digest of the whole text, so two such names never share an id, and
    so does cutting a long one to ``MAX_ID`` characters; text with no letter or digit at all gives ''."""
    text = unicodedata.normalize("NFKD", value.strip().casefold())
    out = re.sub(r"[^a-z0-9]+", "_", text.encode("ascii", "ignore").decode()).strip("_")
    digest = "u" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    if any(not c.isascii() and unicodedata.category(c)[0] in "LN" for c in text):
        out = f"{out}_{digest}" if out else digest
    if len(out) > MAX_ID:  # ids name folders (images/<template>-<subject>): a file system takes 255 bytes
        out = f"{out[:MAX_ID - len(digest) - 1].rstrip('_')}_{digest}"
    return out


def shown(text: str) -> str:
    """``text`` as UTF-8 can store it: a file name's undecodable bytes (which Python holds as lone
    surrogates) become ``\\xff`` escapes, so a table or run.json can record where a file came from."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Suite:
    """A suite's subjects and templates, to map what a source calls them onto the suite's ids."""

    def __init__(self, suite: str | None):
        self.name = suite
        self.subjects: dict[str, str] = {}
        self.templates: set[str] = set()
        self.prompts: dict[tuple[str, str], str] = {}
        if suite is None:
            return
        from prompts.suites import EDIT_TEMPLATE, expand, load_suite

        s = load_suite(suite)
        self.name = s.name
        for subj in s.subjects:
            for key in (subj.id, subj.text.lower(), slug(subj.text)):
                self.subjects.setdefault(key, subj.id)
        self.templates = {t.id for t in s.templates}
        for r in expand(suite, images_per_prompt=1):
            if r.template != EDIT_TEMPLATE:
                self.prompts[(r.template, r.subject)] = r.prompt

    def subject(self, value: str | None, where: str, default: str | None) -> str:
        if value is None:
            if default is None:
                return UNSPECIFIED
            value = default
        if self.name is None:
            sid = slug(value)
            if not sid:
                raise InputError(f"{where}: subject {value!r} has no letters or digits to name it by")
            return sid
        for key in (value.strip(), value.strip().lower(), slug(value)):
            if key in self.subjects:
                return self.subjects[key]
        close = difflib.get_close_matches(slug(value), sorted(set(self.subjects.values())), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise InputError(f"{where}: subject {value!r} is not a subject of suite {self.name!r}{hint}; "
                         f"see `diffaudit suites show {self.name}`")

    def template_for(self, subject: str, prompt: str | None) -> str | None:
        """The suite template whose expansion for ``subject`` is ``prompt`` (spacing and case aside)."""
        if prompt is None:
            return None
        want = _norm(prompt)
        return next((t for (t, s), p in self.prompts.items() if s == subject and _norm(p) == want), None)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# -- planning (validates everything, writes nothing) ---------------------------------------------------

def plan_import(source: str | os.PathLike, *, suite: str | None = None, subject_column: str | None = None,
                template: str | None = None, subject: str | None = None, model: str | None = None) -> Plan:
    """Validate a folder or manifest into import items; raises a one-line ``InputError`` naming the row."""
    src = Path(source).expanduser()
    if not src.exists():
        raise InputError(f"{source}: no such folder or manifest")
    names = _Suite(suite)
    if template is not None:
        if not slug(template) or slug(template) != template:
            raise ConfigError(f"--template {template!r}: use a template id (letters, digits, '_')")
        if suite is not None and template not in names.templates:
            raise ConfigError(f"--template {template!r} is not a template of suite {names.name!r}; it has: "
                              + ", ".join(sorted(names.templates)))
    if src.is_dir():
        if subject_column is not None:
            raise ConfigError("--subject-column applies to manifests; a folder's subjects are its subfolders")
        rows = list(_folder_rows(src.resolve()))
    elif src.suffix.lower() in MANIFEST_SUFFIXES:
        rows, ignored = _manifest_rows(src, subject_column or "subject")
    else:
        raise InputError(f"{source}: give a folder of images or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    items, errors = [], []
    for where, values, base in rows:
        try:
            items.append(_item(where, values, base, names, template=template, subject=subject, model=model))
        except InputError as e:
            errors.append(str(e))
    if errors:
        more = f" ({len(errors) - 1} more bad row(s))" if len(errors) > 1 else ""
        raise InputError(errors[0] + more)
    if not items:
        raise InputError(f"{source}: no files to import")
    return Plan(src, items, suite, names.name, ignored if not src.is_dir() else [])


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder_rows(root: Path) -> Iterator[tuple[str, dict[str, Any], Path]]:
    """A flat folder, or one subfolder per subject (files anywhere below it); hidden entries are ignored."""
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            yield f"{entry}", {"path": str(entry)}, root
        elif entry.is_dir():
            files = sorted(f for f in entry.rglob("*") if f.is_file() and not _hidden(f, root))
            for f in files:
                yield f"folder {entry.name!r}", {"path": str(f), "subject": shown(entry.name)}, root


def _manifest_rows(path: Path, subject_column: str) -> tuple[list[tuple[str, dict[str, Any], Path]], list[str]]:
    """(where, values, base folder) per row of a CSV, JSONL or parquet manifest, with normalised column names."""
    base = path.parent
    suffix = path.suffix.lower()
    raw: list[tuple[str, dict[str, Any]]] = []
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise InputError(f"{path.name}: empty manifest (no header line)")
                _unique_columns(reader.fieldnames, f"{path.name} line 1")
                for row in reader:
                    where = f"{path.name} line {reader.line_num}"
                    if None in row:
                        raise InputError(f"{where}: more values than the header has columns")
                    raw.append((where, row))
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line, object_pairs_hook=lambda pairs, n=n: _unique_keys(pairs, f"{path.name} line {n}"))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path.name} line {n}: not JSON ({e.msg})") from None
                    except (ValueError, RecursionError) as e:  # a 5000-digit number, arrays nested 100000 deep
                        raise InputError(f"{path.name} line {n}: not JSON this tool can read "
                                         f"({str(e).split(';')[0]})") from None
                    if not isinstance(obj, dict):
                        raise InputError(f"{path.name} line {n}: a JSON object per line is needed, got "
                                         f"{type(obj).__name__}")
                    raw.append((f"{path.name} line {n}", obj))
        else:
            try:
                df = pd.read_parquet(path)
            except Exception as e:  # pyarrow raises several unrelated types for a bad file
                raise InputError(f"{path.name}: not a readable parquet file ({e})") from None
            _unique_columns([str(c) for c in df.columns], path.name)
            raw = [(f"{path.name} row {n}", rec) for n, rec in enumerate(df.to_dict("records"), 1)]
    except UnicodeDecodeError as e:
        raise InputError(f"{path.name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:  # a field over the csv module's size limit, a malformed quote in strict dialects
        raise InputError(f"{path.name} line {reader.line_num + 1}: not a CSV row this tool can read ({e})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    columns: dict[str, str] = {}
    rows = []
    wanted = _column(subject_column)
    for where, rec in raw:
        values: dict[str, Any] = {}
        for key, value in rec.items():
            name = _column(str(key))
            columns.setdefault(name, str(key))
            values[name] = value
        if wanted != "subject":
            values["subject"] = values.pop(wanted, None)
        rows.append((where, values, base))
    if raw and "path" not in columns:
        raise InputError(f"{path.name} has no path column (columns: {', '.join(columns.values())})")
    if raw and wanted != "subject" and wanted not in columns:
        raise InputError(f"{path.name} has no {subject_column!r} column for --subject-column "
                         f"(columns: {', '.join(columns.values())})")
    ignored = [orig for name, orig in columns.items() if name not in FIELDS and name != wanted]
    return rows, ignored


def _column(name: str) -> str:
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def _unique_columns(names: list[str], where: str) -> None:
    """Refuse a manifest that names one column twice ("path" and "Path"): which value wins would be a guess."""
    seen: dict[str, str] = {}
    for name in names:
        key = _column(str(name))
        if key in seen:
            raise InputError(f"{where}: the column {name!r} is named more than once"
                             + (f" (as {seen[key]!r} too)" if seen[key] != name else "") + "; keep one")
        seen[key] = name


def _unique_keys(pairs: list[tuple[str, Any]], where: str) -> dict[str, Any]:
    _unique_columns([k for k, _ in pairs], where)
    return dict(pairs)


def _text(values: dict[str, Any], key: str, where: str = "") -> str | None:
    v = values.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    text = str(v).strip()
    if key != "path" and key != "source_image" and not _storable(text):
        raise InputError(f"{where}: {key} {shown(text)!r} holds a lone surrogate, which no table can store; "
                         "fix the text (JSON \\u escapes must pair up)")
    return text or None


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _seed(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, bool):
        raise InputError(f"{where}: seed {value!r} is not a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise InputError(f"{where}: seed {value!r} is not a whole number")
        value = int(value)
    if not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except ValueError:
            raise InputError(f"{where}: seed {value!r} is not a whole number") from None
    if not _INT64[0] <= value <= _INT64[1]:
        raise InputError(f"{where}: seed {value} does not fit in 64 signed bits, which the generations table holds")
    return value


def _file(value: str | None, base: Path, where: str, what: str) -> Path:
    if value is None:
        raise InputError(f"{where}: no {what}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if p.is_dir():
        raise InputError(f"{where}: {what} {value!r} is a folder, not a file")
    if not p.is_file():
        raise InputError(f"{where}: no such file {value!r} ({what}, relative to {base})")
    return p


def _item(where: str, values: dict[str, Any], base: Path, names: _Suite, *, template: str | None,
          subject: str | None, model: str | None) -> Item:
    path = _file(_text(values, "path"), base, where, "path")
    where = where if not where.startswith("folder") else f"{where} ({path.name})"
    subj = names.subject(_text(values, "subject", where), where, subject)
    prompt = _text(values, "prompt", where)
    tmpl = _text(values, "template", where) or template
    if tmpl is not None and not slug(tmpl):
        raise InputError(f"{where}: template {tmpl!r} has no letters or digits to name it by")
    tmpl = slug(tmpl) if tmpl is not None else names.template_for(subj, prompt)
    suite_prompt = names.prompts.get((tmpl, subj)) if tmpl is not None else None
    custom = prompt is not None and (suite_prompt is None or _norm(prompt) != _norm(suite_prompt))
    if prompt is None:
        prompt = suite_prompt
    mode = _text(values, "mode", where)
    if mode is not None and mode.lower() not in MODES:
        raise InputError(f"{where}: mode {mode!r} is not one of {', '.join(MODES)}")
    src_value = _text(values, "source_image")
    source = _file(src_value, base, where, "source_image") if src_value is not None else None
    if source is not None:
        try:
            imaging.check_file(source)
        except InputError as e:
            raise InputError(f"{where}: source_image: {e}") from None
    mode = mode.lower() if mode is not None else ("img2img" if source is not None else None)
    return Item(path, where, subj, tmpl or IMPORTED, prompt, _text(values, "negative_prompt", where),
                _text(values, "model", where) or None, _seed(values.get("seed"), where), mode, source, custom)


# -- importing ---------------------------------------------------------------------------------------

@dataclass
class _Inspected:
    """One file read, hashed and decoded (or the reason it cannot be imported)."""

    item: Item
    data: bytes = b""
    original_sha256: str = ""
    stored: bytes = b""          # the bytes the run keeps: the original, or a PNG conversion
    ext: str = ".png"
    converted: bool = False
    width: int = 0
    height: int = 0
    skip: str | None = None      # not_image | corrupt | too_large | unreadable


def _inspect(item: Item) -> _Inspected:
    out = _Inspected(item)
    try:
        data = imaging.read_bytes_checked(item.file)  # header and file size first: never read a padded file
    except imaging.ImageTooLarge:
        out.skip = "too_large"
        return out
    except imaging.UnreadableImage as e:
        out.skip = e.reason
        return out
    except (InputError, OSError):
        out.skip = "unreadable"
        return out
    out.data, out.original_sha256 = data, sha256_bytes(data)
    try:
        img = imaging.open_image(data, name=str(item.file))
    except imaging.ImageTooLarge:
        out.skip = "too_large"
        return out
    except imaging.UnreadableImage as e:
        out.skip = e.reason
        return out
    except InputError:
        out.skip = "unreadable"
        return out
    fmt = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}.get(img.format or "")
    turned = imaging.upright(img)
    if turned is not None:  # viewers turn it by its EXIF orientation; the stages read pixels as stored
        img, fmt = turned, None
    out.width, out.height = img.size
    if fmt is not None:
        out.stored, out.ext = data, _VERBATIM[fmt]
    else:  # BMP, TIFF, GIF, a turned photo...: every stage reads PNG; the original's hash is kept beside it
        buf = io.BytesIO()
        img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
        out.stored, out.converted = buf.getvalue(), True
    return out


def _inspected(items: list[Item], workers: int) -> Iterator[_Inspected]:
    """Items read and decoded by a small pool, in order, a chunk at a time (bounded memory)."""
    with ThreadPoolExecutor(workers) as pool:
        for i in range(0, len(items), _CHUNK):
            yield from pool.map(_inspect, items[i:i + _CHUNK])


def _link_or_copy(src: Path, dest: Path, data: bytes) -> bool:
    """Hard-link ``src`` to ``dest`` atomically (link to a temp name, then ``os.replace``); copy the bytes
    when the file systems differ or links are not allowed. Returns whether it linked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        atomic_write_bytes(dest, data)
        return False
    os.replace(tmp, dest)
    return True


def check_target(run_dir: str | os.PathLike, source: Path, *, kind: str, suite: str | None) -> None:
    """Refuse an ``--out`` this import cannot go into, before anything is written."""
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: choose {' or '.join(KINDS)}")
    out, src = Path(run_dir).resolve(), source.resolve()
    if src.is_dir() and out.is_relative_to(src):
        raise InputError(f"--out {run_dir} is inside the source {source}; choose a run folder outside it")
    if src.is_relative_to(out):
        raise InputError(f"the source {source} is inside --out {run_dir}; choose a new run folder")
    Run.check_can_create(out)
    if not Run.is_run(out):
        return
    run = Run.open(out)
    gen = run.info.get("generation") or {}
    if not gen.get("imported"):
        if gen or run.has_table("generations"):
            raise InputError(f"run {run_dir} holds images diffaudit generated; import into a new --out")
        return
    if gen.get("kind", "model") != kind:
        raise InputError(f"run {run_dir} was imported as --kind {gen.get('kind', 'model')}, not {kind}; "
                         "use the same kind or a new --out")
    if gen.get("suite") != suite:
        said = lambda v: f"--suite {v}" if v else "no --suite"  # noqa: E731
        raise InputError(f"run {run_dir} was imported with {said(gen.get('suite'))}, not {said(suite)}; "
                         "use the same suite or a new --out")


def import_run(run_dir: str | os.PathLike, source: str | os.PathLike, *, kind: str = "model",
               suite: str | None = None, subject_column: str | None = None, template: str | None = None,
               subject: str | None = None, model: str | None = None, link: bool = False,
               credentials: CredentialReader | None = None, progress: bool = True,
               workers: int | None = None) -> dict[str, Any]:
    """Import ``source`` into the run at ``run_dir`` (created, or extended with what is new); return a summary.

    ``credentials`` reads a file's embedded C2PA manifest (the command passes the provenance stage's reader);
    without it no credentials are read and the ``c2pa_*`` columns stay null.
    """
    t0 = time.perf_counter()
    plan = plan_import(source, suite=suite, subject_column=subject_column, template=template, subject=subject,
                       model=model)
    check_target(run_dir, plan.source, kind=kind, suite=plan.suite)
    made_folder = not Path(run_dir).exists()
    run = Run.create(run_dir)
    with run.lock():
        summary = _Importer(run, plan, kind=kind, model=model, link=link, credentials=credentials,
                            progress=progress, workers=workers or max(1, min(4, (os.cpu_count() or 2) - 1))).execute()
        if not summary["images"]:  # bad input into an empty run: leave no empty run behind
            (run.root / "run.json").unlink(missing_ok=True)
            if made_folder and only_lock(run.root):
                shutil.rmtree(run.root, ignore_errors=True)
            raise InputError(f"{source}: none of the {summary['found']} file(s) could be imported "
                             f"({describe_skips(summary['skipped'])}); nothing was written")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    run.record_stage("import", seconds=summary["seconds"], **{k: v for k, v in summary.items()
                                                            if k not in ("run", "seconds")})
    return summary


class _Importer:
    """One import pass, under the run's lock."""

    def __init__(self, run: Run, plan: Plan, *, kind: str, model: str | None, link: bool,
                 credentials: CredentialReader | None, progress: bool, workers: int):
        self.run, self.plan, self.kind, self.model, self.link = run, plan, kind, model, link
        self.credentials, self.progress, self.workers = credentials, progress, workers
        self.rows: list[dict[str, Any]] = []
        self.skipped: Counter[str] = Counter()
        self.c2pa: Counter[str] = Counter()
        self.notes: list[str] = []
        self.linked = self.copied = self.converted = self.generator_claims = 0
        self.next_index: Counter[str] = Counter()
        self.last_flush = time.perf_counter()

    def execute(self) -> dict[str, Any]:
        for tmp in [*self.run.root.glob("images/*/.*.tmp"), *self.run.root.glob("sources/.*.tmp")]:
            tmp.unlink(missing_ok=True)  # left by a killed import (we hold the lock: none is in use)
        gens = self.run.read_table("generations")
        intact = self.run.completed_images()
        ok = gens[gens["image_id"].isin(intact)]
        in_run = set(ok["sha256"]) | set(ok["original_sha256"].dropna())
        this_pass: set[str] = set()
        self.next_index = Counter({p: int(i) + 1 for p, i in gens.groupby("prompt_id")["index"].max().items()})
        from tqdm.auto import tqdm

        self._record_run_info()  # first: an interrupted first import is still known as an import
        imported = 0
        bar = tqdm(total=len(self.plan.items), unit="img", desc="import", disable=not self.progress)
        try:
            for ins in _inspected(self.plan.items, self.workers):
                bar.update(1)
                if ins.skip is not None:
                    self.skipped[ins.skip] += 1
                    continue
                if ins.original_sha256 in in_run or (ins.converted and sha256_bytes(ins.stored) in in_run):
                    self.skipped["already_imported"] += 1
                    continue
                if ins.original_sha256 in this_pass:
                    self.skipped["duplicate"] += 1
                    continue
                this_pass.add(ins.original_sha256)
                self.rows.append(self._store(ins))
                imported += 1
                self._flush()
        finally:
            self._flush(force=True)
            bar.close()
            self._record_run_info()
        if self.kind == "reference" and self.generator_claims:
            self.notes.append(f"{self.generator_claims} image(s) of this reference carry credentials saying a "
                              "generator made them (digitalSourceType trainedAlgorithmicMedia)")
        if self.plan.ignored_columns:
            self.notes.append("manifest columns not used: " + ", ".join(self.plan.ignored_columns))
        return {"run": str(self.run.root), "kind": self.kind, "found": len(self.plan.items), "imported": imported,
                "skipped": dict(sorted(self.skipped.items())), "linked": self.linked, "copied": self.copied,
                "converted": self.converted, "credentials": dict(sorted(self.c2pa.items())),
                "images": len(self.run.read_table("generations")), "notes": self.notes}

    def _store(self, ins: _Inspected) -> dict[str, Any]:
        item = ins.item
        creds = self.credentials(ins.data) if self.credentials is not None else None
        if creds is not None:
            self.c2pa[creds.status] += 1
            if creds.source_type and "trainedAlgorithmicMedia" in creds.source_type:
                self.generator_claims += 1
        signed = dict(creds.generation or {}) if creds is not None and creds.valid else {}
        prompt_id = item.prompt_id
        rel = f"images/{prompt_id}/{ins.original_sha256[:16]}{ins.ext}"
        dest = self.run.path(rel)
        if self.link and not ins.converted and _link_or_copy(item.file, dest, ins.stored):
            self.linked += 1
        else:
            atomic_write_bytes(dest, ins.stored)
            self.copied += 1
        self.converted += ins.converted
        model, model_source = item.model, "manifest" if item.model else None
        if model is None and creds is not None and creds.valid and creds.model:
            model, model_source = creds.model, "c2pa"
        if model is None and self.model:
            model, model_source = self.model, "option"
        index = self.next_index[prompt_id]
        self.next_index[prompt_id] += 1
        return dict(
            image_id=f"{prompt_id}-{ins.original_sha256[:16]}", prompt_id=prompt_id, suite=self.plan.suite_name,
            template=item.template, subject=item.subject,
            prompt=item.prompt if item.prompt is not None else _signed(signed, "prompt", str),
            negative_prompt=item.negative_prompt if item.negative_prompt is not None
            else _signed(signed, "negative_prompt", str),
            mode=item.mode or _signed(signed, "mode", str), source_image=self._source(item.source_image),
            mask=None, strength=None, index=index,
            seed=item.seed if item.seed is not None else _signed(signed, "seed", int),
            model=model, model_revision=_signed(signed, "model_revision", str) if model_source == "c2pa" else None,
            scheduler=_signed(signed, "scheduler", str), steps=_signed(signed, "steps", int),
            guidance=_signed(signed, "guidance", float), width=ins.width, height=ins.height, path=rel,
            sha256=sha256_bytes(ins.stored), seconds=None, nsfw=None, origin=IMPORTED,
            original_path=shown(str(item.file.resolve())), original_sha256=ins.original_sha256, model_source=model_source,
            c2pa_manifest=None if creds is None else creds.carried,
            c2pa_status=None if creds is None else creds.status,
            c2pa_claim_generator=None if creds is None else creds.claim_generator,
            c2pa_source_type=None if creds is None else creds.source_type,
            c2pa_software_agent=None if creds is None else creds.software_agent,
            c2pa_signer=None if creds is None else creds.signer)

    def _source(self, path: Path | None) -> str | None:
        """An edit's source image, kept inside the run (``sources/<sha256[:16]>.<ext>``) so stages that list
        it as an ingredient find it wherever the run is moved; the path is relative to the run."""
        if path is None:
            return None
        data = imaging.read_bytes_checked(path)
        fmt = next((f for f, ext in _VERBATIM.items() if _sniff(data) == f), None)
        if fmt is None:
            buf = io.BytesIO()
            imaging.open_image(data, name=str(path), mode="RGB").save(buf, format="PNG")
            data, fmt = buf.getvalue(), "png"
        rel = f"sources/{sha256_bytes(data)[:16]}{_VERBATIM[fmt]}"
        if not self.run.path(rel).is_file():
            atomic_write_bytes(self.run.path(rel), data)
        return rel

    def _flush(self, force: bool = False) -> None:
        if self.rows and (force or time.perf_counter() - self.last_flush >= _FLUSH_SECONDS):
            df = pd.DataFrame(self.rows)
            for col in ("seed", "steps"):  # exact integers with nulls (a float64 column would round 63-bit seeds)
                df[col] = pd.Series([r[col] for r in self.rows], dtype=object)
            self.run.append_rows("generations", df, key="image_id")
            self.rows = []
            self.last_flush = time.perf_counter()

    def _record_run_info(self) -> None:
        gens = self.run.read_table("generations")
        old = self.run.info.get("generation") or {}
        sources = list(dict.fromkeys([*old.get("sources", []), shown(str(self.plan.source.resolve()))]))
        info: dict[str, Any] = {"imported": True, "kind": self.kind, "sources": sources,
                                "suite": self.plan.suite, "images": len(gens)}
        if self.plan.suite is not None:
            from prompts.suites import suite_path

            info["suite_file"] = str(suite_path(self.plan.suite).resolve())
        models = sorted(set(gens["model"].dropna()))
        if len(models) == 1 and gens["model"].notna().all():
            info["model"] = models[0]
        elif models:
            info["model"] = ", ".join(models) + (" and unknown" if gens["model"].isna().any() else "")
        self.run.update_info({"generation": info})


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _signed(generation: dict[str, Any], key: str, type_: type) -> Any:
    """A field of a valid signed generation assertion, if it has the expected type (else unknown)."""
    value = generation.get(key)
    if type_ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, type_) or isinstance(value, bool):
        return None
    if type_ is int and not _INT64[0] <= value <= _INT64[1]:
        return None
    return value


def describe_skips(skipped: dict[str, int]) -> str:
    """``3 not images, 1 too large`` for the CLI."""
    words = {"not_image": "not an image", "corrupt": "damaged", "too_large": "over the pixel cap",
             "unreadable": "unreadable", "duplicate": "duplicate", "already_imported": "already in the run"}
    return ", ".join(f"{n} {words.get(k, k)}" for k, n in skipped.items()) or "none"
