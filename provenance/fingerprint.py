"""Content fingerprints for the manifest store, and the checks that decide whether two images agree.

A stored stamp keeps three things about its pixels (about 4.3 KB):

- the 64-bit pHash (``diffaudit.imaging.phash``, the one pHash of the project), to find candidates fast;
- the 64 low-frequency DCT coefficients behind it, minus their median (``coeffs``): a bit whose
  coefficient sits far from the median (``|c| > STABLE_MARGIN``) does not flip under re-encoding,
  resizing, mild blur or noise, so candidates are compared on those *stable* bits only;
- a 64x64 grayscale thumbnail (area-averaged), for the pixel-level check.

An image is *degenerate* when its fingerprint cannot tell it apart from others: fewer than
``MIN_STABLE_BITS`` stable bits (flat, near-flat, gradients, fine periodic patterns: most pHash bits are
coin flips there) or a thumbnail with almost no structure (``gradient < MIN_GRADIENT``). A degenerate
image never matches, on either side.

The pixel check compares thumbnails tile by tile (8x8 tiles of 8x8 pixels) and scores the worst tile
twice: its RMS difference over the stored thumbnail's own neighbour-pixel gradient plus a noise floor
(``NOISE_FLOOR``), and the shift of its mean gray level over ``MEAN_SHIFT_SCALE``; the score is the larger.
The first is scale-free: re-encoding and resizing move a thumbnail by a fraction of a pixel (ratio
~0.05-0.7), a crop or shift of 1% of a side already by more (>= 0.75), and a local edit lights up one
tile. The second catches what keeps edges in place but changes tones (brightness, blends, img2img-like
edits), which benign copies do not: their tile means move by at most ~6.5 gray levels. Every constant below was chosen on ``diffaudit.corpus`` images of the
``calibration`` split and their attacks (``python bench/attribution.py --calibrate`` prints the
distributions and the choice); the held-out figures come from ``python bench/attribution.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffaudit import imaging

#: |coefficient - median| above which a pHash bit counts as stable (units of ``imaging.phash_bits``'s DCT).
#: Calibration: no benign attack (JPEG q50-95, resize 0.33-1.5x, blur sigma 1, noise sigma 5) flipped a
#: bit above 200; crops, rotations, flips and brightness changes flip bits up to 10^4-10^5.
STABLE_MARGIN = 250.0
#: An image needs this many stable bits (of 64) to be matched at all.
MIN_STABLE_BITS = 32
#: ... and at least this much structure in its thumbnail (RMS neighbour difference, gray levels).
MIN_GRADIENT = 3.0
#: Stable bits on which a candidate may disagree with the query (benign attacks: 0 of 64 on calibration).
MAX_STABLE_DISAGREEMENT = 2
#: Gray levels added to the thumbnail gradient in the pixel ratio (codec noise on smooth content).
NOISE_FLOOR = 2.0
#: Gray levels of tile-mean shift that count as much as one unit of the gradient ratio (benign max 6.6).
MEAN_SHIFT_SCALE = 11.0
#: Pixel score at or below which the query is the same picture as a stored one. Calibration: benign
#: copies reach 0.68 (a 2x downscale), a 1% shifted crop at least 0.75.
SAME_IMAGE_RATIO = 0.7
#: A best candidate is decisive when its ratio is at most this share of the runner-up's.
DECISIVE = 0.5
THUMB = 64
TILES = 8


@dataclass(frozen=True)
class Fingerprint:
    """What the store keeps about an image's pixels, and what a query is compared with."""

    phash: int
    coeffs: np.ndarray      # (64,) float32, DCT coefficients minus their median (sign = pHash bit)
    thumb: np.ndarray       # (64, 64) uint8 grayscale

    @property
    def stable(self) -> np.ndarray:
        return np.abs(self.coeffs) > STABLE_MARGIN

    @property
    def stable_bits(self) -> int:
        return int(self.stable.sum())

    @property
    def gradient(self) -> float:
        return gradient(self.thumb)

    @property
    def degenerate(self) -> str | None:
        """Why this fingerprint cannot identify an image (flat, near-flat, low texture), or None."""
        if self.stable_bits < MIN_STABLE_BITS:
            return (f"low texture: {self.stable_bits} of 64 pHash bits are stable (needs {MIN_STABLE_BITS}); "
                    "flat, near-flat and smooth images look alike to a fingerprint")
        if self.gradient < MIN_GRADIENT:
            return f"low texture: thumbnail gradient {self.gradient:.1f} (needs {MIN_GRADIENT})"
        return None

    def to_blobs(self) -> tuple[bytes, bytes]:
        return self.coeffs.astype("<f4").tobytes(), np.ascontiguousarray(self.thumb, np.uint8).tobytes()

    @classmethod
    def from_blobs(cls, phash: int, coeffs: bytes, thumb: bytes) -> Fingerprint:
        return cls(phash & ((1 << 64) - 1), np.frombuffer(coeffs, "<f4").astype(np.float32),
                   np.frombuffer(thumb, np.uint8).reshape(THUMB, THUMB))


def gradient(thumb: np.ndarray) -> float:
    """RMS difference between neighbouring thumbnail pixels (how much a one-pixel shift changes it)."""
    t = thumb.astype(np.float32)
    return float(np.sqrt((np.mean((t[1:] - t[:-1]) ** 2) + np.mean((t[:, 1:] - t[:, :-1]) ** 2)) / 2))


def fingerprint(img: Image.Image | np.ndarray) -> Fingerprint:
    """The fingerprint of decoded pixels (a PIL image or an RGB uint8 array)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    reduced = imaging.phash_reduce(img)
    low = (imaging._DCT_32_8 @ reduced @ imaging._DCT_32_8.T).ravel()
    centred = (low - np.median(low)).astype(np.float32)
    h = int(imaging.pack_bits((centred > 0)[None])[0])
    thumb = np.asarray(img.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)
    return Fingerprint(h, centred, thumb)


def stable_disagreement(query: Fingerprint, stored: Fingerprint) -> int:
    """pHash bits that differ, counted where the stored image's bit is stable."""
    return int((((query.coeffs > 0) != (stored.coeffs > 0)) & stored.stable).sum())


def pixel_ratio(query: Fingerprint, stored: Fingerprint) -> float:
    """The pixel score (0 = identical): the worse of the worst tile's RMS difference over (stored gradient +
    noise floor) and its mean-gray shift over ``MEAN_SHIFT_SCALE``."""
    d = query.thumb.astype(np.float32) - stored.thumb.astype(np.float32)
    n = THUMB // TILES
    tiles = d.reshape(TILES, n, TILES, n)
    worst = float(np.sqrt((tiles ** 2).mean(axis=(1, 3))).max())
    shift = float(np.abs(tiles.mean(axis=(1, 3))).max())
    return max(worst / (stored.gradient + NOISE_FLOOR), shift / MEAN_SHIFT_SCALE)
