"""The copies a memorization check must catch and the distractors it must not confirm, made offline.

Used three ways: to choose the confirmation thresholds (on ``diffaudit.corpus`` split ``calibration``), to
report recall and false confirmations (split ``heldout``, ``bench/memorization.py``) and in tests (split
``test``). A transform takes an RGB uint8 array and a seeded generator (positions, directions and overlay
text are random per image; strengths are fixed, so a table row means one thing).

Transforms (``TRANSFORMS``): ``jpeg50`` (JPEG quality 50), ``resize_0.5`` / ``resize_2`` (half and double
size), ``brightness`` (x1.2), ``noise`` (Gaussian, sigma 8 of 255), ``crop90`` (90% of each side at a
random position), ``rotate2`` (2 degrees either way about the centre, black corners), ``translate4`` (4 px
in a random direction, the gap black), ``overlay`` (a caption band of 10-14% of the height with white text,
or a logo box of 14-20% of the shorter side in a corner; alternately), ``grayscale`` and ``mirror``
(horizontal flip: training pipelines flip at random).

Distractors: ``partial_crop`` (a crop keeping 40-60% of each side of an indexed image, so 16-36% of its
area, scaled back to its size: a part of a training image, not a copy of it) for *near* distractors;
*far* distractors are other images of the same kind from another seed stream (``bench/memorization.py``
builds them from photos of sources the index does not hold).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _pil(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("RGB")


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    _pil(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def resize(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (max(8, round(w * factor)), max(8, round(h * factor)))
    method = Image.Resampling.LANCZOS if factor < 1 else Image.Resampling.BICUBIC
    return np.asarray(_pil(rgb).resize(size, method))


def brightness(rgb: np.ndarray, factor: float = 1.2) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(_pil(rgb)).enhance(factor))


def noise(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) + rng.normal(0, sigma, rgb.shape), 0, 255).astype(np.uint8)


def crop(rgb: np.ndarray, rng: np.random.Generator, keep: float = 0.9) -> np.ndarray:
    """A crop keeping ``keep`` of each side at a random position."""
    h, w = rgb.shape[:2]
    ch, cw = max(8, round(h * keep)), max(8, round(w * keep))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return np.ascontiguousarray(rgb[y:y + ch, x:x + cw])


def rotate(rgb: np.ndarray, rng: np.random.Generator, degrees: float = 2.0) -> np.ndarray:
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return np.asarray(_pil(rgb).rotate(sign * degrees, Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0)))


def translate(rgb: np.ndarray, rng: np.random.Generator, pixels: int = 4) -> np.ndarray:
    """The content moved by ``pixels`` along a random direction of the eight; the uncovered band black."""
    dy, dx = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b][int(rng.integers(8))]
    out = np.zeros_like(rgb)
    h, w = rgb.shape[:2]
    sy, sx = dy * pixels, dx * pixels
    out[max(sy, 0):h + min(sy, 0), max(sx, 0):w + min(sx, 0)] = rgb[max(-sy, 0):h + min(-sy, 0),
                                                                    max(-sx, 0):w + min(-sx, 0)]
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _text(rng: np.random.Generator, words: int) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, int(rng.integers(3, 9)))) for _ in range(words))


def overlay(rgb: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """A caption band (dark, 10-14% of the height, white text) or a logo box in a corner."""
    img = _pil(rgb)
    w, h = img.size
    draw = ImageDraw.Draw(img, "RGBA")
    kind = kind or ("caption" if rng.random() < 0.5 else "logo")
    if kind == "caption":
        band = max(6, round(h * rng.uniform(0.10, 0.14)))
        top = h - band if rng.random() < 0.7 else 0
        draw.rectangle((0, top, w, top + band), fill=(0, 0, 0, 170))
        draw.text((round(w * 0.04), top + band // 6), _text(rng, 4), fill=(255, 255, 255, 255),
                  font=_font(max(6, round(band * 0.6))))
    else:
        side = max(8, round(min(w, h) * rng.uniform(0.14, 0.20)))
        x0 = round(w * 0.03) if rng.random() < 0.5 else w - side - round(w * 0.03)
        y0 = round(h * 0.03) if rng.random() < 0.5 else h - side - round(h * 0.03)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle((x0, y0, x0 + side, y0 + side), fill=(*colour, 255))
        draw.text((x0 + side // 8, y0 + side // 3), _text(rng, 1)[:4].upper(), fill=(255, 255, 255, 255),
                  font=_font(max(6, side // 3)))
    return np.asarray(img)


def grayscale(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(_pil(rgb).convert("L").convert("RGB"))


def mirror(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, ::-1])


def partial_crop(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near distractor: 40-60% of each side of an image, at a random position, scaled back to its size."""
    h, w = rgb.shape[:2]
    part = crop(rgb, rng, keep=float(rng.uniform(0.4, 0.6)))
    return np.asarray(_pil(part).resize((w, h), Image.Resampling.BICUBIC))


TRANSFORMS: dict[str, Transform] = {
    "jpeg50": lambda x, r: jpeg(x, 50),
    "resize_0.5": lambda x, r: resize(x, 0.5),
    "resize_2": lambda x, r: resize(x, 2.0),
    "brightness": lambda x, r: brightness(x, 1.2),
    "noise": noise,
    "crop90": crop,
    "rotate2": rotate,
    "translate4": translate,
    "overlay": overlay,
    "grayscale": lambda x, r: grayscale(x),
    "mirror": lambda x, r: mirror(x),
}
