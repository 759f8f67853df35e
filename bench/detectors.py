"""Face-detector benchmark: recall on faces, false detections on non-faces, speed per 512x512 image.

Prints one JSON line per detector (and the Haar baseline measured in the same run):
- ``lfw_recall``: share of the 100 face crops of ``skimage.data.lfw_subset()`` with a detection whose
  centre lies inside the face. Protocol (``diffaudit.demo.lfw_canvases``): each 25x25 grey crop is upscaled
  4x (bicubic) to 100x100 and pasted in the middle of a 200x200 canvas filled with the crop's mean grey, so
  a detector sees the face with some context (the crops are cut tight at forehead and chin);
- ``lfw_nonface_fp``: share of the 100 non-face crops, treated the same way, with any detection;
- ``corpus_fp``: share of ``diffaudit.corpus`` held-out images (photos without people, documents,
  graphics, flat, textures, patterns at 256-768 px) with any detection, and detections per image;
- ``astronaut`` / ``camera``: faces found in the two scikit-image photos of a person (512 px);
- ``ms_per_512``: mean wall time per 512x512 image (corpus images resized to 512x512), one CPU thread.

    python bench/detectors.py                    # every shipped detector whose package is installed
    python bench/detectors.py --quick            # 40 corpus images, 8 timed
    python bench/detectors.py --fit-dlib-frame   # MtcnnDetector.dlib_frame, fitted and checked (see there)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def inside(faces, lo: float = 50, hi: float = 150) -> bool:
    return any(lo <= f.box[0] + f.box[2] / 2 <= hi and lo <= f.box[1] + f.box[3] / 2 <= hi for f in faces)


def photo(name: str, side: int = 512) -> np.ndarray:
    import cv2

    from diffaudit.corpus import photo as load

    return cv2.resize(load(f"skimage:{name}"), (side, side), interpolation=cv2.INTER_AREA)


def measure(name: str, detector, faces, nonfaces, corpus, timed) -> dict:
    found = detector.detect(faces)
    false = detector.detect(nonfaces)
    on_corpus = detector.detect(corpus)
    detector.detect(timed[:1])  # warm-up
    t0 = time.perf_counter()
    detector.detect(timed)
    ms = (time.perf_counter() - t0) / len(timed) * 1000
    return {"bench": "detectors", "detector": name, "version": detector.name,
            "lfw_recall": sum(inside(f) for f in found) / len(faces),
            "lfw_nonface_fp": sum(bool(f) for f in false) / len(nonfaces),
            "corpus_fp": round(sum(bool(f) for f in on_corpus) / len(corpus), 3),
            "corpus_detections_per_image": round(sum(len(f) for f in on_corpus) / len(corpus), 3),
            "astronaut": len(detector.detect([photo("astronaut")])[0]),
            "camera": len(detector.detect([photo("camera")])[0]),
            "ms_per_512": round(ms, 1)}


def fit_dlib_frame() -> None:
    """Fit MTCNN-box -> dlib-HOG-box offsets and scales on lfw faces 0-49 found by both detectors, and print the
    landmark distance (as a share of the face width) to the HOG box's landmarks on faces 50-99, raw and mapped."""
    from audit.probes import face_attributes as fa
    from audit.probes.base import Face
    from audit.probes.detectors import HogDetector, MtcnnDetector
    from diffaudit.demo import lfw_canvases

    mtcnn, hog = MtcnnDetector(), HogDetector(min_face=0)
    both = []
    for i, img in enumerate(lfw_canvases()[0]):
        m, h = mtcnn.detect_one(img), hog.detect_one(img)
        if m and h:
            both.append((i, img, max(m, key=lambda f: f.box[2] * f.box[3]).box, max(h, key=lambda f: f.box[2] * f.box[3]).box))
    fit = np.array([[(m[0] - h[0]) / m[2], (m[1] - h[1]) / m[2], h[2] / m[2], h[3] / m[3]]
                    for i, _, m, h in both if i < 50]).mean(axis=0)

    class Fitted:
        dlib_frame = tuple(fit)

    def marks(img, box, frame):
        s = fa.landmarks(img, fa.dlib_box(Face(box, 1.0), frame))
        return np.array([[s.part(k).x, s.part(k).y] for k in range(5)], dtype=float)

    out = {"bench": "detectors", "what": "dlib_frame", "fitted_on": sum(i < 50 for i, *_ in both),
           "dlib_frame": [round(float(v), 3) for v in fit]}
    for name, frame in (("raw", None), ("mapped", Fitted())):
        d = [np.abs(marks(img, m, frame) - marks(img, h, None)).mean() / h[2] for i, img, m, h in both if i >= 50]
        out[f"landmark_gap_{name}"] = round(float(np.mean(d)), 4)
    out["evaluated_on"] = sum(i >= 50 for i, *_ in both)
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--detectors", default="haar,mtcnn,blazeface-short,blazeface-full,hog")
    ap.add_argument("--fit-dlib-frame", action="store_true")
    args = ap.parse_args()
    if args.fit_dlib_frame:
        return fit_dlib_frame()

    import cv2

    from audit.probes.faces import make_detector
    from diffaudit.corpus import corpus
    from diffaudit.demo import lfw_canvases
    from diffaudit.errors import ModelError

    cv2.setNumThreads(1)
    faces, nonfaces = lfw_canvases()
    n = 40 if args.quick else 120
    samples = list(corpus(n, split="heldout", seed=0))
    images = [s.rgb for s in samples]
    timed = [cv2.resize(s.rgb, (512, 512), interpolation=cv2.INTER_AREA) for s in samples[:8 if args.quick else 24]]
    for name in args.detectors.split(","):
        try:
            detector = make_detector(name)
        except ModelError as e:
            print(json.dumps({"bench": "detectors", "detector": name, "skipped": str(e)}), flush=True)
            continue
        print(json.dumps(measure(name, detector, faces, nonfaces, images, timed)), flush=True)


if __name__ == "__main__":
    main()
