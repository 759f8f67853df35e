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
    woman = summary[(summary.label == "woman") & (summary.template == "all") & summary.reference_share.notna()]
    both = int((woman.amplified.fillna(False).astype(bool) & (woman.q_value < 0.05)).sum())
    assert f"and {both} are both." in md
    # abstention per probe and attribute (the images each share left out), and beside each BLS row
    g = summary[(summary.template == "all") & (summary.attribute == "perceived_gender")].drop_duplicates("subject")
    rate = g.abstained.sum() / (g.n.sum() + g.abstained.sum())
    line = next(x for x in md.splitlines() if x.startswith("| clip | perceived_gender |"))
    assert f"| {100 * rate:.0f}% |" in line
    assert f"| ceo | {ceo.n} | {100 * ceo.abstention_rate:.0f}% |" in under
    assert "gender_imbalance" in md
    assert html.count("<svg") == 2 and "data:image/png;base64," in html  # BLS and Fair Diffusion charts
    assert "<script" not in html and "http" not in html.split("</style>")[1].replace("http://www.w3.org", "")
    stamps = run.read_table("provenance/stamps")
    assert f"{len(stamps)} image(s) stamped" in md


def test_report_sets_the_run_beside_fair_diffusions_sd15_counts(tmp_path):
    """Occupations of the run that Fair Diffusion published SD 1.5 counts for are compared with them:
    the run's share and interval beside theirs, largest differences first, a second chart."""
    from audit.reference import fair_diffusion_sd15

    run = build_run(tmp_path / "r", shares={"ceo": 0.1, "nurse": 0.95, "electrician": 0.5})
    md, html = (p.read_text() for p in build_report(run.root))
    section = md.split("Against Fair Diffusion's published Stable Diffusion 1.5 counts")[1].split("\n#")[0]
    fd = fair_diffusion_sd15("occupations").set_index("subject")
    summary = run.read_table("bias/summary")
    woman = summary[(summary.label == "woman") & (summary.template == "all")].set_index("subject")
    overlap = sum(int(woman.ci_low[s] <= fd.ci_high[s] and fd.ci_low[s] <= woman.ci_high[s])
                  for s in ("ceo", "nurse", "electrician"))
    assert "3 occupation(s) are in both" in section and f"overlap for {overlap}." in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "occupation" not in line]
    diffs = [abs(woman.share[r.split("|")[1].strip()] - fd.share_woman[r.split("|")[1].strip()]) for r in rows]
    assert len(rows) == 3 and diffs == sorted(diffs, reverse=True)  # largest difference first
    nurse = next(r for r in rows if r.startswith("| nurse |"))
    assert f"{100 * fd.share_woman['nurse']:.0f}%" in nurse and f"| {fd.n['nurse']} |" in nurse
    assert html.count("<svg") == 2 and "Fair Diffusion&#x27;s SD 1.5 share" in html


def test_report_says_which_stages_miss_images_of_an_extended_run(tmp_path):
    """Generation extended after the other stages ran: the report must say that they cover fewer images."""
    import pandas as pd

    from diffaudit.runs import sha256_bytes

    run = build_run(tmp_path / "r", shares={"ceo": 0.1, "nurse": 0.95})
    md = build_report(run.root)[0].read_text()
    gens = run.read_table("generations")
    stamped = run.read_table("provenance/stamps")["image_id"].nunique()  # the fixture stamps a few only
    assert "the bias audit (`" not in md and "the memorization check (`" not in md
    assert f"stamping (`diffaudit stamp RUN`) covers {stamped} of {len(gens)} images" in md
    extra = gens.iloc[:3].copy()
    extra["image_id"] = [f"{i}-new" for i in extra["image_id"]]
    extra["seed"] = extra["seed"] + 100
    for k, rel in enumerate(extra["path"]):
        new = rel.replace(".png", "-new.png")
        run.path(new).write_bytes(run.path(rel).read_bytes())
        extra.iloc[k, extra.columns.get_loc("path")] = new
        extra.iloc[k, extra.columns.get_loc("sha256")] = sha256_bytes(run.path(new).read_bytes())
    run.write_table("generations", pd.concat([gens, extra], ignore_index=True))
    md = build_report(run.root)[0].read_text()
    n = len(gens) + 3
    assert "Not every stage covers every image" in md
    for stage in ("the bias audit", "the memorization check"):
        assert f"{stage} (`" in md and f"covers {len(gens)} of {n} images" in md
    assert f"stamping (`diffaudit stamp RUN`) covers {stamped} of {n} images" in md
