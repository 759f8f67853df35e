"""Descriptor search benchmark: the approximate FAISS index that ``index embed`` builds above its exact limit
(IndexHNSWFlat, inner product) against the exact IndexFlatIP it replaces, on the same unit vectors.

Vectors are synthetic (no descriptor weights ship offline): clustered unit vectors of --dim dimensions (cluster
centres plus noise, closer to real embeddings than uniform noise), and queries that are noisy copies of stored
vectors (a copy's descriptor near its original's). Prints JSON lines:
  build   seconds to build each index, and the recall@10 that ``build_faiss`` measured and recorded
  search  queries/s of each (same queries, both cores' threads as FAISS sets them), the ratio, recall@10 and
          how often the planted original is the top hit, for each efSearch in --ef

    nice -n 10 python bench/descriptors.py [--quick] [--n N] [--dim D] [--queries Q] [--ef 32,64,128,256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    from audit.memorization.descriptors import l2_normalise

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 50), dim)).astype(np.float32)
    x = centres[rng.integers(len(centres), size=n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return l2_normalise(x)


def main() -> None:
    import faiss

    from audit.memorization import descriptors as ds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k vectors, 500 queries")
    ap.add_argument("--n", type=int, default=250_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--ef", default="32,64,128,256")
    args = ap.parse_args()
    n, nq = (20_000, 500) if args.quick else (args.n, args.queries)
    x = vectors(n, args.dim)
    rng = np.random.default_rng(1)
    planted = rng.choice(n, nq, replace=False)
    q = ds.l2_normalise(x[planted] + 0.15 * rng.normal(size=(nq, args.dim)).astype(np.float32) / np.sqrt(args.dim) * 4)
    common = {"n": n, "dim": args.dim, "queries": nq, "threads": faiss.omp_get_max_threads()}

    t0 = time.perf_counter()
    flat, _ = ds.build_faiss(x, flat_limit=n + 1)
    flat_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    hnsw, meta = ds.build_faiss(x, flat_limit=0)
    hnsw_build = time.perf_counter() - t0
    print(json.dumps({"phase": "build", **common, "flat_seconds": round(flat_build, 2),
                      "hnsw_seconds": round(hnsw_build, 2), "recorded": meta}), flush=True)

    t0 = time.perf_counter()
    _, truth = flat.search(q, 10)
    flat_s = time.perf_counter() - t0
    for ef in (int(v) for v in args.ef.split(",")):
        hnsw.hnsw.efSearch = ef
        t0 = time.perf_counter()
        _, got = hnsw.search(q, 10)
        s = time.perf_counter() - t0
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth.tolist(), got.tolist(), strict=True)]))
        print(json.dumps({"phase": "search", **common, "efSearch": ef, "flat_qps": round(nq / flat_s, 1),
                          "hnsw_qps": round(nq / s, 1), "ratio": round(flat_s / s, 2), "recall_at_10": round(recall, 4),
                          "planted_top1_flat": round(float(np.mean(truth[:, 0] == planted)), 4),
                          "planted_top1_hnsw": round(float(np.mean(got[:, 0] == planted)), 4)}), flush=True)


if __name__ == "__main__":
    main()
