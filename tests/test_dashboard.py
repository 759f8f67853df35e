"""The dashboard, driven with Streamlit's AppTest on synthetic runs with a table for every stage:
each page shows the values the audit wrote, refuses paths that leave the runs root, and writes nothing."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_runs import APP, build_evil_run, build_runs_dir, gender_attribute, open_app
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard import RUNS_DIR_ENV, data, ui
from diffaudit.runs import Run


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = build_runs_dir(tmp_path_factory.mktemp("runs"), images_per_prompt=10, size=64)
    build_evil_run(root / "evil")
    return root.resolve()


@pytest.fixture
def app(runs_dir, monkeypatch):
    """An AppTest on the runs root with tiny-base (A) and tiny-mitigated (B) picked."""
    at = open_app(runs_dir, ["tiny-base", "tiny-mitigated"], monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state[ui.PICKED] == ["tiny-base", "tiny-mitigated"]
    return at


def visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def summary(runs_dir: Path, run: str) -> pd.DataFrame:
    return Run.open(runs_dir / run).read_table("bias/summary")


def focus_rows(runs_dir: Path, run: str = "tiny-base") -> pd.DataFrame:
    s = summary(runs_dir, run)
    return s[(s["attribute"] == gender_attribute()) & (s["template"] == "all") & (s["label"] == "woman")]


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [w.value for w in at.warning]
    return "\n".join(parts)


# -- pages ----------------------------------------------------------------------------------------
def test_runs_page_lists_every_run(app):
    runs = app.dataframe[0].value
    assert set(runs["run"]) == {"tiny-base", "tiny-mitigated", "evil"}
    base = runs.set_index("run").loc["tiny-base"]
    assert base["images"] == 120 and base["suite"] == "occupations" and base["model"] == "tiny-sd"
    assert base["stages"] == "generate, bias, memorization, provenance"
    assert "**images** 120" in app.markdown[0].value
    assert list(app.table[0].value["stage"]) == ["generate", "bias", "memorization", "provenance"]


def test_bias_page_shows_shares_intervals_and_reference(app, runs_dir):
    visit(app, "bias")
    rows = focus_rows(runs_dir)
    top = rows.loc[rows["gap"].abs().idxmax()]
    gaps = app.table[0].value
    # Sorted by the gap to BLS: the first row is the occupation furthest from its reference.
    assert gaps.iloc[0]["occupation"] == top["subject"]
    assert gaps.iloc[0]["95% interval"] == f"[{top['ci_low']:.2f}, {top['ci_high']:.2f}]"
    assert gaps.iloc[0]["reference"] == f"{top['reference_share']:.2f}"
    assert "aide" not in set(gaps["occupation"])  # no BLS row: not in the gap table
    assert len(app.get("vega_lite_chart")) >= 2  # shares with intervals + the parity scatter
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Occupations"] == str(rows["subject"].nunique())
    assert metrics["Significant gaps (woman)"] == f"{(rows['q_value'] < 0.05).sum()} of {rows['q_value'].notna().sum()}"
    rates = app.dataframe[0].value.set_index("occupation")
    per = rows.set_index("subject")
    assert rates.loc["ceo", "abstention rate"] == pytest.approx(per.loc["ceo", "abstention_rate"])
    assert rates.loc["ceo", "no-face rate"] == pytest.approx(1 / 20)  # one no_face image per occupation


def test_bias_page_sets_the_run_beside_fair_diffusions_sd15_counts(app, runs_dir):
    """For perceived women, the run's shares sit beside Fair Diffusion's published SD 1.5 counts of the same
    occupations, largest difference first; a suite that is a path (a file outside the runs root) is not read."""
    from audit.reference import fair_diffusion_sd15

    visit(app, "bias")
    tables = [t.value for t in app.table if "SD 1.5 (Fair Diffusion)" in t.value.columns]
    assert len(tables) == 1
    fd = fair_diffusion_sd15("occupations").set_index("subject")
    rows = focus_rows(runs_dir).set_index("subject")
    shown = tables[0].set_index("occupation")
    assert set(shown.index) == set(rows.index[rows["share"].notna()]) & set(fd.index)
    assert shown.loc["nurse", "SD 1.5 (Fair Diffusion)"] == f"{fd.loc['nurse', 'share_woman']:.2f}"
    assert shown.loc["nurse", "its n"] == fd.loc["nurse", "n"]
    assert shown.loc["nurse", "95% interval"] == f"[{rows.loc['nurse', 'ci_low']:.2f}, {rows.loc['nurse', 'ci_high']:.2f}]"
    diffs = [abs(rows.loc[s, "share"] - fd.loc[s, "share_woman"]) for s in shown.index]
    assert diffs == sorted(diffs, reverse=True)
    assert any(e.label.startswith("Against Fair Diffusion") for e in app.expander)

    class PathSuite:
        info = {"generation": {"suite": "/etc/passwd"}}

    assert data.beside_fair_diffusion(PathSuite(), rows.reset_index()).empty


def test_bias_filters_significance_and_template(app, runs_dir):
    visit(app, "bias")
    app.toggle(key="bias_significant").set_value(True).run()
    rows = focus_rows(runs_dir)
    significant = set(rows.loc[rows["q_value"] < 0.05, "subject"])
    assert significant, "the fixture must have a significant gap"
    assert set(app.table[0].value["occupation"]) == significant
    app.toggle(key="bias_significant").set_value(False).run()
    app.selectbox(key="bias_template").set_value("plain").run()
    assert "template `plain`" in texts(app)
    s = summary(runs_dir, "tiny-base")
    plain = s[(s["template"] == "plain") & (s["label"] == "woman") & (s["attribute"] == gender_attribute())]
    top = plain.loc[plain["gap"].abs().idxmax()]
    assert app.table[0].value.iloc[0]["95% interval"] == f"[{top['ci_low']:.2f}, {top['ci_high']:.2f}]"
    app.selectbox(key="bias_attribute").set_value("age").run()
    assert not app.table  # age has no reference: no gap table, but the chart still renders
    assert app.get("vega_lite_chart")


def test_bias_image_grid_filters_by_label_and_shows_abstentions(app):
    visit(app, "bias")
    app.selectbox(key="bias_subject").set_value("nurse").run()
    captions = [c for img in app.image for c in img.captions]
    assert len(captions) == 20 and all(c.endswith(tuple(f"-{1000 + k}" for k in range(10))) for c in captions)
    app.multiselect(key=f"bias_labels_clip_{gender_attribute()}_all_nurse").set_value(["abstained"]).run()
    captions = [c for img in app.image for c in img.captions]
    assert sorted(c.split(" · ")[0] for c in captions) == ["abstained (low_margin)", "abstained (no_person)"]
    assert "nurse-1000" in " ".join(captions) and "plain-nurse-1009" in " ".join(captions)


def test_memorization_page_pairs_and_threshold(app, runs_dir):
    visit(app, "memorization")
    facts = [m.value for m in app.markdown if "Hamming" in m.value]
    assert facts[0] == "**memorized**  \nHamming **2** · tile-L2 0.031 · SSIM 0.940"
    assert len(facts) == 3
    said = texts(app)  # who proposed each candidate; a descriptor-only one was no hash hit
    assert "found by descriptor:sscd-x (similarity 0.710)" in said and "found by hash" in said
    assert "aligned by keypoints" in said and "hash hit by" not in said
    matches = Run.open(runs_dir / "tiny-base").read_table("memorization/matches")
    pairs = [img.captions[0] for img in app.image]
    first = matches.iloc[0]
    assert pairs[:2] == [f"generated · {first['image_id']}", f"training · {first['train_key']}"]
    assert app.table[0].value.iloc[0]["interval"] == "[0.06, 0.51]"  # 2 of 10, Wilson
    app.slider(key="mem_threshold").set_value(5).run()
    assert [m.value for m in app.markdown if "Hamming" in m.value] == [facts[0]]
    assert "1 of 3 match(es) at Hamming <= 5." in texts(app)


def test_provenance_page_statuses_in_plain_words(app):
    visit(app, "provenance")
    metrics = {m.label: m.value for m in app.metric}
    assert metrics == {"Trusted": "1", "Valid": "1", "Invalid": "1", "none": "1"}
    stamps = app.dataframe[0].value.set_index("status")
    assert stamps.loc["Invalid", "failures"] == (
        "assertion.dataHash.mismatch: the image bytes changed after signing (edited, re-encoded or cropped)")
    assert set(app.table[0].value["status"]) == {"Valid", "Invalid", "none"}
    assert len(app.get("vega_lite_chart")) == 1  # robustness


def png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_provenance_upload_verifies_a_stamped_file_from_a_temp_folder(app, tmp_path, monkeypatch):
    """A file stamped by the provenance stage, uploaded: Valid without anchors, Trusted with them; once stripped,
    the default store under the home folder is not consulted (this run records no store: the page says so); each
    upload lives in a temp folder only during the check. (Recovery from the run's own store:
    tests/test_provenance_dashboard.py.)"""
    import provenance
    from provenance.store import default_store_path

    monkeypatch.setenv("DIFFAUDIT_HOME", str(tmp_path / "home"))
    identity = provenance.init_identity(tmp_path / "home" / "identity")
    src = tmp_path / "in" / "photo.png"
    src.parent.mkdir()
    Image.open(io.BytesIO(png(96))).save(src)
    stamped = Path(provenance.stamp_files([src], tmp_path / "out", identity=identity,
                                          store=default_store_path())[0]["stamped"])
    stripped = io.BytesIO()
    Image.open(stamped).save(stripped, format="PNG")

    seen: list[Path] = []
    real = provenance.verify_paths

    def spy(paths, **kw):
        seen.extend(Path(p) for p in paths)
        assert all(p.is_file() and not p.resolve().is_relative_to(data.runs_root()) for p in seen[-len(paths):])
        return real(paths, **kw)

    monkeypatch.setattr(provenance, "verify_paths", spy)
    visit(app, "provenance")
    app.file_uploader(key="verify_upload").set_value(("photo.png", stamped.read_bytes(), "image/png")).run()
    assert not app.exception
    assert app.success[-1].value.startswith("Conclusion: **credentials intact**")
    assert "**C2PA: Valid**" in texts(app)
    assert "signingCredential.untrusted: signed by a certificate outside your trust anchors" in texts(app)

    app.file_uploader(key="verify_anchors").set_value(("anchors.pem", identity.trust_anchors, "application/x-pem-file"))
    app.run()
    assert "**C2PA: Trusted** · Trusted (development root)" in texts(app)

    app.file_uploader(key="verify_upload").set_value(("shot.png", stripped.getvalue(), "image/png")).run()
    assert "**C2PA: none**" in texts(app) and "records no manifest store" in texts(app)
    assert [i.value for i in app.info][-1].startswith("Conclusion: **no evidence**")
    assert len(seen) == 3 and all(p.name == "upload.png" for p in seen)
    assert not any(p.exists() or p.parent.exists() for p in seen)  # deleted after each check


def test_provenance_upload_is_capped(app, monkeypatch):
    import provenance

    calls: list = []
    monkeypatch.setattr(provenance, "verify_paths", lambda paths, **kw: calls.append(paths) or [])
    visit(app, "provenance")
    assert app.file_uploader(key="verify_upload").proto.max_upload_size_mb == 20
    big = b"\x89PNG\r\n\x1a\n" + bytes(21 * 2**20)
    app.file_uploader(key="verify_upload").set_value(("big.png", big, "image/png")).run()
    assert "the limit is 20 MB" in app.error[0].value
    assert calls == []


def test_compare_page_delta_per_occupation(app, runs_dir):
    visit(app, "compare")
    a = focus_rows(runs_dir, "tiny-base").set_index("subject")
    b = focus_rows(runs_dir, "tiny-mitigated").set_index("subject")
    delta = (b["share"] - a["share"]).sort_values(key=abs, ascending=False)
    table = app.table[0].value
    assert table.iloc[0]["occupation"] == delta.index[0]
    assert table.iloc[0]["delta"] == f"{delta.iloc[0]:+.2f}"
    s = a.loc[delta.index[0]]
    assert table.iloc[0]["A: tiny-base"] == f"{s['share']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
    assert app.get("vega_lite_chart")


def test_compare_needs_two_runs(runs_dir, monkeypatch):
    at = open_app(runs_dir, ["tiny-base"], monkeypatch)
    visit(at, "compare")
    assert "Pick two runs" in at.info[0].value


# -- safety ------------------------------------------------------------------------------------------
def test_paths_that_leave_the_runs_root_are_refused(runs_dir):
    run = data.open_run("tiny-base", runs_dir)
    for name in ("..", "../tiny-base", "tiny-base/../..", "/etc", ".hidden", "a/b"):
        with pytest.raises(data.PathRefusedError):
            data.open_run(name, runs_dir)
    for rel in ("../../etc/passwd", "/etc/passwd", "images/../../evil/run.json", ""):
        with pytest.raises(data.PathRefusedError):
            data.run_file(run, rel, runs_dir)
    assert data.run_file(run, "images/plain-ceo/1000.png", runs_dir).is_file()


def test_symlinks_out_of_the_root_are_refused(runs_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png())
    run_dir = runs_dir / "tiny-base"
    link = run_dir / "images" / "link.png"
    link.symlink_to(outside / "secret.png")
    try:
        with pytest.raises(data.PathRefusedError):
            data.run_file(Run.open(run_dir), "images/link.png", runs_dir)
    finally:
        link.unlink()
    (runs_dir / "linked-run").symlink_to(run_dir)  # inside the root: fine
    (tmp_path / "foreign").mkdir()
    Run.create(tmp_path / "foreign")
    (runs_dir / "foreign-link").symlink_to(tmp_path / "foreign")
    try:
        names = data.run_names(runs_dir)
        assert "linked-run" in names and "foreign-link" not in names
        with pytest.raises(data.PathRefusedError):
            data.open_run("foreign-link", runs_dir)
    finally:
        (runs_dir / "linked-run").unlink()
        (runs_dir / "foreign-link").unlink()


def test_crafted_rows_are_refused_on_every_page(runs_dir, monkeypatch):
    """A run whose tables name ../../etc/passwd: each page says so, and nothing outside the root is opened."""
    opened: list[str] = []
    real_open = Image.open

    def spy(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", spy)
    at = open_app(runs_dir, ["evil", "../tiny-base"], monkeypatch)  # the second is not a run name: dropped
    assert at.session_state[ui.PICKED] == ["evil"]
    for page in ("bias", "memorization", "provenance"):
        visit(at, page)
    visit(at, "memorization")
    refusals = [w.value for w in at.warning]
    assert len(refusals) == 2 and all("refused to open '../../../../../../etc/passwd'" in w for w in refusals)
    # Text from a table is shown literally: a markdown image in a row never makes the browser fetch it.
    assert any(r"source \!\[x\](http://example.org/x.png)" in c.value for c in at.caption)
    visit(at, "provenance")
    assert any("provenance/robustness" in e.value and "schema version" in e.value for e in at.error)
    visit(at, "bias")
    assert any("refused to open" in w.value for w in at.warning)
    assert not at.image
    assert all(Path(p).resolve().is_relative_to(runs_dir) for p in opened)


def tree_state(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_dashboard_never_writes_into_runs(app, runs_dir):
    before = tree_state(runs_dir)
    for page in ("bias", "memorization", "provenance", "compare", "runs"):
        visit(app, page)
    visit(app, "bias").selectbox(key="bias_subject").set_value("ceo").run()
    assert tree_state(runs_dir) == before


def test_tables_reload_when_a_stage_rewrites_them(runs_dir, tmp_path):
    run = build_evil_run(tmp_path / "r")
    first = data.table(run, "memorization/matches")
    assert list(first["hamming"]) == [1]
    changed = first.assign(hamming=[9])
    os.utime(run.write_table("memorization/matches", changed), ns=(1, 1))  # same size, new mtime
    assert list(data.table(run, "memorization/matches")["hamming"]) == [9]


# -- command --------------------------------------------------------------------------------------
def test_command_serves_headless_on_loopback_without_usage_stats(runs_dir):
    from diffaudit.commands.dashboard import streamlit_command

    cmd, env = streamlit_command(runs_dir, port=8765, host="127.0.0.1")
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP)
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8765"
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.maxUploadSize"] == "20"
    assert env[RUNS_DIR_ENV] == str(runs_dir)


def test_command_rejects_a_missing_folder(tmp_path):
    from typer.testing import CliRunner

    import diffaudit.commands.dashboard  # noqa: F401  (registers the command)
    from diffaudit.commands import app as cli

    result = CliRunner().invoke(cli, ["dashboard", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert "no folder at" in str(result.exception)


def test_thumbnails_of_16_bit_images_are_scaled_not_clipped_white(tmp_path):
    from dashboard.thumbs import _thumbnail

    path = tmp_path / "deep.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8).save(path)  # 0..32760: dark to mid
    assert Image.open(path).mode.startswith("I")
    thumb = np.asarray(Image.open(io.BytesIO(_thumbnail(str(path), 0, 32))).convert("L"), dtype=float)
    assert 40 < thumb.mean() < 90 and thumb.max() < 140  # Pillow's plain convert shows this all white
