"""Varied images for calibration and held-out measurement, made offline and reproducibly.

Thresholds (pixel confirmation, store attribution, watermark strength) are chosen on one split and
reported on another, never on the images a test asserts on. Splits:

- ``calibration``: random crops of one half of the photos scikit-image and scikit-learn ship
  (``PHOTOS_CALIBRATION``), plus synthetic content from the calibration seed stream;
- ``heldout``: crops of the *other* half of the photos (``PHOTOS_HELDOUT``), synthetic content from
  another seed stream: no photo a threshold was tuned on appears here;
- ``test``: synthetic content only, from a third seed stream (tests assert on these, or on named photos).

Kinds (``KINDS``): ``photo`` (random crop, rescale, flip, rotation, colour jitter, sometimes grayscale),
``document`` (text lines, headings and a table on paper), ``graphic`` (flat shapes, a bar chart, a logo
word), ``flat`` (one colour, near-flat noise or a faint gradient), ``texture`` (noise, plasma, gradient)
and ``pattern`` (stripes, checkerboards, rings, grids). Each sample says its kind and source, so a
benchmark can report figures per kind.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = ("calibration", "heldout", "test")
KINDS = ("photo", "document", "graphic", "flat", "texture", "pattern")
#: Default mix: mostly photos, every other kind well represented.
WEIGHTS = {"photo": 0.4, "document": 0.12, "graphic": 0.12, "flat": 0.1, "texture": 0.13, "pattern": 0.13}
_STREAM = {"calibration": 1_000_003, "heldout": 2_000_003, "test": 3_000_017}
#: Photos split into two disjoint halves (by name, so the split does not move when a package adds one).
PHOTOS_CALIBRATION = ("skimage:astronaut", "skimage:chelsea", "skimage:camera", "skimage:brick",
                      "skimage:grass", "skimage:immunohistochemistry", "skimage:clock", "skimage:horse",
                      "sklearn:china.jpg")
PHOTOS_HELDOUT = ("skimage:coffee", "skimage:cat", "skimage:rocket", "skimage:hubble_deep_field",
                  "skimage:gravel", "skimage:moon", "skimage:retina", "skimage:coins", "skimage:page",
                  "sklearn:flower.jpg")


@dataclass(frozen=True)
class Sample:
    """One generated image: what kind it is, where it came from, and its RGB uint8 pixels."""

    kind: str
    source: str
    rgb: np.ndarray


@functools.lru_cache(maxsize=64)
def photo(ref: str) -> np.ndarray:
    """A packaged photo as RGB uint8 (``skimage:NAME`` or ``sklearn:FILE``); grayscale ones are stacked."""
    scheme, _, name = ref.partition(":")
    if scheme == "skimage":
        import skimage.data

        arr = np.asarray(getattr(skimage.data, name)())
    elif scheme == "sklearn":
        from sklearn.datasets import load_sample_image

        arr = np.asarray(load_sample_image(name))
    else:
        raise ValueError(f"unknown photo reference {ref!r}")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1.0))).astype(np.uint8)
    return np.ascontiguousarray(arr[:, :, :3])


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    inter = cv2.INTER_AREA if h * w < img.shape[0] * img.shape[1] else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=inter))


def _photo(rng: np.random.Generator, size: tuple[int, int], pool: Sequence[str]) -> tuple[str, np.ndarray]:
    ref = pool[int(rng.integers(len(pool)))]
    src = photo(ref)
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(0.3, 1.0)), int(w * rng.uniform(0.3, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = _resize(src[y:y + ch, x:x + cw], size)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.2 and size[0] == size[1]:
        img = np.rot90(img)
    img = img.astype(np.float32) * rng.uniform(0.8, 1.2, 3)
    if rng.random() < 0.1:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    return ref, np.clip(img, 0, 255).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _words(rng: np.random.Generator, n: int) -> str:
    letters = np.array(list(string.ascii_lowercase))
    return " ".join("".join(rng.choice(letters, int(rng.integers(2, 10)))) for _ in range(n))


def _document(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = size
    paper = tuple(int(v) for v in rng.integers(235, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    img = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(img)
    margin, y = int(w * rng.uniform(0.05, 0.12)), int(h * rng.uniform(0.04, 0.1))
    text_px = int(rng.integers(10, 22))
    draw.text((margin, y), _words(rng, int(rng.integers(2, 5))).title(), fill=ink, font=_font(text_px * 2))
    y += text_px * 3
    while y < h - margin:
        if rng.random() < 0.12:  # a small table
            rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 5))
            cw, rh = (w - 2 * margin) // cols, text_px + 8
            for r in range(rows):
                for c in range(cols):
                    box = (margin + c * cw, y + r * rh, margin + (c + 1) * cw, y + (r + 1) * rh)
                    draw.rectangle(box, outline=ink)
                    draw.text((box[0] + 3, box[1] + 3), _words(rng, 1), fill=ink, font=_font(text_px))
            y += rows * rh + text_px
            continue
        draw.text((margin, y), _words(rng, int(rng.integers(3, 12))), fill=ink, font=_font(text_px))
        y += int(text_px * rng.uniform(1.3, 1.8))
    return np.asarray(img)


def _graphic(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = size

    def colour() -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    img = Image.new("RGB", (w, h), colour())
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.3:  # a bar chart
        bars = int(rng.integers(3, 9))
        bw = w // (bars + 2)
        for i in range(bars):
            top = int(h * rng.uniform(0.15, 0.85))
            draw.rectangle((bw * (i + 1), top, bw * (i + 1) + int(bw * 0.8), int(h * 0.9)), fill=colour())
        draw.line((bw // 2, int(h * 0.9), w - bw // 2, int(h * 0.9)), fill=(0, 0, 0), width=2)
    for _ in range(int(rng.integers(2, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour())
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour())
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour())
    if rng.random() < 0.5:  # a logo word
        draw.text((int(w * 0.1), int(h * rng.uniform(0.1, 0.8))), _words(rng, 1).upper(), fill=colour(),
                  font=_font(int(min(h, w) * rng.uniform(0.08, 0.2))))
    return np.asarray(img)


def _flat(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    base = rng.integers(0, 256, 3).astype(np.float32)
    if rng.random() < 0.15:
        base[:] = float(rng.choice([0, 255]))  # black (a safety checker's output) or white
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    choice = rng.random()
    if choice < 0.4:
        img = img + rng.normal(0, rng.uniform(0.5, 3.0), (h, w, 3))
    elif choice < 0.7:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = img + (rng.uniform(-12, 12) * xx + rng.uniform(-12, 12) * yy)[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    kind = rng.integers(3)
    if kind == 0:  # white noise
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == 1:  # colour gradient with a little noise
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([(a * xx + b * yy) % 1.0 for a, b in rng.uniform(-2, 2, (3, 2))], axis=-1) * 255
        return np.clip(base + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
    small = rng.uniform(0, 255, (max(2, h // int(rng.integers(4, 64))), max(2, w // int(rng.integers(4, 64))), 3))
    return _resize(small.astype(np.float32), size).clip(0, 255).astype(np.uint8)


def _pattern(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = float(rng.uniform(4, max(h, w) / 4))
    kind = int(rng.integers(4))
    if kind == 0:  # stripes at an angle
        t = np.deg2rad(rng.uniform(0, 180))
        field = np.sin(2 * np.pi * (xx * np.cos(t) + yy * np.sin(t)) / period) > 0
    elif kind == 1:  # checkerboard
        field = ((xx // period).astype(int) + (yy // period).astype(int)) % 2 == 0
    elif kind == 2:  # rings
        r = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
        field = np.sin(2 * np.pi * r / period) > 0
    else:  # grid lines
        field = ((xx % period) < 2) | ((yy % period) < 2)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return np.where(field[..., None], a, b).astype(np.uint8)


_MAKERS = {"document": _document, "graphic": _graphic, "flat": _flat, "texture": _texture, "pattern": _pattern}


def corpus(n: int, *, split: str = "heldout", seed: int = 0, min_side: int = 256, max_side: int = 768,
           kinds: Sequence[str] | None = None, square: bool = False) -> Iterator[Sample]:
    """``n`` reproducible samples of ``split`` (see the module docstring); ``seed`` picks a stream within it.

    Kinds are drawn by ``WEIGHTS`` among ``kinds`` (default: all; the ``test`` split has no photos)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    allowed = [k for k in (kinds or KINDS) if k in KINDS and not (split == "test" and k == "photo")]
    if not allowed:
        raise ValueError(f"no kinds to draw from {kinds!r} in split {split!r}")
    p = np.array([WEIGHTS[k] for k in allowed])
    p /= p.sum()
    pool = PHOTOS_CALIBRATION if split == "calibration" else PHOTOS_HELDOUT
    rng = np.random.default_rng([_STREAM[split], seed])
    for i in range(n):
        h = int(rng.integers(min_side, max_side + 1))
        w = h if square else int(rng.integers(min_side, max_side + 1))
        kind = allowed[int(rng.choice(len(allowed), p=p))]
        if kind == "photo":
            source, rgb = _photo(rng, (h, w), pool)
        else:
            source, rgb = f"{kind}:{split}:{seed}:{i}", _MAKERS[kind](rng, (h, w))
        yield Sample(kind, source, np.ascontiguousarray(rgb, dtype=np.uint8))
