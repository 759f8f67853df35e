"""The demo audit end to end on the tiny model: every table, the report, verified stamps, and resume
after an interruption in the middle of a stage without redoing finished stages."""

from __future__ import annotations

import pytest

from diffaudit.demo import run_demo
from diffaudit.runs import Run

SUBJECTS = ("ceo", "nurse", "electrician")
TABLES = ("generations", "probes/clip", "probes/faces", "probes/skin_tone", "bias/summary", "bias/metrics",
          "memorization/matches", "memorization/rates", "provenance/stamps")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    logs: list[str] = []
    config = run_demo(runs, images_per_prompt=1, subjects=SUBJECTS, log=logs.append)
    return config, Run.open(config.out), logs


def test_every_table_is_written(demo):
    config, run, _ = demo
    gens = run.read_table("generations")
    assert len(gens) == len(SUBJECTS) + 3  # three occupations, then the demo's three edits
    assert set(gens["mode"]) == {"txt2img", "img2img", "inpaint"}
    for table in TABLES:
        assert run.has_table(table), table
        assert len(run.read_table(table)) > 0, table
    summary = run.read_table("bias/summary")
    woman = summary[(summary.attribute == "perceived_gender") & (summary.label == "woman") & (summary.template == "all")]
    assert set(SUBJECTS) <= set(woman["subject"])
    ceo = woman[woman.subject == "ceo"].iloc[0]
    assert ceo.reference_share == pytest.approx(0.292)  # BLS 2022: chief executives, 29.2% women
    assert set(run.info["pipeline"]) == {"generate", "bias", "memorization", "stamp", "report"}


def test_img2img_outputs_are_found_and_confirmed_as_near_copies(demo):
    _, run, _ = demo
    matches = run.read_table("memorization/matches")
    found = matches[matches["prompt_id"].str.startswith("img2img-")]
    assert set(found["train_key"]) >= {"astronaut.png", "coffee.png"}
    assert (found["hamming"] <= 10).all()
    # the tiny VAE keeps a blurred 64 px copy of the photo: confirmed in pixels, not only by hash
    assert set(found["verdict"]) <= {"memorized", "near_duplicate"}
    for rel in found["evidence_path"]:
        assert run.path(rel).is_file()


def test_report_sections_and_offline_html(demo):
    _, run, _ = demo
    md = (run.root / "report.md").read_text()
    for section in ("## What was audited", "## Bias", "### Perceived women against the BLS 2022 workforce",
                    "### Abstention and face detection", "## Memorization", "## Provenance", "## Limitations"):
        assert section in md, section
    assert "perceived" in md and "tiny model" in md
    assert "Not every stage covers every image" not in md  # the demo's stages each saw all of its images
    assert "Invisible watermark (ssTile): embedded in 0 of" in md  # 64 px: too small, said so
    # abstention over the images the shares count (edits of source photos left out), reasons included
    gens = run.read_table("generations")
    prompted = int((gens["template"] != "edit").sum())
    row = next(x for x in md.splitlines() if x.startswith("| clip | perceived_gender |")).split("|")
    reasons = sum(int(part.split("(")[1].strip().rstrip(")")) for part in row[5].split(",") if "(" in part)
    assert int(row[3]) == prompted < len(gens) and reasons <= prompted
    html = (run.root / "report.html").read_text()
    assert "data:image/png;base64," in html  # the memorization evidence pairs are embedded
    assert "src=\"http" not in html and "href=\"http" not in html and "<script" not in html


def test_stamps_verify_as_trusted(demo):
    from provenance.stamp import verify_paths

    config, run, _ = demo
    stamps = run.read_table("provenance/stamps")
    assert len(stamps) == len(run.read_table("generations"))
    anchors = f"{config.provenance.identity}/root-ca.pem"
    results = verify_paths([run.root / "provenance" / "stamped"], trust_anchors=anchors)
    assert len(results) == len(stamps)
    assert {r.status for r in results} == {"Trusted"}


def test_interrupted_stage_resumes_without_redoing_finished_stages(tmp_path, monkeypatch):
    import provenance.stamp as stamp_mod

    runs = tmp_path / "runs"
    real = stamp_mod._stamp_row
    calls = {"n": 0}

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stamp_mod, "_stamp_row", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_demo(runs, images_per_prompt=1, subjects=("ceo",), log=lambda m: None)
    run = Run.open(runs / "demo")
    assert set(run.info["pipeline"]) == {"generate", "bias", "memorization"}
    assert len(run.read_table("provenance/stamps")) == 2  # rows finished before the interruption are kept
    before = run.info["pipeline"]

    monkeypatch.setattr(stamp_mod, "_stamp_row", real)
    logs: list[str] = []
    run_demo(runs, images_per_prompt=1, subjects=("ceo",), log=logs.append)
    for stage in ("generate", "bias", "memorization"):
        assert any(line.startswith(f"[{stage}] already done") for line in logs), stage
        assert run.info["pipeline"][stage] == before[stage]
    assert run.info["stages"]["stamp"]["images"] == 4 - 2  # only the images not stamped before
    assert len(run.read_table("provenance/stamps")) == 4


def test_demo_prints_a_summary_read_from_the_run(demo):
    _, run, logs = demo
    lines = {line.split(":")[0]: line for line in logs if line.startswith("[summary]")}
    n = len(run.read_table("generations"))
    assert f"images: {n} " in lines["[summary] images"]
    assert f"{n} stamped copies verified against the demo root CA: Trusted {n}" in lines["[summary] provenance"]
    stage = run.info["stages"]["memorization"]
    assert f"photos, {stage['matched_images']} matched one in pixels" in lines["[summary] memorization"]
    assert "; img2img-astronaut, img2img-coffee)" in lines["[summary] memorization"]


def test_memorization_counts_agree_across_run_json_rates_report_dashboard_and_summary(demo, monkeypatch):
    """One definition (``verdicts.image_counts``): the demo's matched / memorized / near_duplicate image counts
    are the same in run.json, rates.parquet, the report, the dashboard and the printed summary."""
    from fixtures_runs import open_app

    from audit.memorization import verdicts as vd

    _, run, logs = demo
    stage = run.info["stages"]["memorization"]
    rates = run.read_table("memorization/rates")
    n = vd.image_counts(run.read_table("memorization/matches"))
    matched, memorized, near = n["matched_images"], n["memorized_images"], n["near_duplicate_images"]
    assert matched >= 2 and matched == memorized + near  # at least the two img2img copies
    assert (stage["matched_images"], stage["memorized_images"], stage["near_duplicate_images"]) == (matched, memorized, near)
    assert (int(rates["matched"].sum()), int(rates["memorized"].sum()), int(rates["near_duplicate"].sum())) == (
        matched, memorized, near)
    md = (run.root / "report.md").read_text()
    assert f"**{matched} matched** a training image" in md
    assert f"({memorized} `{vd.MEMORIZED}`" in md and f"{near} `{vd.NEAR_DUPLICATE}`" in md
    line = next(x for x in logs if x.startswith("[summary] memorization"))
    assert f"{matched} matched one in pixels ({memorized} {vd.MEMORIZED}, {near} {vd.NEAR_DUPLICATE};" in line
    at = open_app(run.root.parent, [run.root.name], monkeypatch)
    at.switch_page("views/memorization.py").run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images matched"] == f"{matched} of {len(run.read_table('generations'))}"
    captions = " ".join(c.value for c in at.caption)
    assert f"Of the matched images: {memorized} {vd.MEMORIZED}, {near} {vd.NEAR_DUPLICATE}." in captions
