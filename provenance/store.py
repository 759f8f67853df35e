"""A local manifest store (SQLite): every stamp with its watermark payload, content fingerprint and signed
manifest, and the fingerprints of the source images (ingredients) of img2img / inpainting stamps.

Screenshots and re-saves strip embedded C2PA manifests. ``verify`` uses the store as *evidence*, never
as a verdict by itself: a watermark payload names a candidate stamp; the claim "same image" also needs
the pixels to agree (``provenance.fingerprint``: stable pHash bits, then a thumbnail check); a query that
matches a stamp's source better than its output is that stamp's *source*, not its output.

Writes follow the stamp they belong to: ``stamp_run`` adds rows as *pending* and commits them only
once the run's ``provenance/stamps`` table holds them; a killed stamp leaves pending rows, which the next
stamp of that run commits (their table row made it) or deletes (it did not). Queries see committed rows
only, so a file overwritten by a later restamp never answers with its stale record.

Schema versions (``PRAGMA user_version``): 1 (no fingerprints, no ingredients, everything committed) and 2.
A version-1 store opened for writing is migrated in place (columns added, nothing rewritten); opened
read-only it is read as it is (its stamps have no thumbnail, so they can be named by a watermark or exact
bytes, never confirmed as "same image" by pixels).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.errors import InputError
from diffaudit.imaging import hamming, phash
from provenance.fingerprint import MAX_STABLE_DISAGREEMENT, Fingerprint, stable_disagreement

__all__ = ["PHASH_RADIUS", "SCHEMA_VERSION", "ManifestStore", "Match", "StoredIngredient", "StoredStamp",
           "default_store_path", "phash"]

SCHEMA_VERSION = 2
#: Legacy radius of ``by_phash`` (robustness tables); verification uses ``provenance.fingerprint``.
PHASH_RADIUS = 10
#: Candidates are pre-filtered on the full pHash before the stable-bit check (a cheap superset).
_PREFILTER = 24

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS stamps (
    manifest_label TEXT PRIMARY KEY,
    method TEXT NOT NULL,            -- watermark method or 'none'
    payload TEXT,                    -- watermark payload (hex)
    phash INTEGER NOT NULL,          -- 64-bit pHash as a signed integer
    image_id TEXT,
    run TEXT,
    stamped_path TEXT,
    sha256 TEXT NOT NULL,
    credentials TEXT NOT NULL,       -- the manifest as read back after signing (JSON)
    manifest BLOB,                   -- the signed C2PA manifest store bytes
    created TEXT NOT NULL DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS stamps_payload ON stamps (method, payload);
CREATE INDEX IF NOT EXISTS stamps_sha ON stamps (sha256);
"""
_V2_COLUMNS = {"coeffs": "BLOB", "thumb": "BLOB", "committed": "INTEGER NOT NULL DEFAULT 1", "width": "INTEGER",
               "height": "INTEGER"}
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS ingredients (
    manifest_label TEXT NOT NULL,    -- the stamp this image was an input of
    position INTEGER NOT NULL,
    title TEXT,
    relationship TEXT,               -- inputTo (img2img) | parentOf (inpainting, restamping)
    sha256 TEXT NOT NULL,
    phash INTEGER NOT NULL,
    coeffs BLOB,
    thumb BLOB,
    PRIMARY KEY (manifest_label, position)
);
CREATE INDEX IF NOT EXISTS ingredients_sha ON ingredients (sha256);
CREATE INDEX IF NOT EXISTS stamps_run ON stamps (run, committed);
"""


def default_store_path() -> Path:
    """``$DIFFAUDIT_HOME/manifests.sqlite`` if set, else ``~/.config/diffaudit/manifests.sqlite``."""
    home = os.environ.get("DIFFAUDIT_HOME")
    return (Path(home) if home else Path.home() / ".config" / "diffaudit") / "manifests.sqlite"


def _signed(h: int) -> int:
    h &= (1 << 64) - 1
    return h - (1 << 64) if h >= 1 << 63 else h


def _fp(h: int, coeffs: bytes | None, thumb: bytes | None) -> Fingerprint | None:
    return Fingerprint.from_blobs(h, coeffs, thumb) if coeffs and thumb else None


@dataclass
class StoredIngredient:
    """A source image of a stamp (what an img2img or inpainting output was made from)."""

    manifest_label: str
    position: int
    title: str | None
    relationship: str | None
    sha256: str
    fingerprint: Fingerprint | None = field(default=None, repr=False)


@dataclass
class StoredStamp:
    """One committed stamp as the store keeps it."""

    manifest_label: str
    method: str
    payload: str | None
    phash: int
    image_id: str | None
    run: str | None
    stamped_path: str | None
    sha256: str
    credentials: dict[str, Any]
    created: str | None = None
    manifest: bytes | None = field(default=None, repr=False)
    fingerprint: Fingerprint | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """The record's identity (no blobs), for reports."""
        return {"manifest_label": self.manifest_label, "image_id": self.image_id, "run": self.run,
                "stamped_path": self.stamped_path, "method": self.method, "payload": self.payload,
                "created": self.created}


@dataclass
class Match:
    """A stored record and how it was found (the robustness table's quick lookups)."""

    how: str                  # "sha256" | "watermark" | "phash"
    distance: int             # pHash Hamming distance between query and record (-1: not computed)
    manifest_label: str
    image_id: str | None
    run: str | None
    stamped_path: str | None
    method: str
    payload: str | None
    credentials: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ManifestStore:
    """The SQLite store. One connection per instance; safe to open from several processes (WAL)."""

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False):
        self.path = Path(path) if path is not None else default_store_path()
        self.readonly = readonly
        try:
            if readonly:  # verifiers (and the dashboard) only read: never create, migrate or change the file
                if not self.path.is_file():
                    raise InputError(f"no manifest store at {self.path}")
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
                self.db.execute("SELECT COUNT(*) FROM stamps").fetchone()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=30)
                self.db.execute("PRAGMA journal_mode=WAL")
                self._migrate()
            self.columns = {r[1] for r in self.db.execute("PRAGMA table_info(stamps)")}
            self.has_ingredients = bool(self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='ingredients'").fetchone())
            self.version = int(self.db.execute("PRAGMA user_version").fetchone()[0]) or 1
        except sqlite3.Error as e:
            raise InputError(f"{self.path} is not a usable diffaudit manifest store ({e})") from e

    def _migrate(self) -> None:
        with self.db:
            self.db.executescript(_SCHEMA_V1)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(stamps)")}
            for name, decl in _V2_COLUMNS.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE stamps ADD COLUMN {name} {decl}")
            self.db.executescript(_SCHEMA_V2)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ManifestStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------
    def add(self, *, manifest_label: str, method: str, payload: str | None, phash: int, sha256: str,
            credentials: dict[str, Any], manifest: bytes | None = None, image_id: str | None = None,
            run: str | None = None, stamped_path: str | None = None, fingerprint: Fingerprint | None = None,
            ingredients: Iterable[tuple[str | None, str | None, str, Fingerprint | None]] = (),
            pending: bool = False, size: tuple[int, int] | None = None) -> None:
        """Register (or replace) one stamped image and its ingredients ``(title, relationship, sha256,
        fingerprint)`` in one transaction. ``pending`` rows are invisible until ``commit``. ``size``: the
        stamped (width, height), which the robust watermark decoder tries when a copy was resized."""
        coeffs, thumb = fingerprint.to_blobs() if fingerprint is not None else (None, None)
        w, h = size if size is not None else (None, None)
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO stamps (manifest_label, method, payload, phash, image_id, run,"
                " stamped_path, sha256, credentials, manifest, coeffs, thumb, committed, width, height)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (manifest_label, method, payload, _signed(phash), image_id, run, stamped_path, sha256,
                 json.dumps(credentials, default=str), manifest, coeffs, thumb, 0 if pending else 1, w, h))
            self.db.execute("DELETE FROM ingredients WHERE manifest_label = ?", (manifest_label,))
            for i, (title, relationship, digest, fp) in enumerate(ingredients):
                c, t = fp.to_blobs() if fp is not None else (None, None)
                self.db.execute("INSERT INTO ingredients VALUES (?,?,?,?,?,?,?,?)",
                                (manifest_label, i, title, relationship, digest,
                                 _signed(fp.phash) if fp is not None else 0, c, t))

    def commit(self, labels: Iterable[str]) -> None:
        """Make pending rows visible (their stamps are now recorded in the run's table)."""
        labels = list(labels)
        with self.db:
            self.db.executemany("UPDATE stamps SET committed = 1 WHERE manifest_label = ?",
                                [(x,) for x in labels])

    def settle_pending(self, run: str | None, recorded: Iterable[str]) -> tuple[int, int]:
        """After a killed stamp of ``run``: commit its pending rows whose label the run's table
        ``recorded``, delete the others (orphans). Returns (committed, deleted)."""
        recorded = set(recorded)
        rows = self.db.execute("SELECT manifest_label FROM stamps WHERE committed = 0 AND run IS ?",
                               (run,)).fetchall()
        keep = [r[0] for r in rows if r[0] in recorded]
        drop = [r[0] for r in rows if r[0] not in recorded]
        with self.db:
            self.db.executemany("UPDATE stamps SET committed = 1 WHERE manifest_label = ?", [(x,) for x in keep])
            self.db.executemany("DELETE FROM stamps WHERE manifest_label = ?", [(x,) for x in drop])
            self.db.executemany("DELETE FROM ingredients WHERE manifest_label = ?", [(x,) for x in drop])
        return len(keep), len(drop)

    # -- reading ---------------------------------------------------------------------------------
    def _where_committed(self) -> str:
        return "committed = 1" if "committed" in self.columns else "1 = 1"

    def _select(self) -> str:
        cols = ["manifest_label", "method", "payload", "phash", "image_id", "run", "stamped_path", "sha256",
                "credentials", "created", "manifest"]
        cols += [c if c in self.columns else f"NULL AS {c}" for c in ("coeffs", "thumb")]
        return "SELECT " + ", ".join(cols) + " FROM stamps"

    @staticmethod
    def _stamp(row: tuple) -> StoredStamp:
        label, method, payload, h, image_id, run, path, sha, creds, created, manifest, coeffs, thumb = row
        return StoredStamp(label, method, payload, h & ((1 << 64) - 1), image_id, run, path, sha, json.loads(creds),
                           created, manifest, _fp(h, coeffs, thumb))

    def methods(self) -> list[str]:
        """Watermark methods used by the stored stamps (what a verifier should try to decode)."""
        rows = self.db.execute("SELECT DISTINCT method FROM stamps WHERE method != 'none' AND "
                               + self._where_committed()).fetchall()
        return sorted(r[0] for r in rows)

    def sizes(self, method: str, limit: int = 8) -> list[tuple[int, int]]:
        """The most common stamped (width, height) of ``method``'s stamps (what a resized copy may have been)."""
        if "width" not in self.columns:
            return []
        rows = self.db.execute("SELECT width, height, COUNT(*) AS n FROM stamps WHERE method = ? AND width IS NOT NULL"
                               " AND " + self._where_committed() + " GROUP BY width, height ORDER BY n DESC LIMIT ?",
                               (method, limit)).fetchall()
        return [(int(w), int(h)) for w, h, _ in rows]

    def count_payloads(self, method: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM stamps WHERE method = ? AND payload IS NOT NULL AND "
                               + self._where_committed(), (method,)).fetchone()[0]

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM stamps WHERE " + self._where_committed()).fetchone()[0]

    def pending(self) -> int:
        """Rows not committed (a stamp in progress, or one that was killed)."""
        if "committed" not in self.columns:
            return 0
        return self.db.execute("SELECT COUNT(*) FROM stamps WHERE committed = 0").fetchone()[0]

    def get(self, label: str) -> StoredStamp | None:
        row = self.db.execute(self._select() + " WHERE manifest_label = ? AND " + self._where_committed(),
                              (label,)).fetchone()
        return self._stamp(row) if row else None

    def stamps_by_sha256(self, sha256: str) -> list[StoredStamp]:
        rows = self.db.execute(self._select() + " WHERE sha256 = ? AND " + self._where_committed(),
                               (sha256,)).fetchall()
        return [self._stamp(r) for r in rows]

    def stamps_with_payload(self, method: str, payload: str) -> list[StoredStamp]:
        """Every committed stamp carrying this watermark payload (random ids can collide: callers check
        the content before naming one)."""
        rows = self.db.execute(self._select() + " WHERE method = ? AND payload = ? AND " + self._where_committed(),
                               (method, payload)).fetchall()
        return [self._stamp(r) for r in rows]

    def ingredients_of(self, label: str) -> list[StoredIngredient]:
        if not self.has_ingredients:
            return []
        rows = self.db.execute("SELECT manifest_label, position, title, relationship, sha256, phash, coeffs, thumb"
                               " FROM ingredients WHERE manifest_label = ? ORDER BY position", (label,)).fetchall()
        return [StoredIngredient(r[0], r[1], r[2], r[3], r[4], _fp(r[5], r[6], r[7])) for r in rows]

    def ingredients_by_sha256(self, sha256: str) -> list[StoredIngredient]:
        if not self.has_ingredients:
            return []
        rows = self.db.execute(
            "SELECT i.manifest_label, i.position, i.title, i.relationship, i.sha256, i.phash, i.coeffs, i.thumb"
            " FROM ingredients i JOIN stamps s USING (manifest_label) WHERE i.sha256 = ? AND s."
            + self._where_committed(), (sha256,)).fetchall()
        return [StoredIngredient(r[0], r[1], r[2], r[3], r[4], _fp(r[5], r[6], r[7])) for r in rows]

    def candidates(self, query: Fingerprint) -> list[tuple[StoredStamp | StoredIngredient, int]]:
        """Stored stamps and ingredients whose stable pHash bits agree with ``query`` (at most
        ``MAX_STABLE_DISAGREEMENT`` differ), with that disagreement. Records without a fingerprint (stores
        made before version 2) are left out: nothing about their pixels can be checked."""
        out: list[tuple[StoredStamp | StoredIngredient, int]] = []
        if "coeffs" not in self.columns:
            return out
        tables = [("stamps", "rowid, phash FROM stamps WHERE coeffs IS NOT NULL AND " + self._where_committed())]
        if self.has_ingredients:
            tables.append(("ingredients", "i.rowid, i.phash FROM ingredients i JOIN stamps s USING (manifest_label)"
                                          " WHERE i.coeffs IS NOT NULL AND s." + self._where_committed()))
        for table, sql in tables:
            rows = self.db.execute("SELECT " + sql).fetchall()
            if not rows:
                continue
            hashes = np.array([r[1] for r in rows], dtype=np.int64).view(np.uint64)
            x = np.bitwise_xor(hashes, np.uint64(query.phash))
            dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
            for i in np.flatnonzero(dist <= _PREFILTER):
                rowid = rows[int(i)][0]
                if table == "stamps":
                    rec: StoredStamp | StoredIngredient = self._stamp(
                        self.db.execute(self._select() + " WHERE rowid = ?", (rowid,)).fetchone())
                else:
                    r = self.db.execute("SELECT manifest_label, position, title, relationship, sha256, phash,"
                                        " coeffs, thumb FROM ingredients WHERE rowid = ?", (rowid,)).fetchone()
                    rec = StoredIngredient(r[0], r[1], r[2], r[3], r[4], _fp(r[5], r[6], r[7]))
                d = stable_disagreement(query, rec.fingerprint)
                if d <= MAX_STABLE_DISAGREEMENT:
                    out.append((rec, d))
        return out

    # -- quick lookups (the robustness table) ----------------------------------------------------
    def _legacy(self, rec: StoredStamp, how: str, distance: int) -> Match:
        return Match(how, distance, rec.manifest_label, rec.image_id, rec.run, rec.stamped_path, rec.method,
                     rec.payload, rec.credentials)

    def by_sha256(self, sha256: str) -> Match | None:
        recs = self.stamps_by_sha256(sha256)
        return self._legacy(recs[0], "sha256", 0) if recs else None

    def by_payload(self, method: str, payload: str, phash: int | None = None) -> Match | None:
        """The stamp carrying this payload; if random ids collided, the one whose pHash is nearest."""
        recs = self.stamps_with_payload(method, payload)
        if not recs:
            return None
        if phash is not None:
            recs.sort(key=lambda r: hamming(r.phash, phash))
        return self._legacy(recs[0], "watermark", hamming(recs[0].phash, phash) if phash is not None else -1)

    def by_phash(self, h: int, radius: int = PHASH_RADIUS) -> Match | None:
        """The stored image with the nearest pHash, if within ``radius`` bits (a quick look-up: ``verify``
        never names a stamp from this alone)."""
        rows = self.db.execute("SELECT phash, manifest_label FROM stamps WHERE " + self._where_committed()).fetchall()
        if not rows:
            return None
        hashes = np.array([r[0] for r in rows], dtype=np.int64).view(np.uint64)
        x = np.bitwise_xor(hashes, np.uint64(h & ((1 << 64) - 1)))
        dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        best = int(np.argmin(dist))
        if dist[best] > radius:
            return None
        return self._legacy(self.get(rows[best][1]), "phash", int(dist[best]))

    def records(self) -> Iterable[dict[str, Any]]:
        cur = self.db.execute("SELECT manifest_label, method, payload, image_id, run, stamped_path, sha256,"
                              " created FROM stamps WHERE " + self._where_committed() + " ORDER BY created")
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row, strict=True))
