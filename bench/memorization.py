"""Memorization benchmark: prints JSON lines, each with our figure, the baseline's and the ratio.

(a) pHash throughput on JPEG files: ours (draft decoding, batched DCT, all cores) vs a plain
    ``imagehash.phash(Image.open(f))`` loop over the same files (goal >= 3x on 2 cores), plus the bit
    agreement of our default (draft) codes with imagehash.
(b) exact radius-10 queries/s over N random 64-bit codes (10M; --quick: 1M): multi-index hashing vs
    FAISS ``IndexBinaryFlat.range_search`` (goal >= 15x), with recall against FAISS checked to be 1.0.
(c) index build: seconds and bytes per million codes (shards on disk, search tables in memory).
(d) held-out recall: N indexed images of ``diffaudit.corpus`` split ``heldout`` (every kind; photos from half
    of its photo sources) in an index, each transformed copy (``audit.memorization.copies``) looked up as a
    user would (``index query`` at the default radius): per transform the share whose source is a hash
    candidate (hash hit), confirmed as a hit (memorized or near_duplicate) and as memorized, with 95%
    Wilson intervals, beside the baseline of the same run (the previous check: plain and centre-crop codes,
    no mirror, images stretched onto each other and compared in RGB); false confirmations on near
    distractors (two crops per indexed image, each showing 16-36% of it) and far ones (other images of the
    same kinds, photos of other sources), both through the search and forced against their nearest indexed
    images;
    the confirmation's cost per candidate. Degenerate (too flat) images are counted apart, never as hits.

    python bench/memorization.py [--quick] [--codes N] [--files N] [--workers N] [--recall-only]
    python bench/memorization.py --calibrate     # how variants.SEARCH and confirm.py's thresholds were chosen
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

NEAR_PER = 2  # near distractors (parts of an indexed image) per indexed image


def emit(**fields) -> None:
    print(json.dumps(fields, default=lambda v: v.item() if hasattr(v, "item") else str(v)), flush=True)


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


# -- (d) held-out recall ------------------------------------------------------------------------------
def _legacy_confirm(query, train) -> bool:
    """The previous check (kept here as the baseline): centre crops of the query stretched onto the training
    image at a common side, RGB tiled L2 (max of 4x4) <= 0.20 and grayscale SSIM >= 0.70."""
    from PIL import Image
    from skimage.metrics import structural_similarity

    side = min(256, *query.size, *train.size)

    def px(img):
        return np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255

    def crop(img, s):
        w, h = img.size
        dx, dy = round(w * (1 - s) / 2), round(h * (1 - s) / 2)
        return img if s >= 1 else img.crop((dx, dy, w - dx, h - dy))

    def tl2(a, b):
        t = side // 4
        d = ((a[:t * 4, :t * 4] - b[:t * 4, :t * 4]) ** 2).reshape(4, t, 4, t, 3).mean(axis=(1, 3, 4))
        return float(np.sqrt(d.max()))

    tr = px(train)
    l2, s = min((tl2(px(crop(query, s)), tr), s) for s in (1.0, 0.95, 0.9))
    gray = np.array([0.299, 0.587, 0.114], np.float32)
    ssim = structural_similarity(px(crop(query, s)) @ gray, tr @ gray, data_range=1.0)
    return l2 <= 0.20 and ssim >= 0.70


def _interval(k: int, n: int) -> list[float]:
    from audit.memorization.check import wilson

    return [round(v, 3) for v in wilson(k, n)]


def bench_recall(n: int, *, seed: int = 0, max_side: int = 512, radius: int = 10, workers: int = 1,
                 descriptor: str | None = None) -> None:
    from PIL import Image

    from audit.memorization import confirm as cf
    from audit.memorization.build import build_index
    from audit.memorization.calibration import split_photos
    from audit.memorization.check import VARIANT_NAMES, query_images
    from audit.memorization.copies import TRANSFORMS, partial_crop
    from audit.memorization.hashing import get_hasher
    from audit.memorization.verdicts import MEMORIZED, is_hit
    from diffaudit import corpus

    drawn = list(corpus.corpus(4 * n, split="heldout", seed=seed, max_side=max_side))
    indexed, others = split_photos(drawn, corpus.PHOTOS_HELDOUT)
    indexed, far = indexed[:n], others[:n]
    rng = np.random.default_rng([seed, 11])
    hasher = get_hasher("phash")
    legacy_codes = lambda img: hasher.codes([img] + [img.crop((round(img.width * (1 - s) / 2), round(img.height * (1 - s) / 2),  # noqa: E731
                                                               img.width - round(img.width * (1 - s) / 2),
                                                               img.height - round(img.height * (1 - s) / 2)))
                                                     for s in (0.95, 0.9)])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        folder.mkdir()
        trains = []
        for i, s in enumerate(indexed):
            Image.fromarray(s.rgb).save(folder / f"{i:05d}.jpg", quality=95)
            trains.append(Image.open(folder / f"{i:05d}.jpg").convert("RGB"))
        build_index([str(folder)], str(Path(tmp) / "idx"), workers=workers, progress=False, square=False)
        index = Index.open(Path(tmp) / "idx")
        if descriptor:  # a second candidate source: its min similarity calibrated on the calibration split
            from audit.memorization.descriptors import embed_index

            meta = embed_index(index.root, descriptor, progress=False)
            emit(bench="recall", descriptor=descriptor, min_similarity=meta["min_similarity"])
        codes = np.asarray(index.codes)
        keys = index.items(np.arange(index.count))["key"].tolist()
        key_id = {k: int(k[:5]) for k in keys}  # key -> position in ``indexed``
        id_pos = np.array([int(k[:5]) for k in keys])  # index id -> position in ``indexed``
        prepared = [cf.prepare(t) for t in trains]
        rows, costs, per_kind = [], [], {}
        for name, tf in TRANSFORMS.items():
            queries = [Image.fromarray(tf(s.rgb, rng)) for s in indexed]
            t0 = time.perf_counter()
            results = query_images(queries, index, radius=radius, top_k=0, descriptor=descriptor)
            seconds = time.perf_counter() - t0
            tally = dict.fromkeys(("judged", "degenerate", "hash_hit", "confirmed", "memorized", "base_hash_hit",
                                   "base_confirmed", "other_confirmed", "photo_judged", "photo_confirmed"), 0)
            missed: dict[str, int] = {}
            for i, (q, r) in enumerate(zip(queries, results, strict=True)):
                costs += [m["confirm_ms"] for m in r["matches"] if "confirm_ms" in m]
                own = [m for m in r["matches"] if m["key"] == f"{i:05d}.jpg"]
                # a copy of a degenerate training image is never a hit, found or not: counted apart
                degenerate = r["degenerate"] or prepared[i].degenerate
                tally["degenerate" if degenerate else "judged"] += 1
                if degenerate:
                    continue
                kind = per_kind.setdefault(indexed[i].kind, {"judged": 0, "confirmed": 0})
                kind["judged"] += 1
                tally["hash_hit"] += bool(own)
                hit = bool(own) and is_hit(own[0]["verdict"])
                tally["confirmed"] += int(hit)
                kind["confirmed"] += int(hit)
                if not hit:
                    missed[indexed[i].kind] = missed.get(indexed[i].kind, 0) + 1
                if indexed[i].kind == "photo":
                    tally["photo_judged"] += 1
                    tally["photo_confirmed"] += int(hit)
                tally["memorized"] += int(bool(own) and own[0]["verdict"] == MEMORIZED)
                tally["other_confirmed"] += any(is_hit(m["verdict"]) and m["key"] != f"{i:05d}.jpg"
                                                and indexed[key_id[m["key"]]].source != indexed[i].source
                                                for m in r["matches"])
                found = np.bitwise_count(codes[id_pos == i][0] ^ legacy_codes(q)).min() <= radius
                tally["base_hash_hit"] += bool(found)
                tally["base_confirmed"] += bool(found) and _legacy_confirm(q, trains[i])
            j = tally["judged"]
            row = {"bench": "recall", "split": "heldout", "transform": name, "radius": radius, **tally,
                   "hash_hit_rate": round(tally["hash_hit"] / max(j, 1), 3),
                   "hash_hit_ci": _interval(tally["hash_hit"], j),
                   "confirmed_rate": round(tally["confirmed"] / max(j, 1), 3),
                   "confirmed_ci": _interval(tally["confirmed"], j),
                   "memorized_rate": round(tally["memorized"] / max(j, 1), 3),
                   "photo_confirmed_rate": round(tally["photo_confirmed"] / max(tally["photo_judged"], 1), 3),
                   "missed_by_kind": dict(sorted(missed.items())), "codes_per_query": len(VARIANT_NAMES),
                   "baseline": "previous check (no mirror, no alignment)",
                   "baseline_hash_hit_rate": round(tally["base_hash_hit"] / max(j, 1), 3),
                   "baseline_confirmed_rate": round(tally["base_confirmed"] / max(j, 1), 3),
                   "ratio": round(tally["confirmed"] / max(tally["base_confirmed"], 1), 2),
                   "query_ms_per_image": round(1000 * seconds / len(queries), 1)}
            rows.append(row)
            emit(**row)
        # distractors: through the search, and forced against their nearest indexed images
        near = [(Image.fromarray(partial_crop(s.rgb, rng)), i, s.kind) for _ in range(NEAR_PER)
                for i, s in enumerate(indexed)]
        far_q = [(Image.fromarray(s.rgb), None, s.kind) for s in far]
        false = {}
        for group, items in (("near", near), ("far", far_q)):
            results = query_images([q for q, _, _ in items], index, radius=radius, top_k=0,
                                   descriptor=descriptor)
            searched = judged = forced = forced_n = 0
            for (q, src, kind), r in zip(items, results, strict=True):
                if r["degenerate"]:
                    continue
                judged += 1
                for m in r["matches"]:
                    j = key_id[m["key"]]
                    same_photo = src is not None and j != src and indexed[src].kind == "photo" \
                        and indexed[j].source == indexed[src].source
                    if is_hit(m["verdict"]) and not same_photo:  # another crop of the same photo may be a copy
                        searched += 1
                        break
                qp = cf.prepare(q)
                if src is not None:
                    targets = [src]
                else:  # the two indexed images of the same kind nearest by pHash: the hardest the index offers
                    d = np.bitwise_count(codes ^ np.uint64(int(r["hash"], 16)))
                    order = id_pos[np.argsort(d, kind="stable")]
                    targets = [j for j in order if indexed[j].kind == kind][:2]
                for j in targets:
                    forced_n += 1
                    forced += is_hit(cf.confirm_prepared(qp, prepared[j]).verdict)
            false[group] = {"judged": judged, "searched_false": searched, "forced_pairs": forced_n,
                            "forced_false": forced}
        total = sum(v["judged"] for v in false.values())
        wrong = sum(v["searched_false"] for v in false.values())
        pairs = sum(v["forced_pairs"] for v in false.values())
        forced = sum(v["forced_false"] for v in false.values())
        emit(bench="false_confirmations", split="heldout", radius=radius, distractors=total, **{
            f"{g}_{k}": v for g, d in false.items() for k, v in d.items()},
            searched_false=wrong, searched_false_ci=_interval(wrong, total), forced_pairs=pairs, forced_false=forced,
            forced_false_ci=_interval(forced, pairs), goal=0)
        emit(bench="recall_by_kind", split="heldout", **{k: {**v, "rate": round(v["confirmed"] / max(v["judged"], 1), 3)}
                                                         for k, v in sorted(per_kind.items())})
        emit(bench="confirm_cost", candidates=len(costs), ms_per_candidate=round(float(np.mean(costs)), 1) if costs else None,
             p95_ms=round(float(np.percentile(costs, 95)), 1) if costs else None,
             note="one core; aligning (ORB + RANSAC, phase correlation) and scoring, mirrored too")
        table = ["| transform | hash hit (95% CI) | confirmed (95% CI) | memorized | photos: confirmed | misses by kind "
                 "| baseline: hash hit | baseline: confirmed |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            misses = ", ".join(f"{k} {v}" for k, v in r["missed_by_kind"].items()) or "none"
            table.append(f"| {r['transform']} | {r['hash_hit_rate']:.0%} [{r['hash_hit_ci'][0]:.0%}, "
                         f"{r['hash_hit_ci'][1]:.0%}] | {r['confirmed_rate']:.0%} "
                         f"[{r['confirmed_ci'][0]:.0%}, {r['confirmed_ci'][1]:.0%}] | {r['memorized_rate']:.0%} | "
                         f"{r['photo_confirmed_rate']:.0%} of {r['photo_judged']} | {misses} | "
                         f"{r['baseline_hash_hit_rate']:.0%} | {r['baseline_confirmed_rate']:.0%} |")
        table.append(f"\n{min(r['judged'] for r in rows)}-{max(r['judged'] for r in rows)} judged copies per "
                     f"transform of {n} indexed images (copies of degenerate images counted apart); {len(VARIANT_NAMES)} codes "
                     f"searched per query. False confirmations: {wrong} of {total} distractors through the search "
                     f"(95% CI [{_interval(wrong, total)[0]:.1%}, {_interval(wrong, total)[1]:.1%}]; near "
                     f"{false['near']['judged']}, far {false['far']['judged']}), {forced} of {pairs} forced pairs. "
                     f"Confirmation: {np.mean(costs):.1f} ms per candidate (p95 {np.percentile(costs, 95):.1f}), "
                     "one core.")
        print("\n".join(table), file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1M codes, 200 files: a CI-scale sanity run")
    p.add_argument("--codes", type=int, default=None)
    p.add_argument("--files", type=int, default=None)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--radius", type=int, default=10)
    p.add_argument("--recall-only", action="store_true", help="only (d), the held-out recall table")
    p.add_argument("--descriptor", default=None, help="(d): also search with this descriptor (e.g. onnx:sscd.onnx)")
    p.add_argument("--indexed", type=int, default=None, help="(d): indexed images (200; --quick: 40)")
    p.add_argument("--calibrate", action="store_true",
                   help="instead: choose the search variants and the confirmation thresholds on the calibration "
                        "split (audit.memorization.calibration; 160 indexed images, --quick: 60) and print them")
    args = p.parse_args()
    if args.calibrate:
        from audit.memorization.calibration import calibrate

        calibrate(args.indexed or (60 if args.quick else 160))
        return
    n_codes = args.codes or (1_000_000 if args.quick else 10_000_000)
    n_files = args.files or (200 if args.quick else 1000)
    n_queries = args.queries or (1000 if args.quick else 5000)
    emit(bench="machine", cpus=os.cpu_count(), workers=args.workers, quick=args.quick,
         note="CPU figures on a shared machine; other jobs may have run at the same time")
    bench_recall(args.indexed or (40 if args.quick else 200), radius=args.radius, workers=min(args.workers, 2),
                 descriptor=args.descriptor)
    if args.recall_only:
        return
    bench_hashing(n_files, args.workers)
    bench_search_and_build(n_codes, n_queries, min(n_queries, 300 if args.quick else 500), args.radius)
    bench_search_variants(min(n_codes, 1_000_000), 200, args.radius)


if __name__ == "__main__":
    main()
