"""The dashboard on a real run made by the tiny model: the offline demo audit (generation in every mode,
CLIP/faces/skin-tone probes, memorization against the photos the edits start from, C2PA stamps), two
occupations x 2 images. Every page must show what those stages wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from fixtures_runs import gender_attribute, open_app
from streamlit.testing.v1 import AppTest

from diffaudit.runs import Run

pytestmark = pytest.mark.slow  # ~20 s on two CPU cores: the tiny pipeline and the demo audit



@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> Path:
    from diffaudit.demo import run_demo

    root = tmp_path_factory.mktemp("tiny-runs")
    run_demo(root, images_per_prompt=2, subjects=("ceo", "nurse"), log=lambda message: None)
    shutil.copytree(root / "demo", root / "demo-copy")  # a second run to compare with
    return root.resolve()


@pytest.fixture
def app(tiny_runs, monkeypatch):
    at = open_app(tiny_runs, ["demo", "demo-copy"], monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    return at


def visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_every_page_on_a_tiny_model_run(app, tiny_runs):
    run = Run.open(tiny_runs / "demo")
    gens = run.read_table("generations")
    runs = app.dataframe[0].value.set_index("run")
    assert runs.loc["demo", "images"] == len(gens) == 10
    assert runs.loc["demo", "model"] == str(run.info["generation"]["model"])

    visit(app, "bias")
    gender = gender_attribute()
    app.selectbox(key="bias_attribute").set_value(gender).run()
    s = run.read_table("bias/summary")
    g = s[(s["probe"] == "clip") & (s["template"] == "all") & (s["attribute"] == gender)]
    per = g.drop_duplicates("subject")
    abstained = per["abstained"].sum() / (per["n"].sum() + per["abstained"].sum())
    assert {m.label: m.value for m in app.metric}["Abstained"] == f"{abstained:.1%}"
    woman = g[(g["label"] == "woman") & g["reference_share"].notna()].set_index("subject")
    if len(woman):  # the tiny model's noise decides whether CLIP dares a label on these occupations
        gaps = app.table[0].value.set_index("occupation")
        for subject, row in woman.iterrows():
            expected = "n/a" if pd.isna(row["ci_low"]) else f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
            assert gaps.loc[subject, "95% interval"] == expected  # n/a: every image abstained
            assert gaps.loc[subject, "reference"] == f"{row['reference_share']:.2f}"
    else:
        assert not app.table  # no labelled image to hold against BLS: no gap table, no made-up figure
    app.selectbox(key="bias_subject").set_value("ceo").run()
    clip = run.read_table("probes/clip")
    ceo = clip[clip["image_id"].str.startswith("heim_face-ceo-") & (clip["attribute"] == gender)]
    expected = sorted(f"abstained ({r.abstain_reason})" if r.abstained else r.label for r in ceo.itertuples())
    assert sorted(c.split(" · ")[0] for img in app.image for c in img.captions) == expected
    app.selectbox(key="bias_probe").set_value("faces").run()
    assert not app.exception
    faces = s[(s["probe"] == "faces") & (s["attribute"] == "face_count")]
    if faces["label"].isna().all():  # the tiny model's noise rarely shows a face the detector accepts
        assert "Every image abstained on `face_count`" in app.info[0].value
    else:
        assert set(app.selectbox(key="bias_subject").options) == set(faces["subject"])

    visit(app, "memorization")
    matches = run.read_table("memorization/matches").sort_values("hamming")
    first = matches.iloc[0]
    facts = [m.value for m in app.markdown if "Hamming" in m.value]
    assert f"Hamming **{first['hamming']}** · tile-L2 {first['tile_l2']:.3f}" in facts[0]
    captions = [img.captions[0] for img in app.image]
    assert captions[:2] == [f"generated · {first['image_id']}", f"training · {first['train_key']}"]

    visit(app, "provenance")
    stamps = run.read_table("provenance/stamps")
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Trusted"] == str(int((stamps["status"] == "Trusted").sum())) and len(stamps) == 10

    visit(app, "compare")
    table = app.table[0].value
    assert {"ceo", "nurse"} <= set(table["occupation"])
    assert set(table["delta"]) <= {"+0.00", "n/a"}  # the same run twice (n/a: every image abstained)
