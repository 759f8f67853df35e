"""Index scale benchmark: N codes (100M; --quick: 2M) through the hash-parquet path, then exact search.

Prints JSON lines, each phase measured in its own process (so each peak RSS is that phase's):
  generate  random 64-bit codes with planted near neighbours (each planted query has VARIANTS indexed codes
            within radius 10 of it), written as hash parquets (key, 16-hex phash, url), like LAION's
  import    ``build_index`` over those parquets (local engine, --workers), and the per-row import it
            replaced, on a subset, as the baseline (rows/s, ratio)
  tables    every segment's search tables (``LocalSearch.prepare``)
  index     build time, peak RSS (driver and workers), bytes on disk per part
  search    exact queries/s at --radius for the local segment-wise search (a first pass and a warm pass),
            the peak RSS it adds, and planted recall
  faiss     FAISS ``IndexBinaryFlat.range_search`` on the same codes (all of them when they fit in RAM,
            else a prefix, said so) for the first --faiss-queries queries; both answers compared
  ray       (unless --no-ray) the Ray engine on a local Ray with this machine's CPUs: start time, queries/s,
            equal to local
  project   the figures projected to 2.3B codes and to N machines, with the assumptions printed

    nice -n 10 python bench/scale.py [--quick] [--codes N] [--queries Q] [--workers W] [--workdir DIR] [--keep]
    python bench/scale.py --project-from bench/results/scale-100m-cpu2-2026-12-02.jsonl [--cores-per-machine C]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RADIUS = 10
VARIANTS = 3                     # indexed near copies per planted query
LAION_2B = 2_300_000_000
HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def reset_peak() -> int | None:
    """Reset this process's peak RSS (Linux) and return the current RSS in bytes, or None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _kib("VmRSS:") * 1024
    except OSError:
        return None


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- generate ------------------------------------------------------------------------------------
def hex_strings(codes: np.ndarray):
    """16-digit lowercase hex of each code as an Arrow string array (no per-row Python)."""
    import pyarrow as pa

    b = codes.astype(">u8").view(np.uint8).reshape(-1, 8)
    digits = np.empty((len(codes), 16), np.uint8)
    digits[:, 0::2], digits[:, 1::2] = HEX[b >> 4], HEX[b & 15]
    offsets = np.arange(0, 16 * len(codes) + 1, 16, dtype=np.int32)
    return pa.StringArray.from_buffers(len(codes), pa.py_buffer(offsets), pa.py_buffer(digits.tobytes()))


def flip(codes: np.ndarray, bits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each code with ``bits[i]`` distinct random bits flipped."""
    out = codes.copy()
    for i, k in enumerate(bits):
        for b in rng.choice(64, int(k), replace=False):
            out[i] ^= np.uint64(1) << np.uint64(int(b))
    return out


def phase_generate(work: Path, n: int, rows: int, n_queries: int) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2026)
    planted_q = int(n_queries * 0.8)
    bases = rng.integers(0, 2**64 - 1, planted_q, dtype=np.uint64)
    ids = np.sort(rng.choice(n, planted_q * VARIANTS, replace=False))
    owner = rng.permutation(np.repeat(np.arange(planted_q), VARIANTS))
    variants = flip(bases[owner], rng.integers(0, RADIUS + 1, len(owner)), rng)
    queries = np.concatenate([bases, rng.integers(0, 2**64 - 1, n_queries - planted_q, dtype=np.uint64)])
    np.savez(work / "planted.npz", queries=queries, ids=ids, owner=owner)
    src = work / "src"
    src.mkdir()
    t = time.perf_counter()
    for f, lo in enumerate(range(0, n, rows)):
        hi = min(n, lo + rows)
        codes = np.random.default_rng([2026, f]).integers(0, 2**64 - 1, hi - lo, dtype=np.uint64)
        a, b = np.searchsorted(ids, [lo, hi])
        codes[ids[a:b] - lo] = variants[a:b]
        keys = pc.cast(pa.array(np.arange(lo, hi)), pa.string())
        urls = pc.binary_join_element_wise("https://img.example/", keys, ".jpg", "")
        pq.write_table(pa.table({"key": keys, "phash": hex_strings(codes), "url": urls}), src / f"{f:05d}.parquet")
    return {"phase": "generate", "codes": n, "files": math.ceil(n / rows), "rows_per_file": rows,
            "planted_queries": planted_q, "random_queries": n_queries - planted_q, "variants_each": VARIANTS,
            "seconds": round(time.perf_counter() - t, 1), "source_bytes": du(src), "peak_rss_mb": peak_mb()}


# -- import --------------------------------------------------------------------------------------
def old_import(path: str) -> int:
    """The hash-parquet import this branch replaced (per row: to_pylist, from_hex, a dict, blake2b identity)."""
    import hashlib

    import pyarrow.parquet as pq

    from audit.memorization.hashing import from_hex

    table = pq.read_table(path)
    codes, rows = [], []
    for key, value, uri in zip(table.column("key").to_pylist(), table.column("phash").to_pylist(),
                               table.column("url").to_pylist(), strict=True):
        codes.append(from_hex(value))
        rows.append({"key": str(key), "uri": uri, "caption": None, "source": uri if uri and os.path.isfile(uri)
                     else None, "member": None, "offset": None, "size": None, "variant": "full"})
    idents = np.fromiter((int.from_bytes(hashlib.blake2b(f"{r['uri']}\0\0full".encode(), digest_size=8).digest(),
                                         "little") for r in rows), np.uint64, count=len(rows))
    return min(len(np.asarray(codes, np.uint64)), len(idents))


def phase_import(work: Path, workers: int, baseline_rows: int) -> dict:
    import pyarrow.parquet as pq

    from audit.memorization.build import build_index
    from audit.memorization.hash_import import read_hash_parquet
    from audit.memorization.index import identities

    first = sorted((work / "src").glob("*.parquet"))[0]
    sub = work / "baseline.parquet"
    pq.write_table(pq.read_table(first).slice(0, baseline_rows), sub)
    t = time.perf_counter()
    n_old = old_import(str(sub))
    old_s = time.perf_counter() - t
    t = time.perf_counter()
    codes, items, _ = read_hash_parquet(str(sub), "phash")
    identities(items, str(sub))
    new_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = build_index([str(work / "src" / "*.parquet")], str(work / "idx"), workers=workers, progress=False)
    build_s = time.perf_counter() - t
    return {"phase": "import", "codes": summary["count"], "workers": workers, "seconds": round(build_s, 1),
            "rows_per_s": round(summary["count"] / build_s), "counts": summary["counts"],
            "baseline": "the per-row import it replaced (read + parse + identities, no writes), one process",
            "baseline_rows": n_old, "baseline_rows_per_s": round(n_old / old_s),
            "ours_same_work_rows_per_s": round(len(codes) / new_s), "ratio": round(old_s / new_s, 1),
            "peak_rss_mb": peak_mb(), "workers_peak_rss_mb": peak_mb(resource.RUSAGE_CHILDREN)}


def phase_tables(work: Path) -> dict:
    from audit.memorization.index import Index
    from audit.memorization.search import LocalSearch

    index = Index.open(work / "idx")
    t = time.perf_counter()
    done = LocalSearch(index.root, index.meta["shards"]).prepare(RADIUS)
    return {"phase": "tables", **done, "seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": peak_mb()}


# -- search --------------------------------------------------------------------------------------
def planted_recall(work: Path, found: tuple) -> float:
    p = np.load(work / "planted.npz")
    want = set(zip(p["owner"].tolist(), p["ids"].tolist(), strict=True))
    got = set(zip(found[0].tolist(), found[1].tolist(), strict=True))
    return len(want & got) / len(want)


def phase_search(work: Path) -> dict:
    from audit.memorization.index import Index
    from audit.memorization.search import SEGMENT_CODES

    queries = np.load(work / "planted.npz")["queries"]
    index = Index.open(work / "idx")
    index.search(queries[:1], RADIUS)
    base = reset_peak()
    t = time.perf_counter()
    first = index.search(queries, RADIUS)
    first_s = time.perf_counter() - t
    grew = (_kib("VmHWM:") * 1024 - base) if base is not None else None
    t = time.perf_counter()
    found = index.search(queries, RADIUS)
    warm_s = time.perf_counter() - t
    assert all(np.array_equal(a, b) for a, b in zip(first, found, strict=True))
    np.savez(work / "found.npz", qi=found[0], ids=found[1], d=found[2])
    n_seg = math.ceil(index.count / SEGMENT_CODES)
    mih = work / "idx" / "mih"
    return {"phase": "search", "engine": "local (one process, one segment at a time)", "codes": index.count,
            "segments": n_seg, "segment_codes": SEGMENT_CODES, "radius": RADIUS, "queries": len(queries),
            "pairs_found": len(found[0]), "first_pass_qps": round(len(queries) / first_s, 1),
            "warm_qps": round(len(queries) / warm_s, 1), "ms_per_query_per_segment": round(
                1000 * warm_s / len(queries) / (index.count / SEGMENT_CODES), 4),
            "planted_recall": planted_recall(work, found),
            "search_rss_growth_mb": None if grew is None else round(grew / 2**20, 1),
            "largest_segment_tables_mb": round(max(du(p) for p in mih.iterdir() if p.is_dir()) / 2**20, 1),
            "all_tables_mb": round(du(mih) / 2**20, 1), "peak_rss_mb": peak_mb()}


def phase_faiss(work: Path, n_faiss_queries: int, max_codes: int | None) -> dict:
    import faiss

    from audit.memorization.index import Index

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # FAISS gets every core; our local search uses one
    index = Index.open(work / "idx")
    queries = np.load(work / "planted.npz")["queries"][:n_faiss_queries]
    avail = _meminfo("MemAvailable:")
    n = index.count if max_codes is None else min(index.count, max_codes)
    n = min(n, int(avail * 0.5 // 8))  # FAISS holds the codes in RAM: leave the rest to others
    flat = faiss.IndexBinaryFlat(64)
    t = time.perf_counter()
    left = n
    for s in index.meta["shards"]:
        if left <= 0:
            break
        part = np.load(work / "idx" / "codes" / f"{s['name']}.npy", mmap_mode="r")[:left]
        flat.add(np.ascontiguousarray(part).view(np.uint8).reshape(-1, 8))
        left -= len(part)
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    lims, dist, ids = flat.range_search(queries.view(np.uint8).reshape(-1, 8), RADIUS + 1)  # FAISS: d < r + 1
    faiss_s = time.perf_counter() - t
    theirs = {(q, int(i), int(d)) for q in range(len(queries))
              for i, d in zip(ids[lims[q]:lims[q + 1]], dist[lims[q]:lims[q + 1]], strict=True)}
    f = np.load(work / "found.npz")
    keep = (f["qi"] < len(queries)) & (f["ids"] < n)
    ours = set(zip(f["qi"][keep].tolist(), f["ids"][keep].tolist(), f["d"][keep].tolist(), strict=True))
    return {"phase": "faiss", "baseline": "faiss.IndexBinaryFlat.range_search", "codes": n,
            "subset": n < index.count, "queries": len(queries), "threads": faiss.omp_get_max_threads(),
            "add_s": round(add_s, 1), "qps": round(len(queries) / faiss_s, 2), "pairs": len(theirs),
            "answers_equal": ours == theirs, "recall_ours_vs_faiss": len(ours & theirs) / max(len(theirs), 1),
            "peak_rss_mb": peak_mb()}


def phase_ray(work: Path) -> dict:
    import ray

    from audit.memorization.index import Index
    from audit.memorization.ray_engine import RaySearch

    queries = np.load(work / "planted.npz")["queries"]
    index = Index.open(work / "idx")
    t = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    rs = RaySearch.get(index.root, index.meta["shards"])
    start_s = time.perf_counter() - t
    rs.search(queries[:1], RADIUS)
    t = time.perf_counter()
    got = rs.search(queries, RADIUS)
    search_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(20):
        rs.search(queries[:1], RADIUS)
    call_s = (time.perf_counter() - t) / 20
    f = np.load(work / "found.npz")
    equal = all(np.array_equal(a, f[k]) for a, k in zip(got, ("qi", "ids", "d"), strict=True))
    out = {"phase": "ray", "cpus": int(ray.cluster_resources().get("CPU", 0)), "actors": len(rs.actors),
           "ray_init_s": round(init_s, 1), "actors_ready_s": round(start_s, 1),
           "qps": round(len(queries) / search_s, 1), "one_query_call_ms": round(1000 * call_s, 1),
           "equal_to_local": equal, "driver_peak_rss_mb": peak_mb()}
    rs.close()
    ray.shutdown()
    return out


# -- projection ----------------------------------------------------------------------------------
def project(r: dict, machines: tuple[int, ...] = (1, 4, 16, 64), cores: int = 16) -> dict:
    """Linear projections from this run's figures; each assumption is printed beside them."""
    s, idx, imp, tab, fa = r["search"], r["index"], r["import"], r["tables"], r.get("faiss")
    n = idx["codes"]
    segs = math.ceil(LAION_2B / s["segment_codes"])
    per_seg_ms = s["ms_per_query_per_segment"]
    tables_b = idx["bytes"]["mih"] / n
    codes_b = idx["bytes"]["codes"] / n
    disk_b = idx["bytes"]["total"] / n
    one_core_qps = 1000 / (per_seg_ms * segs)
    tables_s_per_code = tab["seconds"] / max(n, 1)
    out = {
        "phase": "project", "codes": LAION_2B, "segments": segs,
        "reliable": n >= s["segment_codes"],  # per-segment cost measured on at least one full segment
        "assumptions": [
            f"search cost grows linearly with segments ({s['segment_codes']:,} codes each): "
            f"{per_seg_ms} ms per query per segment, measured warm here at {n:,} codes",
            "search tables stay in the page cache (warm); colder, each query reads pages from disk",
            f"tables {tables_b:.1f} B/code and codes {codes_b:.1f} B/code as measured; disk {disk_b:.1f} B/code in all",
            f"Ray: segments spread evenly over machines x {cores} cores, one actor per core, queries answered "
            "in parallel by all actors; the merge and the per-call overhead (measured below) are added once; "
            "queries come in batches (audit memorization sends a run's codes in one call)",
            "every node reads the index from a shared file system that does not limit table reads or writes",
            f"import: {imp['rows_per_s']:,} rows/s with {imp['workers']} workers here; appending is one writer "
            "(the driver), so more machines do not speed the import; tables build in parallel on the actors",
            "the build's driver holds 8 B per code of identities in RAM (index._Seen)",
            "FAISS IndexBinaryFlat scans every code per query: its queries/s fall as 1/codes, RAM 8 B/code",
        ],
        "disk_gb": round(disk_b * LAION_2B / 1e9, 1), "tables_gb": round(tables_b * LAION_2B / 1e9, 1),
        "codes_gb": round(codes_b * LAION_2B / 1e9, 1),
        "build_driver_identities_gb": round(8 * LAION_2B / 1e9, 1),
        "import_hours_this_machine": round(LAION_2B / imp["rows_per_s"] / 3600, 1),
        "tables_hours_one_core": round(tables_s_per_code * LAION_2B / 3600, 1),
        "local_one_core_qps": round(one_core_qps, 2),
        "local_peak_search_memory_gb": round(s["largest_segment_tables_mb"] / 1024, 2),
    }
    call_ms = r.get("ray", {}).get("one_query_call_ms", 0.0)
    out["ray_per_call_overhead_ms"] = call_ms
    out["machines"] = [{"machines": m, "cores": m * cores,
                        "qps": round(min(m * cores, segs) * one_core_qps, 1),
                        "one_query_ms": round(per_seg_ms * math.ceil(segs / (m * cores)) + call_ms, 1),
                        "tables_per_machine_gb": round(tables_b * LAION_2B / 1e9 / m, 1),
                        "tables_build_minutes": round(tables_s_per_code * LAION_2B / 60 / min(m * cores, segs), 1)}
                       for m in machines]
    if fa:
        faiss_qps_2b = fa["qps"] * fa["codes"] / LAION_2B
        out["faiss_flat_qps_this_machine"] = round(faiss_qps_2b, 4)
        out["faiss_flat_ram_gb"] = round(8 * LAION_2B / 1e9, 1)
    return out


# -- driver --------------------------------------------------------------------------------------
def run_phase(name: str, args: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--workdir", str(work), "--codes", str(args.codes),
           "--queries", str(args.queries), "--workers", str(args.workers), "--rows", str(args.rows),
           "--faiss-queries", str(args.faiss_queries), "--baseline-rows", str(args.baseline_rows)]
    if args.faiss_max:
        cmd += ["--faiss-max", str(args.faiss_max)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"phase {name} failed ({proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    emit(**out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2M codes, 500 queries: a sanity run of a few minutes")
    p.add_argument("--codes", type=int, default=None)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--faiss-queries", type=int, default=None)
    p.add_argument("--faiss-max", type=int, default=None, help="FAISS on at most this many codes")
    p.add_argument("--rows", type=int, default=None, help="rows per hash parquet")
    p.add_argument("--baseline-rows", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", type=Path, default=None, help="where the parquets and index go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--project-from", type=Path, default=None,
                   help="print only the projection, from the JSON lines of an earlier run")
    p.add_argument("--cores-per-machine", type=int, default=16)
    args = p.parse_args()
    if args.project_from:
        lines = [json.loads(x) for x in args.project_from.read_text().splitlines() if x.strip()]
        emit(**project({x["phase"]: x for x in lines if "phase" in x}, cores=args.cores_per_machine))
        return
    args.codes = args.codes or (2_000_000 if args.quick else 100_000_000)
    args.queries = args.queries or (500 if args.quick else 2000)
    args.faiss_queries = args.faiss_queries or (200 if args.quick else 500)
    args.rows = args.rows or (250_000 if args.codes <= 10_000_000 else 1_000_000)
    if args.phase:
        work = args.workdir
        phases = {"generate": lambda: phase_generate(work, args.codes, args.rows, args.queries),
                  "import": lambda: phase_import(work, args.workers, args.baseline_rows),
                  "tables": lambda: phase_tables(work), "search": lambda: phase_search(work),
                  "faiss": lambda: phase_faiss(work, args.faiss_queries, args.faiss_max),
                  "ray": lambda: phase_ray(work)}
        print(json.dumps(phases[args.phase]()), flush=True)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="diffaudit-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work} is not empty")
    emit(bench="machine", cpus=os.cpu_count(), ram_gb=round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                                             / 2**30, 1), nice=os.nice(0), codes=args.codes,
         queries=args.queries, workdir=str(work),
         note="CPU figures on a shared machine; other jobs may have run at the same time")
    r: dict = {}
    try:
        for name in ("generate", "import", "tables"):
            r[name] = run_phase(name, args, work)
        sizes = {part: du(work / "idx" / part) for part in ("codes", "idents", "items", "mih")}
        sizes["total"] = du(work / "idx")
        r["index"] = {"phase": "index", "codes": r["import"]["codes"],
                      "build_s": round(r["import"]["seconds"] + r["tables"]["seconds"], 1),
                      "import_s": r["import"]["seconds"], "tables_s": r["tables"]["seconds"],
                      "peak_rss_mb": max(r["import"]["peak_rss_mb"], r["tables"]["peak_rss_mb"]),
                      "workers_peak_rss_mb": r["import"]["workers_peak_rss_mb"],
                      "bytes": sizes, "bytes_per_code": round(sizes["total"] / r["import"]["codes"], 1),
                      "source_parquet_bytes": r["generate"]["source_bytes"]}
        emit(**r["index"])
        r["search"] = run_phase("search", args, work)
        r["faiss"] = run_phase("faiss", args, work)
        emit(phase="compare", ours="local segment-wise search, 1 process", ours_qps=r["search"]["warm_qps"],
             baseline="faiss.IndexBinaryFlat.range_search", baseline_qps=r["faiss"]["qps"],
             baseline_threads=r["faiss"]["threads"], baseline_codes=r["faiss"]["codes"],
             ratio=round(r["search"]["warm_qps"] / r["faiss"]["qps"] * (r["faiss"]["codes"] / r["search"]["codes"]), 1),
             note="ratio at equal code count (FAISS qps scaled by its codes / ours when it ran on a subset)",
             exact_both=r["faiss"]["answers_equal"] and r["search"]["planted_recall"] == 1.0)
        if not args.no_ray:
            r["ray"] = run_phase("ray", args, work)
        emit(**project(r, cores=args.cores_per_machine))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for part in ("src", "idx", "planted.npz", "found.npz", "baseline.parquet"):
                path = work / part
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
