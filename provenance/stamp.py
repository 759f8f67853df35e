"""Stamp images (watermark + signed C2PA manifest + store entry); ``provenance.verify`` verifies them.

``stamp_run`` writes stamped copies under ``<run>/provenance/stamped/<prompt_id>/<seed>.png`` (originals
are never touched), rows to ``provenance/stamps.parquet`` and every stamp to the manifest store, with
its content fingerprint and those of its source images. It is resumable: a row whose stamped file still
has its recorded sha256 is skipped. Store rows are written *pending* and committed with the table rows
they belong to, so a killed stamp leaves no record that a later restamp would contradict.

Per image, a stamp decodes the image once (under the pixel cap), embeds the watermark in the decoded
pixels, encodes once, signs the bytes in memory with one reused signer and context (no thumbnail), and
reads the result back once to record its validation state against the identity's own root, which is
recorded as ``Trusted (development root)``: self-certification, not a third party's trust.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from diffaudit import imaging
from diffaudit.errors import InputError
from diffaudit.runs import Run, atomic_write_bytes, sha256_bytes, sha256_file
from prompts.suites import BUILTIN_SOURCES, load_source
from provenance import c2pa as cc
from provenance.fingerprint import Fingerprint, fingerprint
from provenance.keys import Identity, init_identity, load_identity
from provenance.store import ManifestStore
from provenance.verify import VerifyResult, verify_bytes, verify_paths  # noqa: F401  (the old home of verify)
from provenance.watermark import DEFAULT_METHOD, Watermark, embed_verified, get

GENERATION_FIELDS = ("image_id", "prompt_id", "suite", "prompt", "negative_prompt", "mode", "source_image",
                     "mask", "strength", "seed", "model", "model_revision", "scheduler", "steps",
                     "guidance", "width", "height")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def _plain(value: Any) -> Any:
    """numpy/pandas scalars -> JSON-able Python values; NaN/NA -> None."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def source_bytes(ref: str, base: Path | None = None) -> bytes:
    """Materialise a source image reference (``skimage:NAME``, ``sklearn:NAME`` or a path) as bytes."""
    scheme, _, name = ref.partition(":")
    if scheme in BUILTIN_SOURCES and name:
        return encode_image(np.asarray(load_source(ref)), "png")
    path = Path(ref)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise InputError(f"source image {ref!r} not found; stamp from where the run's sources exist")
    return path.read_bytes()


def encode_image(rgb: np.ndarray, fmt: str) -> bytes:
    """Encode RGB pixels with OpenCV (BGR order inside), fast settings: PNG level 1 RLE, JPEG q95, WebP lossless."""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    params = {"png": [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE], "jpeg": [cv2.IMWRITE_JPEG_QUALITY, 95],
              "webp": [cv2.IMWRITE_WEBP_QUALITY, 101]}[fmt]
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else f".{fmt}", bgr, params)
    if not ok:
        raise InputError(f"could not encode a {fmt} image")
    return buf.tobytes()


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """RGB uint8 pixels, after the header passed the one pixel cap (``diffaudit.imaging``); a truncated or
    damaged file is an ``InputError`` naming it. A photo with an EXIF orientation is turned upright: the
    stamped copy carries no EXIF, so it shows as the original did (``imaging.upright``)."""
    rgb = imaging.decode_rgb(data, name=name)
    try:
        turned = imaging.upright(Image.open(io.BytesIO(data)))
    except (OSError, ValueError):
        turned = None
    return np.asarray(turned.convert("RGB")) if turned is not None else rgb


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode to RGB with Pillow under the pixel cap; raises ``InputError`` with the reason otherwise."""
    return imaging.open_image(data, name=name, mode="RGB")


@dataclass
class Stamp:
    """One stamped image."""

    data: bytes
    format: str
    payload: str | None
    manifest_label: str
    phash: int
    status: str
    failure_codes: list[str]
    credentials: dict[str, Any]
    manifest: bytes
    seconds: float
    trust: str | None = None
    fingerprint: Fingerprint | None = field(default=None, repr=False)
    watermark: str = "none"          # the method embedded, "none", or "unreadable" (it did not read back)
    size: tuple[int, int] | None = None


class Stamper:
    """Watermark + sign + self-check + register, with everything expensive created once."""

    def __init__(self, identity: Identity | None = None, *, watermark: str = DEFAULT_METHOD,
                 store: ManifestStore | None = None, thumbnail: bool = False, tsa_url: str | None = None):
        self.identity = identity if identity is not None else default_identity()
        self.watermark: Watermark | None = None if watermark == "none" else get(watermark)
        self.method = watermark
        self.signer = cc.ManifestSigner(self.identity, thumbnail=thumbnail, tsa_url=tsa_url)
        self.trust = cc.dev_root_trust(self.identity)
        self.reader = cc.reader_context(self.trust)
        self.store = store

    def embeds(self, rgb: np.ndarray) -> bool:
        """Whether a stamp of this image carries a watermark (none is asked for, or it is below 256x256)."""
        return self.watermark is not None and not self.watermark.too_small(rgb)

    def stamp(self, data: bytes, generation: dict[str, Any], *, title: str,
              ingredients: Iterable[cc.Ingredient] = (), image_id: str | None = None,
              run: str | None = None, stamped_path: str | None = None, name: str | None = None,
              pending: bool = False, register: bool = True) -> Stamp:
        """Stamp one image's bytes. A file that already carries credentials becomes the ``parentOf``
        ingredient of the new manifest (its manifest kept). ``name`` names the file in errors; ``pending``
        store rows wait for ``ManifestStore.commit``; ``register=False`` leaves the store alone."""
        t0 = time.perf_counter()
        name = name or title
        fmt = cc.sniff(data)
        if fmt is None:
            raise InputError(f"{name}: not a PNG, JPEG or WebP image")
        rgb = decode_rgb(data, name=name)
        ingredients = list(ingredients)
        parent = None
        if cc.read_credentials(data, self.reader, name=name).status != "none":
            parent = cc.Ingredient(Path(name).name, data, "parentOf")
        payload, marked, state = None, None, "none"
        size = (int(rgb.shape[1]), int(rgb.shape[0]))
        if self.embeds(rgb):
            # read back through the copies the image will travel as before the payload is registered
            emb = embed_verified(rgb, self.watermark.new_payload(), method=self.method)
            state = self.method if emb.readable else "unreadable"
            if emb.readable:
                payload, rgb = emb.payload, emb.rgb
                bits = self.watermark.payload_to_bits(payload)
                marked = cc.Watermarked(self.method, payload, np.packbits(bits).tobytes())
        signed, label, manifest = self.signer.sign(encode_image(rgb, fmt), generation, title=title,
                                                   ingredients=ingredients, watermark=marked, parent=parent)
        creds = cc.read_credentials(signed, self.reader, name=name, trust=self.trust)
        fp = fingerprint(rgb)
        if self.store is not None and register:
            self.store.add(manifest_label=label, method=self.method if payload else "none", payload=payload,
                           phash=fp.phash, sha256=sha256_bytes(signed), credentials=creds.to_dict(),
                           manifest=manifest, image_id=image_id, run=run, stamped_path=stamped_path,
                           fingerprint=fp, ingredients=_ingredient_prints(([parent] if parent else []) + ingredients),
                           pending=pending, size=size)
        return Stamp(signed, fmt, payload, label, fp.phash, creds.status, creds.failure_codes, creds.to_dict(),
                     manifest, time.perf_counter() - t0, creds.trust, fp, state, size)


def _ingredient_prints(ingredients: Iterable[cc.Ingredient]) -> list[tuple[str, str, str, Fingerprint | None]]:
    """(title, relationship, sha256, fingerprint) of each source image; a mask or an undecodable source gets
    no fingerprint (it is recorded by hash only)."""
    out = []
    for ing in ingredients:
        fp = None
        if cc.sniff_mime(ing.data, ing.title) in ("image/png", "image/jpeg", "image/webp", "image/tiff"):
            try:
                fp = fingerprint(imaging.open_image(ing.data, name=ing.title, mode="RGB"))
            except InputError:
                fp = None
        out.append((ing.title, ing.relationship, ing.sha256, fp))
    return out


def default_identity() -> Identity:
    """The default identity, created on first use (a development CA chain; say so to the user)."""
    from provenance.keys import default_identity_dir

    folder = default_identity_dir()
    if not (folder / "signer.pem").is_file():
        return init_identity(folder)
    return load_identity(folder)


def _public_ref(ref: Any) -> Any:
    """What a signed manifest may say about a source or mask: builtin and ``box:`` refs as they are, a
    path only by its file name (a local path is private; the ingredient's hash identifies the file)."""
    if not ref:
        return ref
    scheme, _, name = str(ref).partition(":")
    if (scheme in BUILTIN_SOURCES and name) or scheme == "box":
        return ref
    return Path(str(ref)).name


def _generation(row: dict[str, Any], run: Run) -> dict[str, Any]:
    gen = {k: _plain(row.get(k)) for k in GENERATION_FIELDS}
    gen["source_image"], gen["mask"] = _public_ref(gen["source_image"]), _public_ref(gen["mask"])
    gen["run"] = run.name
    gen["run_created"] = run.info.get("created")
    return gen


def _ingredients(row: dict[str, Any], base: Path) -> list[cc.Ingredient]:
    mode, src = _plain(row.get("mode")), _plain(row.get("source_image"))
    if mode not in ("img2img", "inpaint") or not src:
        return []
    ings = [cc.Ingredient(_public_ref(str(src)), source_bytes(str(src), base),
                          "parentOf" if mode == "inpaint" else "inputTo")]
    mask = _plain(row.get("mask"))
    if mode == "inpaint" and mask and not str(mask).startswith("box:"):
        ings.append(cc.Ingredient(_public_ref(str(mask)), source_bytes(str(mask), base), "inputTo"))
    return ings


def progress_bar(items: list, desc: str, enabled: bool = True) -> Iterator:
    """Iterate ``items`` with a tqdm bar (shown only on a terminal, and only when ``enabled``)."""
    if not enabled:
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, unit="img", disable=None))


def stamp_run(run_dir: str | os.PathLike, *, identity: Identity | None = None, watermark: str = DEFAULT_METHOD,
              store: ManifestStore | str | os.PathLike | None = None, flush_every: int = 64,
              tsa_url: str | None = None) -> dict[str, Any]:
    """Stamp every generated image of a run; return a summary (counts, seconds, images/s, statuses). A
    reference run (real photos) is refused: a stamp would say its images were made by a model."""
    run = Run.open(run_dir)
    if run.is_reference:
        raise InputError(f"{run.root} is a reference set of real images: stamping would label them as "
                         "AI-generated (trainedAlgorithmicMedia); stamp only a model's outputs")
    t0 = time.perf_counter()
    own_store = not isinstance(store, ManifestStore)
    st = store if isinstance(store, ManifestStore) else ManifestStore(store)
    try:
        stamper = Stamper(identity, watermark=watermark, store=st, tsa_url=tsa_url)
        with run.lock():
            table = run.read_table("provenance/stamps")
            settled = st.settle_pending(run.name, table["manifest_label"].dropna())  # a killed stamp's rows
            done = _already_stamped(run, stamper)
            todo = [r for r in run.images().to_dict("records") if r["image_id"] not in done]
            rows: list[dict[str, Any]] = []

            def flush() -> None:
                if rows:
                    run.append_rows("provenance/stamps", pd.DataFrame(rows), key="image_id")
                    st.commit(r["manifest_label"] for r in rows)  # the store follows the table, never leads it
                    rows.clear()

            try:
                for row in progress_bar(todo, f"stamp {run.name}"):
                    rows.append(_stamp_row(run, stamper, row))
                    if len(rows) >= flush_every:
                        flush()
            finally:
                flush()
        table = run.read_table("provenance/stamps")
        seconds = time.perf_counter() - t0
        folder = stamper.identity.folder
        run.record_stage("stamp", seconds=seconds, images=len(todo), watermark=watermark,
                         signer=stamper.identity.signer_name, identity=str(Path(folder).resolve()) if folder else None,
                         store=str(Path(st.path).resolve()), tsa_url=tsa_url)
        return {"run": str(run.root), "stamped": len(todo), "skipped": len(done), "total": len(table),
                "seconds": round(seconds, 3), "images_per_s": round(len(todo) / seconds, 2) if todo else None,
                "status": table["status"].value_counts().to_dict(), "watermark": watermark,
                "store": str(st.path), "stamps": str(run.table_path("provenance/stamps")),
                "store_rows_settled": {"committed": settled[0], "deleted": settled[1]}}
    finally:
        if own_store:
            st.close()


def _already_stamped(run: Run, stamper: Stamper) -> set[str]:
    """Images whose stamped copy is intact and carries what ``stamper`` would embed: its watermark, or none
    where it embeds none (an image below the watermark's minimum is not restamped on every rerun)."""
    table = run.read_table("provenance/stamps")
    done = set()
    for image_id, rel, digest, method in zip(table["image_id"], table["stamped_path"], table["sha256"],
                                             table["watermark"], strict=True):
        p = run.path(rel)
        if not (p.is_file() and sha256_file(p) == digest):
            continue
        if method in (stamper.method, "unreadable") or (method == "none" and not stamper.embeds(
                decode_rgb(p.read_bytes(), str(p)))):  # a mark that did not read back is not retried each rerun
            done.add(image_id)
    return done


def _stamp_row(run: Run, stamper: Stamper, row: dict[str, Any]) -> dict[str, Any]:
    src = run.path(row["path"])
    # named after the run's own file (<seed>.png for generated images, <sha256 prefix>.<ext> for imported ones,
    # which have no seed), in the format stamp() keeps
    try:
        data = imaging.read_bytes_checked(src)
    except OSError as e:
        raise InputError(f"{src}: cannot read ({e.strerror or e}); nothing more was stamped") from e
    ext = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}.get(cc.sniff(data[:16]), ".png")
    rel = f"provenance/stamped/{row['prompt_id']}/{Path(row['path']).stem}{ext}"
    stamp = stamper.stamp(data, _generation(row, run), title=Path(rel).name,
                          ingredients=_ingredients(row, run.root), image_id=row["image_id"], run=run.name,
                          stamped_path=str(run.root / rel), name=str(src), pending=True)
    atomic_write_bytes(run.root / rel, stamp.data)
    return {"image_id": row["image_id"], "source_path": row["path"], "stamped_path": rel,
            "format": stamp.format, "watermark": stamp.watermark,
            "payload": stamp.payload, "manifest_label": stamp.manifest_label,
            "sha256": sha256_bytes(stamp.data), "phash": f"{stamp.phash:016x}", "status": stamp.status,
            "trust": stamp.trust, "failure_codes": stamp.failure_codes, "seconds": stamp.seconds}


def stamp_files(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
                identity: Identity | None = None, watermark: str = DEFAULT_METHOD,
                store: ManifestStore | str | os.PathLike | None = None,
                model: str | None = None, tsa_url: str | None = None) -> list[dict[str, Any]]:
    """Stamp loose image files into ``out_dir`` (same name and format); originals are never modified. A
    file that already carries credentials keeps them, as the new manifest's ``parentOf`` ingredient."""
    files = list(_expand(paths))
    if not files:
        raise InputError("no PNG, JPEG or WebP files to stamp")
    out = Path(out_dir)
    seen: dict[Path, Path] = {}
    for f, rel in files:  # every check up front: a bad input stops the command before anything is written
        if rel in seen:
            raise InputError(f"{seen[rel]} and {f} would both be stamped to {out / rel}; "
                             "stamp them into different --out folders (or pass their folder)")
        seen[rel] = f
        with f.open("rb") as fh:
            if cc.sniff(fh.read(12)) is None:
                raise InputError(f"{f}: not a PNG, JPEG or WebP image; nothing was stamped")
        imaging.check_file(f)  # the header, the pixel cap and the file's size, before anything is written
        if (out / rel).resolve() == f.resolve():
            raise InputError(f"{f}: the output folder is the input's folder; choose another --out")
    own_store = not isinstance(store, ManifestStore)
    st = store if isinstance(store, ManifestStore) else ManifestStore(store)
    results = []
    try:
        stamper = Stamper(identity, watermark=watermark, store=st, tsa_url=tsa_url)
        for f, rel in progress_bar(files, "stamp"):
            target = out / rel
            gen = {"model": model, "source_file": f.name}
            stamp = stamper.stamp(imaging.read_bytes_checked(f), gen, title=f.name, stamped_path=str(target.resolve()),
                                  name=str(f), register=False)
            atomic_write_bytes(target, stamp.data)  # the file first: a kill in between leaves no store orphan
            st.add(manifest_label=stamp.manifest_label, method=watermark if stamp.payload else "none",
                   payload=stamp.payload, phash=stamp.phash, sha256=sha256_bytes(stamp.data),
                   credentials=stamp.credentials, manifest=stamp.manifest, stamped_path=str(target.resolve()),
                   fingerprint=stamp.fingerprint, size=stamp.size)  # a restamped parent is this same picture: no source print
            results.append({"file": str(f), "stamped": str(target), "status": stamp.status, "trust": stamp.trust,
                            "watermark": stamp.watermark,
                            "payload": stamp.payload, "manifest_label": stamp.manifest_label,
                            "restamped": any(a.get("action") == "c2pa.opened" for a in stamp.credentials["actions"]),
                            "seconds": round(stamp.seconds, 4)})
    finally:
        if own_store:
            st.close()
    return results


def _expand(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, Path]]:
    """``(file, name)``: files as given (whatever their extension; name = file name) and image files found
    under folders, sorted (name = the path relative to that folder, so ``<prompt_id>/<seed>.png`` stays).
    A missing path, or a folder without images, is an ``InputError``."""
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{p}: no PNG, JPEG or WebP images in this folder")
            yield from ((f, f.relative_to(p)) for f in found)
        elif p.exists():
            yield p, Path(p.name)
        else:
            raise InputError(f"{p}: no such file or folder")
