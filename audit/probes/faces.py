"""Face detection: where the faces are, how many per image, and which images have none.

The offline default is OpenCV 4.x's frontal-face Haar cascade (``alt2``), whose weights ship inside the
``opencv-python`` wheel (``cv2.data.haarcascades``; OpenCV 5 dropped them). A stronger detector
plugs in by passing its weights: YuNet (``cv2.FaceDetectorYN``) with ``detector="path/to/yunet.onnx"``
(get ``face_detection_yunet_2023mar.onnx`` from the OpenCV model zoo). Other detectors (MTCNN,
RetinaFace) are one more ``FaceDetector`` class with a ``detect`` method.

Rows: one per face (``attribute="face"``, ``bbox``, detector confidence as ``score``) and one per image
(``attribute="face_count"``, ``label`` "one" or "multiple", ``score`` the number of faces). An image
with no face gets a ``face_count`` abstention with reason ``no_face``: counted, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from audit.probes.base import NO_FACE, Face, FaceDetector, ImageBatch, frame, row
from diffaudit.errors import ModelError

VERSION = "1"


class HaarDetector:
    """OpenCV's frontal-face Haar cascade on the histogram-equalised grey image (offline, CPU, fast).

    ``alt2`` is the default: on the scikit-image photos at 224-640 px it found the astronaut's face
    exactly once in every crop and scale tried, where ``default`` also fired on her suit in a third.

    Faces smaller than ``min_face`` of the shorter image side are ignored: the audit looks at
    portraits, and tiny detections are mostly texture false positives. Images whose shorter side
    exceeds ``detect_side`` are searched at that size (boxes are scaled back), which makes 512-1024 px
    generations several times cheaper without losing faces of that minimum size.
    """

    def __init__(self, cascade: str = "haarcascade_frontalface_alt2.xml", *, scale_factor: float = 1.1,
                 min_neighbors: int = 5, min_face: float = 0.08, detect_side: int = 320):
        import cv2

        path = Path(cv2.data.haarcascades) / cascade
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise ModelError(f"cannot load the Haar cascade {path}; install opencv-python 4.x (OpenCV 5 has none)")
        self.scale_factor, self.min_neighbors, self.min_face = scale_factor, min_neighbors, min_face
        self.detect_side = detect_side
        self.name = f"haar:{Path(cascade).stem}:{scale_factor}:{min_neighbors}:{min_face}:{detect_side}"

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        import cv2

        out = []
        for pixels in images:
            grey = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
            factor = min(1.0, self.detect_side / min(grey.shape))
            if factor < 1.0:
                size = (round(grey.shape[1] * factor), round(grey.shape[0] * factor))
                grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
            grey = cv2.equalizeHist(grey)
            side = max(8, int(self.min_face * min(grey.shape)))
            boxes, _, weights = self._cascade.detectMultiScale3(
                grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(side, side),
                outputRejectLevels=True)
            faces = [Face(tuple(float(v) / factor for v in b), float(w))
                     for b, w in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(weights).reshape(-1), strict=True)]
            out.append(sorted(faces, key=lambda f: (f.box[0], f.box[1])))
        return out


class YuNetDetector:
    """OpenCV's YuNet CNN face detector (``cv2.FaceDetectorYN``) from a user-supplied ``.onnx`` file."""

    def __init__(self, weights: str | Path, *, score_threshold: float = 0.8, nms_threshold: float = 0.3):
        import cv2

        weights = Path(weights)
        if not weights.is_file():
            raise ModelError(f"YuNet weights not found at {weights}; download face_detection_yunet_2023mar.onnx "
                             "from the OpenCV model zoo, or use the built-in detector 'haar'")
        try:
            self._net = cv2.FaceDetectorYN.create(str(weights), "", (320, 320), score_threshold, nms_threshold)
        except cv2.error as e:
            raise ModelError(f"cannot load YuNet weights {weights}: {e}".splitlines()[0]) from e
        self.name = f"yunet:{weights.resolve()}:{score_threshold}:{nms_threshold}"

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        import cv2

        out = []
        for pixels in images:
            h, w = pixels.shape[:2]
            self._net.setInputSize((w, h))
            _, found = self._net.detect(cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2BGR))
            found = np.zeros((0, 15)) if found is None else found
            faces = [Face(tuple(float(v) for v in f[:4]), float(f[14])) for f in found]
            out.append(sorted(faces, key=lambda f: (f.box[0], f.box[1])))
        return out


def make_detector(spec: str | FaceDetector | None = None) -> FaceDetector:
    """A detector from a spec: ``None``/"haar" (built in), a path to YuNet ``.onnx`` weights, or an instance."""
    if spec is None or spec == "haar":
        return HaarDetector()
    if isinstance(spec, FaceDetector):
        return spec
    if str(spec).endswith(".onnx"):
        return YuNetDetector(spec)
    raise ModelError(f"unknown face detector {spec!r}; use 'haar' (built in) or a path to YuNet .onnx weights")


class FaceProbe:
    """Detects faces and records their boxes and the number of faces per image."""

    name: ClassVar[str] = "faces"
    attributes: ClassVar[tuple[str, ...]] = ("face", "face_count")
    labels: ClassVar[dict[str, tuple[str, ...]]] = {"face": ("face",), "face_count": ("one", "multiple")}
    needs_faces: ClassVar[bool] = True

    def __init__(self, detector: str | FaceDetector | None = None):
        self.detector = make_detector(detector)

    @property
    def version(self) -> str:
        return f"{VERSION}+{self.detector.name}"

    def score(self, batch: ImageBatch) -> pd.DataFrame:
        rows = []
        meta = {"probe": self.name, "version": self.version}
        for record, faces in zip(batch.records, batch.faces(self.detector), strict=True):
            for i, face in enumerate(faces):
                rows.append(row(record.image_id, "face", label="face", score=face.score, face_index=i,
                                bbox=face.box, **meta))
            if faces:
                rows.append(row(record.image_id, "face_count", label="one" if len(faces) == 1 else "multiple",
                                score=len(faces), **meta))
            else:
                rows.append(row(record.image_id, "face_count", score=0, abstain_reason=NO_FACE, **meta))
        return frame(rows)
