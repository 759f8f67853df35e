"""A local manifest store (SQLite) keyed by watermark payload and by perceptual hash.

Screenshots and re-saves strip embedded C2PA manifests. Every stamped image is registered here with its
watermark payload, its 64-bit pHash (DCT hash, imagehash) and the signed manifest, so ``verify`` can
recover the credentials of a stripped file: first by the watermark payload (exact, survives JPEG),
then by the nearest pHash within ``PHASH_RADIUS`` bits (survives resizing and mild edits, but can
confuse near-identical images, so it is reported with its distance).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.errors import InputError
from diffaudit.imaging import hamming, phash

__all__ = ["PHASH_RADIUS", "ManifestStore", "Match", "default_store_path", "phash"]

PHASH_RADIUS = 10  # bits out of 64; pHash of unrelated photos differ by ~32 on average

_SCHEMA = """
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


def default_store_path() -> Path:
    """``$DIFFAUDIT_HOME/manifests.sqlite`` if set, else ``~/.config/diffaudit/manifests.sqlite``."""
    home = os.environ.get("DIFFAUDIT_HOME")
    return (Path(home) if home else Path.home() / ".config" / "diffaudit") / "manifests.sqlite"


def _hamming(a: int, b: int) -> int:
    return hamming(a, b)


def _signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


@dataclass
class Match:
    """A stored record and how it was found."""

    how: str                  # "sha256" | "watermark" | "phash"
    distance: int             # pHash Hamming distance (0 for sha256/watermark matches)
    manifest_label: str
    image_id: str | None
    run: str | None
    stamped_path: str | None
    method: str
    payload: str | None
    credentials: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class ManifestStore:
    """The SQLite store. One connection per instance; safe to open from several processes (WAL)."""

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False):
        self.path = Path(path) if path is not None else default_store_path()
        try:
            if readonly:  # verifiers (and the dashboard) only read: never create or change the file
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
                self.db.execute("SELECT COUNT(*) FROM stamps").fetchone()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=30)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise InputError(f"{self.path} is not a usable diffaudit manifest store ({e})") from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ManifestStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, *, manifest_label: str, method: str, payload: str | None, phash: int, sha256: str,
            credentials: dict[str, Any], manifest: bytes | None = None, image_id: str | None = None,
            run: str | None = None, stamped_path: str | None = None) -> None:
        """Register (or replace) one stamped image."""
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO stamps (manifest_label, method, payload, phash, image_id, run,"
                " stamped_path, sha256, credentials, manifest) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (manifest_label, method, payload, _signed(phash), image_id, run, stamped_path, sha256,
                 json.dumps(credentials, default=str), manifest))

    def methods(self) -> list[str]:
        """Watermark methods used by the stored stamps (what a verifier should try to decode)."""
        rows = self.db.execute("SELECT DISTINCT method FROM stamps WHERE method != 'none'").fetchall()
        return sorted(r[0] for r in rows)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM stamps").fetchone()[0]

    _COLS = "manifest_label, image_id, run, stamped_path, method, payload, credentials"

    def _match(self, row: tuple, how: str, distance: int) -> Match:
        label, image_id, run, path, method, payload, creds = row
        return Match(how, distance, label, image_id, run, path, method, payload, json.loads(creds))

    def by_sha256(self, sha256: str) -> Match | None:
        row = self.db.execute(f"SELECT {self._COLS} FROM stamps WHERE sha256 = ?", (sha256,)).fetchone()
        return self._match(row, "sha256", 0) if row else None

    def by_payload(self, method: str, payload: str, phash: int | None = None) -> Match | None:
        """The stamp carrying this payload; if random ids collided, the one whose pHash is nearest."""
        rows = self.db.execute(f"SELECT {self._COLS}, phash FROM stamps WHERE method = ? AND payload = ?",
                               (method, payload)).fetchall()
        if not rows:
            return None
        if phash is not None and len(rows) > 1:
            rows.sort(key=lambda r: _hamming(r[-1], phash))
        return self._match(rows[0][:-1], "watermark", 0)

    def by_phash(self, h: int, radius: int = PHASH_RADIUS) -> Match | None:
        """The stored image with the nearest pHash, if within ``radius`` bits."""
        rows = self.db.execute("SELECT phash, rowid FROM stamps").fetchall()
        if not rows:
            return None
        hashes = np.array([r[0] for r in rows], dtype=np.int64).view(np.uint64)
        x = np.bitwise_xor(hashes, np.uint64(h))
        dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        best = int(np.argmin(dist))
        if dist[best] > radius:
            return None
        row = self.db.execute(f"SELECT {self._COLS} FROM stamps WHERE rowid = ?", (rows[best][1],)).fetchone()
        return self._match(row, "phash", int(dist[best]))

    def records(self) -> Iterable[dict[str, Any]]:
        cur = self.db.execute("SELECT manifest_label, method, payload, image_id, run, stamped_path, sha256,"
                              " created FROM stamps ORDER BY created")
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row, strict=True))
