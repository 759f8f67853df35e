"""Exact Hamming search over an index, one segment at a time: memory is bounded by a segment, not the index.

An index's codes are split into *segments*: fixed ranges of ids, ``[j * S, (j + 1) * S)`` with
``S = SEGMENT_CODES``. Each segment has its own multi-index-hash tables (``index.MultiIndexHash``, built
for the segment's size) under ``mih/<j>/``, keyed on the index shards it covers. Because ids only grow
and shards never change, appending to an index leaves every full segment's tables valid: only the last,
partial segment and the new ones are built again. A search opens one segment's tables (memory-mapped),
searches every query in it, and lets it go before the next, so the peak memory of a search is about one
segment's tables and the query temporaries, whatever the index's size; the OS page cache keeps the tables
warm between searches when there is room. Fixed id ranges, not one table per index shard, because an
index built from 512-file units would otherwise carry millions of tiny tables, each probed per query.

Every segment answers exactly (multi-index hashing is exact, a flat scan is the reference), so the
concatenation of the segments' answers, sorted by (query, distance, id), is the answer of one search over
the whole index. ``audit.memorization.ray_engine.RaySearch`` gives the same segments to Ray actors that
keep their tables loaded and merges their answers the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit.memorization.index import (
    DEFAULT_RADIUS,
    MultiIndexHash,
    _cost,
    _widths,
    choose_m,
    flat_cost,
    flat_search,
    popcount,
)
from diffaudit.errors import ConfigError, InputError

SEGMENT_CODES = 1 << 24          # ids per segment: ~0.6 GB of tables (m = 3) and 134 MB of codes at most
FLAT_BELOW = 65536               # segments this small are scanned (their tables would cost more than a scan)
TOPK_CHUNK = 1 << 16             # codes scanned per step by top-k (keeps the (queries x chunk) block small)
TOPK_QUERIES = 64                # queries per step by top-k
ENGINES = ("local", "ray")
_ID_BITS = 57                    # top-k sort key: distance << 57 | id (ids below 2**57)
LAYOUT = {"format": "diffaudit-mih", "layout": "segments"}


@dataclass(frozen=True)
class Segment:
    """Ids ``[lo, hi)`` of an index and the slices of shard code files that hold them."""

    number: int
    lo: int
    hi: int
    parts: tuple[tuple[str, int, int], ...]   # (shard name, start, stop) within that shard's codes
    key: str                                  # what its tables are built from (see ``segments``)

    @property
    def count(self) -> int:
        return self.hi - self.lo


def segments(shards: list[dict[str, Any]], size: int | None = None) -> list[Segment]:
    """The segments of an index whose ``meta.json`` lists ``shards``: fixed id ranges of ``size`` codes."""
    size = int(size or SEGMENT_CODES)
    counts = [int(s["count"]) for s in shards]
    offsets = np.cumsum([0, *counts])
    total = int(offsets[-1])
    out = []
    for j, lo in enumerate(range(0, total, size)):
        hi = min(total, lo + size)
        first = int(np.searchsorted(offsets, lo, side="right") - 1)
        parts, covered = [], []
        for s in range(first, len(shards)):
            a, b = max(lo, int(offsets[s])), min(hi, int(offsets[s + 1]))
            if a >= hi:
                break
            if b > a:
                parts.append((shards[s]["name"], a - int(offsets[s]), b - int(offsets[s])))
                covered.append({k: shards[s][k] for k in ("name", "count", "unit")})
        text = json.dumps({"lo": lo, "hi": hi, "shards": covered}, sort_keys=True)
        out.append(Segment(j, lo, hi, tuple(parts), hashlib.sha1(text.encode()).hexdigest()))
    return out


def shard_codes(root: Path, name: str) -> np.ndarray:
    """A shard's codes, memory-mapped; a missing or damaged file is a one-line ``InputError`` that says how
    to see the whole damage, not a traceback from numpy."""
    path = root / "codes" / f"{name}.npy"
    try:
        codes = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"index {root}: codes/{path.name} of shard {name} is missing or unreadable ({first}); "
                         f"run `diffaudit index info --check {root}`") from None
    if codes.dtype != np.uint64 or codes.ndim != 1:
        raise InputError(f"index {root}: codes/{path.name} of shard {name} holds {codes.dtype} {codes.shape}, "
                         f"not 64-bit codes; run `diffaudit index info --check {root}`")
    return codes


def segment_codes(root: Path, seg: Segment) -> np.ndarray:
    """A segment's codes: the memory-mapped shard itself when one shard holds them, else a copy."""
    parts = [shard_codes(root, name)[a:b] for name, a, b in seg.parts]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _use_flat(n: int, radius: int, method: str) -> bool:
    if method == "flat":
        return True
    if method == "mih":
        return False
    return n <= FLAT_BELOW or _cost(n, choose_m(n), radius) >= flat_cost(n)


# -- one segment's tables ------------------------------------------------------------------------
def _tmp_name(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _clear_stale(folder: Path) -> None:
    """Remove temp folders that killed table builds on this host left for ``folder``."""
    prefix = f"{folder.name}.tmp-{socket.gethostname()}-"
    for p in folder.parent.glob(f"{folder.name}.tmp-*"):
        pid = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass


def _order(sub: np.ndarray) -> np.ndarray:
    """The stable order of bucket numbers (one sort of (bucket, position) pairs: unique keys)."""
    pairs = (sub.astype(np.uint64) << np.uint64(32)) | np.arange(len(sub), dtype=np.uint64)
    pairs.sort()
    return (pairs & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def build_tables(codes: np.ndarray, m: int, folder: Path, key: str) -> None:
    """Write the tables ``MultiIndexHash.build(codes, m)`` would hold into ``folder``, one at a time (peak
    memory: the codes plus one table), then replace ``folder`` atomically (readers may build at once)."""
    codes = np.asarray(codes, dtype=np.uint64)
    if len(codes) >= 2**32:
        raise ValueError("a segment holds fewer than 2**32 codes")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(folder)
    tmp = _tmp_name(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shift = 64
        for i, w in enumerate(_widths(m)):
            shift -= w
            sub = ((codes >> np.uint64(shift)) & np.uint64((1 << w) - 1)).astype(np.uint32)
            starts = np.zeros((1 << w) + 1, dtype=np.int64)
            np.cumsum(np.bincount(sub, minlength=1 << w), out=starts[1:])
            np.save(tmp / f"starts-{i}.npy", starts)
            del starts
            order = _order(sub)
            del sub
            np.save(tmp / f"perm-{i}.npy", order)
            np.save(tmp / f"codes-{i}.npy", codes[order])
            del order
        (tmp / "tables.json").write_text(json.dumps({"m": m, "n": len(codes), "key": key}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_tables(folder: Path, n: int, key: str) -> MultiIndexHash | None:
    try:
        return MultiIndexHash.load(folder, n, key)
    except (OSError, ValueError, KeyError):  # replaced under us by a concurrent build: build again
        return None


def _mark_layout(mih: Path) -> None:
    """Write ``mih/tables.json`` naming the segment layout; remove whole-index tables of older versions."""
    marker = mih / "tables.json"
    mih.mkdir(parents=True, exist_ok=True)
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        info = None
    if isinstance(info, dict) and info.get("layout") == LAYOUT["layout"]:
        return
    for old in mih.glob("*-*.npy"):  # starts-i / perm-i / codes-i of one whole-index table set
        old.unlink(missing_ok=True)
    tmp = _tmp_name(marker)
    tmp.write_text(json.dumps(LAYOUT))
    os.replace(tmp, marker)


class SegmentTables:
    """One segment, ready to search: its codes (memory-mapped) and, when needed, its MIH tables."""

    def __init__(self, root: Path, seg: Segment, *, save: bool = True):
        self.root, self.seg, self.save = Path(root), seg, save
        self._codes: np.ndarray | None = None
        self._mih: MultiIndexHash | None = None

    @property
    def folder(self) -> Path:
        return self.root / "mih" / f"{self.seg.number:06d}"

    @property
    def codes(self) -> np.ndarray:
        if self._codes is None:
            self._codes = segment_codes(self.root, self.seg)
        return self._codes

    def tables(self) -> MultiIndexHash:
        """The segment's tables: loaded memory-mapped, or built (and saved, unless the index is read-only)."""
        if self._mih is None:
            self._mih = _load_tables(self.folder, self.seg.count, self.seg.key)
        if self._mih is None:
            m = choose_m(self.seg.count)
            built = False
            if self.save:
                try:
                    _mark_layout(self.folder.parent)
                    build_tables(self.codes, m, self.folder, self.seg.key)
                    built = True
                except OSError:  # a read-only index still searches; it builds the tables again next time
                    pass
            self._mih = _load_tables(self.folder, self.seg.count, self.seg.key) if built else None
            if self._mih is None:
                self._mih = MultiIndexHash.build(np.asarray(self.codes), m, self.seg.key)
        return self._mih

    def has_tables(self) -> bool:
        return self._mih is not None or _load_tables(self.folder, self.seg.count, self.seg.key) is not None

    def warm(self) -> int:
        """Read every table page once (so that the first query does not fault them in); returns bytes."""
        total = 0
        for t in self.tables().tables:
            for arr in t.values():
                a = np.asarray(arr)
                total += a.nbytes
                if a.size:
                    a.view(np.uint8)[:: 4096].sum()
        return total

    def nbytes(self) -> int:
        """Bytes of the tables (or of the codes, for a segment searched by scanning)."""
        if self._mih is None:
            return self.codes.nbytes
        return sum(np.asarray(a).nbytes for t in self._mih.tables for a in t.values())

    def search(self, queries: np.ndarray, radius: int, method: str = "auto") -> tuple[np.ndarray, ...]:
        """(query index, global id, distance) of every code of this segment within ``radius``."""
        if _use_flat(self.seg.count, radius, method):
            qi, ids, d = flat_search(np.asarray(self.codes), queries, radius)
        else:
            qi, ids, d = self.tables().search(queries, radius)
        return qi, ids + self.seg.lo, d

    def topk_keys(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` smallest (distance, id) keys of each query over this segment: (n_queries, <= k)."""
        return topk_keys(((self.seg.lo, self.codes),), queries, k)


# -- top-k by scanning ---------------------------------------------------------------------------
def _keep_smallest(keys: np.ndarray, k: int) -> np.ndarray:
    if keys.shape[1] > k:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    return keys


def topk_keys(chunks, queries: np.ndarray, k: int) -> np.ndarray:
    """Sort keys ``distance << 57 | id`` of the ``k`` nearest codes per query over ``(first id, codes)``
    chunks, each row sorted. Keys are unique, so ties at the k-th distance go to the smallest ids."""
    queries = np.asarray(queries, dtype=np.uint64)
    best = np.empty((len(queries), 0), np.uint64)
    if k <= 0:
        return best
    for lo, codes in chunks:
        for a in range(0, len(codes), TOPK_CHUNK):
            block = np.asarray(codes[a:a + TOPK_CHUNK])
            ids = np.arange(lo + a, lo + a + len(block), dtype=np.uint64)
            parts = []
            for q in range(0, len(queries), TOPK_QUERIES):
                d = popcount(block[None, :] ^ queries[q:q + TOPK_QUERIES, None]).astype(np.uint64)
                parts.append(_keep_smallest((d << np.uint64(_ID_BITS)) | ids[None, :], k))
            new = np.concatenate(parts) if parts else np.empty((0, 0), np.uint64)
            best = _keep_smallest(np.concatenate([best, new], axis=1), k)
    best.sort(axis=1)
    return best


def merge_topk(keys: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, distances), each (n_queries, k), from per-part top-k keys."""
    keys = [x for x in keys if x.size] or [np.empty((0 if not keys else len(keys[0]), 0), np.uint64)]
    best = _keep_smallest(np.concatenate(keys, axis=1), k)
    best.sort(axis=1)
    ids = (best & np.uint64((1 << _ID_BITS) - 1)).astype(np.int64)
    return ids, (best >> np.uint64(_ID_BITS)).astype(np.int64)


def merge_found(found: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate segments' answers (disjoint ids) and sort by query, distance, id."""
    found = [f for f in found if len(f[0])]
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    qi, ids, d = (np.concatenate(x).astype(np.int64) for x in zip(*found, strict=True))
    order = np.lexsort((ids, d, qi))
    return qi[order], ids[order], d[order]


# -- the local engine ----------------------------------------------------------------------------
class LocalSearch:
    """Search an index folder segment by segment in this process (one segment's tables open at a time)."""

    def __init__(self, root: str | os.PathLike, shards: list[dict[str, Any]], *, segment_codes: int | None = None,
                 save: bool = True):
        self.root, self.save = Path(root), save
        self.segments = segments(shards, segment_codes)
        self.count = self.segments[-1].hi if self.segments else 0

    def _open(self) -> Iterator[SegmentTables]:
        for seg in self.segments:
            yield SegmentTables(self.root, seg, save=self.save)

    def prepare(self, radius: int = DEFAULT_RADIUS, progress: bool = False) -> dict[str, Any]:
        """Build (and save) every segment's tables that a search at ``radius`` will use; returns counts."""
        todo = [st for st in self._open() if not _use_flat(st.seg.count, radius, "auto")]
        built = 0
        bar = todo
        if progress:
            from tqdm import tqdm

            bar = tqdm(todo, unit="segment", desc="search tables")
        for st in bar:
            if not st.has_tables():
                st.tables()
                built += 1
        return {"segments": len(self.segments), "with_tables": len(todo), "built": built}

    def search(self, queries: np.ndarray, radius: int = DEFAULT_RADIUS,
               method: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.uint64).ravel()
        return merge_found([st.search(queries, radius, method) for st in self._open()])

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.uint64).ravel()
        k = min(k, self.count)
        return merge_topk([topk_keys(self._chunks(), queries, k)], k)

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, memory-mapped codes) of every shard slice, in id order (no copy)."""
        for seg in self.segments:
            lo = seg.lo
            for name, a, b in seg.parts:
                yield lo, shard_codes(self.root, name)[a:b]
                lo += b - a


# -- choosing the engine -------------------------------------------------------------------------
_CHOSEN: dict[str, str | None] = {}


def use_engine(engine: str | None, address: str | None = None) -> None:
    """Make ``engine`` ('local' or 'ray', at ``address``) the default of ``Index.search``/``topk`` in this
    process (the CLI's ``--engine``, ``--ray-address``); ``None`` leaves each to the environment."""
    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"unknown search engine {engine!r}; choose from {', '.join(ENGINES)}")
    _CHOSEN.clear()
    _CHOSEN.update(engine=engine, address=address)


def chosen_engine(engine: str | None = None) -> tuple[str, str | None]:
    """(engine, Ray address): ``engine`` if given, else ``use_engine``'s, else the environment's
    (``DIFFAUDIT_SEARCH_ENGINE``, ``DIFFAUDIT_RAY_ADDRESS``), else local."""
    address = _CHOSEN.get("address") or os.environ.get("DIFFAUDIT_RAY_ADDRESS") or None
    name = engine or _CHOSEN.get("engine") or os.environ.get("DIFFAUDIT_SEARCH_ENGINE") or "local"
    if name not in ENGINES:
        raise ConfigError(f"unknown search engine {name!r}; choose from {', '.join(ENGINES)}")
    return name, address


def searcher(root: Path, shards: list[dict[str, Any]], engine: str | None = None):
    """The engine that searches this index: a ``LocalSearch``, or the process's ``RaySearch`` for it."""
    name, address = chosen_engine(engine)
    if name == "ray":
        from audit.memorization.ray_engine import RaySearch

        return RaySearch.get(root, shards, address=address)
    return LocalSearch(root, shards)
