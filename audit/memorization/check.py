"""Check a run's images against a training-set index: hash, exact radius search, confirm, write tables.

Search: each generated image is hashed as it is and in variants that undo common edits (its mirror image,
centre crops, padded "un-crops", caption bands and corner logos painted over, turns of +-2 degrees; chosen
on the calibration split, ``variants.py``), and every code is searched exactly within the radius; a
candidate keeps its nearest variant. Images with
almost no texture are flagged ``degenerate`` before any search result is trusted (their hash bits are
rounding noise) and are never counted.

Confirmation (``confirm.py``) aligns each training candidate to the generated image and compares them where
they overlap. What counts as a hit, and an image's verdict (its best candidate's), is ``verdicts.py``'s.

Descriptors (``descriptors.py``, ``--descriptor SPEC``): each generated image is also embedded (once per run:
the run keeps its vectors) and its nearest training images by cosine similarity, above the descriptor's
calibrated min similarity, join the hash candidates and go through the same confirmation and verdicts;
``matches.source`` says who proposed a candidate (``hash``, ``descriptor:<name>`` or both) and
``descriptor_sim`` its similarity.

Writes ``memorization/matches.parquet`` (one row per image x candidate, nearest first),
``memorization/rates.parquet`` (per prompt: images, judged, matched, memorized, near_duplicate, degenerate,
rate = matched / judged with a Wilson 95% interval) and ``memorization/evidence/`` (per pair a thumbnail of
the training image and the training image aligned into the generated image's frame; paths in the table
are relative to the run). ``run.json`` records the same image counts.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from audit.memorization import confirm as cf
from audit.memorization import descriptors as ds
from audit.memorization import variants
from audit.memorization import verdicts as vd
from audit.memorization.hashing import get_hasher, square_crop
from audit.memorization.index import DEFAULT_RADIUS, Index
from audit.memorization.sources import SkipImage, decode_image, file_key, load_train_image
from diffaudit.errors import InputError
from diffaudit.runs import Run, atomic_write_bytes

MAX_CANDIDATES = 10          # confirmed per generated image, nearest first
EVIDENCE_SIDE = 384
EVIDENCE_DIR = "memorization/evidence"
MATCH_COLUMNS = ["image_id", "prompt_id", "train_key", "train_uri", "hamming", "tile_l2", "ssim", "embedding_sim",
                 "verdict", "evidence_path", "agreement", "overlap", "train_overlap", "alignment", "mirrored",
                 "transform", "query_variant", "confirm_ms", "aligned_path", "source", "descriptor_sim"]


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (statsmodels; 0, 1 when n == 0)."""
    from statsmodels.stats.proportion import proportion_confint

    return (0.0, 1.0) if n == 0 else tuple(float(v) for v in proportion_confint(k, n, method="wilson"))


# -- search ----------------------------------------------------------------------------------------
# the variants searched (and their names) are ``variants.py``'s
VARIANT_NAMES = variants.names()
query_variants = variants.query_variants
query_codes = variants.query_codes


def search_codes(index: Index, codes: np.ndarray, radius: int) -> list[pd.DataFrame]:
    """Per image (a row of variant codes): candidate ids with their best Hamming distance and the variant
    that reached it, nearest first."""
    codes = np.asarray(codes, dtype=np.uint64).reshape(len(codes), -1)
    qi, ids, dist = index.search(codes.ravel(), radius)
    per = codes.shape[1]
    names = np.asarray(VARIANT_NAMES if per == len(VARIANT_NAMES) else [f"v{i}" for i in range(per)], dtype=object)
    found = pd.DataFrame({"image": qi // per, "id": ids, "hamming": dist, "variant": names[qi % per]})
    found = found.sort_values(["image", "hamming", "id"], kind="stable").drop_duplicates(["image", "id"])
    groups = dict(tuple(found.groupby("image")))
    return [groups.get(i, found.iloc[:0]).reset_index(drop=True) for i in range(len(codes))]


def search_images(index: Index, images: list[Image.Image], radius: int) -> list[pd.DataFrame]:
    """``search_codes`` for decoded images."""
    hasher = get_hasher(index.hash_name)
    codes = np.stack([query_codes(hasher, im) for im in images]) if images else np.empty((0, len(VARIANT_NAMES)),
                                                                                           np.uint64)
    return search_codes(index, codes, radius)


# -- decoding and evidence -------------------------------------------------------------------------
def _open(path: str) -> Image.Image:
    try:
        return decode_image(path)
    except SkipImage as e:
        raise InputError(f"{path} is not a readable image ({e.reason}); replace or regenerate it") from None


def _jpeg(run: Run, rel: str, img: Image.Image) -> str:
    thumb = img.convert("RGB")
    thumb.thumbnail((EVIDENCE_SIDE, EVIDENCE_SIDE))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=90)
    atomic_write_bytes(run.path(rel), buf.getvalue())
    return rel


def _evidence(run: Run, img: Image.Image, key: str, item_id: int) -> str:
    return _jpeg(run, f"{EVIDENCE_DIR}/{file_key(key)}-{item_id}.jpg", img)


def _aligned_evidence(run: Run, generated: Image.Image, train: Image.Image, c: cf.Confirmation, image_id: str,
                      item_id: int) -> str | None:
    aligned = cf.aligned_pair(generated, train, c)
    if aligned is None:
        return None
    return _jpeg(run, f"{EVIDENCE_DIR}/aligned-{file_key(image_id)}-{item_id}.jpg", aligned)


def _train_image(item: Any) -> Image.Image | None:
    """The indexed training image of an item row (its square crop for ``square`` codes), None if unreadable."""
    try:
        img = load_train_image(item["source"], item["member"], _int(item["offset"]), _int(item["size"]))
    except (SkipImage, OSError, InputError):
        return None
    return square_crop(img) if item["variant"] == "square" else img


def _int(value: Any) -> int | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value) else int(value)


def _prune_evidence(run: Run, keep: set[str]) -> None:
    folder = run.path(EVIDENCE_DIR)
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file() and f"{EVIDENCE_DIR}/{f.name}" not in keep:
                f.unlink()


def confirmation_fields(c: cf.Confirmation) -> dict[str, Any]:
    """The matches-table columns of one confirmation."""
    a = c.alignment
    return {"tile_l2": c.tile_l2, "ssim": c.ssim, "embedding_sim": c.embedding_sim, "verdict": c.verdict,
            "agreement": c.agreement, "overlap": c.overlap, "train_overlap": c.train_overlap,
            "alignment": a.method if a else None, "mirrored": a.mirrored if a else None,
            "transform": json.dumps(a.describe()) if a else None, "confirm_ms": round(1000 * c.seconds, 2)}


# -- counts (what counts is ``verdicts.py``'s) --------------------------------------------------
def _rates(gens: pd.DataFrame, matches: pd.DataFrame, degenerate: set[str] | None = None) -> pd.DataFrame:
    """Per prompt: images, judged (not degenerate), matched (best verdict a hit) with a Wilson interval of
    matched / judged, and the matched images split by verdict."""
    best = vd.image_verdicts(matches)
    flagged = set(degenerate or ()) | set(best.index[best == vd.DEGENERATE])
    rows = []
    for (prompt_id, subject), g in gens.groupby(["prompt_id", "subject"], sort=True):
        ids = g["image_id"]
        b = ids.map(best)
        n_deg = int(ids.isin(flagged).sum())
        judged = len(g) - n_deg
        k = int(b.map(vd.is_hit).sum())
        lo, hi = wilson(k, judged)
        rows.append({"prompt_id": prompt_id, "subject": subject, "images": len(g), "matched": k,
                     "rate": k / judged if judged else 0.0, "ci_low": lo, "ci_high": hi,
                     "memorized": int((b == vd.MEMORIZED).sum()), "near_duplicate": int((b == vd.NEAR_DUPLICATE).sum()),
                     "degenerate": n_deg, "judged": judged})
    return pd.DataFrame(rows)


# -- the run check ---------------------------------------------------------------------------------
def _hash_all(hasher, files: list[str], progress: bool, cache: ds.RunCache | None = None,
              shas: list[str] | None = None) -> tuple[np.ndarray, list[bool], np.ndarray | None]:
    """Variant codes, the degenerate flag and (with a descriptor ``cache``) the descriptor of every generated
    image, each decoded once here; descriptors the run already holds (same sha256, same model) are reused."""
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, unit="img", desc="hash" if cache is None else f"hash + {cache.desc.name}")
    codes, flat = [], []
    vectors: list[np.ndarray | None] = [None] * len(files)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        for (k, _), v in zip(pending, cache.desc.embed([a for _, a in pending]), strict=True):
            vectors[k] = v
            cache.put(shas[k], v)
        pending.clear()

    for k, f in enumerate(it):
        img = _open(f)
        codes.append(query_codes(hasher, img))
        flat.append(cf.prepare(img).degenerate)
        if cache is not None:
            vectors[k] = cache.get(shas[k])
            if vectors[k] is None:
                pending.append((k, np.asarray(img.convert("RGB"))))
                if len(pending) >= ds.BATCH:
                    flush()
    if pending:
        flush()
    codes = np.stack(codes) if codes else np.empty((0, len(VARIANT_NAMES)), np.uint64)
    if cache is None:
        return codes, flat, None
    return codes, flat, np.stack(vectors) if vectors else np.zeros((0, cache.desc.dim), np.float32)


def _descriptor(index: Index, descriptor: str | ds.Descriptor | None) -> ds.Store | None:
    """The descriptor store to search (checked against the model before any image is read), or None."""
    if descriptor is None:
        return None
    desc = descriptor if isinstance(descriptor, ds.Descriptor) else ds.resolve(descriptor, index)
    return ds.Store.open(index, desc)


def _candidates(index: Index, codes: np.ndarray, radius: int, max_candidates: int, store: ds.Store | None,
                vectors: np.ndarray | None, min_similarity: float | None) -> list[pd.DataFrame]:
    """Per image: hash candidates (nearest ``max_candidates``) and, with a descriptor, its nearest
    ``max_candidates`` training images above the min similarity, each with its ``source``."""
    hashed = search_codes(index, codes, radius)
    found = (store.search(vectors, max_candidates, min_similarity) if store is not None
             else [pd.DataFrame({"id": np.empty(0, np.int64), "descriptor_sim": np.empty(0)})] * len(hashed))
    source = ds.source_name(store.descriptor) if store is not None else "hash"
    return ds.merge_candidates(hashed, found, codes, index, source, VARIANT_NAMES, max_candidates)


def check_run(run_dir: str | Path, index_dir: str | Path, *, radius: int = DEFAULT_RADIUS,
              max_candidates: int = MAX_CANDIDATES, progress: bool = True,
              descriptor: str | ds.Descriptor | None = None, min_similarity: float | None = None) -> dict[str, Any]:
    """Check every image of a run against an index; write matches, rates and evidence; return a summary.

    ``descriptor`` (a spec or a loaded ``Descriptor`` the index was embedded with) adds its nearest
    neighbours above ``min_similarity`` (default: the index's calibrated value) as candidates."""
    t0 = time.perf_counter()
    run = Run.open(run_dir)
    index = Index.open(index_dir)
    gens = run.images()
    if gens.empty:
        raise InputError(f"run {run.root} has no images; generate into it first")
    hasher = get_hasher(index.hash_name)
    store = _descriptor(index, descriptor)
    cache = ds.RunCache(run, store.descriptor) if store is not None else None
    # stream: keep only codes (and descriptors); images are decoded again only for the few with candidates
    codes, flat, vectors = _hash_all(hasher, gens["file"].tolist(), progress, cache, gens["sha256"].tolist())
    degenerate = set(gens["image_id"][np.asarray(flat, bool)]) if len(flat) else set()
    candidates = _candidates(index, codes, radius, max_candidates, store, vectors, min_similarity)
    wanted = np.unique(np.concatenate([c["id"].to_numpy() for c in candidates] + [[]]))
    items = index.items(wanted.astype(np.int64)).set_index("id") if len(wanted) else None
    pairs = [(i, c) for i, cands in enumerate(candidates) for c in cands.itertuples()]
    if progress and pairs:
        from tqdm import tqdm

        pairs = tqdm(pairs, unit="pair", desc="confirm")
    rows, confirm_s = [], []
    current: tuple[int, Image.Image, cf.Prepared] | None = None  # pairs come grouped by image: decode each once
    with run.lock():
        for i, cand in pairs:
            item = items.loc[int(cand.id)]
            gen = gens.iloc[i]
            row = dict.fromkeys(MATCH_COLUMNS)
            row.update(image_id=gen["image_id"], prompt_id=gen["prompt_id"], train_key=item["key"],
                       train_uri=item["uri"], hamming=int(cand.hamming), query_variant=cand.variant,
                       source=cand.source, descriptor_sim=None if pd.isna(cand.descriptor_sim)
                       else round(float(cand.descriptor_sim), 6))
            if gen["image_id"] in degenerate:
                row["verdict"] = vd.DEGENERATE  # never confirmed, never counted, no evidence kept
                rows.append(row)
                continue
            train = _train_image(item)
            if train is None:
                row["verdict"] = vd.UNAVAILABLE
                rows.append(row)
                continue
            if current is None or current[0] != i:
                img = _open(gens["file"].iloc[i])
                current = (i, img, cf.prepare(img))
            c = cf.confirm_prepared(current[2], cf.prepare(train))
            confirm_s.append(c.seconds)
            row.update(confirmation_fields(c))
            row["evidence_path"] = _evidence(run, train, item["key"], int(cand.id))
            row["aligned_path"] = _aligned_evidence(run, current[1], train, c, gen["image_id"], int(cand.id))
            rows.append(row)
        matches = pd.DataFrame(rows, columns=MATCH_COLUMNS).sort_values("hamming", kind="stable")
        rates = _rates(gens, matches, degenerate)
        run.write_table("memorization/matches", matches)
        run.write_table("memorization/rates", rates)
        if cache is not None:
            cache.save(gens)
        _prune_evidence(run, set(matches["evidence_path"].dropna()) | set(matches["aligned_path"].dropna()))
    n = vd.image_counts(matches, degenerate)
    assert n["matched_images"] == int(rates["matched"].sum())  # one definition: the tables agree by construction
    per_pair = round(1000 * float(np.mean(confirm_s)), 1) if confirm_s else None
    summary = {"run": str(run.root), "index": str(index.root), "hash": index.hash_name, "radius": radius,
               "images": len(gens), **n, "verdicts": matches["verdict"].value_counts().to_dict(),
               "confirm_ms_per_candidate": per_pair, "seconds": round(time.perf_counter() - t0, 3)}
    extra: dict[str, Any] = {}
    if store is not None:
        src = matches["source"].fillna("")
        hits = matches[matches["verdict"].map(vd.is_hit)]
        extra = {"descriptor": store.descriptor.name, "min_similarity": store.min_similarity
                 if min_similarity is None else float(min_similarity)}
        summary["descriptor"] = {**extra, "spec": store.descriptor.spec,
                                 "descriptor_candidates": int(src.str.contains("descriptor:").sum()),
                                 "descriptor_only_candidates": int(src.str.startswith("descriptor:").sum()),
                                 "hits_found_by_descriptor_only": int(hits["source"].fillna("").str
                                                                      .startswith("descriptor:").sum()),
                                 "vectors_reused": cache.reused, "faiss": store.meta["faiss"]["type"]}
    run.record_stage("memorization", seconds=summary["seconds"], index=summary["index"], hash=index.hash_name,
                     radius=radius, images=len(gens), confirm_ms_per_candidate=per_pair, **extra, **n)
    return summary


def query_files(files: list[str], index_dir: str | Path | Index, *, radius: int = DEFAULT_RADIUS, top_k: int = 5,
                confirm_matches: bool = True, max_candidates: int = MAX_CANDIDATES,
                descriptor: str | ds.Descriptor | None = None, min_similarity: float | None = None
                ) -> list[dict[str, Any]]:
    """Look up images a user brings: matches within ``radius`` (confirmed, nearest ``max_candidates``; with a
    ``descriptor``, its nearest neighbours too) and the ``top_k`` nearest codes of the plain image."""
    index = index_dir if isinstance(index_dir, Index) else Index.open(index_dir)
    store = _descriptor(index, descriptor)  # a wrong model fails before any image is read
    images = [_open(f) for f in files]
    return [{"file": f, **r} for f, r in zip(files, query_images(images, index, radius=radius, top_k=top_k,
                                                                  confirm_matches=confirm_matches,
                                                                  max_candidates=max_candidates, descriptor=store,
                                                                  min_similarity=min_similarity), strict=True)]


def query_images(images: list[Image.Image], index_dir: str | Path | Index, *, radius: int = DEFAULT_RADIUS,
                 top_k: int = 5, confirm_matches: bool = True, max_candidates: int = MAX_CANDIDATES,
                 descriptor: str | ds.Descriptor | ds.Store | None = None, min_similarity: float | None = None
                 ) -> list[dict[str, Any]]:
    """``query_files`` for decoded images: per image its hash, degenerate flag, best verdict, whether that is
    a hit, the candidates (key, Hamming, the variant that hit, who proposed it, the confirmation) and the
    nearest codes."""
    index = index_dir if isinstance(index_dir, Index) else Index.open(index_dir)
    hasher = get_hasher(index.hash_name)
    store = descriptor if isinstance(descriptor, ds.Store) else _descriptor(index, descriptor)
    codes = np.stack([query_codes(hasher, im) for im in images]) if images else \
        np.empty((0, len(VARIANT_NAMES)), np.uint64)
    vectors = store.descriptor.embed([np.asarray(im.convert("RGB")) for im in images]) if store is not None else None
    candidates = _candidates(index, codes, radius, max_candidates, store, vectors, min_similarity)
    results = []
    if top_k and index.count:
        near_ids, near_d = index.topk(np.asarray([hasher.hash_image(im) for im in images], np.uint64), top_k)
    else:
        near_ids = near_d = np.zeros((len(images), 0), np.int64)
    for img, cands, nid, nd in zip(images, candidates, near_ids, near_d, strict=True):
        query = cf.prepare(img)
        matches = []
        if len(cands):
            items = index.items(cands["id"].to_numpy())
            for item, ham, var, src, sim in zip(items.to_dict("records"), cands["hamming"], cands["variant"],
                                                cands["source"], cands["descriptor_sim"], strict=True):
                m = {"id": int(item["id"]), "key": item["key"], "variant": item["variant"], "uri": item["uri"],
                     "hamming": int(ham), "query_variant": var, "source": src,
                     "descriptor_sim": None if pd.isna(sim) else round(float(sim), 4)}
                if query.degenerate:
                    m["verdict"] = vd.DEGENERATE
                elif confirm_matches:
                    train = _train_image(item)
                    m.update(cf.confirm_prepared(query, cf.prepare(train)).describe() if train is not None
                             else {"verdict": vd.UNAVAILABLE})
                matches.append(m)
        near = index.items(nid)
        nearest = [{"key": k, "variant": v, "hamming": int(d)}
                   for k, v, d in zip(near["key"], near["variant"], nd, strict=True)]
        verdict = vd.best(m.get("verdict") for m in matches) if matches else None
        results.append({"hash": format(hasher.hash_image(img), "016x"), "degenerate": query.degenerate,
                        "verdict": verdict, "hit": vd.is_hit(verdict), "matches": matches, "nearest": nearest})
    return results
