"""Choose the confirmation thresholds on one split and measure them on another.

The set (``pairs``) is built from ``diffaudit.corpus.corpus(split=...)``: *indexed* images of every kind
(photos only from half of the split's photo sources), each with its transformed copies (``copies.py``,
paired with their source), *near* distractors (crops showing 16-36% of an indexed image, paired with it)
and *far* distractors (other images of the same kind, photos from the other half of the sources, each
paired with the indexed images of its kind nearest by pHash: the hardest pairs the index would offer).
Every pair is aligned and scored once (``confirm.scored_candidates``); ``evaluate`` then replays the
verdict under any thresholds without aligning again, and ``choose`` searches them:

1. a rule for tiles and alignments (``TILE_GRID``): when a tile is textured, correlated and close enough
   to agree, how many textured tiles a verdict needs, whether one overlay region may be left out
   (``confirm.OCCLUSIONS``) and how strong a phase-correlation peak must be to support a verdict; for each,
2. ``memorized`` takes the (agreement, SSIM) pair with the best recall over the copies such that no
   distractor is confirmed even at thresholds ``MEMORIZED_MARGIN`` looser; ``near_duplicate`` the best with
   no distractor confirmed at thresholds ``NEAR_MARGIN`` looser (both are hits; ``memorized`` is the
   surer). Ties go to the stricter thresholds, and the tile rule with the best recall wins.

The thresholds are chosen on two draws of the split (``SEEDS``; 160 indexed images each, ``NEAR_PER`` near
distractors per image: one draw of 160 near distractors let a rule through that confirmed 2% of another
draw's) and checked on a third (``CHECK_SEED``) before the held-out bench measures them.

The search-time variants (``variants.SEARCH``) are chosen on the same split by ``choose_variants``: every
copy (``copies.TRANSFORMS`` but the mirror, which the mirrored full code finds) of an indexed image that is
not degenerate is hashed in every candidate family (``variants.CANDIDATES``); greedily, the family that
brings the most more copies within the radius (summed over the transforms) per code it costs is added,
until ``VARIANT_BUDGET`` codes (per side: the mirrored query gets the same families) or no family helps.

Run: ``python bench/memorization.py --calibrate`` or ``python -m audit.memorization.calibration [--quick]``
(print the chosen thresholds, variant families and the calibration figures; the constants in
``confirm.py`` and ``variants.SEARCH`` are set from that output). Tests never call it, and the figures
reported in the README come from the held-out split (``bench/memorization.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from audit.memorization import confirm as cf
from audit.memorization import variants as vr
from audit.memorization.copies import TRANSFORMS, partial_crop
from audit.memorization.verdicts import DEGENERATE, MEMORIZED, is_hit

MEMORIZED_MARGIN = 0.15         # memorized: no distractor confirmed even at thresholds this much looser
NEAR_MARGIN = 0.05              # near_duplicate: ... this much looser
TILE_GRID = {"textured": (0.03, 0.04), "tile_corr": (0.5, 0.6, 0.7), "tile_l2": (0.12, 0.15, 0.2),
             "min_evidence": (4, 6, 8, 12), "occlusion": (False, True), "min_phase_response": (0.0, 0.2, 0.3, 0.4)}
LEVELS = np.round(np.arange(0.3, 1.0001, 0.025), 3)
NEAR_PER = 3                    # near distractors per indexed image
SEEDS = (0, 1)                  # draws of the calibration split the thresholds are chosen on ...
CHECK_SEED = 2                  # ... and the draw (same split) they are checked on before the held-out bench
VARIANT_BUDGET = 40             # codes per side the search-time variants may cost (``full`` included)


@dataclass
class Pair:
    """One scored query-training pair of the calibration (or held-out) set."""

    group: str                 # copy | near | far
    transform: str             # a TRANSFORMS name, partial_crop, or far
    kind: str                  # the corpus kind of the training image
    query: cf.Prepared
    train: cf.Prepared
    scored: list
    seconds: float

    def confirm(self, t: cf.Thresholds) -> cf.Confirmation:
        return cf.decide(self.query, self.train, self.scored, t)


def split_photos(samples: list, pool: Iterable[str]) -> tuple[list, list]:
    """(indexable, distractor) samples: photos by source, alternately; other kinds by position."""
    order = {ref: i for i, ref in enumerate(sorted(set(pool)))}
    a, b = [], []
    for i, s in enumerate(samples):
        side = order.get(s.source, i) % 2 if s.kind == "photo" else i % 2
        (a if side == 0 else b).append(s)
    return a, b


def build(split: str, n: int, *, seed: int = 0, max_side: int = 512, far_per: int = 2, near_per: int = NEAR_PER,
          transforms: Iterable[str] = tuple(TRANSFORMS), progress: bool = True, light: bool = True) -> list[Pair]:
    """Scored pairs of ``n`` indexed images of ``split``: every transform's copy, ``near_per`` near and
    about ``far_per`` far distractors per indexed image. ``light`` drops the pixels once scored (verdicts
    are replayed from the scores; thousands of pairs then fit in memory)."""
    from diffaudit import corpus
    from diffaudit.imaging import phash

    pool = corpus.PHOTOS_CALIBRATION if split == "calibration" else corpus.PHOTOS_HELDOUT
    drawn = list(corpus.corpus(4 * n, split=split, seed=seed, max_side=max_side))
    indexed, others = split_photos(drawn, pool)
    indexed = indexed[:n]
    distract = others[: len(indexed)]
    rng = np.random.default_rng([seed, 7])
    jobs: list[tuple[str, str, str, np.ndarray, np.ndarray]] = []
    for s in indexed:
        for name in transforms:
            jobs.append(("copy", name, s.kind, TRANSFORMS[name](s.rgb, rng), s.rgb))
        for _ in range(near_per):
            jobs.append(("near", "partial_crop", s.kind, partial_crop(s.rgb, rng), s.rgb))
    codes = np.array([phash(Image.fromarray(s.rgb)) for s in indexed], dtype=np.uint64)
    kinds = np.array([s.kind for s in indexed])
    for d in distract:
        same = np.flatnonzero(kinds == d.kind)
        if not len(same):
            continue
        dist = np.bitwise_count(codes[same] ^ np.uint64(phash(Image.fromarray(d.rgb))))
        for j in same[np.argsort(dist, kind="stable")[:far_per]]:
            jobs.append(("far", "far", d.kind, d.rgb, indexed[j].rgb))
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, unit="pair", desc=f"align {split}")
    pairs, cache = [], {}
    for group, name, kind, q, t in jobs:
        t0 = time.perf_counter()
        key = id(t)
        if key not in cache:
            cache[key] = cf.prepare(Image.fromarray(t))
        train = cache[key]
        query = cf.prepare(Image.fromarray(q))
        scored = cf.scored_candidates(query, train)
        pairs.append(Pair(group, name, kind, query, train, scored, time.perf_counter() - t0))
    if light:
        for p in pairs:
            for x in (p.query, p.train):
                x.lum, x._features = None, None
    return pairs


def evaluate(pairs: list[Pair], t: cf.Thresholds | None = None) -> dict:
    """Per transform: pairs, degenerate, memorized and hit counts; per distractor group: hits."""
    t = t or cf.DEFAULT
    out: dict = {}
    for p in pairs:
        v = p.confirm(t).verdict
        row = out.setdefault(p.group, {}).setdefault(p.transform, {"n": 0, "degenerate": 0, "memorized": 0,
                                                                      "hit": 0})
        row["n"] += 1
        row["degenerate"] += v == DEGENERATE
        row["memorized"] += v == MEMORIZED
        row["hit"] += is_hit(v)
    return out


def _best_levels(pairs: list[Pair], t: cf.Thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair, per candidate passing the overlap and evidence rules: (agreement, ssim); and which pairs are
    copies that are not degenerate. Returned as (pair index, agreement, ssim) arrays."""
    idx, agr, ssim = [], [], []
    for i, p in enumerate(pairs):
        if p.query.is_degenerate(t) or p.train.is_degenerate(t):
            continue
        for a, s in p.scored:
            if not t.usable(a) or s.overlap < t.min_overlap or s.train_overlap < t.min_train_overlap:
                continue
            share, evidence = s.agreement(t)
            if evidence < t.min_evidence:
                continue
            idx.append(i)
            agr.append(share)
            ssim.append(s.ssim)
    return np.asarray(idx, np.int64), np.asarray(agr), np.asarray(ssim)


def _passing(n: int, idx: np.ndarray, agr: np.ndarray, ssim: np.ndarray, a: float, s: float) -> np.ndarray:
    hit = np.zeros(n, bool)
    ok = (agr >= a) & (ssim >= s)
    hit[idx[ok]] = True
    return hit


def choose(pairs: list[Pair], grid: dict | None = None) -> tuple[cf.Thresholds, dict]:
    """The thresholds with the best copy recall and no confirmed distractor (see the module docstring)."""
    grid = grid or TILE_GRID
    copies = np.array([p.group == "copy" for p in pairs])
    best: tuple | None = None
    for values in itertools.product(*grid.values()):
        t = dataclasses.replace(cf.DEFAULT, **dict(zip(grid, values, strict=True)))
        idx, agr, ssim = _best_levels(pairs, t)
        chosen = {}
        for level, margin in (("memorized", MEMORIZED_MARGIN), ("near", NEAR_MARGIN)):
            top = None
            for a, s in itertools.product(LEVELS, LEVELS):
                if _passing(len(pairs), idx, agr, ssim, a - margin, s - margin)[~copies].any():
                    continue
                recall = _passing(len(pairs), idx, agr, ssim, a, s)[copies].mean()
                key = (recall, a + s)  # ties: the stricter pair
                if top is None or key > top[0]:
                    top = (key, a, s)
            chosen[level] = top
        if chosen["memorized"] is None or chosen["near"] is None:
            continue
        near_a, near_s = chosen["near"][1:]
        mem_a, mem_s = chosen["memorized"][1:]
        cand = dataclasses.replace(t, memorized_agreement=float(mem_a), memorized_ssim=float(mem_s),
                                   near_agreement=float(min(near_a, mem_a)), near_ssim=float(min(near_s, mem_s)))
        score = (chosen["near"][0][0], chosen["memorized"][0][0])
        if best is None or score > best[0]:
            best = (score, cand)
    if best is None:
        raise RuntimeError("no thresholds keep every distractor unconfirmed")
    return best[1], {"near_recall": best[0][0], "memorized_recall": best[0][1]}


def summary(pairs: list[Pair], t: cf.Thresholds) -> list[dict]:
    """Rows per transform and distractor group: counts under thresholds ``t`` and mean seconds per pair."""
    table = evaluate(pairs, t)
    secs: dict = {}
    for p in pairs:
        secs.setdefault((p.group, p.transform), []).append(p.seconds)
    rows = []
    for group, per in table.items():
        for name, row in per.items():
            rows.append({"group": group, "transform": name, **row,
                         "ms_per_pair": round(1000 * float(np.mean(secs[(group, name)])), 1)})
    return rows


def variant_distances(split: str, n: int, *, seed: int = 0, max_side: int = 512,
                      families: Iterable[str] = vr.CANDIDATES, progress: bool = True) -> dict[str, list[dict]]:
    """Per transform, per copy (neither image degenerate): the smallest Hamming distance from each family's
    codes of the copy to its training image's code, plus the training image's ``kind``."""
    from audit.memorization.hashing import get_hasher
    from diffaudit import corpus

    families = tuple(families)
    pool = corpus.PHOTOS_CALIBRATION if split == "calibration" else corpus.PHOTOS_HELDOUT
    drawn = list(corpus.corpus(4 * n, split=split, seed=seed, max_side=max_side))
    indexed = split_photos(drawn, pool)[0][:n]
    hasher = get_hasher("phash")
    rng = np.random.default_rng([seed, 13])
    out: dict[str, list[dict]] = {}
    names = [t for t in TRANSFORMS if t != "mirror"]
    items = [(t, s) for t in names for s in indexed]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, unit="copy", desc=f"variants {split}")
    flat = {id(s): cf.prepare(Image.fromarray(s.rgb)).degenerate for s in indexed}
    codes = {id(s): np.uint64(hasher.hash_image(Image.fromarray(s.rgb))) for s in indexed}
    for t, s in items:
        q = Image.fromarray(TRANSFORMS[t](s.rgb, rng))
        if flat[id(s)] or cf.prepare(q).degenerate:
            continue
        fams = vr.family_codes(hasher, q, families)
        row = {f: int(np.bitwise_count(c ^ codes[id(s)]).min()) for f, c in fams.items()}
        out.setdefault(t, []).append({"kind": s.kind, **row})
    return out


def choose_variants(dist: dict[str, list[dict]], *, budget: int = VARIANT_BUDGET, radius: int = 10,
                    families: Iterable[str] = vr.CANDIDATES) -> tuple[tuple[str, ...], list[dict]]:
    """The greedy choice of search families (see the module docstring) and its path, one row per step."""
    families = tuple(families)
    cost = {f: len(vr.family(f, np.zeros((64, 64, 3), np.uint8))) for f in families}
    mats = {t: np.array([[r[f] for f in ("full", *families)] for r in rows]) <= radius for t, rows in dist.items()}

    def found(chosen: list[int]) -> dict[str, int]:
        cols = [0] + [1 + i for i in chosen]
        return {t: int(m[:, cols].any(axis=1).sum()) for t, m in mats.items()}

    chosen: list[int] = []
    path = [{"family": "full", "codes": 1, **found(chosen)}]
    while True:
        spent = 1 + sum(cost[families[i]] for i in chosen)
        base = sum(found(chosen).values())
        best = None
        for i, f in enumerate(families):
            if i in chosen or spent + cost[f] > budget:
                continue
            gain = (sum(found(chosen + [i]).values()) - base) / cost[f]
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, i)
        if best is None:
            break
        chosen.append(best[1])
        path.append({"family": families[best[1]], "codes": spent + cost[families[best[1]]], **found(chosen)})
    return tuple(families[i] for i in chosen), path


def calibrate(n: int = 160, *, seed: int = 0, emit=print, variants: bool = True, thresholds: bool = True) -> dict:
    """Choose the search variants and the thresholds on the calibration split; ``emit`` each result as a
    JSON line. Returns {"variants": ..., "thresholds": ...}."""
    out: dict = {}
    if variants:
        dist = variant_distances("calibration", n, seed=seed)
        chosen, path = choose_variants(dist)
        totals = {t: len(rows) for t, rows in dist.items()}
        for row in path:
            emit(json.dumps({"variant_step": row["family"], "codes": row["codes"],
                             "within_radius": {t: round(row[t] / totals[t], 3) for t in totals}}))
        emit(json.dumps({"variants": list(chosen), "codes_per_side": path[-1]["codes"],
                         "current": list(vr.SEARCH), "same_as_current": tuple(chosen) == tuple(vr.SEARCH)}))
        out["variants"] = chosen
    if thresholds:
        pairs = [p for s in SEEDS for p in build("calibration", n, seed=seed + s)]
        t, recall = choose(pairs)
        emit(json.dumps({"thresholds": dataclasses.asdict(t), **recall,
                         "same_as_current": t == cf.DEFAULT}))
        for row in summary(pairs, t):
            emit(json.dumps({"set": f"calibration seeds {[seed + s for s in SEEDS]}", **row}))
        check = build("calibration", n, seed=seed + CHECK_SEED)
        for row in summary(check, t):
            emit(json.dumps({"set": f"calibration seed {seed + CHECK_SEED} (check)", **row}))
        out["thresholds"] = t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="60 indexed images instead of 160")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    calibrate(args.n or (60 if args.quick else 160), seed=args.seed)


if __name__ == "__main__":
    main()
