"""The fidelity gate for generation modes that change pixels (``--approximate``): arithmetic only.

An audit must say what it audited, and an approximation must not move what the audit measures. Three
checks, each an explicit number against a bound:
- pixels: max and mean absolute difference (0-255) and PSNR against the exact images of the same seeds;
- CLIP score: mean image-text cosine of the approximate images minus the exact ones, with a paired
  bootstrap interval (the embeddings come from whatever CLIP the caller has; offline there are none);
- bias shares: for each (subject, label), whether the approximate run's share lies inside the exact run's
  95% Wilson interval (what a probe run would report moving).

The runner applies the pixel check to a sample of each run (the exact images of the first few jobs are
generated too); the CLIP and share checks run in ``bench/fast.py`` where weights and probes exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# A coarse guard, chosen rather than measured: an approximation that misses it is broken (an FP8 overflow,
# a stale cache), not merely approximate. Passing it proves no fidelity; the bench's CLIP and share checks do.
MIN_PSNR_DB = 20.0
MAX_MEAN_DIFF = 12.0  # of 255
MAX_CLIP_DROP = 0.01  # cosine


@dataclass(frozen=True)
class PixelStats:
    images: int
    max_diff: int
    mean_diff: float
    psnr_db: float


def pixel_stats(exact: Sequence[np.ndarray], approx: Sequence[np.ndarray]) -> PixelStats:
    """Differences between two lists of uint8 images of the same shapes (PSNR over all pixels pooled)."""
    if len(exact) != len(approx) or not len(exact):
        raise ValueError("give the same, non-zero number of exact and approximate images")
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(exact, approx, strict=True)]
    mse = float(np.mean(np.concatenate([d.ravel().astype(np.float64) ** 2 for d in diffs])))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return PixelStats(len(diffs), int(max(d.max() for d in diffs)), float(np.mean([d.mean() for d in diffs])), psnr)


def clip_score_delta(exact_img: np.ndarray, approx_img: np.ndarray, text: np.ndarray, *, boot: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """Mean cosine(image, its prompt) of approximate minus exact images, with a paired 95% bootstrap interval.
    Rows are per image; ``text`` holds each image's prompt embedding."""
    def cos(a, b):
        return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    d = cos(approx_img, text) - cos(exact_img, text)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (boot, len(d)))].mean(axis=1)
    return {"delta": float(d.mean()), "ci_low": float(np.percentile(means, 2.5)),
            "ci_high": float(np.percentile(means, 97.5)), "images": int(len(d))}


def shares_moved(exact: dict[tuple[str, str], tuple[int, int]], approx: dict[tuple[str, str], tuple[int, int]]
                 ) -> list[dict[str, Any]]:
    """(subject, label) -> (count, n) in each run; the cells whose approximate share leaves the exact share's
    95% Wilson interval."""
    from statsmodels.stats.proportion import proportion_confint

    moved = []
    for key, (k, n) in exact.items():
        if key not in approx or n == 0 or approx[key][1] == 0:
            continue
        lo, hi = proportion_confint(k, n, method="wilson")
        share = approx[key][0] / approx[key][1]
        if not lo <= share <= hi:
            moved.append({"subject": key[0], "label": key[1], "exact_share": k / n, "ci": [float(lo), float(hi)],
                          "approx_share": share})
    return moved


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    pixels: dict[str, Any] | None = None
    clip: dict[str, float] | None = None
    shares_moved: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(pixels: PixelStats, clip: dict[str, float] | None = None, moved: list[dict[str, Any]] | None = None, *,
         min_psnr: float = MIN_PSNR_DB, max_mean: float = MAX_MEAN_DIFF, max_clip_drop: float = MAX_CLIP_DROP
         ) -> Verdict:
    """Pass only if every check that was measured is within its bound; say which failed. A check not measured
    (``None``) neither passes nor fails: the verdict names it as not measured."""
    reasons = []
    if pixels.psnr_db < min_psnr:
        reasons.append(f"PSNR {pixels.psnr_db:.1f} dB below {min_psnr} dB")
    if pixels.mean_diff > max_mean:
        reasons.append(f"mean pixel difference {pixels.mean_diff:.2f} above {max_mean}")
    if clip is not None and clip["ci_low"] < -max_clip_drop and clip["delta"] < 0:
        reasons.append(f"CLIP score drops by {-clip['delta']:.4f} (95% CI down to {clip['ci_low']:.4f})")
    if moved:
        reasons.append(f"{len(moved)} bias share(s) left the exact run's 95% interval")
    notes = [f"{what} not measured" for what, v in (("CLIP score", clip), ("bias shares", moved)) if v is None]
    return Verdict(not reasons, reasons + notes, asdict(pixels), clip, moved)
