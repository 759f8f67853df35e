"""audit.stats and audit.planning: known-answer intervals from statsmodels, Wilson coverage by Monte Carlo,
the one-vote-per-image rule, the BLS comparison (binomial test, BH q-values, amplification), the aggregate
metrics, and the sample-size plan."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom, binomtest, norm
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

from audit import stats
from audit.planning import exact_power, plan
from diffaudit.errors import DiffauditError, InputError, SchemaError
from diffaudit.runs import Run

# subject -> template -> (women, men, abstained)
KNOWN = {
    "ceo": {"heim_face": (7, 33, 3), "plain": (5, 15, 0)},
    "nurse": {"heim_face": (45, 5, 1), "plain": (30, 10, 2)},
    "electrician": {"heim_face": (1, 19, 0), "plain": (0, 20, 0)},
    "astronaut": {"heim_face": (3, 7, 0), "plain": (4, 6, 0)},  # not a suite subject: no reference
}


def probe_row(image_id: str, attribute: str, label: str | None, *, face_index: int = -1, bbox=None,
              probe: str = "clip", reason: str | None = None) -> dict:
    return dict(image_id=image_id, face_index=face_index, bbox=bbox, attribute=attribute, label=label,
                score=0.9 if label else None, margin=0.3 if label else None, abstained=label is None,
                abstain_reason=reason if label is None else None, probe=probe, probe_version="1")


def known_tables(known=KNOWN) -> tuple[pd.DataFrame, pd.DataFrame]:
    gens, rows = [], []
    for subject, by_template in known.items():
        for template, (w, m, a) in by_template.items():
            labels = ["woman"] * w + ["man"] * m + [None] * a
            for i, label in enumerate(labels):
                image_id = f"{template}-{subject}-{i}"
                gens.append(dict(image_id=image_id, subject=subject, template=template))
                rows.append(probe_row(image_id, "perceived_gender", label, reason="low_margin"))
    return pd.DataFrame(gens), pd.DataFrame(rows)


@pytest.fixture(scope="module")
def known_summary() -> pd.DataFrame:
    gens, clip = known_tables()
    return stats.summarize(gens, {"clip": clip}, suite="demo", reference="bls-2022")


def row(summary: pd.DataFrame, subject: str, template: str, label: str) -> pd.Series:
    hit = summary[(summary.subject == subject) & (summary.template == template) & (summary.label == label)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_known_counts_give_the_statsmodels_intervals(known_summary):
    for subject, by_template in KNOWN.items():
        pooled = np.sum(list(by_template.values()), axis=0)
        for template, (w, m, a) in [*by_template.items(), ("all", tuple(pooled))]:
            n = w + m
            sim = multinomial_proportions_confint([m, w], alpha=0.05, method="goodman")  # labels sorted: man, woman
            for j, (label, k) in enumerate((("man", m), ("woman", w))):
                r = row(known_summary, subject, template, label)
                lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
                assert (r["count"], r["n"], r["abstained"]) == (k, n, a)
                assert r["share"] == pytest.approx(k / n, abs=1e-15)
                assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
                assert (r["sim_ci_low"], r["sim_ci_high"]) == pytest.approx(tuple(sim[j]), abs=1e-12)
                assert r["abstention_rate"] == pytest.approx(a / (n + a))


def test_summary_fits_its_schema_and_round_trips(known_summary, tmp_path):
    run = Run.create(tmp_path / "r")
    run.write_table("bias/summary", known_summary)
    back = run.read_table("bias/summary")
    assert len(back) == len(known_summary) == 4 * 3 * 2  # subjects x (2 templates + all) x labels
    assert set(back.template) == {"heim_face", "plain", "all"}
    run.write_table("bias/metrics", stats.metrics(known_summary, n_boot=200))


def mc_coverage(p: float, method: str, reps: int = 4000, n: int = 50) -> float:
    k = np.random.default_rng(12345).binomial(n, p, size=reps)
    lo, hi = proportion_confint(k, n, alpha=0.05, method=method)
    return float(np.mean((lo <= p) & (p <= hi)))


def exact_coverage(p: float, method: str, n: int = 50) -> float:
    k = np.arange(n + 1)
    lo, hi = proportion_confint(k, n, alpha=0.05, method=method)
    return float(binom.pmf(k, n, p)[(lo <= p) & (p <= hi)].sum())


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_wilson_95_covers_at_least_94_percent_for_n_50(p):
    assert mc_coverage(p, "wilson") >= 0.94  # Monte Carlo, seeded; exact values 0.962 and 0.957
    assert exact_coverage(p, "wilson") >= 0.95


def test_coverage_at_p_half_n_50_wilson_dips_clopper_pearson_holds():
    """At n = 50, p = 0.5 every approximate interval (Wilson included) covers exactly 93.5%: the 15
    outcomes 18..32 it covers carry that mass (Brown, Cai and DasGupta 2001). The issue's ">= 94%" holds
    there only for the exact Clopper-Pearson interval, which ``summarize(interval="beta")`` gives."""
    assert exact_coverage(0.5, "wilson") == pytest.approx(0.9351, abs=1e-4)
    assert 0.925 <= mc_coverage(0.5, "wilson") <= 0.945
    for p in (0.05, 0.3, 0.5):
        assert mc_coverage(p, "beta") >= 0.94 and exact_coverage(p, "beta") >= 0.95
    gens, clip = known_tables({"ceo": {"t": (7, 43, 0)}})
    s = stats.summarize(gens, {"clip": clip}, suite=None, interval="beta")
    r = s[(s.template == "all") & (s.label == "woman")].iloc[0]
    assert (r.ci_low, r.ci_high) == pytest.approx(proportion_confint(7, 50, method="beta"), abs=1e-12)


def test_wilson_coverage_through_summarize():
    """The same check through the real aggregation path: 600 subjects of 50 images at p = 0.3."""
    rng = np.random.default_rng(7)
    women = rng.binomial(50, 0.3, size=600)
    gens, clip = known_tables({f"s{i}": {"t": (int(w), 50 - int(w), 0)} for i, w in enumerate(women)})
    s = stats.summarize(gens, {"clip": clip}, suite=None, reference=None)
    s = s[(s.template == "all") & (s.label == "woman")]
    assert len(s) == 600
    coverage = np.mean((s.ci_low <= 0.3) & (0.3 <= s.ci_high))
    assert coverage >= 0.93, coverage  # 600 replicates: binomial noise of about 1 point around ~0.95


def test_reference_gap_test_q_values_and_amplification(known_summary):
    s = known_summary
    ceo = row(s, "ceo", "all", "woman")
    assert ceo["reference"] == "bls-2022"
    assert ceo["reference_share"] == pytest.approx(0.292)
    assert row(s, "ceo", "all", "man")["reference_share"] == pytest.approx(1 - 0.292)
    assert ceo["gap"] == pytest.approx(ceo["share"] - 0.292)
    assert (ceo["gap_ci_low"], ceo["gap_ci_high"]) == pytest.approx((ceo["ci_low"] - 0.292, ceo["ci_high"] - 0.292))
    assert ceo["p_value"] == pytest.approx(binomtest(12, 60, 0.292).pvalue)
    # BH across the occupations of one (probe, attribute, template, label) family equals statsmodels.
    fam = s[(s.template == "all") & (s.label == "woman") & s.p_value.notna()]
    assert sorted(fam.subject) == ["ceo", "electrician", "nurse"]
    assert fam.q_value.to_numpy() == pytest.approx(multipletests(fam.p_value.to_numpy(), method="fdr_bh")[1])
    # No reference for a subject outside the suite.
    astro = row(s, "astronaut", "all", "woman")
    assert astro["reference"] is None or pd.isna(astro["reference"])
    assert pd.isna(astro["reference_share"]) and pd.isna(astro["q_value"]) and pd.isna(astro["amplified"])
    # ceo: 20% women vs 29.2% -> further from parity on the same side; nurse: 84.4% vs 87.9% -> not.
    assert bool(ceo["amplified"]) and bool(row(s, "ceo", "all", "man")["amplified"])
    assert not bool(row(s, "nurse", "all", "woman")["amplified"])


@pytest.mark.parametrize(("share", "ref", "expected"), [
    (0.10, 0.30, True), (0.35, 0.30, False), (0.80, 0.30, False), (0.95, 0.90, True), (0.60, 0.50, True),
    (0.50, 0.50, False), (0.5, float("nan"), None)])
def test_amplified_rule(share, ref, expected):
    got = stats.amplified(share, ref)
    assert (np.isnan(got) if expected is None else bool(got) == expected)


def test_a_share_equal_to_its_reference_is_not_amplified():
    """359 of 500 cashiers read as women is BLS's 71.8% exactly; the man row's reference is 1 - 0.718, one
    rounding unit off, which a strict float comparison used to flag as amplified (found in review)."""
    gens, clip = known_tables({"cashier": {"t": (359, 141, 0)}, "hairdresser": {"t": (931, 69, 0)}})
    s = stats.summarize(gens, {"clip": clip}, suite="demo")
    pooled = s[s.template == "all"]
    assert len(pooled) == 4 and not pooled["amplified"].astype(bool).any()
    assert stats.amplified(1 - 0.718, 1 - 0.718 + 5e-17) == 0.0


def test_edit_images_are_not_summarized_as_subjects():
    """An img2img of a coffee photo is not a prompt about a subject: it must not get perceived-gender shares
    nor enter the pooled rows (the demo's edits did, as 'coffee: 100% women')."""
    gens, clip = known_tables({"ceo": {"t": (3, 5, 0)}, "coffee": {"edit": (2, 0, 0)}})
    s = stats.summarize(gens, {"clip": clip}, suite="demo")
    assert set(s["subject"]) == {"ceo"} and set(s["template"]) == {"t", "all"}
    assert row(s, "ceo", "all", "woman")["n"] == 8
    edits_only = known_tables({"coffee": {"edit": (2, 0, 0)}})
    with pytest.raises(InputError, match="only edit images"):
        stats.summarize(edits_only[0], {"clip": edits_only[1]}, suite="demo")


def test_a_row_that_neither_abstains_nor_labels_is_refused():
    """It would count in n with no label, and the label shares would no longer sum to 1."""
    gens, probes = known_tables({"ceo": {"t": (3, 5, 0)}})
    probes = probes.copy()
    probes.loc[probes.index[0], "label"] = None  # abstained stays False
    with pytest.raises(SchemaError, match="neither abstain nor give a label"):
        stats.summarize(gens, {"clip": probes}, suite="demo")


def test_one_vote_per_image_largest_face_and_no_row():
    gens = pd.DataFrame([dict(image_id=f"i{k}", subject="x", template="t") for k in range(4)])
    rows = pd.DataFrame([
        # i0: two faces; the larger (100x100) says woman.
        probe_row("i0", "perceived_gender", "man", face_index=0, bbox=[0, 0, 10, 10]),
        probe_row("i0", "perceived_gender", "woman", face_index=1, bbox=[0, 0, 100, 100]),
        # i1: the larger face abstained: the image abstains (no fall back to the smaller face).
        probe_row("i1", "perceived_gender", "man", face_index=0, bbox=[0, 0, 10, 10]),
        probe_row("i1", "perceived_gender", None, face_index=1, bbox=[0, 0, 50, 50], reason="low_margin"),
        # i2: a whole-image row only.
        probe_row("i2", "perceived_gender", "man"),
        # i3: probed, but no perceived_gender row at all.
        probe_row("i3", "perceived_age", "adult"),
    ])
    v = stats.votes(gens, rows).set_index(["image_id", "attribute"])
    assert v.loc[("i0", "perceived_gender"), "label"] == "woman"
    assert bool(v.loc[("i1", "perceived_gender"), "abstained"])
    assert v.loc[("i1", "perceived_gender"), "abstain_reason"] == "low_margin"
    assert v.loc[("i2", "perceived_gender"), "label"] == "man"
    assert v.loc[("i3", "perceived_gender"), "abstain_reason"] == "no_row"
    assert len(v) == 8  # 4 images x 2 attributes
    s = stats.summarize(gens, {"clip": rows}, suite=None)
    g = s[(s.attribute == "perceived_gender") & (s.template == "all")].set_index("label")
    assert g.loc["woman", "count"] == 1 and g.loc["man", "count"] == 1
    assert g.loc["man", "n"] == 2 and g.loc["man", "abstained"] == 2


def test_all_abstained_subject_keeps_its_rows_with_null_share():
    gens, clip = known_tables({"ceo": {"t": (0, 0, 5)}, "nurse": {"t": (3, 1, 0)}})
    s = stats.summarize(gens, {"clip": clip}, suite="demo")
    ceo = s[(s.subject == "ceo") & (s.template == "all")]
    assert len(ceo) == 2 and (ceo.n == 0).all() and ceo.share.isna().all() and (ceo.abstention_rate == 1).all()
    assert ceo.p_value.isna().all()


def test_bad_inputs_raise_diffaudit_errors():
    gens, clip = known_tables()
    with pytest.raises(DiffauditError, match="unknown reference 'bls-1999'"):
        stats.summarize(gens, {"clip": clip}, suite="demo", reference="bls-1999")
    with pytest.raises(DiffauditError, match="unknown reference"):
        stats.summarize(gens, {"clip": clip}, suite=None, reference="nope")
    with pytest.raises(InputError, match="not in generations"):
        stats.summarize(gens.iloc[1:], {"clip": clip}, suite="demo")
    with pytest.raises(InputError, match="no probe rows"):
        stats.summarize(gens, {"clip": clip.iloc[:0]}, suite="demo")
    with pytest.raises(DiffauditError, match="unknown interval method 'wald'"):
        stats.summarize(gens, {"clip": clip}, suite="demo", interval="wald")


def test_metrics_match_their_definitions(known_summary):
    m = stats.metrics(known_summary, n_boot=500, seed=3)
    pooled = m[(m.template == "all") & (m.probe == "clip")].set_index(["subject", "metric"])
    w, n = 7 + 5, 7 + 33 + 5 + 15
    assert pooled.loc[("ceo", "gender_imbalance"), "value"] == pytest.approx(abs(w / n - 0.5))
    assert pooled.loc[("ceo", "mad"), "value"] == pytest.approx(abs(w / n - 0.5))  # two labels: MAD = |p - 1/2|
    p = np.array([w, n - w]) / n
    assert pooled.loc[("ceo", "entropy"), "value"] == pytest.approx(-(p * np.log(p)).sum() / np.log(2))
    assert pooled.loc[("ceo", "mean_abs_gap"), "value"] == pytest.approx(abs(w / n - 0.292))
    subjects = ["astronaut", "ceo", "electrician", "nurse"]
    overall = pooled.loc[("all", "gender_imbalance")]
    assert overall["value"] == pytest.approx(np.mean([pooled.loc[(s, "gender_imbalance"), "value"] for s in subjects]))
    assert overall["subjects"] == 4 and overall["ci_low"] <= overall["value"] <= overall["ci_high"]
    # ceo 20% < 29.2% women: amplified; electrician 2.5% vs 2.2% and nurse 84.4% vs 87.9%: not.
    assert pooled.loc[("all", "amplified_share"), "value"] == pytest.approx(1 / 3)
    again = stats.metrics(known_summary, n_boot=500, seed=3)
    pd.testing.assert_frame_equal(m, again)  # seeded


def test_folded_scores_get_the_folded_wilson_interval():
    """|share - target| per subject: the share's Wilson interval, folded. At parity the interval starts at 0
    (a percentile bootstrap of the folded score never covers 0 there: found in review)."""
    from statsmodels.stats.proportion import proportion_confint

    gens, clip = known_tables({"ceo": {"t": (10, 10, 0)}, "nurse": {"t": (18, 2, 0)}})
    m = stats.metrics(stats.summarize(gens, {"clip": clip}, suite="demo"), n_boot=200)
    per = m[(m.template == "all")].set_index(["subject", "metric"])
    at_parity = per.loc[("ceo", "gender_imbalance")]
    lo, hi = proportion_confint(10, 20, method="wilson")
    assert at_parity["value"] == 0 and at_parity["ci_low"] == 0 and at_parity["ci_high"] == pytest.approx(0.5 - lo)
    lo, hi = proportion_confint(18, 20, method="wilson")
    nurse = per.loc[("nurse", "gender_imbalance")]
    assert (nurse["ci_low"], nurse["ci_high"]) == (pytest.approx(lo - 0.5), pytest.approx(hi - 0.5))
    gap = per.loc[("nurse", "mean_abs_gap")]  # nurse: BLS 87.9% women
    assert gap["value"] == pytest.approx(0.9 - 0.879)
    assert (gap["ci_low"], gap["ci_high"]) == (0, pytest.approx(max(0.879 - lo, hi - 0.879)))


def test_mad_with_three_labels():
    gens, rows = [], []
    for i, label in enumerate(["a"] * 6 + ["b"] * 3 + ["c"] * 1):
        gens.append(dict(image_id=f"i{i}", subject="x", template="t"))
        rows.append(probe_row(f"i{i}", "perceived_age", label))
    s = stats.summarize(pd.DataFrame(gens), {"clip": pd.DataFrame(rows)}, suite=None)
    m = stats.metrics(s, n_boot=100).set_index(["template", "subject", "metric"])
    p = np.array([0.6, 0.3, 0.1])
    assert m.loc[("all", "x", "mad"), "value"] == pytest.approx(np.mean(np.abs(p - 1 / 3)))
    assert ("all", "x", "gender_imbalance") not in m.index


# --- planning -------------------------------------------------------------------------------------------

def test_plan_gives_the_textbook_sample_size():
    # One-sample test of p0 = 0.5 against p1 = 0.6, two-sided alpha 0.05, power 0.8: the classic normal
    # approximation n = [z_{a/2} sqrt(p0 q0) + z_b sqrt(p1 q1)]^2 / (p1 - p0)^2 = 193.8 -> 194 images.
    za, zb = norm.ppf(0.975), norm.ppf(0.8)
    textbook = math.ceil((za * math.sqrt(0.25) + zb * math.sqrt(0.24)) ** 2 / 0.1 ** 2)
    assert textbook == 194
    p = plan(0.10, power=0.8)
    assert p.images_per_subject == textbook
    assert p.images_per_prompt >= p.images_per_subject and p.exact_power == pytest.approx(0.764, abs=0.01)
    k = np.arange(p.exact_images_per_subject + 1)
    reject = np.array([binomtest(int(x), len(k) - 1, 0.5).pvalue <= 0.05 for x in k])
    assert binom.pmf(k, len(k) - 1, 0.6)[reject].sum() >= 0.8  # the exact n really reaches the power


def test_plan_adjusts_for_many_occupations_templates_and_abstention():
    single = plan(0.10)
    many = plan(0.10, occupations=153)
    assert many.alpha_per_test == pytest.approx(0.05 / 153) and many.images_per_subject > single.images_per_subject
    bh = plan(0.10, occupations=153, correction="bh", differing=30)
    assert single.images_per_subject < bh.images_per_subject < many.images_per_subject
    spread = plan(0.10, templates=3, abstention=0.2)
    drawn = math.ceil(max(spread.images_per_subject, spread.exact_images_per_subject) / 0.8)
    assert spread.images_per_subject_drawn == drawn and spread.images_per_prompt == math.ceil(drawn / 3)
    # BH never tests above alpha: with most occupations differing, the plan is never below one test's.
    most = plan(0.10, occupations=10, correction="bh", differing=9)
    assert most.alpha_per_test == pytest.approx(0.05) and most.images_per_subject == single.images_per_subject
    with pytest.raises(InputError, match="--differing"):
        plan(0.10, occupations=153, correction="bh")
    with pytest.raises(InputError, match="--effect"):
        plan(1.5)


def test_exact_power_matches_scipy_binomtest():
    n, p0, p1, a = 57, 0.292, 0.45, 0.01
    k = np.arange(n + 1)
    reject = np.array([binomtest(int(x), n, p0).pvalue <= a for x in k])
    assert exact_power(n, p0, p1, a) == pytest.approx(binom.pmf(k, n, p1)[reject].sum(), abs=1e-12)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process (as the entry point does) and return (exit code, stdout, stderr)."""
    from diffaudit.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


def test_plan_cli_prints_the_result_and_its_assumptions(capsys):
    code, out, _ = cli(capsys, "plan", "--effect", "0.10", "--power", "0.8")
    assert code == 0 and "194 (normal approximation)" in out and "assuming:" in out
    code, out, _ = cli(capsys, "plan", "--effect", "0.10", "--templates", "3", "--abstention", "0.1")
    p = plan(0.10, templates=3, abstention=0.1)  # drawn per subject = per prompt x templates, not the minimum
    assert code == 0 and f"images per prompt: {p.images_per_prompt}  ({3 * p.images_per_prompt} per subject" in out
    code, _, err = cli(capsys, "plan", "--effect", "0.1", "--occupations", "9", "--correction", "bh")
    assert code == 2 and err.count("\n") == 1 and "--differing" in err


def test_declared_labels_get_zero_count_rows_and_metrics():
    """A probe's declared label set counts even when a label never occurs (all images read one way)."""
    from audit.stats import metrics, summarize

    gens = pd.DataFrame({"image_id": [f"i{k}" for k in range(4)], "subject": ["ceo"] * 4, "template": ["t"] * 4})
    probe = pd.DataFrame({"image_id": gens.image_id, "face_index": -1, "bbox": None,
                          "attribute": "perceived_gender", "label": "man", "score": 0.9, "margin": 0.5,
                          "abstained": False, "abstain_reason": None, "probe": "clip", "probe_version": "1"})
    summary = summarize(gens, {"clip": probe}, suite=None, reference=None,
                        labels={"clip": {"perceived_gender": ("man", "woman")}})
    woman = summary[(summary.label == "woman") & (summary.template == "all")].iloc[0]
    assert woman["count"] == 0 and woman["n"] == 4 and woman["share"] == 0.0 and woman["ci_high"] > 0.4
    m = metrics(summary)
    gi = m[(m.metric == "gender_imbalance") & (m.subject == "ceo") & (m.template == "all")]
    assert gi["value"].iloc[0] == pytest.approx(0.5)
