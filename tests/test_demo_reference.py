"""The demo meets real faces: its reference run of real photos (not model output) shows faces found by
the real detector, the labels two probes read from them, their agreement and the skin measures, in the
report and in the demo's own summary lines."""

from __future__ import annotations

import pytest

from diffaudit.demo import REFERENCE_LFW, reference_summary, run_reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    logs: list[str] = []
    run = run_reference(tmp_path_factory.mktemp("runs"), log=logs.append)
    return run, logs


def test_reference_run_is_labelled_real_and_every_photo_probed(reference):
    run, logs = reference
    assert run.info["generation"]["reference_set"] is True
    gens = run.read_table("generations")
    assert len(gens) == 2 + REFERENCE_LFW and set(gens["model"]) == {"reference-photos"}
    faces = run.read_table("probes/faces")
    found = set(faces.loc[faces["face_index"] >= 0, "image_id"])
    assert {"photo-astronaut-0", "photo-camera-1"} <= found and len(found) >= 2 + REFERENCE_LFW - 2
    assert "probed 18 real photos" in logs[0]


def test_report_shows_real_detections_and_agreement(reference):
    run, _ = reference
    md = (run.root / "report.md").read_text()
    html = (run.root / "report.html").read_text()
    assert "reference set of real photos, not model output" in md
    bias = md[md.index("## Bias"):]
    assert bias.index("### Do the probes agree?") < bias.index("### Faces found")  # agreement leads
    assert "| clip vs faces_attr | perceived_gender | 18 |" in md and "Cohen's kappa" in md
    assert "| photo-astronaut-0 | 1 |" in md and "woman, young_adult" in md and "man, young_adult" in md
    assert "mtcnn:" in md and "### Apparent skin colour beyond one number" in md and "| all | L\\* | 1 |" in md  # Markdown-escaped
    assert html.count("data:image/png;base64") >= 8  # the detections drawn on the photos


def test_demo_summary_lines(reference):
    run, _ = reference
    lines = reference_summary(run)
    assert lines[0].startswith("[reference] faces found by mtcnn in ")
    assert any("astronaut: faces_attr: woman, young_adult" in ln and "skin L* 76" in ln for ln in lines)
    assert any("camera: faces_attr: man, young_adult" in ln for ln in lines)
    assert any("agreement clip vs faces_attr on perceived_gender" in ln and "kappa" in ln for ln in lines)


def test_rerun_resumes_without_reprobing(reference, tmp_path):
    run, _ = reference
    logs: list[str] = []
    again = run_reference(run.root.parent, log=logs.append)
    assert again.info["stages"]["bias"]["probed"] == {"clip": 0, "faces": 0, "faces_attr": 0, "skin_tone": 0}
