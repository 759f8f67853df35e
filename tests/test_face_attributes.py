"""The face-attribute probe: dlib's CC0 gender and age models on aligned chips label the astronaut and the
cameraman (outputs pinned so a model or runtime upgrade is noticed), abstain as CLIP does, check the shipped
files' hashes, and FairFace loads from a state dict in the published layout (a random one here)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import skimage_photo

from audit.probes import face_attributes as fa
from audit.probes.base import LOW_MARGIN, NO_FACE, Face, ImageBatch, ImageRecord
from audit.probes.face_attributes import (
    AGE_LABELS,
    FaceAttributeProbe,
    FairFace,
    age_group_index,
    make_face_model,
)
from diffaudit import schema
from diffaudit.errors import ModelError


@pytest.fixture(scope="module")
def probe():
    return FaceAttributeProbe()


def photo(name: str) -> ImageRecord:
    return ImageRecord(name, np.asarray(skimage_photo(name, 512)))


def votes(df):
    return {(r.image_id, r.attribute): r.label for r in df.itertuples()}


def test_astronaut_and_cameraman_pinned(probe):
    """What the shipped CC0 models say (written down in the README): the astronaut (Eileen Collins) is read
    as a woman (0.93), young adult (0.63; middle-aged 0.36, a margin of 0.26 over the 0.2 abstention
    margin); the cameraman as a man (0.98), young adult (0.94)."""
    batch = ImageBatch([photo("astronaut"), photo("camera")])
    df = probe.score(batch)
    schema.to_arrow("probes/faces_attr", df)
    assert votes(df) == {("astronaut", "perceived_gender"): "woman", ("astronaut", "perceived_age"): "young_adult",
                         ("camera", "perceived_gender"): "man", ("camera", "perceived_age"): "young_adult"}
    assert not df["abstained"].any() and (df["face_index"] == 0).all()
    pinned = {"astronaut": ([0.92604, 0.07396], [0.00614, 0.62503, 0.36447, 0.00437]),
              "camera": ([0.01665, 0.98335], [0.02244, 0.9364, 0.03893, 0.00223])}
    for record in batch.records:
        faces = probe.detector.detect_one(record.pixels)
        p = probe.probabilities(record.pixels, faces)
        np.testing.assert_allclose(p.gender[0], pinned[record.image_id][0], atol=2e-3)
        np.testing.assert_allclose(p.age[0], pinned[record.image_id][1], atol=2e-3)
        np.testing.assert_allclose(p.gender.sum(), 1, atol=1e-5)
        np.testing.assert_allclose(p.age.sum(), 1, atol=1e-5)


def test_version_names_model_and_detector(probe):
    assert probe.version.startswith("2+dlib-age-gender-v1:d4c4116c4f9f0075:margin=0.2+mtcnn:")


def test_no_face_and_low_margin_abstain(probe):
    blank = ImageRecord("blank", np.full((128, 128, 3), 128, np.uint8))
    df = probe.score(ImageBatch([blank]))
    assert df[["attribute", "face_index", "abstain_reason"]].values.tolist() == [
        ["perceived_gender", -1, NO_FACE], ["perceived_age", -1, NO_FACE]]
    strict = FaceAttributeProbe(probe.detector, model=probe.model, min_margin=0.99)
    df = strict.score(ImageBatch([photo("astronaut")]))
    assert (df["abstain_reason"] == LOW_MARGIN).all() and df["label"].isna().all()
    assert df["margin"].between(0, 0.99).all()


def test_age_groups():
    assert [age_group_index(a) for a in (0.25, 19, 20, 39, 40, 59, 60, 80)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert AGE_LABELS == ("child", "young_adult", "middle_aged", "older_adult")
    assert [AGE_LABELS[i] for i in fa.FAIRFACE_AGE_GROUP] == ["child"] * 3 + ["young_adult"] * 2 + [
        "middle_aged"] * 2 + ["older_adult"] * 2


def test_damaged_weights_are_refused(tmp_path, monkeypatch):
    copy = tmp_path / "w"
    shutil.copytree(fa.WEIGHTS, copy)
    data = bytearray((copy / "gender-v1.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "gender-v1.onnx").write_bytes(bytes(data))
    monkeypatch.setattr(fa, "WEIGHTS", copy)
    fa._manifest.cache_clear()
    try:
        with pytest.raises(ModelError, match="missing or damaged"):
            fa.DlibAgeGender()
    finally:
        fa._manifest.cache_clear()


# --- FairFace -----------------------------------------------------------------------------------------

def fairface_file(path, *, bias: dict[int, float] | None = None, prefix: str = "", fc: int = 18):
    """A random torchvision ResNet-34 with FairFace's 18-output head, saved as a state dict like the published
    res34_fair_align_multi_7_20190809.pt; ``bias`` sets some fc biases to steer the outputs."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None)
    model.fc = torch.nn.Linear(512, fc)
    with torch.no_grad():
        model.fc.weight.mul_(0.01)
        model.fc.bias.zero_()
        for i, v in (bias or {}).items():
            model.fc.bias[i] = v
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    return path


def test_fairface_loads_a_state_dict_in_the_published_layout(tmp_path, probe):
    # index 7 is Male, 8 Female; 9.. the nine age bins (17: 70+). Race (0-6) pushed hard: it must not matter.
    path = fairface_file(tmp_path / "res34_fair_align_multi_7_20190809.pt",
                         bias={8: 10.0, 17: 10.0, 0: 50.0, 3: 50.0}, prefix="module.")
    model = make_face_model(f"fairface:{path}", device="cpu")
    assert isinstance(model, FairFace) and model.name.startswith("fairface-res34:")
    ff = FaceAttributeProbe(probe.detector, model=model)
    df = ff.score(ImageBatch([photo("astronaut")]))
    assert votes(df) == {("astronaut", "perceived_gender"): "woman", ("astronaut", "perceived_age"): "older_adult"}
    assert set(df["attribute"]) == {"perceived_gender", "perceived_age"}  # no race attribute, ever
    assert df["probe_version"].iloc[0].startswith("2+fairface-res34:")
    male = FaceAttributeProbe(probe.detector, model=make_face_model(
        f"fairface:{fairface_file(tmp_path / 'm.pt', bias={7: 10.0, 12: 10.0})}"))
    assert votes(male.score(ImageBatch([photo("astronaut")]))) == {
        ("astronaut", "perceived_gender"): "man", ("astronaut", "perceived_age"): "young_adult"}  # 12: 30-39


def test_fairface_chips_follow_its_predict_script(tmp_path, probe, monkeypatch):
    """FairFace's predict.py: dlib.get_face_chips at 300 px with padding 0.25, resized to 224."""
    seen = []
    real = fa.chip
    monkeypatch.setattr(fa, "chip", lambda px, shape, size, padding: seen.append((size, padding)) or real(
        px, shape, size, padding))
    model = FairFace(fairface_file(tmp_path / "f.pt"))
    record = photo("astronaut")
    faces = probe.detector.detect_one(record.pixels)
    shapes = [fa.landmarks(record.pixels, fa.dlib_box(f, probe.detector)) for f in faces]
    p = model.predict(record.pixels, shapes)
    assert seen == [(300, 0.25)] and p.gender.shape == (1, 2) and p.age.shape == (1, 4)


def test_fairface_bad_files(tmp_path):
    with pytest.raises(ModelError, match="FairFace weights not found"):
        make_face_model(f"fairface:{tmp_path}/missing.pt")
    with pytest.raises(ModelError, match="18 outputs"):
        make_face_model(f"fairface:{fairface_file(tmp_path / 'ten.pt', fc=10)}")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read FairFace weights"):
        make_face_model(f"fairface:{tmp_path / 'junk.pt'}")
    with pytest.raises(ModelError, match="unknown face model"):
        make_face_model("resnet:x.pt")


def test_dlib_box_uses_the_detectors_framing():
    face = Face((100.0, 100.0, 50.0, 60.0), 1.0)
    assert fa.dlib_box(face, None) == (100, 100, 149, 159)

    class Framed:
        dlib_frame = (0.1, -0.1, 1.2, 0.9)

    assert fa.dlib_box(face, Framed()) == (95, 105, 154, 158)


def test_faces_cut_by_the_image_border_abstain(probe):
    """Review (rev2): with the astronaut's face cut by the left border (the image starting at x = 200 or 220
    of 512, about half her face left), the gender model read "man" at 0.92 and 0.98 with a margin far above
    0.2, from a chip a quarter of which was the zero padding outside the image. A face whose aligned chip
    lies more than one padding strip (0.2 / 1.4 of its side) outside the image abstains (``face_cut_off``)."""
    img = np.asarray(skimage_photo("astronaut", 512))
    cut = ImageBatch([ImageRecord(f"x{x}", np.ascontiguousarray(img[:, x:])) for x in (200, 220)])
    df = probe.score(cut)
    assert len(df) == 4 and (df["abstain_reason"] == fa.FACE_CUT_OFF).all() and df["label"].isna().all()
    whole = probe.score(ImageBatch([photo("astronaut"), ImageRecord("x150", np.ascontiguousarray(img[:, 150:]))]))
    assert not whole["abstained"].any()  # a face near the border but whole is labelled
    assert set(votes(whole).values()) >= {"woman"}


def test_chip_outside_fraction(probe):
    record = photo("astronaut")
    (face,) = probe.detector.detect_one(record.pixels)
    shape = fa.landmarks(record.pixels, fa.dlib_box(face, probe.detector))
    assert fa.outside_fraction(record.pixels.shape[:2], shape, 0.2) == 0.0
    half = np.ascontiguousarray(record.pixels[:, 200:])
    (face,) = probe.detector.detect_one(half)
    shape = fa.landmarks(half, fa.dlib_box(face, probe.detector))
    assert 0.15 < fa.outside_fraction(half.shape[:2], shape, 0.2) < 0.5


def test_a_changed_manifest_is_refused(tmp_path, monkeypatch):
    """The manifest holds the channel means and chip padding the models need, and the other files' hashes:
    a valid JSON with other means (or other hashes) must not load silently."""
    import json

    copy = tmp_path / "w"
    shutil.copytree(fa.WEIGHTS, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["models"]["gender"]["input"]["normalization"]["means"] = [0.0, 0.0, 0.0]
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    monkeypatch.setattr(fa, "WEIGHTS", copy)
    fa._manifest.cache_clear()
    try:
        with pytest.raises(ModelError, match="missing or damaged"):
            fa.DlibAgeGender()
    finally:
        fa._manifest.cache_clear()
