"""Memorization without a training set: per-prompt scores, flags, calibration, AUC, the built-in suites and
``diffaudit audit memorization RUN`` without ``--index``.

Arithmetic is checked on runs whose score columns are set by hand; the end-to-end path on the tiny model,
whose random weights make every score meaningless: those tests prove the plumbing only.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from audit.memorization import prompt_scores as ps
from diffaudit.cli import app
from diffaudit.errors import ConfigError, InputError
from diffaudit.runs import Run
from prompts.suites import expand, load_suite

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "sdv1_500_memorized.jsonl"


def scored_run(root: Path, scores: dict[str, list[float | None]], suites: dict[str, str] | None = None,
               latent: list[int] | None = None) -> Run:
    """A run whose generations table holds the given per-image step-1 scores (and mean = step1 / 2)."""
    gen = {"model": "sd15-test", "steps": 25, "scheduler": "ddim", "guidance": 7.5}
    if latent is not None:
        gen["memorization_score"] = {"latent_shape": latent, "mean_steps": 10}
    run = Run.create(root, {"generation": gen})
    rows = []
    for prompt_id, values in scores.items():
        for i, v in enumerate(values):
            rows.append(dict(image_id=f"{prompt_id}-{i}", prompt_id=prompt_id,
                             suite=(suites or {}).get(prompt_id, "test"), template="t", subject=prompt_id,
                             prompt=f"prompt {prompt_id}", negative_prompt="", mode="txt2img", index=i, seed=i,
                             width=512, height=512, path=f"images/{prompt_id}/{i}.png", sha256="0" * 64,
                             mem_score_step1=v, mem_score_mean=None if v is None else v / 2,
                             mem_score_steps=None if v is None else 10))
    run.write_table("generations", pd.DataFrame(rows))
    return run


def test_prompt_score_is_the_mean_of_its_images_and_flags_against_the_threshold(tmp_path):
    run = scored_run(tmp_path / "r", {"a": [1.0, 2.0, 3.0], "b": [9.0, 7.0], "c": [None, None], "d": [6.0, None]},
                     latent=[4, 64, 64])
    summary = ps.score_run(run.root)
    t = run.read_table("memorization/prompt_scores").set_index("prompt_id")
    assert t.loc["a", "score"] == pytest.approx(2.0) and t.loc["a", "score_median"] == 2.0
    assert (t.loc["a", "score_min"], t.loc["a", "score_max"]) == (1.0, 3.0)
    assert t.loc["b", "score"] == pytest.approx(8.0) and t.loc["d", "score"] == pytest.approx(6.0)
    assert t.loc["d", "scored"] == 1 and t.loc["d", "images"] == 2
    assert t["threshold"].eq(ps.DEFAULT_THRESHOLD).all()
    assert t.loc["b", "flagged"] and t.loc["d", "flagged"] and not t.loc["a", "flagged"]
    assert pd.isna(t.loc["c", "flagged"]) and pd.isna(t.loc["c", "rank"])  # no score: no verdict
    assert (t.loc["b", "rank"], t.loc["d", "rank"], t.loc["a", "rank"]) == (1, 2, 3)
    assert t.loc["b", "images_above"] == 2 and t["copy_found"].isna().all()  # no index check in this run
    assert summary["flagged_prompts"] == 2 and summary["scored_images"] == 6
    assert [p["prompt_id"] for p in summary["most_suspicious"]] == ["b", "d", "a"]
    assert summary["auc"] is None and summary["threshold"]["source"] == "default"
    assert "evidence, not proof" in summary["meaning"]
    stage = run.info["stages"]["memorization_scores"]
    assert stage["flagged_prompts"] == 2 and stage["threshold"] == ps.DEFAULT_THRESHOLD

    ps.score_run(run.root, threshold="7.5")  # a number on the command line
    t = run.read_table("memorization/prompt_scores").set_index("prompt_id")
    assert t.loc["b", "flagged"] and not t.loc["d", "flagged"]
    ps.score_run(run.root, threshold="3", statistic="mean")  # mean = step1 / 2 in this run
    t = run.read_table("memorization/prompt_scores").set_index("prompt_id")
    assert t.loc["b", "score"] == pytest.approx(4.0) and t.loc["b", "flagged"] and not t.loc["d", "flagged"]
    with pytest.raises(ConfigError, match="no published threshold"):
        ps.score_run(run.root, statistic="mean")
    with pytest.raises(ConfigError, match="neither a number nor a calibration file"):
        ps.score_run(run.root, threshold="no-such-file.json")


def test_default_threshold_scales_with_the_latent_and_says_so():
    assert ps.default_threshold([4, 64, 64]).value == ps.DEFAULT_THRESHOLD
    sdxl = ps.default_threshold([4, 128, 128])
    assert sdxl.value == pytest.approx(2 * ps.DEFAULT_THRESHOLD) and "uncalibrated" in sdxl.note
    assert "uncalibrated for any other model" in ps.default_threshold(None).note


def test_auc_when_the_run_holds_both_suites(tmp_path):
    rng = np.random.default_rng(1)
    pos = {f"m{i}": list(rng.normal(8, 2, 3)) for i in range(40)}
    neg = {f"o{i}": list(rng.normal(3, 1, 3)) for i in range(120)}
    suites = {**{p: "memorized_sd1" for p in pos}, **{p: "ordinary_sd1" for p in neg}}
    run = scored_run(tmp_path / "r", {**pos, **neg}, suites)
    auc = ps.score_run(run.root)["auc"]
    table = run.read_table("memorization/prompt_scores")
    p = table.loc[table["suite"] == "memorized_sd1", "score"].to_numpy()
    n = table.loc[table["suite"] == "ordinary_sd1", "score"].to_numpy()
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in p for b in n])  # the definition, pair by pair
    assert auc["auc"] == pytest.approx(brute, abs=1e-4)
    assert auc["auc_ci"][0] <= auc["auc"] <= auc["auc_ci"][1] and auc["auc_ci"][1] - auc["auc_ci"][0] < 0.2
    cut = np.sort(n)[int(np.ceil(0.99 * len(n))) - 1]
    assert auc["tpr_at_1pct_fpr"] == pytest.approx((p > cut).mean())
    assert (auc["memorized_prompts"], auc["ordinary_prompts"]) == (40, 120) and auc["note"] is None
    assert auc["fpr_at_threshold"] == pytest.approx((n > ps.DEFAULT_THRESHOLD).mean())


def test_calibration_fits_on_one_half_and_reports_the_other(tmp_path):
    scores = {f"o{i:03d}": [float(i)] for i in range(400)}  # prompt scores 0..399
    run = scored_run(tmp_path / "r", scores)
    out = tmp_path / "cal.json"
    cal = ps.calibrate(run.root, fpr=0.05, out=out)
    halves = {p: ps._half(p, 0) for p in scores}
    cal_scores = np.array([scores[p][0] for p, h in halves.items() if h == "calibration"])
    held = np.array([scores[p][0] for p, h in halves.items() if h == "heldout"])
    assert cal["prompts_calibration"] == len(cal_scores) and cal["prompts_heldout"] == len(held)
    assert cal["threshold"] == np.quantile(cal_scores, 0.95, method="higher")
    assert (cal_scores > cal["threshold"]).mean() <= 0.05  # at most the target on the half it was fitted on
    assert cal["fpr_heldout"] == pytest.approx((held > cal["threshold"]).mean())
    assert cal["fpr_heldout_ci"][0] <= cal["fpr_heldout"] <= cal["fpr_heldout_ci"][1]
    thr = ps.resolve_threshold(str(out), run)
    assert thr.source == "calibration" and thr.value == cal["threshold"] and "held-out" in thr.note
    other = scored_run(tmp_path / "other", {"x": [1.0]})
    other.update_info({"generation": {**other.info["generation"], "steps": 50}})
    assert "may not transfer" in ps.resolve_threshold(str(out), other).note
    with pytest.raises(InputError, match="too few"):
        ps.calibrate(run.root, fpr=0.001)


def test_calibration_on_a_mixed_run_uses_its_ordinary_prompts_only(tmp_path):
    scores = {**{f"o{i}": [1.0 + i / 100] for i in range(60)}, **{f"m{i}": [50.0] for i in range(60)}}
    suites = {p: "ordinary_sd1" if p.startswith("o") else "memorized_sd1" for p in scores}
    run = scored_run(tmp_path / "r", scores, suites)
    cal = ps.calibrate(run.root, fpr=0.1)
    assert cal["suite"] == "ordinary_sd1" and cal["threshold"] < 2
    assert cal["prompts_calibration"] + cal["prompts_heldout"] == 60


def test_flagged_prompts_say_whether_the_index_found_a_copy(tmp_path):
    run = scored_run(tmp_path / "r", {"a": [9.0], "b": [8.0], "c": [1.0], "d": [7.0]})
    run.write_table("memorization/matches", pd.DataFrame([
        dict(image_id="a-0", prompt_id="a", train_key="k1", hamming=2, verdict="memorized"),
        dict(image_id="b-0", prompt_id="b", train_key="k2", hamming=9, verdict="unconfirmed")]))
    run.write_table("memorization/rates", pd.DataFrame([
        dict(prompt_id=p, subject=p, images=1, matched=int(p == "a"), rate=float(p == "a"), ci_low=0.0, ci_high=1.0)
        for p in ("a", "b", "c")]))  # "d" was added after the index check
    summary = ps.score_run(run.root)
    t = run.read_table("memorization/prompt_scores").set_index("prompt_id")
    assert t["copy_found"].to_dict() == {"a": True, "b": False, "c": False, "d": None}
    assert summary["index_check"] == {"flagged_with_copy": 1, "flagged_without_copy": 1, "flagged_not_checked": 1}


def test_a_run_without_scores_writes_nothing_and_says_why(photo_run):
    summary = ps.score_run(photo_run.root)
    assert summary["scored_images"] == 0 and "before diffaudit recorded" in summary["reason"]
    assert not photo_run.has_table("memorization/prompt_scores")
    result = CliRunner().invoke(app, ["audit", "memorization", str(photo_run.root)])
    assert result.exit_code != 0 and isinstance(result.exception, InputError)
    assert "--index" in str(result.exception)


# --- the built-in suites ---------------------------------------------------------------------------------

def test_memorized_suite_holds_the_500_published_captions_verbatim():
    suite = load_suite("memorized-sd1")
    assert suite.name == "memorized_sd1" and len(suite.subjects) == 500
    assert any("Webster" in s for s in suite.sources) and any("Wen" in s for s in suite.sources)
    assert not any("http" in s.text for s in suite.subjects)  # the URLs are not carried, let alone fetched
    if REFERENCE.is_file():
        rows = [json.loads(line) for line in REFERENCE.read_text().splitlines()]
        assert [s.text for s in suite.subjects] == [r["caption"] for r in rows]
        assert [s.id for s in suite.subjects] == [f"l{r['index']}" for r in rows]
    assert sum("<i>" in s.text for s in suite.subjects) > 10  # HTML tags kept as data


def test_combined_suite_expands_to_both_suites_with_their_own_names():
    reqs = expand("memorization-sd1", images_per_prompt=2, seed=0)
    by_suite = pd.Series([r.suite for r in reqs]).value_counts().to_dict()
    assert by_suite == {"memorized_sd1": 500, "ordinary_sd1": 500}
    assert len({r.prompt_id for r in reqs}) == 1000
    memorized = {r.prompt for r in reqs if r.suite == "memorized_sd1"}
    ordinary = [r.prompt for r in reqs if r.suite == "ordinary_sd1"]
    assert len(set(ordinary)) == 500 and not memorized & set(ordinary)
    alone = {r.prompt_id: r.seeds for r in expand("ordinary-sd1", images_per_prompt=2, seed=0)}
    assert all(alone[r.prompt_id] == r.seeds for r in reqs if r.suite == "ordinary_sd1")  # same seeds as alone


def test_include_cycles_and_duplicate_ids_are_suite_errors(tmp_path):
    from diffaudit.errors import SuiteError

    (tmp_path / "a.yaml").write_text("name: a\ndescription: a\nsources: [x]\ninclude: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("name: b\ndescription: b\nsources: [x]\ninclude: [a.yaml]\n")
    with pytest.raises(SuiteError, match="cycle"):
        expand(tmp_path / "a.yaml", images_per_prompt=1)
    (tmp_path / "c.yaml").write_text("name: c\ndescription: c\nsources: [x]\ninclude: [ordinary-sd1, ordinary-sd1]\n")
    with pytest.raises(SuiteError, match="more than once"):
        expand(tmp_path / "c.yaml", images_per_prompt=1)
    with pytest.raises(SuiteError, match="pick subsets"):
        expand("memorization-sd1", images_per_prompt=1, subjects=("tennis_court",))


# --- end to end on the tiny model (plumbing only) --------------------------------------------------------

def tiny_auc_suites(folder: Path) -> Path:
    """Small stand-ins named like the built-in suites: 3 'memorized' and 12 'ordinary' prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mem.yaml").write_text(textwrap.dedent("""\
        name: memorized_sd1
        description: three captions of the real suite
        sources: ["test"]
        templates: [{id: caption, text: "{subject}"}]
        subjects:
          - {id: l1030727993, text: "The No Limits Business Woman Podcast"}
          - {id: l964841345, text: "Mothers influence on her young hippo"}
          - {id: l851022632, text: "Sony Won't Release <i>The Interview</i> on VOD"}
        """))
    (folder / "ord.yaml").write_text(textwrap.dedent("""\
        name: ordinary_sd1
        description: twelve ordinary prompts
        sources: ["test"]
        templates: [{id: coco, text: "a photo of {a} {subject}"}, {id: art, text: "{subject}, digital art"}]
        subjects: [{id: owl, text: owl}, {id: bridge, text: stone bridge}, {id: kettle, text: kettle},
                   {id: tram, text: tram}, {id: fern, text: fern}, {id: kite, text: kite}]
        """))
    (folder / "both.yaml").write_text("name: both\ndescription: both\nsources: [test]\ninclude: [mem.yaml, ord.yaml]\n")
    return folder / "both.yaml"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> Path:
    """A runs root with one tiny run of both stand-in suites, scored without an index (threshold 0)."""
    from diffaudit.config import GenerationConfig
    from generate.runner import generate_run

    root = tmp_path_factory.mktemp("runs")
    cfg = GenerationConfig(suite=str(tiny_auc_suites(root.parent / "suites")), model="tiny", images_per_prompt=2,
                           steps=2, width=32, height=32, seed=0, batch_size=8)
    generate_run(root / "mem-auc", cfg, progress=False)
    result = CliRunner().invoke(app, ["audit", "memorization", str(root / "mem-auc"), "--threshold", "0"])
    assert result.exit_code == 0, result.output
    (root / "summary.json").write_text(result.output)
    return root


def test_audit_memorization_without_an_index_on_a_tiny_run(tiny_runs, tmp_path):
    run_dir = tiny_runs / "mem-auc"
    summary = json.loads((tiny_runs / "summary.json").read_text())
    assert summary["scored_images"] == 30 and summary["prompts"] == 15
    assert summary["flagged_prompts"] == 15  # every score is > 0
    assert summary["auc"]["memorized_prompts"] == 3 and summary["auc"]["ordinary_prompts"] == 12
    assert summary["auc"]["note"] and "plumbing" in summary["caution"]
    table = Run.open(run_dir).read_table("memorization/prompt_scores")
    assert len(table) == 15 and table["rank"].tolist() == list(range(1, 16))
    result = CliRunner().invoke(app, ["audit", "memorization-calibrate", str(run_dir), "--fpr", "0.5",
                                      "--suite", "ordinary_sd1", "--out", str(tmp_path / "cal.json")])
    assert result.exit_code == 0, result.output
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["model"] == "tiny" and cal["latent_shape"] == [4, 16, 16]
    result = CliRunner().invoke(app, ["audit", "memorization", str(run_dir), "--threshold", str(tmp_path / "cal.json")])
    assert result.exit_code == 0 and json.loads(result.output)["threshold"]["source"] == "calibration"
    ps.score_run(run_dir, threshold=0)  # back to what the report and dashboard tests expect


def test_report_has_the_memorization_scores_section(tiny_runs):
    from diffaudit.report import build_report

    md, html_path = build_report(tiny_runs / "mem-auc")
    text = md.read_text()
    section = text[text.index("## Memorization scores"):text.index("## Provenance")]
    assert "**15 flagged**" in section and "evidence, not proof" in section
    assert "AUC" in section and "3 known-memorized" in section and "12 ordinary" in section
    assert "Sony Won't Release <i>The Interview</i> on VOD" not in html_path.read_text()  # escaped in HTML
    assert "&lt;i&gt;The Interview&lt;/i&gt;" in html_path.read_text()
    assert "prove the plumbing" in section
    assert html_path.read_text().count("<svg") >= 1


def test_dashboard_page_shows_scores_flags_and_images(tiny_runs, monkeypatch):
    from fixtures_runs import open_app

    at = open_app(tiny_runs, ["mem-auc"], monkeypatch)
    at.switch_page("views/memorization_scores.py").run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Prompts flagged"] == "15 of 15" and metrics["Threshold"] == "0"
    assert "Detector AUC on this run" in metrics
    flagged = at.table[0].value
    top = Run.open(tiny_runs / "mem-auc").read_table("memorization/prompt_scores").iloc[0]
    assert len(flagged) == 15 and flagged.iloc[0]["prompt_id"] == ui_md(top["prompt_id"])
    assert len(at.get("vega_lite_chart")) == 1
    assert any("plumbing" in w.value for w in at.warning)
    captions = [c for img in at.image for c in img.captions]  # the first flagged prompt's two images
    assert len(captions) == 2 and all(c.startswith(top["prompt_id"]) for c in captions)


def ui_md(text: str) -> str:
    from dashboard.ui import md

    return md(text)


# --- end to end with the default threshold: the report and the dashboard say what the table says ----------

def _md_cells(line: str) -> list[str]:
    """A Markdown table row's cells, with the report's escaping (a backslash before punctuation) undone."""
    import re

    return [re.sub(r"\\(.)", r"\1", c.strip()) for c in line.strip().strip("|").split(" | ")]


def _report_flagged_rows(md: str) -> tuple[str, list[dict[str, str]]]:
    """The memorization-scores section of report.md and its flagged-prompt table as dicts of cells."""
    section = md[md.index("## Memorization scores"):]
    section = section[:section.index("\n## ", 3)] if "\n## " in section[3:] else section
    lines = section.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| rank |")), None)
    if start is None:
        return section, []
    header = _md_cells(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, _md_cells(line), strict=True)))
    return section, rows


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory) -> Path:
    """A runs root with one tiny run of eight ordinary prompts, two images each, not scored yet."""
    from diffaudit.config import GenerationConfig
    from generate.runner import generate_run

    root = tmp_path_factory.mktemp("plain")
    suite = root.parent / "plain-suite.yaml"
    suite.write_text(textwrap.dedent("""\
        name: plain
        description: eight ordinary prompts
        sources: ["test"]
        templates: [{id: coco, text: "a photo of {a} {subject}"}, {id: art, text: "{subject}, digital art"}]
        subjects: [{id: owl, text: owl}, {id: bridge, text: stone bridge}, {id: kettle, text: kettle},
                   {id: tram, text: tram}]
        """))
    cfg = GenerationConfig(suite=str(suite), model="tiny", images_per_prompt=2, steps=2, width=32, height=32,
                           seed=3, batch_size=8)
    generate_run(root / "plain", cfg, progress=False)
    return root


def _check_report_and_dashboard(runs: Path, monkeypatch) -> pd.DataFrame:
    """`diffaudit report RUN` and the dashboard's loader and page show exactly the parquet's flagged prompts:
    ranks, scores, counts, threshold; returns the parquet's flagged rows."""
    from fixtures_runs import open_app

    from dashboard import data

    run_dir = runs / "plain"
    run = Run.open(run_dir)
    table = run.read_table("memorization/prompt_scores")
    stage = run.info["stages"]["memorization_scores"]
    flagged = table[table["flagged"].fillna(False).astype(bool)].sort_values("rank")
    gens = run.read_table("generations")
    assert table["flagged"].tolist() == [s > stage["threshold"] for s in table["score"]]
    assert table.set_index("prompt_id")["score"].to_dict() == pytest.approx(
        gens.groupby("prompt_id")["mem_score_step1"].mean().to_dict(), rel=1e-12)

    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    section, rows = _report_flagged_rows((run_dir / "report.md").read_text())
    assert f"{len(table)} of {len(table)} prompts scored" in section
    assert f"**{len(flagged)} flagged** above the threshold {stage['threshold']:.3g}" in section
    assert [r["prompt"] for r in rows] == flagged["prompt"].tolist()
    assert [int(float(r["rank"])) for r in rows] == flagged["rank"].astype(int).tolist()
    assert [float(r["score"]) for r in rows] == [round(s, 3) for s in flagged["score"]]
    assert [r["images above"] for r in rows] == [f"{a}/{n}" for a, n in zip(flagged["images_above"],
                                                                            flagged["scored"], strict=True)]
    assert {r["copy found"] for r in rows} <= {"–"}  # no index check in this run
    if len(flagged):
        shown = [f"#{int(r.rank)} {r.prompt_id}" for r in flagged.head(6).itertuples()]
        assert "*(evidence images in report.html: " + ", ".join(shown) + ")*" in section.replace("\\", "")

    loaded = data.prompt_scores(run)
    pd.testing.assert_frame_equal(loaded.table.reset_index(drop=True), table.reset_index(drop=True))
    assert loaded.flagged["prompt_id"].tolist() == flagged["prompt_id"].tolist()
    assert loaded.threshold == stage["threshold"]
    if len(flagged):
        first = loaded.images(run, flagged["prompt_id"].iloc[0])
        mine = gens[gens["prompt_id"] == flagged["prompt_id"].iloc[0]]
        assert first["mem_score_step1"].tolist() == mine["mem_score_step1"].tolist()

    at = open_app(runs, ["plain"], monkeypatch)
    at.switch_page("views/memorization_scores.py").run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Prompts flagged"] == f"{len(flagged)} of {len(table)}"
    assert metrics["Threshold"] == f"{stage['threshold']:.3g}"
    if len(flagged):
        shown = at.table[0].value
        assert shown["prompt_id"].tolist() == [ui_md(p) for p in flagged["prompt_id"]]
        assert shown["score"].tolist() == [f"{s:.3f}" for s in flagged["score"]]
        assert shown["rank"].astype(int).tolist() == flagged["rank"].astype(int).tolist()
        captions = [c for img in at.image for c in img.captions]
        mine = gens[gens["prompt_id"] == flagged["prompt_id"].iloc[0]]
        assert captions == [f"{ui_md(i)} · score {s:.3f}" for i, s in zip(mine["image_id"], mine["mem_score_step1"],
                                                                           strict=True)]
    else:
        assert any("No prompt is above the threshold" in i.value for i in at.info)
    return flagged


def test_default_threshold_end_to_end_report_and_dashboard_agree_with_the_table(plain_runs, monkeypatch):
    """`audit memorization RUN` with no index and no threshold: the documented default, scaled to the tiny
    model's 4x16x16 latent and said to be uncalibrated; report and dashboard show the table's numbers."""
    run_dir = plain_runs / "plain"
    result = CliRunner().invoke(app, ["audit", "memorization", str(run_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    expected = ps.DEFAULT_THRESHOLD * np.sqrt(4 * 16 * 16 / (4 * 64 * 64))
    assert summary["threshold"]["source"] == "default" and summary["threshold"]["value"] == pytest.approx(expected)
    assert "uncalibrated" in summary["threshold"]["note"] and summary["index_check"] is None
    table = Run.open(run_dir).read_table("memorization/prompt_scores")
    assert summary["scored_images"] == 16 and summary["prompts"] == len(table) == 8
    assert summary["flagged_prompts"] == int(table["flagged"].sum())
    assert [(p["prompt_id"], p["score"]) for p in summary["most_suspicious"]] == [
        (r.prompt_id, round(r.score, 4)) for r in table.head(ps.TOP).itertuples()]
    _check_report_and_dashboard(plain_runs, monkeypatch)


def test_a_threshold_inside_the_scores_flags_the_top_half_in_report_and_dashboard(plain_runs, monkeypatch):
    """A threshold between the run's prompt scores (the median: plumbing, not a tuned operating point) so that
    the flagged table has rows and unflagged prompts stay out of it."""
    run_dir = plain_runs / "plain"
    gens = Run.open(run_dir).read_table("generations")
    median = float(np.median(gens.groupby("prompt_id")["mem_score_step1"].mean()))
    result = CliRunner().invoke(app, ["audit", "memorization", str(run_dir), "--threshold", repr(median)])
    assert result.exit_code == 0, result.output
    flagged = _check_report_and_dashboard(plain_runs, monkeypatch)
    assert len(flagged) == 4 and flagged["rank"].astype(int).tolist() == [1, 2, 3, 4]


def test_with_an_index_flagged_prompts_say_whether_a_copy_was_found_end_to_end(tmp_path, monkeypatch):
    """Tiny run with img2img edits at strength 0.1 of photos that the index holds (their outputs are the photos:
    real copies) beside txt2img prompts (noise): `audit memorization RUN --index IDX` marks exactly the edits'
    prompts as copies, and the report and the dashboard say so per flagged prompt."""
    from fixtures_runs import open_app

    from audit.memorization.build import build_index
    from dashboard import data
    from diffaudit.config import GenerationConfig
    from diffaudit.demo import write_training_photos
    from generate.runner import generate_run

    suite = tmp_path / "copies.yaml"
    suite.write_text(textwrap.dedent("""\
        name: copies
        description: two edits of indexed photos, two prompts from noise
        sources: ["test"]
        templates: [{id: coco, text: "a photo of {a} {subject}"}]
        subjects: [{id: owl, text: owl}, {id: tram, text: tram}]
        edits:
          - {id: astronaut, mode: img2img, prompt: "a photo of an astronaut", source: "skimage:astronaut", strength: 0.1}
          - {id: coffee, mode: img2img, prompt: "a photo of a cup of coffee", source: "skimage:coffee", strength: 0.1}
        """))
    runs = tmp_path / "runs"
    cfg = GenerationConfig(suite=str(suite), model="tiny", images_per_prompt=1, steps=10, seed=0, batch_size=4)
    generate_run(runs / "copies", cfg, progress=False)
    build_index([str(p) for p in write_training_photos(tmp_path / "training")], str(tmp_path / "idx"), progress=False)
    result = CliRunner().invoke(app, ["audit", "memorization", str(runs / "copies"), "--index", str(tmp_path / "idx"),
                                      "--threshold", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["prompt_scores"]
    run = Run.open(runs / "copies")
    table = run.read_table("memorization/prompt_scores")
    copies = table.set_index("prompt_id")["copy_found"].to_dict()
    assert copies == {"img2img-astronaut": True, "img2img-coffee": True, "coco-owl": False, "coco-tram": False}
    assert summary["index_check"] == {"flagged_with_copy": 2, "flagged_without_copy": 2, "flagged_not_checked": 0}

    assert CliRunner().invoke(app, ["report", str(runs / "copies")]).exit_code == 0
    _, rows = _report_flagged_rows((runs / "copies" / "report.md").read_text())
    assert {r["prompt"]: r["copy found"] for r in rows} == {
        p: "yes" if copies[i] else "no" for i, p in zip(table["prompt_id"], table["prompt"], strict=True)}
    assert data.prompt_scores(run).flagged["copy_found"].tolist() == table["copy_found"].tolist()
    at = open_app(runs, ["copies"], monkeypatch)
    at.switch_page("views/memorization_scores.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = at.table[0].value
    assert shown["copy found"].tolist() == ["yes" if c else "no" for c in table["copy_found"]]
