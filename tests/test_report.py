"""The report renders what the tables hold: BLS comparison with intervals, chart, memorization pairs."""

from __future__ import annotations

from fixtures_runs import build_run

from diffaudit.report import build_report


def test_report_on_a_run_with_every_table(tmp_path):
    from audit.stats import metrics

    run = build_run(tmp_path / "r", shares={"ceo": 0.1, "nurse": 0.95, "electrician": 0.5})
    run.write_table("bias/metrics", metrics(run.read_table("bias/summary"), n_boot=200))
    md_path, html_path = build_report(run.root)
    md, html = md_path.read_text(), html_path.read_text()
    summary = run.read_table("bias/summary")
    ceo = summary[(summary.subject == "ceo") & (summary.label == "woman") & (summary.template == "all")].iloc[0]
    # ceo is under-represented against BLS (29.2% women) and listed with its interval and BLS share
    under = md.split("Most under-represented")[1].split("Most")[0]
    assert "| ceo |" in under and f"[{100 * ceo.ci_low:.0f}, {100 * ceo.ci_high:.0f}]" in under and "29%" in under
    assert "| nurse |" in md.split("Most over-represented")[1].split("Most under-represented")[0]
    assert "**Amplification:**" in md and "Figures comparable with HEIM and DALL-Eval" in md
    assert "gender_imbalance" in md
    assert html.count("<svg") == 1 and "data:image/png;base64," in html
    assert "<script" not in html and "http" not in html.split("</style>")[1].replace("http://www.w3.org", "")
    stamps = run.read_table("provenance/stamps")
    assert f"{len(stamps)} image(s) stamped" in md
