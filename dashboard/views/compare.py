"""Compare: two runs (two models, before/after a mitigation, or a model against a reference run of real
images) side by side: the change in each occupation's share per label, with both runs' intervals, the
difference's interval and q-value (``audit.compare.versus``, which the report reads too), and BLS."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from audit.compare import KEYS, versus
from dashboard import charts, ui

st.title("Compare")
if len(ui.picked()) < 2:
    st.info("Pick two runs in the sidebar: the first is the baseline (A), the second the comparison (B). "
            "A reference run of real images (`diffaudit import --kind reference`) is always the baseline.")
    st.stop()
run_a, run_b = ui.current_run(0), ui.current_run(1)


def kind(run) -> str:
    gen = run.info.get("generation") or {}
    return str(gen.get("kind", "model")) if isinstance(gen, dict) else "model"


if kind(run_b) == "reference" and kind(run_a) != "reference":
    run_a, run_b = run_b, run_a  # model vs real data: the real data is the baseline
against_real = kind(run_a) == "reference"
a, b = ui.table(run_a, "bias/summary"), ui.table(run_b, "bias/summary")
if a.empty or b.empty:
    missing = run_a if a.empty else run_b
    ui.missing_stage("bias summary", f"diffaudit audit bias {missing.root}")
    st.stop()

both = versus(b, a).merge(a[KEYS + ["reference_share"]].rename(columns={"reference_share": "bls"}), on=KEYS,
                          how="left")
if both.empty:
    st.warning(f"{run_a.name} and {run_b.name} share no (probe, attribute, occupation, template, label): "
               "compare runs of the same suite and probes.")
    st.stop()

probes = ui.first_with_reference(both, "probe", "bls")
if len(probes) > 1:
    f1, f2, f3, f4 = st.columns(4)
    probe = f1.selectbox("Probe", probes, key="cmp_probe")
else:
    (f2, f3, f4), probe = st.columns(3), probes[0]
both = both[both["probe"] == probe]
attribute = f2.selectbox("Attribute", ui.first_with_reference(both, "attribute", "bls"), key="cmp_attribute")
both = both[both["attribute"] == attribute]
templates = sorted(both["template"].unique(), key=lambda t: (t != "all", t))
template = f3.selectbox("Template", templates, key="cmp_template")
both = both[both["template"] == template]
labels = sorted(both["label"].dropna().unique(),
                key=lambda lab: (both.loc[both["label"] == lab, "bls"].isna().all(), lab != "woman", lab))
if not labels:
    st.info(f"Every image abstained on `{attribute}` under probe `{probe}` in both runs: nothing to compare.")
    st.stop()
label = f4.selectbox("Label", labels, key="cmp_label")
rows = both[both["label"] == label].copy()  # sorted by |delta| by versus()
name_a = f"A: {run_a.name}" + (" (real images)" if against_real else "")
name_b = f"B: {run_b.name}"
st.caption(f"A = **{ui.md(run_a.name)}**{' (a reference run of real images)' if against_real else ''}, "
           f"B = **{ui.md(run_b.name)}** · probe `{ui.md(probe)}` · `{ui.md(attribute)}` = `{ui.md(label)}` · "
           f"template `{ui.md(template)}`. Delta = share in B - share in A, with Newcombe's 95% interval; q: "
           "Fisher's exact test, Benjamini-Hochberg across occupations.")
if against_real:
    st.info(f"Model vs real data: **{run_b.name}** against real images of the same subjects. A delta is what "
            "the model adds to (or removes from) what the data already holds, read by the same probe.")

m1, m2, m3, m4 = st.columns(4)
m1.metric("Occupations in both", len(rows))
gap_a, gap_b = (rows["reference_share"] - rows["bls"]).abs(), (rows["share"] - rows["bls"]).abs()
m2.metric("Closer to BLS in B", f"{int((gap_b < gap_a).sum())} of {int(rows['bls'].notna().sum())}")
m3.metric("Differ at q < 0.05", int((rows["q_value"] < 0.05).sum()))
m4.metric("Largest change", f"{rows['delta'].iloc[0]:+.2f}" if len(rows) and rows["delta"].notna().any()
          else ui.MISSING, help=str(rows["subject"].iloc[0]) if len(rows) else None)

st.table(ui.md_table(pd.DataFrame({
    "occupation": rows["subject"],
    name_a: [f"{ui.number(s)} {ui.interval(lo, hi)}" for s, lo, hi in
             zip(rows["reference_share"], rows["reference_ci_low"], rows["reference_ci_high"], strict=True)],
    name_b: [f"{ui.number(s)} {ui.interval(lo, hi)}" for s, lo, hi in
             zip(rows["share"], rows["ci_low"], rows["ci_high"], strict=True)],
    "delta": [f"{d:+.2f}" if d == d else ui.MISSING for d in rows["delta"]],
    "delta 95% CI": [ui.interval(lo, hi) for lo, hi in zip(rows["delta_ci_low"], rows["delta_ci_high"], strict=True)],
    "q": [ui.number(q, 3) for q in rows["q_value"]],
    "BLS": [ui.number(v) for v in rows["bls"]],
}), "occupation"), hide_index=True)

long = pd.concat([
    rows.assign(run=name_a, share=rows["reference_share"], ci_low=rows["reference_ci_low"],
                ci_high=rows["reference_ci_high"]),
    rows.assign(run=name_b),
])[["subject", "run", "share", "ci_low", "ci_high", "delta"]]
long["interval"] = [ui.interval(lo, hi) for lo, hi in zip(long["ci_low"], long["ci_high"], strict=True)]
reference = rows.loc[rows["bls"].notna(), ["subject", "bls"]].rename(columns={"bls": "reference_share"})
st.vega_lite_chart(spec=charts.share_intervals(long, rows["subject"].tolist(), group="run", reference=reference,
                                               title=f"share perceived as {label}"), width="stretch")
st.caption("Each occupation: A and B with their intervals; black tick: the BLS share. Sorted by |delta|.")
