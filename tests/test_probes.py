"""Probes: the shared contract for every registered probe, then known answers per probe
(Monk swatches 10/10, the astronaut's one face and skin tone, a blank image abstains, CLIP gates)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import skimage_photo

from audit.probes.base import (
    FEW_SKIN_PIXELS,
    LOW_MARGIN,
    NO_FACE,
    NO_PERSON,
    Face,
    ImageBatch,
    ImageRecord,
    decode_batch,
)
from audit.probes.clip import PROMPTS, ClipProbe, load_clip, preprocess, quick_gelu, resolve_spec
from audit.probes.faces import FaceProbe, HaarDetector, make_detector
from audit.probes.skin_tone import (
    MONK_HEX,
    MONK_ITA,
    MONK_LABELS,
    SkinToneProbe,
    hex_to_rgb,
    ita,
    monk_category,
)
from diffaudit import schema
from diffaudit.errors import InputError, ModelError
from diffaudit.registry import PROBES


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip("tiny", device="cpu")


def record(name: str, size: int = 256) -> ImageRecord:
    return ImageRecord(name, np.asarray(skimage_photo(name, size)))


def blank(image_id: str = "blank", size: int = 128, value: int = 128) -> ImageRecord:
    return ImageRecord(image_id, np.full((size, size, 3), value, dtype=np.uint8))


class FullFrame:
    """A stub detector: one face covering the whole image (feeds known colours to skin_tone)."""

    name = "full-frame"

    def detect(self, images):
        return [[Face((0.0, 0.0, float(img.shape[1]), float(img.shape[0])), 1.0)] for img in images]


# --- the contract every registered probe keeps ------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(PROBES))
def any_probe(request, tiny_clip):
    cls = PROBES.load(request.param)
    return cls(tiny_clip) if request.param == "clip" else cls()


def test_probe_contract(any_probe):
    batch = ImageBatch([record("astronaut"), record("coffee"), blank()])
    df = any_probe.score(batch)
    schema.to_arrow(f"probes/{any_probe.name}", df)  # raises SchemaError on any schema violation
    assert set(df["image_id"]) == set(batch.image_ids)  # every image gets a row, abstentions included
    assert set(df["attribute"]) <= set(any_probe.attributes)
    assert (df["probe"] == any_probe.name).all() and (df["probe_version"] == any_probe.version).all()
    abstained = df[df["abstained"]]
    assert abstained["label"].isna().all() and abstained["abstain_reason"].notna().all()
    assert df.loc[~df["abstained"], "label"].notna().all()
    assert any_probe.score(ImageBatch([])).empty


# --- skin tone: ITA in float CIELAB, Monk categories -------------------------------------------------

def swatch_batch(order: str = "rgb") -> ImageBatch:
    records = []
    for label, hx in zip(MONK_LABELS, MONK_HEX, strict=True):
        rgb = np.array(hex_to_rgb(hx), dtype=np.uint8)
        px = np.broadcast_to(rgb if order == "rgb" else rgb[::-1], (48, 48, 3)).copy()
        records.append(ImageRecord(label, px))
    return ImageBatch(records)


def reference_ita(hx: str) -> float:
    """ITA of an sRGB hex colour by the textbook formulas, independent of the probe's code: sRGB -> linear
    (IEC 61966-2-1) -> XYZ (sRGB D65 matrix) -> CIELAB (CIE 1976, D65 white) -> atan2(L* - 50, b*)."""
    rgb = [int(hx[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    m = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
    xyz = [sum(a * b for a, b in zip(row, lin, strict=True)) for row in m]
    eps, kappa = 216 / 24389, 24389 / 27
    f = [t ** (1 / 3) if t > eps else (kappa * t + 16) / 116
         for t in (v / w for v, w in zip(xyz, (0.95047, 1.0, 1.08883), strict=True))]
    lightness, b_star = 116 * f[1] - 16, 200 * (f[1] - f[2])
    return math.degrees(math.atan2(lightness - 50, b_star))


def tones(df: pd.DataFrame, attribute: str = "skin_tone") -> pd.DataFrame:
    return df[df["attribute"] == attribute].reset_index(drop=True)


def test_monk_swatches_ten_out_of_ten():
    df = tones(SkinToneProbe(FullFrame()).score(swatch_batch()))
    assert list(df["label"]) == list(MONK_LABELS)
    assert not df["abstained"].any()
    expected = np.array([reference_ita(h) for h in MONK_HEX])
    # pinned absolute values (float CIELAB D65): 8-bit OpenCV Lab or swapped R/B would miss them by degrees
    np.testing.assert_allclose(expected[[0, 5, 9]], [83.0, 10.88, -84.31], atol=0.02)
    np.testing.assert_allclose(df["score"], expected, atol=0.05)
    np.testing.assert_allclose(MONK_ITA, expected, atol=0.05)


def test_swapped_channels_fail_the_swatch_test():
    """The bug two audits shipped (BGR read as RGB) must not pass the swatch test."""
    df = tones(SkinToneProbe(FullFrame()).score(swatch_batch("bgr")))
    assert (df["label"].to_numpy() == np.array(MONK_LABELS)).sum() < 10


def test_eight_bit_lab_would_fail():
    """OpenCV 8-bit Lab (L*255/100, a/b offset by 128) gives other ITAs than float CIELAB."""
    import cv2

    rgb = np.array([[hex_to_rgb(h) for h in MONK_HEX]], dtype=np.uint8)
    lab8 = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[0].astype(float)
    labels = [monk_category(float(a))[0] for a in ita(lab8)]
    assert labels != list(MONK_LABELS)


def test_ita_and_thresholds():
    assert ita(np.array([50.0, 0.0, 10.0])) == pytest.approx(0.0)
    assert ita(np.array([60.0, 0.0, 10.0])) == pytest.approx(45.0)
    assert np.all(np.diff(MONK_ITA) < 0)  # MST 1 (lightest) .. 10 (darkest): ITA falls
    mid = (MONK_ITA[2] + MONK_ITA[3]) / 2
    assert monk_category(mid + 0.1)[0] == "MST-03" and monk_category(mid - 0.1)[0] == "MST-04"
    assert monk_category(mid + 0.1)[1] == pytest.approx(0.1)
    assert monk_category(120.0)[0] == "MST-01" and monk_category(-120.0)[0] == "MST-10"


def test_skin_tone_abstains_without_skin_pixels():
    green = ImageRecord("green", np.broadcast_to(np.array([30, 200, 40], np.uint8), (48, 48, 3)).copy())
    df = SkinToneProbe(FullFrame()).score(ImageBatch([green]))
    assert df["attribute"].tolist() == ["skin_tone", "skin_lightness", "skin_hue"]
    assert df["abstain_reason"].tolist() == [FEW_SKIN_PIXELS] * 3 and df["bbox"].iloc[0] == [0.0, 0.0, 48.0, 48.0]


# --- faces and skin tone on real photos --------------------------------------------------------------

def test_astronaut_one_face_and_a_skin_tone():
    batch = ImageBatch([record("astronaut")])
    faces = FaceProbe().score(batch)
    boxes = faces[faces["attribute"] == "face"]
    assert len(boxes) == 1
    x, y, w, h = boxes["bbox"].iloc[0]
    assert 70 <= x + w / 2 <= 150 and 20 <= y + h / 2 <= 90  # her face, upper middle of the photo
    count = faces[faces["attribute"] == "face_count"].iloc[0]
    assert count["label"] == "one" and count["score"] == 1
    tone = tones(SkinToneProbe().score(batch)).iloc[0]
    assert not tone["abstained"] and tone["face_index"] == 0
    # Light skin under warm light: ITA well above the "intermediate" range, an MST in the light half.
    assert tone["score"] > 41 and tone["label"] in MONK_LABELS[:5]


@pytest.mark.parametrize("size", [224, 384, 512])
def test_astronaut_one_face_at_any_size(size):
    faces = FaceProbe().score(ImageBatch([record("astronaut", size)]))
    assert faces.loc[faces["attribute"] == "face_count", "label"].tolist() == ["one"]
    x, y, w, h = faces.loc[faces["attribute"] == "face", "bbox"].iloc[0]
    assert 0.27 <= (x + w / 2) / size <= 0.59 and 0.08 <= (y + h / 2) / size <= 0.35


def test_blank_image_abstains_with_a_reason():
    batch = ImageBatch([blank()])
    faces, tones = FaceProbe().score(batch), SkinToneProbe().score(batch)
    assert faces[["face_index", "attribute", "abstained", "abstain_reason"]].values.tolist() == [
        [-1, "face_count", True, NO_FACE]]
    assert tones[["face_index", "abstained", "abstain_reason"]].values.tolist() == [[-1, True, NO_FACE]] * 3


def test_multiple_faces_are_counted():
    face = np.asarray(skimage_photo("astronaut", 256))[20:110, 75:155]
    twice = np.concatenate([face, face], axis=1)
    df = FaceProbe().score(ImageBatch([ImageRecord("two", np.ascontiguousarray(twice))]))
    assert (df["attribute"] == "face").sum() == 2
    assert df.loc[df["attribute"] == "face", "face_index"].tolist() == [0, 1]
    assert df.loc[df["attribute"] == "face_count", "label"].tolist() == ["multiple"]


def test_faces_are_detected_once_per_batch_and_shared():
    calls = []

    class Counting(HaarDetector):
        def detect(self, images):
            calls.append(len(images))
            return super().detect(images)

    detector = Counting()
    batch = ImageBatch([record("astronaut"), record("coffee")])
    FaceProbe(detector).score(batch)
    SkinToneProbe(detector).score(batch.subset(["astronaut"]))
    assert calls == [2]


def test_face_detector_specs():
    assert isinstance(make_detector("haar"), HaarDetector)
    with pytest.raises(ModelError, match="YuNet weights not found"):
        make_detector("/nonexistent/yunet.onnx")
    with pytest.raises(ModelError, match="unknown face detector"):
        make_detector("retinaface")
    assert make_detector(None).name.startswith("mtcnn:") and make_detector("auto").name.startswith("mtcnn:")


# --- CLIP ----------------------------------------------------------------------------------------------

def test_clip_rows_gate_and_margin(tiny_clip):
    batch = ImageBatch([record("astronaut"), record("rocket"), blank()])
    df = ClipProbe(tiny_clip, min_margin=0.0, person_threshold=0.0).score(batch)
    assert len(df) == 3 * len(PROMPTS) and not df["abstained"].any()
    gender = df[df["attribute"] == "perceived_gender"]
    assert set(gender["label"]) <= {"woman", "man"}
    assert set(df.loc[df["attribute"] == "perceived_age", "label"]) <= set(PROMPTS["perceived_age"])
    assert ((gender["score"] >= 0.5) & (gender["score"] <= 1)).all()
    # Margin above every possible margin: every attribute abstains for low margin, the gate does not.
    strict = ClipProbe(tiny_clip, min_margin=1.01, person_threshold=0.0).score(batch)
    attrs = strict[strict["attribute"] != "person"]
    assert (attrs["abstain_reason"] == LOW_MARGIN).all() and attrs["label"].isna().all()
    assert not strict.loc[strict["attribute"] == "person", "abstained"].any()
    # A gate nobody passes: no_person everywhere, scores kept for later threshold studies.
    gated = ClipProbe(tiny_clip, person_threshold=1.01).score(batch)
    assert (gated.loc[gated["attribute"] == "person", "label"] == "no_person").all()
    attrs = gated[gated["attribute"] != "person"]
    assert (attrs["abstain_reason"] == NO_PERSON).all() and attrs["score"].notna().all()
    pd.testing.assert_series_equal(attrs["score"].reset_index(drop=True),
                                   df.loc[df["attribute"] != "person", "score"].reset_index(drop=True))


def test_clip_is_deterministic_and_batch_independent(tiny_clip):
    records = [record("astronaut"), record("coffee", 200), record("chelsea")]
    whole = ClipProbe(tiny_clip, batch_size=8).score(ImageBatch(records))
    one_by_one = pd.concat([ClipProbe(tiny_clip, batch_size=1).score(ImageBatch([r])) for r in records],
                           ignore_index=True)
    np.testing.assert_allclose(whole["score"], one_by_one["score"], rtol=1e-4)
    assert load_clip("tiny").model.state_dict()["logit_scale"] == tiny_clip.model.state_dict()["logit_scale"]


def test_preprocess_matches_open_clip_transform(tiny_clip):
    """The batched preprocessing equals open_clip's own eval transform."""
    import open_clip

    transform = open_clip.image_transform(tiny_clip.image_size, is_train=False, mean=tiny_clip.mean,
                                          std=tiny_clip.std)
    img = skimage_photo("astronaut", 64)
    ours = preprocess(tiny_clip, [np.asarray(img)])[0]
    theirs = transform(img)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_gpu_preprocess_matches_cpu(tiny_clip):
    """On CUDA images are resized on the GPU with torch; it agrees with PIL up to resampling noise."""
    from dataclasses import replace

    imgs = [np.asarray(skimage_photo("astronaut", 96)), np.asarray(skimage_photo("coffee", 64))]
    gpu = preprocess(replace(tiny_clip, device=torch.device("cuda")), imgs).cpu()
    assert float((gpu - preprocess(tiny_clip, imgs)).abs().mean()) < 0.05


def test_clip_model_specs(tmp_path):
    assert resolve_spec("ViT-B-32") == ("ViT-B-32", "openai")
    assert resolve_spec("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert resolve_spec(str(tmp_path)) == (f"local-dir:{tmp_path.resolve()}", None)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    assert resolve_spec(f"ViT-B-32:{weights}") == ("ViT-B-32", str(weights))
    with pytest.raises(ModelError, match="needs its architecture"):
        resolve_spec(str(weights))
    with pytest.raises(ModelError, match="unknown CLIP architecture"):
        resolve_spec("ViT-Q-99")
    with pytest.raises(ModelError, match="neither a pretrained tag"):
        resolve_spec("ViT-B-32:no-such-tag")


def test_openai_weights_get_quick_gelu():
    assert quick_gelu("ViT-L-14", "openai") and quick_gelu("ViT-B-32", "openai")
    assert not quick_gelu("ViT-B-32", "laion2b_s34b_b79k") and not quick_gelu("ViT-B-32", "/some/weights.pt")


def test_missing_weights_offline_say_what_to_do(tmp_path):
    with pytest.raises(ModelError) as e:
        load_clip("ViT-B-32:openai", device="cpu", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "--clip-model tiny" in msg and "NAME:/path/to/weights.pt" in msg



def test_failed_load_prints_only_diffaudits_error(tmp_path, capfd, caplog, monkeypatch):
    """open_clip's own "Failed to download weights" record reaches neither stderr nor any handler, and the
    root logger is left as found (no stderr handler installed by logging.error's basicConfig)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # an unconfigured root, as under the CLI
    with pytest.raises(ModelError):
        load_clip("ViT-B-32:openai", device="cpu", cache_dir=str(tmp_path))
    assert capfd.readouterr().err == "" and root.handlers == [] and root.filters == []
    monkeypatch.undo()
    with caplog.at_level(logging.DEBUG), pytest.raises(ModelError):
        load_clip("ViT-B-32:openai", device="cpu", cache_dir=str(tmp_path))
    assert not [r for r in caplog.records if "open_clip" in r.pathname]
    logging.error("still logged after loading")
    assert caplog.records[-1].getMessage() == "still logged after loading"

# --- decoding ------------------------------------------------------------------------------------------

def test_decode_batch_rgb_and_errors(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "grey.png")
    Image.new("RGBA", (6, 4), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    with ThreadPoolExecutor(2) as pool:
        batch = decode_batch([("g", str(tmp_path / "grey.png")), ("r", str(tmp_path / "rgba.png"))], pool)
    assert [r.pixels.shape for r in batch.records] == [(8, 10, 3), (4, 6, 3)]
    assert batch.records[1].pixels.dtype == np.uint8 and tuple(batch.records[1].pixels[0, 0]) == (255, 0, 0)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image x"):
        decode_batch([("x", str(tmp_path / "bad.png"))])
