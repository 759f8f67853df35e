"""Check a run's images against a training-set index: hash, exact radius search, confirm, write tables.

Writes ``memorization/matches.parquet`` (one row per image x confirmed-or-not candidate),
``memorization/rates.parquet`` (per prompt: images, memorized images, rate with a Wilson 95% interval)
and ``memorization/evidence/*.jpg`` (a thumbnail of each matched training image, shown beside the
generated one by the dashboard; paths in the table are relative to the run).
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from audit.memorization.confirm import CROPS, center_crop, confirm
from audit.memorization.hashing import get_hasher, square_crop
from audit.memorization.index import DEFAULT_RADIUS, Index
from audit.memorization.sources import SkipImage, decode_image, file_key, load_train_image
from diffaudit.errors import InputError
from diffaudit.runs import Run, atomic_write_bytes

MAX_CANDIDATES = 10          # confirmed per generated image, nearest first
EVIDENCE_SIDE = 384
EVIDENCE_DIR = "memorization/evidence"


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (statsmodels; 0, 1 when n == 0)."""
    from statsmodels.stats.proportion import proportion_confint

    return (0.0, 1.0) if n == 0 else tuple(float(v) for v in proportion_confint(k, n, method="wilson"))


def query_codes(hasher, img: Image.Image) -> np.ndarray:
    """Codes of an image's centre crops (``CROPS``): a copy cropped by a few percent still matches."""
    return hasher.codes([center_crop(img, s) for s in CROPS])


def search_codes(index: Index, codes: np.ndarray, radius: int) -> list[pd.DataFrame]:
    """Per image (a row of crop codes): candidate ids with their best Hamming distance, nearest first."""
    codes = np.asarray(codes, dtype=np.uint64).reshape(len(codes), -1)
    qi, ids, dist = index.search(codes.ravel(), radius)
    found = pd.DataFrame({"image": qi // codes.shape[1], "id": ids, "hamming": dist})
    found = found.sort_values(["image", "hamming", "id"]).drop_duplicates(["image", "id"])
    groups = dict(tuple(found.groupby("image")))
    return [groups.get(i, found.iloc[:0]).reset_index(drop=True) for i in range(len(codes))]


def search_images(index: Index, images: list[Image.Image], radius: int) -> list[pd.DataFrame]:
    """``search_codes`` for decoded images."""
    hasher = get_hasher(index.hash_name)
    codes = np.stack([query_codes(hasher, im) for im in images]) if images else np.empty((0, len(CROPS)), np.uint64)
    return search_codes(index, codes, radius)


def _open(path: str) -> Image.Image:
    try:
        return decode_image(path)
    except SkipImage as e:
        raise InputError(f"{path} is not a readable image ({e.reason}); replace or regenerate it") from None


def _evidence(run: Run, img: Image.Image, key: str, item_id: int) -> str:
    rel = f"{EVIDENCE_DIR}/{file_key(key)}-{item_id}.jpg"
    thumb = img.convert("RGB")
    thumb.thumbnail((EVIDENCE_SIDE, EVIDENCE_SIDE))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=90)
    atomic_write_bytes(run.path(rel), buf.getvalue())
    return rel


CONFIRMED = ("memorized", "near_duplicate")  # verdicts confirmed in pixels; "unconfirmed" is a hash hit only


def _rates(gens: pd.DataFrame, matches: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: images with a near-copy confirmed in pixels (either verdict), with a Wilson interval."""
    memorized = set(matches.loc[matches["verdict"].isin(CONFIRMED), "image_id"])
    rows = []
    for (prompt_id, subject), g in gens.groupby(["prompt_id", "subject"], sort=True):
        n, k = len(g), int(g["image_id"].isin(memorized).sum())
        lo, hi = wilson(k, n)
        rows.append({"prompt_id": prompt_id, "subject": subject, "images": n, "matched": k,
                     "rate": k / n if n else 0.0, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def check_run(run_dir: str | Path, index_dir: str | Path, *, radius: int = DEFAULT_RADIUS,
              max_candidates: int = MAX_CANDIDATES, progress: bool = True) -> dict[str, Any]:
    """Check every image of a run against an index; write matches, rates and evidence; return a summary."""
    t0 = time.perf_counter()
    run = Run.open(run_dir)
    index = Index.open(index_dir)
    gens = run.images()
    if gens.empty:
        raise InputError(f"run {run.root} has no images; generate into it first")
    hasher = get_hasher(index.hash_name)
    files = gens["file"].tolist()
    if progress:
        from tqdm import tqdm

        files = tqdm(files, unit="img", desc="hash")
    # stream: keep only codes; images are decoded again only for the few with candidates
    codes = np.stack([query_codes(hasher, _open(f)) for f in files])
    candidates = search_codes(index, codes, radius)
    wanted = np.unique(np.concatenate([c["id"].to_numpy()[:max_candidates] for c in candidates] + [[]]))
    items = index.items(wanted.astype(np.int64)).set_index("id") if len(wanted) else None
    rows = []
    pairs = [(i, c) for i, cands in enumerate(candidates) for c in cands.head(max_candidates).itertuples()]
    if progress and pairs:
        from tqdm import tqdm

        pairs = tqdm(pairs, unit="pair", desc="confirm")
    gen_img: tuple[int, Image.Image] | None = None  # pairs come grouped by image: decode each once
    with run.lock():
        for i, cand in pairs:
            item = items.loc[int(cand.id)]
            gen = gens.iloc[i]
            row = {"image_id": gen["image_id"], "prompt_id": gen["prompt_id"], "train_key": item["key"],
                   "train_uri": item["uri"], "hamming": int(cand.hamming), "tile_l2": None, "ssim": None,
                   "embedding_sim": None, "verdict": "unconfirmed", "evidence_path": None}
            train = _train_image(item)
            if train is not None:
                if gen_img is None or gen_img[0] != i:
                    gen_img = (i, _open(gens["file"].iloc[i]))
                c = confirm(gen_img[1], train)
                row.update(tile_l2=c.tile_l2, ssim=c.ssim, embedding_sim=c.embedding_sim, verdict=c.verdict,
                           evidence_path=_evidence(run, train, item["key"], int(cand.id)))
            rows.append(row)
        matches = pd.DataFrame(rows, columns=["image_id", "prompt_id", "train_key", "train_uri", "hamming",
                                              "tile_l2", "ssim", "embedding_sim", "verdict", "evidence_path"])
        run.write_table("memorization/matches", matches)
        run.write_table("memorization/rates", _rates(gens, matches))
        _prune_evidence(run, set(matches["evidence_path"].dropna()))
    memorized = int(matches.loc[matches["verdict"] == "memorized", "image_id"].nunique())
    summary = {"run": str(run.root), "index": str(index.root), "hash": index.hash_name, "radius": radius,
               "images": len(gens), "candidates": len(matches), "memorized_images": memorized,
               "verdicts": matches["verdict"].value_counts().to_dict(), "seconds": round(time.perf_counter() - t0, 3)}
    run.record_stage("memorization", seconds=summary["seconds"], index=summary["index"], hash=index.hash_name,
                     radius=radius, images=len(gens), candidates=len(matches), memorized_images=memorized)
    return summary


def _train_image(item: Any) -> Image.Image | None:
    """The indexed training image of an item row (its square crop for ``square`` codes), None if unreadable."""
    try:
        img = load_train_image(item["source"], item["member"], _int(item["offset"]), _int(item["size"]))
    except (SkipImage, OSError):
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


def query_files(files: list[str], index_dir: str | Path, *, radius: int = DEFAULT_RADIUS, top_k: int = 5,
                confirm_matches: bool = True) -> list[dict[str, Any]]:
    """Look up images a user brings: matches within ``radius`` (confirmed) and the ``top_k`` nearest codes."""
    index = Index.open(index_dir)
    images = [_open(f) for f in files]
    hasher = get_hasher(index.hash_name)
    results = []
    near_ids, near_d = index.topk(np.asarray([hasher.hash_image(im) for im in images], np.uint64), top_k)
    for f, img, cands, nid, nd in zip(files, images, search_images(index, images, radius), near_ids, near_d,
                                      strict=True):
        matches = []
        if len(cands):
            items = index.items(cands["id"].to_numpy())
            for item, ham in zip(items.to_dict("records"), cands["hamming"], strict=True):
                m = {"key": item["key"], "variant": item["variant"], "uri": item["uri"], "hamming": int(ham)}
                train = _train_image(item) if confirm_matches else None
                if train is not None:
                    c = confirm(img, train)
                    m.update(tile_l2=round(c.tile_l2, 4), ssim=round(c.ssim, 4), verdict=c.verdict)
                elif confirm_matches:
                    m.update(verdict="unconfirmed")
                matches.append(m)
        near = index.items(nid)
        nearest = [{"key": k, "variant": v, "hamming": int(d)}
                   for k, v, d in zip(near["key"], near["variant"], nd, strict=True)]
        results.append({"file": f, "hash": format(hasher.hash_image(img), "016x"), "matches": matches,
                        "nearest": nearest})
    return results
