"""Compare: two runs (two models, or before/after a mitigation) side by side, the change in each
occupation's share per label, with both runs' intervals and the reference."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, ui

KEYS = ["probe", "attribute", "subject", "template", "label"]

st.title("Compare")
if len(ui.picked()) < 2:
    st.info("Pick two runs in the sidebar: the first is the baseline (A), the second the comparison (B).")
    st.stop()
run_a, run_b = ui.current_run(0), ui.current_run(1)
a, b = ui.table(run_a, "bias/summary"), ui.table(run_b, "bias/summary")
if a.empty or b.empty:
    missing = run_a if a.empty else run_b
    ui.missing_stage("bias summary", f"diffaudit audit bias {missing.root}")
    st.stop()

cols = ["share", "ci_low", "ci_high", "n", "reference_share", "q_value"]
both = a[KEYS + cols].merge(b[KEYS + cols], on=KEYS, how="inner", suffixes=("_a", "_b"))
if both.empty:
    st.warning(f"{run_a.name} and {run_b.name} share no (probe, attribute, occupation, template, label): "
               "compare runs of the same suite and probes.")
    st.stop()

probes = ui.first_with_reference(both, "probe", "reference_share_a")
if len(probes) > 1:
    f1, f2, f3, f4 = st.columns(4)
    probe = f1.selectbox("Probe", probes, key="cmp_probe")
else:
    (f2, f3, f4), probe = st.columns(3), probes[0]
both = both[both["probe"] == probe]
attribute = f2.selectbox("Attribute", ui.first_with_reference(both, "attribute", "reference_share_a"),
                         key="cmp_attribute")
both = both[both["attribute"] == attribute]
templates = sorted(both["template"].unique(), key=lambda t: (t != "all", t))
template = f3.selectbox("Template", templates, key="cmp_template")
both = both[both["template"] == template]
labels = sorted(both["label"].dropna().unique(),
                key=lambda lab: (both.loc[both["label"] == lab, "reference_share_a"].isna().all(), lab != "woman", lab))
if not labels:
    st.info(f"Every image abstained on `{attribute}` under probe `{probe}` in both runs: nothing to compare.")
    st.stop()
label = f4.selectbox("Label", labels, key="cmp_label")
rows = both[both["label"] == label].copy()
rows["delta"] = rows["share_b"] - rows["share_a"]
rows["gap_a"] = rows["share_a"] - rows["reference_share_a"]
rows["gap_b"] = rows["share_b"] - rows["reference_share_a"]
rows = rows.sort_values("delta", key=lambda s: s.abs(), ascending=False, na_position="last")
st.caption(f"A = **{run_a.name}**, B = **{run_b.name}** · probe `{probe}` · `{attribute}` = `{label}` · "
           f"template `{template}`. Delta = share in B - share in A; each run keeps its own 95% interval.")

m1, m2, m3 = st.columns(3)
m1.metric("Occupations in both", len(rows))
closer = (rows["gap_b"].abs() < rows["gap_a"].abs()).sum()
with_ref = int(rows["reference_share_a"].notna().sum())
m2.metric("Closer to the reference in B", f"{int(closer)} of {with_ref}")
m3.metric("Largest change", f"{rows['delta'].iloc[0]:+.2f}" if len(rows) else ui.MISSING,
          help=str(rows["subject"].iloc[0]) if len(rows) else None)

st.table(ui.md_table(pd.DataFrame({
    "occupation": rows["subject"],
    f"A: {run_a.name}": [f"{ui.number(s)} {ui.interval(lo, hi)}" for s, lo, hi in
                         zip(rows["share_a"], rows["ci_low_a"], rows["ci_high_a"], strict=True)],
    f"B: {run_b.name}": [f"{ui.number(s)} {ui.interval(lo, hi)}" for s, lo, hi in
                         zip(rows["share_b"], rows["ci_low_b"], rows["ci_high_b"], strict=True)],
    "delta": [f"{d:+.2f}" if d == d else ui.MISSING for d in rows["delta"]],
    "reference": [ui.number(v) for v in rows["reference_share_a"]],
}), "occupation"), hide_index=True)

long = pd.concat([
    rows.assign(run=f"A: {run_a.name}", share=rows["share_a"], ci_low=rows["ci_low_a"], ci_high=rows["ci_high_a"]),
    rows.assign(run=f"B: {run_b.name}", share=rows["share_b"], ci_low=rows["ci_low_b"], ci_high=rows["ci_high_b"]),
])[["subject", "run", "share", "ci_low", "ci_high", "delta"]]
long["interval"] = [ui.interval(lo, hi) for lo, hi in zip(long["ci_low"], long["ci_high"], strict=True)]
reference = rows.loc[rows["reference_share_a"].notna(), ["subject", "reference_share_a"]].rename(
    columns={"reference_share_a": "reference_share"})
st.vega_lite_chart(spec=charts.share_intervals(long, rows["subject"].tolist(), group="run", reference=reference,
                                               title=f"share perceived as {label}"), width="stretch")
st.caption("Each occupation: A and B with their intervals; black tick: the reference share. Sorted by |delta|.")
