"""The probe protocol and the plumbing every probe shares: decoded image batches and face boxes.

A probe turns a batch of decoded images into rows of the ``PROBES`` table (``diffaudit.schema``):
one row per image, or per face, per attribute. Images are decoded once per batch (``decode_batch``)
and the batch is handed to every probe; faces are detected once per batch and detector
(``ImageBatch.faces``), so the ``faces`` and ``skin_tone`` probes see the same boxes.
Labels are *perceived* presentation, never identity. A probe that cannot decide says so: it writes
a row with ``abstained=True`` and a reason, so abstentions are counted, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from diffaudit.imaging import open_image
from diffaudit.schema import PROBES

COLUMNS: tuple[str, ...] = tuple(PROBES.names)

# Abstention reasons, shared so that reports can count them by name.
NO_FACE = "no_face"
NO_PERSON = "no_person"
LOW_MARGIN = "low_margin"
FEW_SKIN_PIXELS = "few_skin_pixels"
FACE_CUT_OFF = "face_cut_off"  # a face the image border cuts: the classifier would read padding


@dataclass(frozen=True)
class ImageRecord:
    """One decoded image: its run ``image_id`` and RGB pixels (``H x W x 3``, ``uint8``)."""

    image_id: str
    pixels: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


@dataclass(frozen=True)
class Face:
    """A detected face: box ``(x, y, w, h)`` in pixels, the detector's confidence, and the landmarks
    ``((x, y), ...)`` the detector gives (MTCNN: eyes, nose, mouth corners; none for Haar and HOG)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None


@dataclass
class ImageBatch:
    """Images decoded once and shared by every probe of a batch, with per-batch caches (faces)."""

    records: list[ImageRecord]
    _faces: dict[tuple[str, str], list[Face]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.records]

    def subset(self, image_ids: Iterable[str]) -> ImageBatch:
        """The records named by ``image_ids``, sharing this batch's decoded pixels and face cache."""
        keep = set(image_ids)
        return ImageBatch([r for r in self.records if r.image_id in keep], self._faces)

    def faces(self, detector: FaceDetector) -> list[list[Face]]:
        """Faces per record (in record order), detected once per image and detector."""
        todo = [r for r in self.records if (detector.name, r.image_id) not in self._faces]
        if todo:
            for record, found in zip(todo, detector.detect([r.pixels for r in todo]), strict=True):
                self._faces[(detector.name, record.image_id)] = found
        return [self._faces[(detector.name, r.image_id)] for r in self.records]


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces in RGB images. ``name`` identifies the detector and its settings (used as a cache key)."""

    name: str

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]: ...


class Probe(Protocol):
    """A bias probe: ``score`` returns rows of the ``PROBES`` table for every image of the batch.

    Every image gets at least one row (an abstention if nothing else), which is how resuming knows
    an image was probed. ``version`` changes whenever the probe's rows would change (model, thresholds).
    A probe with ``needs_faces`` reads ``batch.faces`` and takes the shared detector as its first
    argument; other probes are built without arguments (``clip`` takes its model).
    """

    name: ClassVar[str]
    attributes: ClassVar[tuple[str, ...]]
    labels: ClassVar[dict[str, tuple[str, ...]]]  # attribute -> every label it can give (zero counts count)
    needs_faces: ClassVar[bool]

    @property
    def version(self) -> str: ...

    def score(self, batch: ImageBatch) -> pd.DataFrame: ...


def row(image_id: str, attribute: str, *, probe: str, version: str, label: str | None = None,
        score: float | None = None, margin: float | None = None, face_index: int = -1,
        bbox: Sequence[float] | None = None, abstain_reason: str | None = None) -> dict[str, Any]:
    """One ``PROBES`` row. A row with an ``abstain_reason`` is an abstention and carries no label."""
    return {
        "image_id": image_id,
        "face_index": int(face_index),
        "bbox": None if bbox is None else [float(v) for v in bbox],
        "attribute": attribute,
        "label": None if abstain_reason else label,
        "score": None if score is None else float(score),
        "margin": None if margin is None else float(margin),
        "abstained": abstain_reason is not None,
        "abstain_reason": abstain_reason,
        "probe": probe,
        "probe_version": version,
    }


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with the ``PROBES`` columns in order (also when there are none)."""
    return pd.DataFrame(rows, columns=list(COLUMNS))


def decode(image_id: str, path: str) -> ImageRecord:
    """Decode one image file to RGB ``uint8`` (palette, grey and alpha images are converted), under the one
    pixel cap (``diffaudit.imaging``): an imported run may hold any file."""
    return ImageRecord(image_id, np.asarray(open_image(path, name=f"cannot read image {image_id} at {path}",
                                                       mode="RGB")))


def decode_batch(items: Sequence[tuple[str, str]], pool: ThreadPoolExecutor | None = None) -> ImageBatch:
    """Decode ``(image_id, path)`` pairs into one batch, in parallel threads when a pool is given."""
    if pool is None:
        return ImageBatch([decode(i, p) for i, p in items])
    return ImageBatch(list(pool.map(lambda item: decode(*item), items)))
