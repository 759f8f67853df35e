"""An on-disk index of 64-bit training-image hashes with exact Hamming search.

Layout of an index folder (grows by appending shards; each shard is written before ``meta.json``
names it, so a crash never leaves a half-indexed shard, and a rerun skips the units already done)::

    meta.json                 format, version, hash name, count, shards (name, count, unit id), counts
    codes/<shard>.npy         uint64 codes, loaded memory-mapped
    idents/<shard>.npy        sorted 64-bit hashes of each item's identity (source, member, variant), so that
                              a rebuild over the same sources plus new files adds only the new images
    items/<shard>.parquet     key, uri, caption, source, member, offset, size, variant (row i <-> code i)
    mih/                      search tables (a cache rebuilt when the count changes)

Search is exact: multi-index hashing (Norouzi et al., "Fast Search in Hamming Space with Multi-Index
Hashing", CVPR 2012) splits the 64 bits into m substrings; by the generalized pigeonhole principle a code
within radius r has at least one substring within r // m (the first r % m + 1 substrings within r // m,
the others within r // m - 1). Candidates come from enumerating those substring neighbourhoods in
dense bucket tables and are verified by popcount, so recall equals a flat scan's. When a flat
``np.bitwise_count`` scan is cheaper (small indexes, large radii) it is used instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from contextlib import AbstractContextManager
from functools import cached_property, lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from diffaudit.errors import InputError
from diffaudit.runs import atomic_write_bytes, atomic_write_text, folder_lock, now, only_lock

FORMAT = "diffaudit-index"
VERSION = 1
DEFAULT_RADIUS = 10
ITEMS = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("source", pa.string()),          # file holding the image: the image itself or its tar shard
    pa.field("member", pa.string()),          # tar member name (metadata only, never used as a path)
    pa.field("offset", pa.int64()),           # data offset inside an uncompressed tar
    pa.field("size", pa.int64()),
    pa.field("variant", pa.string()),         # full | square (the centred square crop of a wide/tall image)
])
REQUIRED_META = frozenset({"hash", "count", "shards"})
REQUIRED_SHARD = frozenset({"name", "count", "unit"})
MAX_WIDTH = 24                                # widest substring table: 2**24 buckets
CHUNK_CANDIDATES = 1 << 18                    # candidates verified per step (keeps temporaries in cache)


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


# -- multi-index hashing -------------------------------------------------------------------------
def _widths(m: int) -> list[int]:
    return [64 // m + (1 if i < 64 % m else 0) for i in range(m)]


def _radii(r: int, m: int) -> list[int]:
    """Per-substring search radius from the generalized pigeonhole principle (-1: skip the table)."""
    base, extra = divmod(r, m)
    return [base if i <= extra else base - 1 for i in range(m)]


def _n_masks(width: int, radius: int) -> int:
    return sum(math.comb(width, j) for j in range(radius + 1))


@lru_cache(maxsize=64)
def _masks(width: int, radius: int) -> np.ndarray:
    out = [0]
    for j in range(1, radius + 1):
        out += [sum(1 << b for b in c) for c in combinations(range(width), j)]
    return np.asarray(out, dtype=np.uint64)


def _cost(n: int, m: int, r: int) -> float:
    """Rough relative cost of one query (ns): 20 per bucket probe, 8 per candidate."""
    cost = 0.0
    for w, rad in zip(_widths(m), _radii(r, m), strict=True):
        if rad >= 0:
            k = _n_masks(w, rad)
            cost += k * (20 + 8 * n / 2.0 ** w)
    return cost


def flat_cost(n: int) -> float:
    return 1.5 * n


def choose_m(n: int, r: int = DEFAULT_RADIUS) -> int:
    """The number of substrings that minimises the estimated query cost at radius ``r``."""
    lo = math.ceil(64 / MAX_WIDTH)
    return min(range(lo, 17), key=lambda m: _cost(n, m, r))


class MultiIndexHash:
    """Bucket tables over m substrings of the codes; ``search`` is exact for any radius."""

    def __init__(self, tables: list[dict[str, np.ndarray]], m: int, n: int, key: str = ""):
        self.tables, self.m, self.n, self.key = tables, m, n, key

    @classmethod
    def build(cls, codes: np.ndarray, m: int, key: str = "") -> MultiIndexHash:
        """Tables for ``codes``; ``key`` names what they were built from (``load`` rejects another key)."""
        codes = np.asarray(codes, dtype=np.uint64)
        tables, shift = [], 64
        for w in _widths(m):
            shift -= w
            sub = ((codes >> np.uint64(shift)) & np.uint64((1 << w) - 1)).astype(np.int64)
            order = np.argsort(sub, kind="stable")
            starts = np.zeros((1 << w) + 1, dtype=np.int64)
            np.cumsum(np.bincount(sub, minlength=1 << w), out=starts[1:])
            tables.append({"starts": starts, "perm": order.astype(np.uint32 if len(codes) < 2**32 else np.int64),
                           "codes": codes[order]})
        return cls(tables, m, len(codes), key)

    def save(self, folder: Path) -> None:
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")  # concurrent readers may build at once
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, t in enumerate(self.tables):
            for name, arr in t.items():
                np.save(tmp / f"{name}-{i}.npy", arr)
        (tmp / "tables.json").write_text(json.dumps({"m": self.m, "n": self.n, "key": self.key}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: Path, n: int, key: str = "") -> MultiIndexHash | None:
        try:
            info = json.loads((folder / "tables.json").read_text())
        except (OSError, ValueError):
            return None
        if info.get("n") != n or info.get("key", "") != key:
            return None
        m = int(info["m"])
        tables = [{name: np.load(folder / f"{name}-{i}.npy", mmap_mode="r") for name in ("starts", "perm", "codes")}
                  for i in range(m)]
        return cls(tables, m, n, key)

    def search(self, queries: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (query index, id, distance) with distance <= r, sorted by query then distance then id."""
        queries = np.asarray(queries, dtype=np.uint64)
        per_query = sum(_n_masks(w, rad) * (1 + self.n / 2.0 ** w)
                        for w, rad in zip(_widths(self.m), _radii(r, self.m), strict=True) if rad >= 0)
        step = max(1, int(CHUNK_CANDIDATES // max(per_query, 1)))
        found = [self._search(queries[i:i + step], r, i) for i in range(0, len(queries), step)]
        qi, ids, d = (np.concatenate(x) for x in zip(*found, strict=True)) if found else (np.empty(0),) * 3
        return _dedupe(qi, ids, d, self.n)

    def _search(self, queries: np.ndarray, r: int, base: int):
        shift = 64
        qs, ids, ds = [], [], []
        idx = np.int32 if self.n < 2**31 else np.int64
        for w, rad, t in zip(_widths(self.m), _radii(r, self.m), self.tables, strict=True):
            shift -= w
            if rad < 0:
                continue
            qsub = (queries >> np.uint64(shift)) & np.uint64((1 << w) - 1)
            buckets = (qsub[:, None] ^ _masks(w, rad)[None, :]).astype(np.int64).ravel()
            starts = t["starts"]
            lo = starts[buckets]
            ln = (starts[buckets + 1] - lo).astype(idx)
            keep = np.flatnonzero(ln)
            lo, ln = lo[keep].astype(idx), ln[keep]
            total = int(ln.sum())
            if not total:
                continue
            qidx = (keep // (len(buckets) // len(queries))).astype(idx)
            pos = np.repeat(lo - (np.cumsum(ln) - ln), ln)
            pos += np.arange(total, dtype=idx)
            dist = popcount(np.asarray(t["codes"])[pos] ^ np.repeat(queries[qidx], ln))
            hit = np.flatnonzero(dist <= r)
            qs.append(np.repeat(qidx, ln)[hit].astype(np.int64) + base)
            ids.append(np.asarray(t["perm"])[pos[hit]].astype(np.int64))
            ds.append(dist[hit])
        if not qs:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
        return np.concatenate(qs), np.concatenate(ids), np.concatenate(ds)


def _dedupe(qi: np.ndarray, ids: np.ndarray, d: np.ndarray, n: int):
    qi, ids, d = qi.astype(np.int64), ids.astype(np.int64), d.astype(np.int64)
    if len(qi):
        _, first = np.unique(qi * max(n, 1) + ids, return_index=True)
        qi, ids, d = qi[first], ids[first], d[first]
    order = np.lexsort((ids, d, qi))
    return qi[order], ids[order], d[order]


def flat_search(codes: np.ndarray, queries: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact radius search by scanning every code (the reference MIH is checked against)."""
    qs, ids, ds = [], [], []
    for i, q in enumerate(np.asarray(queries, dtype=np.uint64)):
        d = popcount(codes ^ q)
        hit = np.flatnonzero(d <= r)
        qs.append(np.full(len(hit), i, np.int64))
        ids.append(hit)
        ds.append(d[hit])
    if not qs:
        return (np.empty(0, np.int64),) * 3
    return _dedupe(np.concatenate(qs), np.concatenate(ids), np.concatenate(ds), len(codes))


# -- item identity -------------------------------------------------------------------------------
def identity(where: str, member: str | None, variant: str) -> int:
    """A 64-bit hash of an indexed image's identity: the file holding it, its tar member, its variant."""
    text = f"{where}\0{member or ''}\0{variant}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def identities(items: pd.DataFrame, origin: str = "") -> np.ndarray:
    """Identity hashes of item rows: by ``source``, else ``uri``, else ``origin#key`` (a hash parquet row)."""
    return np.fromiter((identity(_str(src) or _str(uri) or f"{origin}#{key}", _str(member) or None, _str(var))
                        for src, uri, key, member, var in zip(items["source"], items["uri"], items["key"],
                                                              items["member"], items["variant"], strict=True)),
                       dtype=np.uint64, count=len(items))


class _Seen:
    """A set of uint64 held as a few sorted runs; a run merges into the one before it when that one is not
    larger, so each hash is merged O(log n) times and a lookup is a binary search per run."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __contains__(self, h: int) -> bool:
        return bool(self.contains(np.asarray([h], np.uint64))[0])

    def contains(self, h: np.ndarray) -> np.ndarray:
        found = np.zeros(len(h), bool)
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, h), len(run) - 1)
            found |= run[pos] == h
        return found

    def add(self, h: np.ndarray) -> None:
        run = np.unique(np.asarray(h, np.uint64))
        while self.runs and len(self.runs[-1]) <= len(run):
            run = np.sort(np.concatenate([self.runs.pop(), run]), kind="stable")  # merges two sorted runs
        if len(run):
            self.runs.append(run)


# -- the index folder ----------------------------------------------------------------------------
class Index:
    """An index folder: ``Index.create`` to start or extend one, ``Index.open`` to read one."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root, self.meta = root, meta

    @classmethod
    def open(cls, path: str | os.PathLike) -> Index:
        root = Path(path)
        meta_file = root / "meta.json"
        if not meta_file.is_file():
            raise InputError(f"no index at {root} (no meta.json); build one with `diffaudit index build`")
        try:
            stamp = _file_stamp(meta_file)
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{meta_file} is unreadable ({e}); rebuild the index") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"{root} is not a diffaudit index; build one with `diffaudit index build`")
        if meta.get("version") != VERSION:
            raise InputError(f"index {root} has version {meta.get('version')}, this diffaudit reads version "
                             f"{VERSION}; rebuild it with `diffaudit index build`")
        missing = sorted(REQUIRED_META - set(meta))
        shards = meta.get("shards")
        if not missing and (not isinstance(shards, list)
                            or not all(isinstance(s, dict) and REQUIRED_SHARD <= set(s) for s in shards)):
            missing = [f"shards[].{k}" for k in sorted(REQUIRED_SHARD)]
        if missing:
            raise InputError(f"{meta_file} lacks {', '.join(missing)}; the index is damaged, rebuild it with "
                             "`diffaudit index build`")
        idx = cls(root.resolve(), meta)
        idx._meta_stat = stamp
        return idx

    @classmethod
    def check_can_create(cls, path: str | os.PathLike, hash_name: str) -> Index | None:
        """The index at ``path`` if it can be extended with ``hash_name`` codes, None if one can be started
        there; ``InputError`` otherwise. Writes nothing."""
        root = Path(path)
        if (root / "meta.json").exists():
            idx = cls.open(root)
            if idx.hash_name != hash_name:
                raise InputError(f"index {root} holds {idx.hash_name} codes, not {hash_name}; "
                                 "use another --out or the same --hash")
            return idx
        if root.exists() and (not root.is_dir() or not only_lock(root)):
            raise InputError(f"{root} exists and is not a diffaudit index; choose another --out")
        return None

    @classmethod
    def create(cls, path: str | os.PathLike, hash_name: str) -> Index:
        """Open ``path`` to append to it (same hash required) or start a new index there (under its lock)."""
        root = Path(path)
        if cls.check_can_create(root, hash_name) is not None:
            return cls.open(root)
        from audit.memorization.hashing import get_hasher

        hasher = get_hasher(hash_name)
        root.mkdir(parents=True, exist_ok=True)
        with folder_lock(root, "index"):
            if cls.check_can_create(root, hash_name) is not None:  # another writer made it meanwhile
                return cls.open(root)
            meta = {"format": FORMAT, "version": VERSION, "hash": hash_name, "hash_version": hasher.version,
                    "bits": 64, "count": 0, "created": now(), "updated": now(), "shards": [], "counts": {}}
            idx = cls(root.resolve(), meta)
            idx._write_meta()
            return idx

    def lock(self) -> AbstractContextManager[None]:
        """The index's write lock (``diffaudit.runs.folder_lock``, the run lock's mechanism): a second writer
        is refused with a one-line error naming the holder, and a killed writer's lock goes with it."""
        return folder_lock(self.root, "index")

    def _write_meta(self) -> None:
        atomic_write_text(self.root / "meta.json", json.dumps(self.meta, indent=2) + "\n")
        self._meta_stat = _file_stamp(self.root / "meta.json")

    def _check_unchanged(self) -> None:
        """Refuse to append on top of a meta.json that another writer replaced since this one read it (its
        shard names would collide with theirs)."""
        if getattr(self, "_meta_stat", None) != _file_stamp(self.root / "meta.json"):
            raise InputError(f"index {self.root} was changed by another writer since it was opened; open it again "
                             "(and run `diffaudit index info --check` on it)")

    # -- properties ---------------------------------------------------------------------------
    @property
    def hash_name(self) -> str:
        return self.meta["hash"]

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def units_done(self) -> set[str]:
        return {s["unit"] for s in self.meta["shards"]}

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.cumsum([0] + [s["count"] for s in self.meta["shards"]])

    @cached_property
    def codes(self) -> np.ndarray:
        """All codes in id order: the memory-mapped shard itself when there is one, else a concatenation."""
        parts = [np.load(self.root / "codes" / f"{s['name']}.npy", mmap_mode="r") for s in self.meta["shards"]]
        if not parts:
            return np.empty(0, np.uint64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- growing ------------------------------------------------------------------------------
    @cached_property
    def _seen(self) -> _Seen:
        """Identities of every indexed item (from ``idents/``; recomputed from the items of older shards)."""
        seen = _Seen()
        for s in self.meta["shards"]:
            path = self.root / "idents" / f"{s['name']}.npy"
            seen.add(np.load(path) if path.is_file()
                     else identities(pq.read_table(self.root / "items" / f"{s['name']}.parquet").to_pandas()))
        return seen

    def indexed(self, idents: np.ndarray) -> np.ndarray:
        """Which identity hashes (``identity``) the index already holds."""
        return self._seen.contains(np.asarray(idents, np.uint64))

    def append(self, codes: np.ndarray, items: pd.DataFrame, *, unit: str, counts: dict[str, int],
               origin: str = "") -> dict[str, int]:
        """``_append`` under the index's lock, on top of the meta.json this object read or wrote last."""
        with self.lock():
            self._check_unchanged()
            return self._append(codes, items, unit=unit, counts=counts, origin=origin)

    def _append(self, codes: np.ndarray, items: pd.DataFrame, *, unit: str, counts: dict[str, int],
                origin: str = "") -> dict[str, int]:
        """Add one unit's codes and items as a new shard, then record it in meta.json.

        Items already indexed (same source, member and variant; see ``identities``, where ``origin`` names
        a hash parquet) are left out, so a rebuild over grown sources adds only the new images. Returns
        ``counts`` with those moved from indexed/square_crops to skipped_already_indexed."""
        if len(codes) != len(items):
            raise ValueError("codes and items differ in length")
        idents = identities(items, origin)
        _, first = np.unique(idents, return_index=True)
        keep = np.zeros(len(idents), bool)
        keep[first] = True
        keep &= ~self.indexed(idents)
        if not keep.all():
            dropped = items["variant"].to_numpy()[~keep]
            square = int((dropped == "square").sum())
            counts = dict(Counter(counts) + Counter(skipped_already_indexed=len(dropped)))
            counts["indexed"] = counts.get("indexed", 0) - (len(dropped) - square)
            counts["square_crops"] = counts.get("square_crops", 0) - square
            counts = {k: v for k, v in counts.items() if v}
            codes, items, idents = np.asarray(codes)[keep], items[keep], idents[keep]
        name = f"{len(self.meta['shards']):06d}"
        if len(codes):
            atomic_write_bytes(self.root / "idents" / f"{name}.npy", _npy_bytes(np.unique(idents)))
            buf = _npy_bytes(np.asarray(codes, dtype=np.uint64))
            atomic_write_bytes(self.root / "codes" / f"{name}.npy", buf)
            table = pa.Table.from_pandas(items[ITEMS.names].reset_index(drop=True), schema=ITEMS, preserve_index=False)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            atomic_write_bytes(self.root / "items" / f"{name}.parquet", sink.getvalue().to_pybytes())
            self.meta["shards"].append({"name": name, "count": len(codes), "unit": unit})
        else:  # a unit with no usable image is still done; record it without files
            self.meta.setdefault("empty_units", []).append(unit)
        self.meta["count"] = self.count + len(codes)
        total = Counter(self.meta.get("counts", {}))
        total.update(counts)
        self.meta["counts"] = dict(sorted(total.items()))
        self.meta["updated"] = now()
        self._write_meta()
        self._seen.add(idents)
        for attr in ("codes", "offsets", "_mih"):
            self.__dict__.pop(attr, None)
        return counts

    def is_done(self, unit: str) -> bool:
        return unit in self.units_done or unit in self.meta.get("empty_units", [])

    # -- reading ------------------------------------------------------------------------------
    def items(self, ids: np.ndarray) -> pd.DataFrame:
        """The item rows (``ITEMS`` columns plus ``id``) of global ids, in order."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError("id out of range")
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        rows = [None] * len(ids)
        for s in np.unique(shard_of):
            info = self.meta["shards"][s]
            table = pq.read_table(self.root / "items" / f"{info['name']}.parquet")
            where = np.flatnonzero(shard_of == s)
            part = table.take(pa.array(ids[where] - self.offsets[s])).to_pylist()
            for i, row in zip(where, part, strict=True):
                rows[i] = row
        return pd.DataFrame(rows, columns=ITEMS.names).assign(id=ids)

    @cached_property
    def _mih(self) -> MultiIndexHash:
        cache = self.root / "mih"
        key = hashlib.sha1(json.dumps(self.meta["shards"], sort_keys=True).encode()).hexdigest()
        mih = MultiIndexHash.load(cache, self.count, key)
        if mih is None:
            mih = MultiIndexHash.build(np.asarray(self.codes), choose_m(self.count), key)
            try:
                mih.save(cache)
            except OSError:  # a read-only index still searches, it just rebuilds the tables next time
                pass
        return mih

    def search(self, queries: np.ndarray, radius: int = DEFAULT_RADIUS,
               *, method: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact radius search: (query index, id, hamming) for every code within ``radius``."""
        if not 0 <= radius <= 64:
            raise InputError(f"radius {radius} must be between 0 and 64")
        queries = np.asarray(queries, dtype=np.uint64).ravel()
        if method == "auto":
            mih_cost = _cost(self.count, choose_m(self.count), radius)
            method = "mih" if self.count > 65536 and mih_cost < flat_cost(self.count) else "flat"
        if method == "flat":
            return flat_search(np.asarray(self.codes), queries, radius)
        return self._mih.search(queries, radius)

    def topk(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query by a flat scan: (ids, distances), each (n_queries, k)."""
        codes = np.asarray(self.codes)
        k = min(k, len(codes))
        ids = np.zeros((len(queries), k), np.int64)
        dists = np.zeros((len(queries), k), np.int64)
        for i, q in enumerate(np.asarray(queries, dtype=np.uint64)):
            d = popcount(codes ^ q)
            part = np.argpartition(d, k - 1)[:k] if k < len(d) else np.arange(len(d))
            order = part[np.lexsort((part, d[part]))]
            ids[i], dists[i] = order, d[order]
        return ids, dists

    def info(self) -> dict[str, Any]:
        """Summary for ``diffaudit index info``."""
        size = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
        return {"path": str(self.root), "hash": self.hash_name, "version": self.meta["version"],
                "count": self.count, "shards": len(self.meta["shards"]), "bytes_on_disk": size,
                "created": self.meta.get("created"), "updated": self.meta.get("updated"),
                "counts": self.meta.get("counts", {})}


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of a file: an atomic replace changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
