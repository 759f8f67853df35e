"""Memorization benchmark: prints JSON lines, each with our figure, the baseline's and the ratio.

(a) pHash throughput on JPEG files: ours (draft decoding, batched DCT, all cores) vs a plain
    ``imagehash.phash(Image.open(f))`` loop over the same files (goal >= 3x on 2 cores), plus the bit
    agreement of our default (draft) codes with imagehash.
(b) exact radius-10 queries/s over N random 64-bit codes (10M; --quick: 1M): multi-index hashing vs
    FAISS ``IndexBinaryFlat.range_search`` (goal >= 15x), with recall against FAISS checked to be 1.0.
(c) index build: seconds and bytes per million codes (shards on disk, search tables in memory).

    python bench/memorization.py [--quick] [--codes N] [--files N] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.memorization.hashing import get_hasher  # noqa: E402
from audit.memorization.index import Index, MultiIndexHash, choose_m  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def make_jpegs(folder: Path, n: int, size: int = 512) -> list[str]:
    """n distinct 512x512 JPEGs (q90) cut from the photos scikit-image ships."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
              for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")]
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        s = int(min(w, h) * rng.uniform(0.6, 1.0))
        x, y = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        out = folder / f"{i:06d}.jpg"
        img.crop((x, y, x + s, y + s)).resize((size, size), Image.Resampling.BICUBIC).save(out, quality=90)
        paths.append(str(out))
    return paths


def bench_hashing(n_files: int, workers: int, repeats: int = 3) -> None:
    import imagehash
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), n_files)
        hasher = get_hasher("phash")
        hasher.hash_files(paths[:64], workers=workers)  # warm the pool's imports once
        base = ours = one = float("inf")
        for _ in range(repeats):  # alternate and keep each one's best: the machine is shared
            t = time.perf_counter()
            ref = [int(str(imagehash.phash(Image.open(p))), 16) for p in paths]
            base = min(base, time.perf_counter() - t)
            t = time.perf_counter()
            codes, good, _ = hasher.hash_files(paths, workers=workers)
            ours = min(ours, time.perf_counter() - t)
            t = time.perf_counter()
            hasher.hash_data(paths)
            one = min(one, time.perf_counter() - t)
        exact, _, _ = hasher.hash_files(paths, workers=workers, exact=True)
    bits = np.bitwise_count(codes ^ np.asarray(ref, np.uint64))
    emit(bench="hash_throughput", files=n_files, workers=workers, ours_img_s=round(n_files / ours, 1),
         ours_one_core_img_s=round(n_files / one, 1), repeats=repeats, baseline="imagehash.phash loop, 1 process",
         baseline_img_s=round(n_files / base, 1), ratio=round(base / ours, 2), goal=3.0,
         draft_identical=round(float((bits == 0).mean()), 4), draft_mean_bits=round(float(bits.mean()), 3),
         draft_max_bits=int(bits.max()),
         exact_identical=float((exact == np.asarray(ref, np.uint64)).mean()))


def planted_queries(codes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """80% near copies of indexed codes (0..12 flipped bits), 20% random codes."""
    near = codes[rng.integers(0, len(codes), int(n * 0.8))].copy()
    for i, k in enumerate(rng.integers(0, 13, len(near))):
        for b in rng.choice(64, int(k), replace=False):
            near[i] ^= np.uint64(1) << np.uint64(b)
    return np.concatenate([near, rng.integers(0, 2**64 - 1, n - len(near), dtype=np.uint64)])


def bench_search_and_build(n_codes: int, n_queries: int, n_faiss: int, radius: int) -> None:
    import faiss

    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2**64 - 1, n_codes, dtype=np.uint64)
    per_m = n_codes / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        import pandas as pd

        # (c) build: append 1M-code shards with keys, then build + save the search tables
        t = time.perf_counter()
        index = Index.create(Path(tmp) / "idx", "phash")
        step = 1_000_000
        for i in range(0, n_codes, step):
            chunk = codes[i:i + step]
            items = pd.DataFrame({"key": [f"{j:09d}" for j in range(i, i + len(chunk))]})
            for col in ("uri", "caption", "source", "member", "offset", "size", "variant"):
                items[col] = None
            index.append(chunk, items, unit=f"bench:{i}", counts={"indexed": len(chunk)})
        append_s = time.perf_counter() - t
        t = time.perf_counter()
        m = choose_m(n_codes, radius)
        mih = MultiIndexHash.build(np.asarray(Index.open(index.root).codes), m)
        mih.save(index.root / "mih")
        tables_s = time.perf_counter() - t
        table_bytes = sum(a.nbytes for tbl in mih.tables for a in tbl.values())
        disk = sum(f.stat().st_size for f in (index.root).rglob("*") if f.is_file())
        del mih
        emit(bench="index_build", codes=n_codes, m=m, append_s_per_million=round(append_s / per_m, 3),
             tables_s_per_million=round(tables_s / per_m, 3),
             codes_mb_per_million=8.0, tables_mb_per_million=round(table_bytes / 1e6 / per_m, 1),
             disk_mb_per_million=round(disk / 1e6 / per_m, 1),
             peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))

        # (b) exact radius search: MIH (memory-mapped tables from disk) vs FAISS IndexBinaryFlat
        index = Index.open(index.root)
        queries = planted_queries(codes, n_queries, rng)
        index.search(queries[:8], radius, method="mih")  # loads the tables
        t = time.perf_counter()
        qi, ids, _ = index.search(queries, radius, method="mih")
        mih_s = time.perf_counter() - t
        flat = faiss.IndexBinaryFlat(64)
        flat.add(codes.view(np.uint8).reshape(-1, 8))
        fq = queries[:n_faiss]
        t = time.perf_counter()
        lims, _, fid = flat.range_search(fq.view(np.uint8).reshape(-1, 8), radius + 1)  # FAISS: d < radius
        faiss_s = time.perf_counter() - t
    ours = {(int(q), int(i)) for q, i in zip(qi, ids, strict=True) if q < n_faiss}
    theirs = {(q, int(i)) for q in range(n_faiss) for i in fid[lims[q]:lims[q + 1]]}
    recall = len(ours & theirs) / max(len(theirs), 1)
    emit(bench="radius_search", codes=n_codes, radius=radius, queries=n_queries, pairs_found=len(theirs),
         ours_qps=round(n_queries / mih_s, 1), baseline="faiss.IndexBinaryFlat.range_search",
         baseline_queries=n_faiss, baseline_qps=round(n_faiss / faiss_s, 1),
         ratio=round((n_queries / mih_s) / (n_faiss / faiss_s), 2), goal=15.0,
         recall_vs_faiss=recall, extra_vs_faiss=len(ours - theirs), faiss_threads=faiss.omp_get_max_threads())


def bench_search_variants(n_codes: int, n_queries: int, radius: int) -> None:
    """Why m is chosen by cost: m = r + 1 substrings (exact-match pigeonhole) vs the chosen m vs a numpy scan."""
    from audit.memorization.index import flat_search

    rng = np.random.default_rng(2)
    codes = rng.integers(0, 2**64 - 1, n_codes, dtype=np.uint64)
    queries = planted_queries(codes, n_queries, rng)
    t = time.perf_counter()
    ref = flat_search(codes, queries, radius)
    flat_qps = n_queries / (time.perf_counter() - t)
    out = {}
    for m in sorted({choose_m(n_codes, radius), radius + 1}):
        mih = MultiIndexHash.build(codes, m)
        mih.search(queries[:8], radius)
        t = time.perf_counter()
        got = mih.search(queries, radius)
        out[f"m{m}_qps"] = round(n_queries / (time.perf_counter() - t), 1)
        out[f"m{m}_exact"] = all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True))
    emit(bench="radius_search_variants", codes=n_codes, radius=radius, chosen_m=choose_m(n_codes, radius),
         numpy_scan_qps=round(flat_qps, 1), **out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1M codes, 200 files: a CI-scale sanity run")
    p.add_argument("--codes", type=int, default=None)
    p.add_argument("--files", type=int, default=None)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--radius", type=int, default=10)
    args = p.parse_args()
    n_codes = args.codes or (1_000_000 if args.quick else 10_000_000)
    n_files = args.files or (200 if args.quick else 1000)
    n_queries = args.queries or (1000 if args.quick else 5000)
    emit(bench="machine", cpus=os.cpu_count(), workers=args.workers, quick=args.quick,
         note="CPU figures on a shared machine; other jobs may have run at the same time")
    bench_hashing(n_files, args.workers)
    bench_search_and_build(n_codes, n_queries, min(n_queries, 300 if args.quick else 500), args.radius)
    bench_search_variants(min(n_codes, 1_000_000), 200, args.radius)


if __name__ == "__main__":
    main()
