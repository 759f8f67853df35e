"""Segment-wise search (audit.memorization.search): equal to a flat scan, to the whole-index MIH of before
and to FAISS, over segments that cut across shards; tables survive growth; memory stays per segment."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import audit.memorization.search as search
from audit.memorization.index import Index, MultiIndexHash, flat_search

RADII = (0, 3, 10, 16)


def items_for(lo: int, hi: int) -> pd.DataFrame:
    """Item rows for ids lo..hi (Arrow-backed keys, no source: identities are hashed column-wise)."""
    n = hi - lo
    keys = pc.cast(pa.array(np.arange(lo, hi)), pa.string())
    nulls = pd.arrays.ArrowExtensionArray(pa.nulls(n, pa.string()))
    return pd.DataFrame({"key": pd.arrays.ArrowExtensionArray(keys), "uri": nulls, "caption": nulls,
                         "source": nulls, "member": nulls,
                         "offset": pd.arrays.ArrowExtensionArray(pa.nulls(n, pa.int64())),
                         "size": pd.arrays.ArrowExtensionArray(pa.nulls(n, pa.int64())),
                         "variant": pd.arrays.ArrowExtensionArray(pa.array(["full"] * n))})


def make_index(root, codes: np.ndarray, cuts: list[int]) -> Index:
    index = Index.create(root, "phash")
    bounds = [0, *cuts, len(codes)]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        index.append(codes[a:b], items_for(a, b), unit=f"test:{i}", counts={"indexed": b - a})
    return Index.open(root)


def planted(codes: np.ndarray, rng: np.random.Generator, n: int = 300) -> np.ndarray:
    """Near copies of indexed codes at every distance 0..17, and random codes."""
    base = codes[rng.integers(0, len(codes), n)].copy()
    for i, k in enumerate(rng.integers(0, 18, n)):
        for b in rng.choice(64, int(k), replace=False):
            base[i] ^= np.uint64(1) << np.uint64(int(b))
    return np.concatenate([base, rng.integers(0, 2**64 - 1, 60, dtype=np.uint64)])


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def small_segments(monkeypatch):
    monkeypatch.setattr(search, "SEGMENT_CODES", 70_000)


def test_segments_cover_every_id_once_across_shard_boundaries():
    shards = [{"name": f"{i:06d}", "count": c, "unit": f"u{i}"} for i, c in enumerate([5, 100, 1, 0, 44, 250])]
    segs = search.segments(shards, 64)
    assert [(s.lo, s.hi) for s in segs] == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 320), (320, 384),
                                            (384, 400)]
    covered = [(name, a, b) for s in segs for name, a, b in s.parts]
    per_shard: dict[str, int] = {}
    for name, a, b in covered:
        assert a == per_shard.get(name, 0) and b > a  # contiguous, in order, no empty slices
        per_shard[name] = b
    assert per_shard == {s["name"]: s["count"] for s in shards if s["count"]}
    assert segs[0].parts == (("000000", 0, 5), ("000001", 0, 59))
    # a segment's key names what it covers: growing the index changes only the last one's
    grown = search.segments([*shards, {"name": "000006", "count": 30, "unit": "u6"}], 64)
    assert [s.key for s in grown[:6]] == [s.key for s in segs[:6]] and grown[6].key != segs[6].key


def test_search_equals_flat_old_mih_and_faiss(tmp_path, small_segments):
    import faiss

    rng = np.random.default_rng(7)
    codes = rng.integers(0, 2**64 - 1, 300_000, dtype=np.uint64)
    index = make_index(tmp_path / "idx", codes, [1_000, 150_000, 150_001, 151_000])
    queries = planted(codes, rng)
    old = MultiIndexHash.build(codes, 4)  # what Index.search held in RAM before: one table set over all codes
    flat = faiss.IndexBinaryFlat(64)
    flat.add(codes.view(np.uint8).reshape(-1, 8))
    for r in RADII:
        got = index.search(queries, r)
        assert same(got, flat_search(codes, queries, r)), r
        assert same(got, old.search(queries, r)), r
        lims, dist, ids = flat.range_search(queries.view(np.uint8).reshape(-1, 8), r + 1)  # FAISS: d < r + 1
        theirs = sorted((q, int(d), int(i)) for q in range(len(queries))
                        for i, d in zip(ids[lims[q]:lims[q + 1]], dist[lims[q]:lims[q + 1]], strict=True))
        qi, ids_, d = (x.tolist() for x in got)
        assert list(zip(qi, d, ids_, strict=True)) == theirs, r
        assert len(got[0]) >= 300 * (r == 16)  # the planted copies are found
    for method in ("mih", "flat"):
        assert same(index.search(queries, 10, method=method), index.search(queries, 10))
    segs = sorted(p.name for p in (tmp_path / "idx" / "mih").iterdir())
    assert segs == ["000000", "000001", "000002", "000003", "000004", "tables.json"]
    assert json.loads((tmp_path / "idx" / "mih" / "tables.json").read_text())["layout"] == "segments"


def test_topk_is_the_k_nearest_with_ties_to_the_smaller_id(tmp_path, small_segments):
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 2**64 - 1, 150_000, dtype=np.uint64)
    codes[[10, 80_000, 149_999]] = codes[5]  # exact duplicates in three segments: ties at distance 0
    index = make_index(tmp_path / "idx", codes, [70_001])
    queries = np.concatenate([codes[[5, 77, 100_000]], rng.integers(0, 2**64 - 1, 70, dtype=np.uint64)])
    ids, dists = index.topk(queries, 6)
    d = np.bitwise_count(codes[None, :] ^ queries[:, None]).astype(np.int64)
    for i in range(len(queries)):
        order = np.lexsort((np.arange(len(codes)), d[i]))[:6]
        assert np.array_equal(ids[i], order) and np.array_equal(dists[i], d[i][order])
    assert ids[0, :4].tolist() == [5, 10, 80_000, 149_999] and dists[0, :4].tolist() == [0, 0, 0, 0]
    tiny = make_index(tmp_path / "tiny", codes[:3], [])
    ids, dists = tiny.topk(queries[:2], 5)
    assert ids.shape == (2, 3) and sorted(ids[0].tolist()) == [0, 1, 2]


def test_growing_keeps_full_segments_tables_and_rebuilds_the_last(tmp_path, small_segments):
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 2**64 - 1, 290_000, dtype=np.uint64)
    root = tmp_path / "idx"
    index = make_index(root, codes[:208_000], [90_000])  # segments of 70k, 70k and a partial 68k
    queries = planted(codes, rng, 100)
    assert same(index.search(queries, 10), flat_search(codes[:208_000], queries, 10))
    stamp = {p.name: (p / "tables.json").stat().st_mtime_ns for p in (root / "mih").iterdir() if p.is_dir()}
    assert sorted(stamp) == ["000000", "000001", "000002"]
    index.append(codes[208_000:], items_for(208_000, 290_000), unit="test:more", counts={"indexed": 82_000})
    index = Index.open(root)
    assert same(index.search(queries, 10), flat_search(codes, queries, 10))
    after = {p.name: (p / "tables.json").stat().st_mtime_ns for p in (root / "mih").iterdir() if p.is_dir()}
    assert after["000000"] == stamp["000000"] and after["000001"] == stamp["000001"]  # full: kept
    assert after["000002"] != stamp["000002"] and "000003" in after                  # partial: rebuilt


PEAK = """
import sys, numpy as np
import audit.memorization.search as search
from audit.memorization.index import Index

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

search.SEGMENT_CODES = 1 << 17
index = Index.open(sys.argv[1])
queries = np.load(sys.argv[2])
index.search(queries[:1], 10)  # imports done
before = kib("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
index.search(queries, 10)
print((kib("VmHWM:") - before) * 1024)
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's peak-RSS reset")
def test_search_memory_is_one_segment_not_the_index(tmp_path, monkeypatch):
    """Peak RSS (mapped table pages included) of a search grows by about one segment, not by the index."""
    import subprocess
    import sys

    monkeypatch.setattr(search, "SEGMENT_CODES", 1 << 17)
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 2**64 - 1, 1_200_000, dtype=np.uint64)
    index = make_index(tmp_path / "idx", codes, [400_000, 800_000])
    queries = planted(codes, rng, 300)
    np.save(tmp_path / "q.npy", queries)
    expected = index.search(queries, 10)  # builds the tables
    monkeypatch.setattr(Index, "codes", property(lambda self: pytest.fail("search concatenated every code")))
    assert same(Index.open(tmp_path / "idx").search(queries, 10), expected)
    tables = sum(f.stat().st_size for f in (tmp_path / "idx" / "mih").rglob("*.npy"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "idx"), str(tmp_path / "q.npy")],
                         capture_output=True, text=True, env=env, check=True)
    grew = int(out.stdout.split()[-1])
    assert tables > 60e6 and grew < tables / 3, (grew, tables)


def test_read_only_index_still_searches_exactly(tmp_path, small_segments, monkeypatch):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 2**64 - 1, 160_000, dtype=np.uint64)
    index = make_index(tmp_path / "idx", codes, [])

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(search, "build_tables", refuse)
    queries = planted(codes, rng, 50)
    assert same(index.search(queries, 10), flat_search(codes, queries, 10))
    assert not any(p.is_dir() for p in (tmp_path / "idx" / "mih").glob("*"))


def test_old_whole_index_tables_are_replaced(tmp_path, small_segments):
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 2**64 - 1, 100_000, dtype=np.uint64)
    index = make_index(tmp_path / "idx", codes, [])
    MultiIndexHash.build(codes, 4, "old-key").save(tmp_path / "idx" / "mih")  # the layout before segments
    queries = planted(codes, rng, 50)
    assert same(index.search(queries, 10), flat_search(codes, queries, 10))
    mih = tmp_path / "idx" / "mih"
    assert not list(mih.glob("*.npy")) and (mih / "000000" / "tables.json").is_file()


def test_engine_choice(monkeypatch):
    from diffaudit.errors import ConfigError

    monkeypatch.delenv("DIFFAUDIT_SEARCH_ENGINE", raising=False)
    monkeypatch.delenv("DIFFAUDIT_RAY_ADDRESS", raising=False)
    try:
        assert search.chosen_engine() == ("local", None)
        monkeypatch.setenv("DIFFAUDIT_SEARCH_ENGINE", "ray")
        monkeypatch.setenv("DIFFAUDIT_RAY_ADDRESS", "auto")
        assert search.chosen_engine() == ("ray", "auto")
        search.use_engine("local")
        assert search.chosen_engine()[0] == "local" and search.chosen_engine("ray")[0] == "ray"
        with pytest.raises(ConfigError):
            search.use_engine("spark")
        monkeypatch.setenv("DIFFAUDIT_SEARCH_ENGINE", "spark")
        search.use_engine(None)
        with pytest.raises(ConfigError):
            search.chosen_engine()
    finally:
        search.use_engine(None)
