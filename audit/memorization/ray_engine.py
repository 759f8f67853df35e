"""The Ray engine: building maps ``hash_unit`` over a Ray Dataset of units; searching gives an index's
segments to Ray actors that keep their tables loaded.

Ray runs locally by default (``ray.init`` with this machine's CPUs) or joins a cluster at ``address``
(``ray://head:10001`` or ``auto``). Building: the index is written by the driver, in unit order, so a Ray
build equals a local one; results travel pickled (codes, item rows, counts are small next to the images).
Searching (``RaySearch``): each actor opens its segments of the index folder (which every node must see at
the same path, e.g. a shared file system), builds the tables that are missing (in parallel, one segment at
a time per actor), keeps them memory-mapped and warm, and answers each batch of queries for its segments;
the driver merges the answers as ``search.LocalSearch`` does, so the result equals a local search.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from audit.memorization.sources import Unit
from diffaudit import ray_cluster
from diffaudit.errors import ConfigError


def _ray(data: bool = False):
    return ray_cluster.ray_module(data)  # how every stage connects to Ray: diffaudit.ray_cluster


def _task(row: dict[str, Any]) -> dict[str, Any]:
    from audit.memorization.build import hash_unit

    unit = pickle.loads(row["unit"])
    return {"i": row["i"], "result": pickle.dumps(hash_unit(unit, row["hash_name"], row["exact"], row["square"]))}


def ray_hash_units(units: list[Unit], hash_name: str, exact: bool, square: bool, *, address: str | None = None,
                   num_cpus: int | None = None) -> Iterator[tuple]:
    """Yield ``hash_unit`` results for ``units`` in their order, computed by Ray tasks."""
    if not units:
        return
    ray = _ray(data=True)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the build shows its own progress bar
    ctx.print_on_execution_start = False
    started = ray_cluster.start(address, num_cpus)
    try:
        rows = [{"i": i, "unit": pickle.dumps(u), "hash_name": hash_name, "exact": exact,
             "square": square}
                for i, u in enumerate(units)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(_task)
        pending: dict[int, tuple] = {}
        want = 0
        for row in ds.iter_rows():
            pending[int(row["i"])] = pickle.loads(row["result"])
            while want in pending:
                yield pending.pop(want)
                want += 1
    finally:
        if started:
            ray.shutdown()


# -- search ----------------------------------------------------------------------------------------
class SegmentWorker:
    """A Ray actor's state: some segments of one index, their tables loaded (built first if missing)."""

    def __init__(self, root: str, segs: list, warm: bool = True):
        from audit.memorization.search import DEFAULT_RADIUS, SegmentTables, _use_flat

        self.parts = [SegmentTables(Path(root), seg) for seg in segs]
        self.bytes = 0
        for st in self.parts:
            if not _use_flat(st.seg.count, DEFAULT_RADIUS, "auto"):  # small segments are scanned: no tables
                st.tables()
            self.bytes += st.warm() if warm and st._mih is not None else st.nbytes()

    def info(self) -> dict[str, Any]:
        import socket

        return {"host": socket.gethostname(), "pid": os.getpid(), "segments": [st.seg.number for st in self.parts],
                "bytes": self.bytes}

    def search(self, queries: np.ndarray, radius: int, method: str) -> tuple[np.ndarray, ...]:
        from audit.memorization.search import merge_found

        return merge_found([st.search(queries, radius, method) for st in self.parts])

    def topk(self, queries: np.ndarray, k: int) -> np.ndarray:
        from audit.memorization.search import topk_keys

        return topk_keys(((st.seg.lo, st.codes) for st in self.parts), queries, k)


def assign(segs: list, n_actors: int) -> list[list]:
    """Segments per actor: largest first onto the least loaded actor (all full segments weigh the same)."""
    n_actors = max(1, min(n_actors, len(segs)))
    load = [0] * n_actors
    out: list[list] = [[] for _ in range(n_actors)]
    for seg in sorted(segs, key=lambda s: (-s.count, s.number)):
        a = min(range(n_actors), key=lambda i: (load[i], i))
        out[a].append(seg)
        load[a] += seg.count
    return [sorted(x, key=lambda s: s.number) for x in out]


class RaySearch:
    """An index's segments on Ray actors (one CPU each) that keep their tables; ``search``/``topk`` merge
    the actors' answers. One per (index, shard list, address) in a process: ``RaySearch.get``."""

    _live: dict[tuple, RaySearch] = {}

    def __init__(self, root: str | os.PathLike, shards: list[dict[str, Any]], *, address: str | None = None,
                 actors: int | None = None, segment_codes: int | None = None, warm: bool = True):
        from audit.memorization.search import segments

        ray = _ray()
        self.started = ray_cluster.start(address)
        self.root = str(Path(root).resolve())
        self.segments = segments(shards, segment_codes)
        self.count = self.segments[-1].hi if self.segments else 0
        free = int(ray.available_resources().get("CPU", 0))  # actors beyond the free CPUs would wait forever
        want = actors or int(os.environ.get("DIFFAUDIT_RAY_ACTORS", 0)) or max(1, free)
        groups = assign(self.segments, want) if self.segments else []
        worker = ray.remote(num_cpus=1)(SegmentWorker)
        self.actors = [worker.remote(self.root, g, warm) for g in groups]
        try:
            self.layout = ray.get([a.info.remote() for a in self.actors])  # waits for every table to load
        except ray.exceptions.RayError as e:
            self.close()
            raise ConfigError(f"Ray actors could not open the index {self.root} ({str(e).splitlines()[-1]}); every "
                              "node needs diffaudit installed and the index folder at the same path") from None

    @classmethod
    def get(cls, root: str | os.PathLike, shards: list[dict[str, Any]], *, address: str | None = None,
            actors: int | None = None) -> RaySearch:
        """The live ``RaySearch`` for this index and shard list, started if needed. One lives per process:
        another one (another index, or this one before it grew) is stopped first, so that its actors give
        their CPUs back."""
        from audit.memorization.search import segments

        root = str(Path(root).resolve())
        key = (root, tuple(s.key for s in segments(shards)), address, actors)
        if key not in cls._live:
            cls.close_all()
            cls._live[key] = cls(root, shards, address=address, actors=actors)
        return cls._live[key]

    def search(self, queries: np.ndarray, radius: int, method: str = "auto") -> tuple[np.ndarray, ...]:
        from audit.memorization.search import merge_found

        ray = _ray()
        queries = np.asarray(queries, dtype=np.uint64).ravel()
        ref = ray.put(queries)
        return merge_found(ray.get([a.search.remote(ref, radius, method) for a in self.actors]))

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from audit.memorization.search import merge_topk

        ray = _ray()
        queries = np.asarray(queries, dtype=np.uint64).ravel()
        k = min(k, self.count)
        ref = ray.put(queries)
        return merge_topk(ray.get([a.topk.remote(ref, k) for a in self.actors]) or
                          [np.empty((len(queries), 0), np.uint64)], k)

    def close(self) -> None:
        """Stop the actors (their tables go with them)."""
        ray = _ray()
        for a in getattr(self, "actors", []):
            ray.kill(a)
        self.actors = []
        for key in [k for k, v in RaySearch._live.items() if v is self]:
            RaySearch._live.pop(key)

    @classmethod
    def close_all(cls) -> None:
        for rs in list(cls._live.values()):
            rs.close()
