"""The dashboard's Agreement page and the bias page's skin section, on the demo's reference run of real
photos: the figures shown are those the audit wrote, and the gallery shows the images the probes disagree on."""

from __future__ import annotations

import pytest
from fixtures_runs import open_app

from diffaudit.demo import run_reference


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run_reference(root, log=lambda message: None)
    return root.resolve()


def visit(at, page):
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_agreement_page_shows_the_written_figures_and_the_disagreements(runs, monkeypatch):
    from diffaudit.runs import Run

    at = visit(open_app(runs, ["demo-reference"], monkeypatch), "agreement")
    table = Run.open(runs / "demo-reference").read_table("bias/agreement")
    first = table[(table["subject"] == "all")].sort_values("attribute").iloc[0]  # perceived_age comes first
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images both labelled"] == f"{int(first['n'])} of {int(first['images'])}"
    assert metrics["Cohen's kappa"] == f"{first['kappa']:.2f}"
    at.selectbox(key="agree_attribute").set_value("perceived_gender").run()
    gender = table[(table["subject"] == "all") & (table["attribute"] == "perceived_gender")].iloc[0]
    assert {m.label: m.value for m in at.metric}["Raw agreement"] == f"{gender['raw_agreement']:.2f}"
    captions = "\n".join(c.value for c in at.caption)
    assert f"{int(gender['n'] - gender['agree'])} image(s) labelled differently" in captions
    shown = [c for img in at.image for c in img.captions]
    assert len(shown) == int(gender["n"] - gender["agree"])  # one thumbnail per disagreement
    assert all(c.startswith("clip: ") and " · faces_attr: " in c for c in shown)
    assert any(c.endswith("photo-camera-1") for c in shown)  # the tiny CLIP reads him as a woman


def test_bias_page_shows_skin_measures(runs, monkeypatch):
    at = visit(open_app(runs, ["demo-reference"], monkeypatch), "bias")
    headers = [h.value for h in at.subheader]
    assert "Apparent skin colour: lightness L*, hue h*, ITA" in headers
