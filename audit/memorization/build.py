"""Build (or extend) an index from sources: plan units, hash each unit in a worker, append shards in order.

Engines: ``local`` runs units on a process pool (all cores); ``ray`` maps the same ``hash_unit`` over a
Ray Dataset (a local Ray or ``--ray-address``). Results are appended in unit order, so both engines
write the same index. A build can be interrupted: finished units are shards already, a rerun skips them.
Images already indexed (same file or tar member, same variant) are never added twice, so rebuilding over
grown sources adds only the new images; indexed image files are not even read again.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from audit.memorization.hashing import BATCH, from_hex, get_hasher
from audit.memorization.index import ITEMS, Index, identity
from audit.memorization.sources import Record, Unit, iter_files, iter_tar, plan, read_hash_schema
from diffaudit.errors import ConfigError, InputError
from diffaudit.runs import LOCK_FILE, reserve

ENGINES = ("local", "ray")


def _hashes_unit(unit: Unit, hash_name: str, counts: Counter) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Read a parquet of precomputed hashes: ``key`` plus a ``<hash_name>``, ``hash`` or ``code`` column."""
    read_hash_schema(unit.path)
    try:
        table = pq.read_table(unit.path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{unit.path} is not a readable parquet file of hashes ({str(e).splitlines()[0]})") \
            from None
    cols = table.column_names
    col = next((c for c in (hash_name, "hash", "code") if c in cols), None)
    if "key" not in cols or col is None:
        raise InputError(f"{unit.path}: a hash parquet needs a 'key' column and a '{hash_name}', 'hash' or "
                         f"'code' column (16-digit hex or integer); it has {cols}")
    codes, rows = [], []
    values = table.column(col).to_pylist()
    uris = table.column("uri").to_pylist() if "uri" in cols else [None] * len(values)
    caps = table.column("caption").to_pylist() if "caption" in cols else [None] * len(values)
    for key, value, uri, cap in zip(table.column("key").to_pylist(), values, uris, caps, strict=True):
        counts["seen"] += 1
        try:
            code = from_hex(value) if isinstance(value, str) else int(value) & ((1 << 64) - 1)
        except (TypeError, ValueError):
            counts["skipped_bad_hash"] += 1
            continue
        codes.append(code)
        rows.append({"key": str(key), "uri": uri, "caption": cap, "source": uri if uri and os.path.isfile(uri)
                     else None, "member": None, "offset": None, "size": None, "variant": "full"})
    return np.asarray(codes, dtype=np.uint64), rows


def hash_unit(unit: Unit, hash_name: str, exact: bool = False,
              square: bool = True) -> tuple[np.ndarray, list[dict[str, Any]], dict]:
    """Read and hash one unit: (codes, item rows, counts). Runs in a worker process or a Ray task.

    With ``square``, wide and tall images get a second code for their centred square crop."""
    counts: Counter = Counter()
    if unit.kind == "hashes":
        codes, rows = _hashes_unit(unit, hash_name, counts)
        counts["indexed"] += len(rows)
        return codes, rows, dict(counts)
    hasher = get_hasher(hash_name)
    records = iter_files(unit, counts) if unit.kind == "files" else iter_tar(unit.path, unit.meta, counts)
    codes, rows = [], []

    def flush(batch: list[Record]) -> None:
        reduced, owners, variants, reasons = hasher.reduce_many([r.data for r in batch], exact=exact,
                                                                square=square)
        for reason in reasons:
            if reason:
                counts[f"skipped_{reason}"] += 1
        codes.append(hasher.pack(reduced))
        for i, variant in zip(owners, variants, strict=True):
            r = batch[i]
            rows.append({"key": r.key, "uri": r.uri, "caption": r.caption, "source": r.source,
                         "member": r.member, "offset": r.offset, "size": r.size, "variant": variant})
        counts["indexed"] += len(reasons) - sum(map(bool, reasons))
        counts["square_crops"] += variants.count("square")

    batch: list[Record] = []
    for rec in records:
        batch.append(rec)
        if len(batch) == BATCH:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    out = np.concatenate(codes) if codes else np.empty(0, np.uint64)
    return out, rows, dict(counts)


def _unindexed(index: Index, units: list[Unit]) -> tuple[list[Unit], Counter]:
    """The units with the image files the index already holds left out (they are not read again), and the
    count of files left out. Tar shards are read whole; ``Index.append`` drops their indexed members."""
    counts: Counter = Counter()
    out = []
    for u in units:
        if u.kind == "files" and index.count:
            done = index.indexed(np.fromiter((identity(f, None, "full") for f in u.files), np.uint64,
                                             count=len(u.files)))
            if done.any():
                counts["skipped_already_indexed"] += int(done.sum())
                u = replace(u, files=tuple(f for f, d in zip(u.files, done, strict=True) if not d))
        out.append(u)
    return out, counts


def _local(units: list[Unit], hash_name: str, exact: bool, square: bool, workers: int) -> Iterator[tuple]:
    if workers <= 1 or len(units) == 1:
        for u in units:
            yield hash_unit(u, hash_name, exact, square)
        return
    from concurrent.futures import ProcessPoolExecutor

    n = len(units)
    pool = ProcessPoolExecutor(workers)
    try:
        yield from pool.map(hash_unit, units, [hash_name] * n, [exact] * n, [square] * n)
    finally:  # on Ctrl-C, drop the queued units instead of finishing them all
        pool.shutdown(wait=True, cancel_futures=True)


def build_index(sources: list[str], out: str, *, hash_name: str = "phash", engine: str = "local",
                workers: int | None = None, exact: bool = False, square: bool = True,
                ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Index the training images of ``sources`` into the folder ``out`` (created or extended).

    ``exact`` decodes JPEGs in full (codes bit-identical to imagehash); ``square`` adds the centred square
    crop of wide/tall images as a second code (a memorized generation reproduces the training crop).
    Returns a summary: path, hash, count, units done/skipped, per-reason counts of this build, seconds.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    get_hasher(hash_name)  # unknown names fail before any work
    t0 = time.perf_counter()
    units = plan(list(sources))  # every source is checked before the index folder is touched
    Index.check_can_create(out, hash_name)
    with reserve(out, "index"):  # one writer at a time: a second build is refused, not interleaved
        fresh = not os.path.exists(os.path.join(out, "meta.json"))
        index = Index.create(out, hash_name)
        try:
            return _build(index, units, sources, hash_name, engine, workers, exact, square, ray_address,
                          progress, t0)
        except BaseException:
            if fresh and index.count == 0:  # nothing indexed: leave no empty index behind
                _discard(index.root)
            raise


def _discard(root: str | os.PathLike) -> None:
    """Remove what a fresh build wrote (everything but the lock, which ``reserve`` removes with the folder)."""
    for p in Path(root).iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _build(index: Index, units: list[Unit], sources: list[str], hash_name: str, engine: str, workers: int | None,
           exact: bool, square: bool, ray_address: str | None, progress: bool, t0: float) -> dict[str, Any]:
    todo = [u for u in units if not index.is_done(u.uid)]
    work, counts = _unindexed(index, todo)
    workers = workers or os.cpu_count() or 1
    if engine == "ray":
        from audit.memorization.ray_engine import ray_hash_units

        results: Iterable[tuple] = ray_hash_units(work, hash_name, exact, square, address=ray_address)
    else:
        results = _local(work, hash_name, exact, square, workers)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(todo), unit="unit", desc=f"index {hash_name}")
    for unit, (codes, rows, c) in zip(todo, results, strict=True):
        counts.update(index.append(codes, pd.DataFrame(rows, columns=ITEMS.names), unit=unit.uid, counts=c,
                                   origin=unit.path))
    if index.count == 0:
        raise InputError(f"no usable images in {', '.join(sources)} "
                         f"({', '.join(f'{k}={v}' for k, v in sorted(counts.items())) or 'nothing read'})")
    return {"path": str(index.root), "hash": hash_name, "engine": engine, "count": index.count,
            "units": len(units), "units_skipped": len(units) - len(todo), "counts": dict(sorted(counts.items())),
            "seconds": round(time.perf_counter() - t0, 3)}
