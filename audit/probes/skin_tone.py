"""Skin tone of each face as a Monk Skin Tone (MST) category, from the Individual Typology Angle.

ITA = arctan((L* - 50) / b*) in degrees (Chardon et al. 1991), computed in float CIELAB
(``skimage.color.rgb2lab`` on RGB in [0, 1], D65). Two published audits got this wrong, one by
swapping R and B (OpenCV images are BGR), one by using 8-bit OpenCV Lab (L scaled to 0..255, a/b
offset by 128); here pixels are RGB throughout and the Monk swatch test guards both.

Each face's ITA is the median over its skin pixels, mapped to the MST category whose published
swatch (Monk 2019, skintone.google) has the nearest ITA, i.e. thresholds at the midpoints between
swatch ITAs. Skin pixels: inside the ellipse inscribed in the central part of the face box (which
leaves out hair, background and most of the eyes), with a skin-like colour: hue angle
atan2(b*, a*) in [0, 100] degrees, chroma >= 2 and 8 <= L* <= 98 (drops grey, blue/green and
specular pixels while keeping every MST swatch). Too few skin pixels: abstain (``few_skin_pixels``).
An image without a face gets one abstention row (``no_face``).

``score`` is the face's ITA in degrees; ``margin`` its distance in degrees to the nearest category
threshold (small margins are where lighting decides the category).

Beyond one number (Thong, Joniak and Xiang, ICCV 2023, "Beyond Skin Tone: A Multidimensional Measure of
Apparent Skin Color"): ITA mixes lightness and hue, so each face also gets the median perceptual
lightness L* (attribute ``skin_lightness``) and the median hue angle h* = atan2(b*, a*) in degrees
(``skin_hue``: lower is redder, higher yellower) of the same skin pixels, in ``score``. Their labels are
10-unit bins (``L* 50-60``, ``h* 50-60``), so the summary carries their distribution per subject; the
continuous per-subject summaries with intervals are ``audit.skin``'s. The hue gate of the skin mask
(0-100 degrees) bounds h*. ``margin`` of these rows is the distance to the nearest bin edge.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd

from audit.probes.base import FEW_SKIN_PIXELS, NO_FACE, Face, FaceDetector, ImageBatch, frame, row
from audit.probes.faces import make_detector

VERSION = "2"

# Monk Skin Tone scale swatches, MST 1..10 (Monk 2019; https://skintone.google/the-scale).
MONK_HEX: tuple[str, ...] = ("#f6ede4", "#f3e7db", "#f7ead0", "#eadaba", "#d7bd96",
                             "#a07e56", "#825c43", "#604134", "#3a312a", "#292420")
MONK_LABELS: tuple[str, ...] = tuple(f"MST-{i:02d}" for i in range(1, 11))
BIN = 10  # width of the L* and h* label bins
LIGHTNESS_LABELS: tuple[str, ...] = tuple(f"L* {lo}-{lo + BIN}" for lo in range(0, 100, BIN))
HUE_LABELS: tuple[str, ...] = tuple(f"h* {lo}-{lo + BIN}" for lo in range(0, 100, BIN))


def bin_label(value: float, labels: tuple[str, ...]) -> tuple[str, float]:
    """The 10-unit bin label of an L* or h* value in [0, 100], and its distance to the nearest bin edge."""
    i = min(max(int(value // BIN), 0), len(labels) - 1)
    return labels[i], float(min(value - i * BIN, (i + 1) * BIN - value))


def hue_angle(lab: np.ndarray) -> np.ndarray:
    """CIELAB hue angle h* = atan2(b*, a*) in degrees (``... x 3`` input)."""
    lab = np.asarray(lab, dtype=np.float64)
    return np.degrees(np.arctan2(lab[..., 2], lab[..., 1]))


def hex_to_rgb(value: str) -> tuple[int, int, int]:
    value = value.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Float CIELAB (D65) of RGB ``uint8`` pixels (``... x 3``), via scikit-image on RGB in [0, 1]."""
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.float64) / 255.0)


def ita(lab: np.ndarray) -> np.ndarray:
    """Individual Typology Angle in degrees from CIELAB (``... x 3``); b* <= 0 counts as b* -> 0+."""
    lab = np.asarray(lab, dtype=np.float64)
    return np.degrees(np.arctan2(lab[..., 0] - 50.0, np.maximum(lab[..., 2], 1e-6)))


MONK_ITA: np.ndarray = ita(rgb_to_lab(np.array([hex_to_rgb(h) for h in MONK_HEX], dtype=np.uint8)))
# MST ITAs fall strictly from MST 1 to MST 10, so the category thresholds are the midpoints.
_THRESHOLDS: np.ndarray = (MONK_ITA[:-1] + MONK_ITA[1:]) / 2


def monk_category(angle: float) -> tuple[str, float]:
    """The MST label whose swatch ITA is nearest to ``angle``, and the distance to the nearest threshold."""
    index = int(np.sum(angle < _THRESHOLDS))  # thresholds fall, so count those above the angle
    return MONK_LABELS[index], float(np.min(np.abs(_THRESHOLDS - angle)))


def skin_mask(lab: np.ndarray) -> np.ndarray:
    """Skin-like pixels of a CIELAB patch (see the module docstring for the rule)."""
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    hue = np.degrees(np.arctan2(b, a))
    return (hue >= 0) & (hue <= 100) & (np.hypot(a, b) >= 2) & (L >= 8) & (L <= 98)


def face_region(pixels: np.ndarray, box: tuple[float, float, float, float], *, width: float = 0.6,
                height: float = 0.7) -> np.ndarray:
    """RGB pixels inside the ellipse inscribed in the central ``width x height`` part of a face box."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    rx, ry = max(w * width / 2, 0.5), max(h * height / 2, 0.5)
    x0, x1 = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)), pixels.shape[1])
    y0, y1 = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)), pixels.shape[0])
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
    return pixels[y0:y1, x0:x1][inside]


class SkinToneProbe:
    """Monk Skin Tone category of each face, from the median ITA of its skin pixels."""

    name: ClassVar[str] = "skin_tone"
    attributes: ClassVar[tuple[str, ...]] = ("skin_tone", "skin_lightness", "skin_hue")
    labels: ClassVar[dict[str, tuple[str, ...]]] = {"skin_tone": MONK_LABELS, "skin_lightness": LIGHTNESS_LABELS,
                                                    "skin_hue": HUE_LABELS}
    needs_faces: ClassVar[bool] = True

    def __init__(self, detector: str | FaceDetector | None = None, *, min_skin_pixels: int = 50,
                 min_skin_fraction: float = 0.15):
        self.detector = make_detector(detector)
        self.min_skin_pixels, self.min_skin_fraction = min_skin_pixels, min_skin_fraction

    @property
    def version(self) -> str:
        return f"{VERSION}+{self.detector.name}:{self.min_skin_pixels}:{self.min_skin_fraction}"

    def measure(self, pixels: np.ndarray, face: Face) -> tuple[dict[str, float] | None, int]:
        """Medians of the face's skin pixels (``ita``, ``lightness`` L*, ``hue`` h*; ``None`` if too few skin
        pixels) and the number of skin pixels."""
        region = face_region(pixels, face.box)
        if not len(region):
            return None, 0
        lab = rgb_to_lab(region)
        skin = lab[skin_mask(lab)]
        if len(skin) < max(self.min_skin_pixels, self.min_skin_fraction * len(region)):
            return None, len(skin)
        return {"ita": float(np.median(ita(skin))), "lightness": float(np.median(skin[:, 0])),
                "hue": float(np.median(hue_angle(skin)))}, len(skin)

    def score(self, batch: ImageBatch) -> pd.DataFrame:
        rows = []
        meta = {"probe": self.name, "version": self.version}
        for record, faces in zip(batch.records, batch.faces(self.detector), strict=True):
            if not faces:
                rows += [row(record.image_id, a, abstain_reason=NO_FACE, **meta) for a in self.attributes]
            for i, face in enumerate(faces):
                m, _ = self.measure(record.pixels, face)
                where = {"face_index": i, "bbox": face.box}
                if m is None:
                    rows += [row(record.image_id, a, abstain_reason=FEW_SKIN_PIXELS, **where, **meta)
                             for a in self.attributes]
                    continue
                label, margin = monk_category(m["ita"])
                rows.append(row(record.image_id, "skin_tone", label=label, score=m["ita"], margin=margin,
                                **where, **meta))
                for attribute, key, labels in (("skin_lightness", "lightness", LIGHTNESS_LABELS),
                                               ("skin_hue", "hue", HUE_LABELS)):
                    label, margin = bin_label(m[key], labels)
                    rows.append(row(record.image_id, attribute, label=label, score=m[key], margin=margin,
                                    **where, **meta))
        return frame(rows)
