"""Put a training image into a query's frame: the similarity transform between them, mirrored or not.

A copy found in the wild is seldom pixel-aligned with its source: it is cropped, shifted, slightly rotated,
rescaled or flipped (training pipelines flip at random). Comparing the two images stretched to one size
(the old check) then measures the misalignment, not the content. So every candidate pair is aligned first,
and scored only where the two overlap (``confirm.py``).

Candidates (each tried on the training image and on its mirror image):

- ``resize``: the training image stretched onto the query (what a plain resize-and-compare assumes);
- ``keypoints``: ORB keypoints (Rublee et al. 2011) matched with Lowe's ratio test, then a 4-degree-of-
  freedom similarity (scale, rotation, shift) fitted by RANSAC (``cv2.estimateAffinePartial2D``); kept
  when enough matches agree (``MIN_INLIERS``) and the fit is a plausible copy (scale within
  ``SCALES``, rotation within ``MAX_ROTATION``);
- ``phase``: for pairs where keypoints find nothing (low texture, tiny images), phase correlation of the
  luminance (``cv2.phaseCorrelate``, Hanning window) at a few scales (``PHASE_SCALES``) gives a shift and
  a scale, and a small rotation (``PHASE_ROTATIONS``).

A transform is a 2x3 matrix mapping training pixel coordinates (of the *unflipped* training image: a
mirror is a negative determinant) to query pixel coordinates, at the images' own resolutions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_INLIERS = 12
MIN_INLIER_SHARE = 0.2           # of the ratio-test matches
SCALES = (1 / 3, 3.0)            # plausible copy scales (training -> query, per side)
MAX_ROTATION = 30.0              # degrees
PHASE_SCALES = (1.0, 1 / 0.95, 1 / 0.9, 1 / 0.85)
PHASE_ROTATIONS = (-2.0, 2.0)     # degrees, tried at the best scale
RANSAC_PX = 3.0                  # reprojection threshold, in pixels of the working frame
ORB_FEATURES = 600


@dataclass(frozen=True)
class Alignment:
    """How a training image was put into the query's frame (``matrix``: training px -> query px)."""

    method: str                   # resize | keypoints | phase
    matrix: np.ndarray            # 2x3, float64
    inliers: int = 0
    response: float = 0.0         # phase correlation peak, 0 otherwise

    @property
    def mirrored(self) -> bool:
        return bool(np.linalg.det(self.matrix[:, :2]) < 0)

    @property
    def scale(self) -> float:
        """Linear scale (training -> query), the square root of the area ratio."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))

    @property
    def rotation(self) -> float:
        """Rotation in degrees (of the mirrored training image, when mirrored)."""
        m = self.matrix[:, :2] @ (np.diag([-1.0, 1.0]) if self.mirrored else np.eye(2))
        return float(math.degrees(math.atan2(m[1, 0], m[0, 0])))

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary: method, mirrored, scale, rotation, shift and the matrix itself."""
        return {"method": self.method, "mirrored": self.mirrored, "scale": round(self.scale, 4),
                "rotation": round(self.rotation, 3), "shift": [round(float(v), 2) for v in self.matrix[:, 2]],
                "inliers": self.inliers, "matrix": [[round(float(v), 6) for v in row] for row in self.matrix]}


@dataclass
class Features:
    """ORB keypoints and descriptors of one working image (computed once per image, reused per pair)."""

    points: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.float32))
    descriptors: np.ndarray | None = None


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def pixel_scale(sx: float, sy: float | None = None) -> np.ndarray:
    """3x3 map of pixel coordinates under a resize by (sx, sy), pixel centres kept (``cv2.resize``'s)."""
    sy = sx if sy is None else sy
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def flip_matrix(width: int) -> np.ndarray:
    """3x3 horizontal mirror of an image ``width`` pixels wide."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def to_frame(matrix: np.ndarray, train_scale: tuple[float, float], query_scale: tuple[float, float]) -> np.ndarray:
    """A working-resolution transform (training work px -> query frame px) in original pixels, both ends."""
    full = np.linalg.inv(pixel_scale(*query_scale)) @ _h(matrix) @ pixel_scale(*train_scale)
    return full[:2]


def from_frame(matrix: np.ndarray, train_scale: tuple[float, float], query_scale: tuple[float, float]) -> np.ndarray:
    """The inverse of ``to_frame``: an original-pixel transform at working resolutions."""
    work = pixel_scale(*query_scale) @ _h(matrix) @ np.linalg.inv(pixel_scale(*train_scale))
    return work[:2]


def orb_features(lum: np.ndarray) -> Features:
    """ORB keypoints of a uint8 luminance image (FAST threshold lowered: small, soft images have few)."""
    import cv2

    orb = cv2.ORB_create(nfeatures=ORB_FEATURES, fastThreshold=8, edgeThreshold=15, patchSize=15)
    kp, desc = orb.detectAndCompute(lum, None)
    if desc is None or not kp:
        return Features()
    return Features(np.float32([k.pt for k in kp]), desc)


def keypoint_alignment(train: Features, query: Features) -> tuple[np.ndarray, int] | None:
    """The similarity (train -> query, working pixels) that most ratio-test matches agree on, or None."""
    import cv2

    if train.descriptors is None or query.descriptors is None or len(train.points) < 3 or len(query.points) < 3:
        return None
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    pairs = matcher.knnMatch(train.descriptors, query.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
    if len(good) < MIN_INLIERS:
        return None
    src = train.points[[g.queryIdx for g in good]]
    dst = query.points[[g.trainIdx for g in good]]
    m, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX,
                                         maxIters=2000, confidence=0.995, refineIters=10)
    if m is None or inl is None:
        return None
    n = int(inl.sum())
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    angle = abs(math.degrees(math.atan2(m[1, 0], m[0, 0])))
    if n < MIN_INLIERS or n < MIN_INLIER_SHARE * len(good) or not SCALES[0] <= scale <= SCALES[1] \
            or angle > MAX_ROTATION:
        return None
    return m.astype(np.float64), n


def phase_alignment(train: np.ndarray, query: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Shift-scale-rotation transforms (train -> query, working pixels) by phase correlation: the training
    image stretched onto the query and enlarged by each factor of ``PHASE_SCALES``; then, at the best scale,
    turned by each angle of ``PHASE_ROTATIONS``. Each comes with its correlation peak."""
    import cv2

    hq, wq = query.shape
    ht, wt = train.shape

    def correlate(k: float, angle: float) -> tuple[np.ndarray, float]:
        w, h = max(8, round(wq * k)), max(8, round(hq * k))
        t = cv2.resize(train, (w, h), interpolation=cv2.INTER_AREA if k * wq < wt else cv2.INTER_LINEAR)
        turn = np.eye(3)
        if angle:
            turn = _h(cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0))
            t = cv2.warpAffine(t, turn[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        canvas = np.full((h, w), float(query.mean()), np.float32)
        oy, ox = (h - hq) // 2, (w - wq) // 2
        canvas[oy:oy + hq, ox:ox + wq] = query
        window = cv2.createHanningWindow((w, h), cv2.CV_32F)
        (dx, dy), response = cv2.phaseCorrelate(t.astype(np.float32), canvas, window)
        # a pixel x of t lands at x + d on the canvas (cv2's convention), so at x + d - offset in the frame
        shift = np.array([[1.0, 0.0, dx - ox], [0.0, 1.0, dy - oy], [0.0, 0.0, 1.0]])
        return (shift @ turn @ pixel_scale(w / wt, h / ht))[:2], float(response)

    out = [correlate(k, 0.0) for k in PHASE_SCALES]
    k = PHASE_SCALES[int(np.argmax([r for _, r in out]))]
    out += [correlate(k, a) for a in PHASE_ROTATIONS]
    return out


def resize_alignment(train_shape: tuple[int, int], query_shape: tuple[int, int]) -> np.ndarray:
    """The training image stretched onto the query (working pixels)."""
    (ht, wt), (hq, wq) = train_shape, query_shape
    return pixel_scale(wq / wt, hq / ht)[:2]
