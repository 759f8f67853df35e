"""Bias: per occupation, the share of each perceived label with its interval against the BLS share,
amplification at a glance, abstention and no-face rates, and each occupation's images.

Everything shown comes from ``bias/summary`` (written by ``diffaudit audit bias``) and the probe
tables; this page filters and draws, it computes no statistic."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data, ui
from diffaudit.errors import DiffauditError

PAGE = 24  # images per grid page
TOP = 30  # occupations in the share chart unless all are asked for

st.title("Bias")
run = ui.current_run()
summary = ui.table(run, "bias/summary")
if summary.empty:
    ui.missing_stage("bias summary", f"diffaudit audit bias {run.root}")
    st.stop()

# -- filters -----------------------------------------------------------------------------------------
f1, f2, f3, f4 = st.columns(4)
probes = ui.first_with_reference(summary, "probe")
probe = f1.selectbox("Probe", probes, key="bias_probe") if len(probes) > 1 else probes[0]
rows = summary[summary["probe"] == probe]
attribute = f1.selectbox("Attribute", ui.first_with_reference(rows, "attribute"), key="bias_attribute")
rows = rows[rows["attribute"] == attribute]
templates = sorted(rows["template"].unique(), key=lambda t: (t != "all", t))
template = f2.selectbox("Template", templates, key="bias_template",
                        help="'all' pools the templates; the others are each prompt template alone.")
rows = rows[rows["template"] == template]
with_ref = rows[rows["reference_share"].notna()]
# Labels with a reference first; the female share first of all, as HEIM and the BLS table report it.
labels = sorted(rows["label"].dropna().unique(),
                key=lambda lab: (lab not in set(with_ref["label"]), lab != "woman", lab))
if not labels:
    st.info(f"Every image abstained on `{attribute}` under probe `{probe}`: there is no label to show. "
            "The abstention reasons are in the image grid of the other attributes.")
    st.stop()
focus = f3.selectbox("Label compared with the reference", labels, key="bias_label")
alpha = f4.number_input("Significance level (q-value)", 0.001, 0.5, 0.05, 0.01, format="%.3f", key="bias_alpha")
significant_only = f4.toggle("Only significant gaps", key="bias_significant",
                             help="Occupations whose gap to the reference has a Benjamini-Hochberg q-value "
                                  "below the level, for the chosen label.")

focus_rows = rows[rows["label"] == focus].set_index("subject")
if significant_only:
    keep = focus_rows.index[focus_rows["q_value"].fillna(1.0) < alpha]
    rows = rows[rows["subject"].isin(keep)]
    focus_rows = focus_rows.loc[focus_rows.index.isin(keep)]
if rows.empty:
    st.info("No occupation passes these filters.")
    st.stop()

# Occupations by how far the chosen label's share is from the reference (no reference: last).
order = (focus_rows["gap"].abs().sort_values(ascending=False, na_position="last").index.tolist()
         + sorted(set(rows["subject"]) - set(focus_rows.index)))
reference = ", ".join(sorted(rows["reference"].dropna().unique())) or "none"

stage = (run.info.get("stages") or {}).get("bias") or {}
version = (stage.get("versions") or {}).get(probe)
st.caption(f"Probe `{probe}`" + (f" (version `{version}`)" if version else "")
           + (f" · CLIP `{stage['clip_model']}`" if probe == "clip" and stage.get("clip_model") else "")
           + f" · attribute `{attribute}` · template `{template}` · reference `{reference}`. "
           "Labels are perceived presentation as a classifier sees it, never identity. Intervals are those the "
           "audit wrote (95% by default).")

# -- headline figures --------------------------------------------------------------------------------
per_subject = rows.drop_duplicates("subject").set_index("subject")
no_face = data.no_face_rates(run).set_index("subject")
no_face = no_face[no_face.index.isin(per_subject.index)]
m1, m2, m3, m4 = st.columns(4)
m1.metric("Occupations", len(order))
significant = focus_rows[focus_rows["q_value"].fillna(1.0) < alpha]
m2.metric(f"Significant gaps ({focus})", f"{len(significant)} of {focus_rows['q_value'].notna().sum()}")
m3.metric("Amplified", int(focus_rows["amplified"].fillna(False).astype(bool).sum()),
          help="Further from parity than the reference, as the audit flagged it.")
answered, abstained = int(per_subject["n"].sum()), int(per_subject["abstained"].sum())
m4.metric("Abstained", f"{abstained / max(answered + abstained, 1):.1%}",
          help=f"{abstained} of {answered + abstained} images: the probe was not sure enough to label them.")
if len(no_face) and no_face["images"].sum():
    st.caption(f"At least one probe found no face or no person in {int(no_face['no_face'].sum())} of "
               f"{int(no_face['images'].sum())} images of these occupations (the face detector and CLIP's person "
               "check can disagree; the abstention table below has each probe's reasons).")

# -- largest gaps as text (readable, copyable) --------------------------------------------------------
top = focus_rows.reindex([s for s in order if s in focus_rows.index]).reset_index()
top = top[top["reference_share"].notna()].head(10)
if len(top):
    st.subheader(f"Largest gaps: {focus} share vs {reference}")
    st.table(ui.md_table(pd.DataFrame({
        "occupation": top["subject"],
        "share": [ui.number(v) for v in top["share"]],
        "95% interval": [ui.interval(lo, hi) for lo, hi in zip(top["ci_low"], top["ci_high"], strict=True)],
        "reference": [ui.number(v) for v in top["reference_share"]],
        "gap": [ui.number(v, 3) for v in top["gap"]],
        "gap interval": [ui.interval(lo, hi) for lo, hi in zip(top["gap_ci_low"], top["gap_ci_high"], strict=True)],
        "q-value": [ui.number(v, 4) for v in top["q_value"]],
    }), "occupation"), hide_index=True)

# -- share with interval per occupation and label, reference on the same axis ---------------------------
st.subheader("Share of each perceived label, with its interval and the reference")
plot = rows[["subject", "label", "share", "ci_low", "ci_high", "n", "reference_share", "gap", "q_value",
             "amplified"]].assign(
    interval=[ui.interval(lo, hi) for lo, hi in zip(rows["ci_low"], rows["ci_high"], strict=True)])
show_all = len(order) <= TOP or st.toggle(f"Show all {len(order)} occupations", key="bias_all",
                                          help=f"By default the chart shows the {TOP} largest gaps.")
shown = order if show_all else order[:TOP]
drawn = plot[plot["subject"].isin(shown)]
spec = charts.share_intervals(drawn, shown, group="label", title="share of images", pick=True,
                              reference=drawn.loc[drawn["reference_share"].notna(),
                                                  ["subject", "label", "reference_share"]])
event = st.vega_lite_chart(spec=spec, width="stretch", on_select="rerun", key="bias_chart")
st.caption("Dot: share; line: its 95% interval; black tick: the reference (BLS) share. Sorted by the gap of "
           f"'{focus}' to the reference. Click a dot to see that occupation's images below.")

# -- amplification at a glance ------------------------------------------------------------------------
scatter = focus_rows[focus_rows["reference_share"].notna()].reset_index()
if len(scatter):
    st.subheader(f"Run share vs reference share ({focus})")
    scatter = scatter[["subject", "share", "ci_low", "ci_high", "reference_share", "q_value"]].assign(
        interval=[ui.interval(lo, hi) for lo, hi in zip(scatter["ci_low"], scatter["ci_high"], strict=True)],
        flag=scatter["amplified"].map({True: "amplified", False: "not amplified"}).fillna("unknown"))
    st.vega_lite_chart(spec=charts.parity_scatter(scatter, reference), width="stretch")
    st.caption("Dashed: parity with the workforce. Points further from 0.5 than the line on their side "
               "amplify the workforce's imbalance.")

# -- a second reference: Fair Diffusion's published SD 1.5 counts (another model and classifier) --------
gendered = focus == "woman" and attribute in set(with_ref["attribute"])
both = data.beside_fair_diffusion(run, focus_rows.reset_index()) if gendered else pd.DataFrame()
if len(both):
    with st.expander(f"Against Fair Diffusion's published Stable Diffusion 1.5 counts ({len(both)} occupations)"):
        st.caption("Fair Diffusion (Friedrich et al. 2023) counted perceived gender in SD 1.5 images of the same "
                   "occupations with the FairFace classifier: another model and another classifier, so compare "
                   "directions and sizes, not decimals.")
        st.table(ui.md_table(pd.DataFrame({
            "occupation": both["subject"],
            "share": [ui.number(v) for v in both["share"]],
            "95% interval": [ui.interval(lo, hi) for lo, hi in zip(both["ci_low"], both["ci_high"], strict=True)],
            "SD 1.5 (Fair Diffusion)": [ui.number(v) for v in both["share_woman"]],
            "its 95% interval": [ui.interval(lo, hi)
                                 for lo, hi in zip(both["ci_low_fd"], both["ci_high_fd"], strict=True)],
            "its n": both["n_fd"].astype(int),
        }), "occupation"), hide_index=True)

# -- abstention and no-face rates -----------------------------------------------------------------------
st.subheader("Abstention and no-face rates")
rates = pd.DataFrame({"occupation": order})
rates["abstention rate"] = rates["occupation"].map(per_subject["abstention_rate"])
rates["abstained"] = rates["occupation"].map(per_subject["abstained"])
rates["no-face rate"] = rates["occupation"].map(no_face["no_face_rate"]) if len(no_face) else None
st.dataframe(rates, hide_index=True, width="stretch",
             column_config={"abstention rate": st.column_config.NumberColumn(format="percent"),
                            "no-face rate": st.column_config.NumberColumn(format="percent")})

if st.toggle("Show every summary row for these filters", key="bias_rows"):
    st.dataframe(plot, hide_index=True, width="stretch")

# -- apparent skin colour beyond one number, and gender x skin-tone group ----------------------------------
skin = ui.table(run, "bias/skin")
if len(skin) and (skin["n"] > 0).any():
    st.subheader("Apparent skin colour: lightness L*, hue h*, ITA")
    st.caption("Per image, the median L* and hue angle h* (degrees; lower is redder) of the largest face's skin "
               "pixels, beside ITA (Thong, Joniak and Xiang, ICCV 2023). Mean with its 95% Student-t interval, "
               "median and quartiles per occupation; 'all' pools the images. Apparent colour depends on lighting; "
               "it is never anyone's race or ethnicity.")
    measure = st.radio("Measure", sorted(skin["measure"].unique(), key=lambda m: ("L*", "h*", "ITA").index(m)
                                         if m in ("L*", "h*", "ITA") else 9), horizontal=True, key="bias_skin")
    show = skin[(skin["measure"] == measure) & skin["subject"].isin(["all", *order])]
    st.dataframe(pd.DataFrame({
        "occupation": show["subject"], "images measured": show["n"], "abstained": show["abstained"],
        "mean": show["mean"], "95% interval": [ui.interval(lo, hi, 1) for lo, hi in zip(
            show["ci_low"], show["ci_high"], strict=True)],
        "median": show["median"], "quartiles": [ui.interval(lo, hi, 1) for lo, hi in zip(
            show["q25"], show["q75"], strict=True)]}), hide_index=True, width="stretch")
    inter = ui.table(run, "bias/intersectional")
    inter = inter[inter["subject"].isin(["all", *order]) & (inter["n"] > 0)]
    if len(inter):
        with st.expander("Perceived gender x skin-tone group"):
            st.caption("Skin-tone groups bin L* at the midpoints between the L* of Monk swatches 7 and 8 and of 5 "
                       "and 6 (darker, medium, lighter). Shares among images with both votes, with 95% Bonferroni "
                       "Clopper-Pearson intervals that hold simultaneously over the six cells of a subject.")
            st.dataframe(pd.DataFrame({
                "gender probe": inter["gender_probe"], "occupation": inter["subject"],
                "perceived gender": inter["perceived_gender"], "skin group": inter["skin_group"],
                "count": inter["count"], "n": inter["n"], "share": inter["share"],
                "simultaneous 95% interval": [ui.interval(lo, hi) for lo, hi in zip(
                    inter["sim_ci_low"], inter["sim_ci_high"], strict=True)]}), hide_index=True, width="stretch",
                column_config={"share": st.column_config.NumberColumn(format="percent")})

# -- one occupation's images ------------------------------------------------------------------------
st.subheader("Images of one occupation")
clicked = [p.get("subject") for p in (event.selection.get("pick") or [])] if event else []
# A click on the chart picks the occupation once; the selectbox stays free to change it afterwards.
if clicked and clicked[0] in order and clicked[0] != st.session_state.get("bias_clicked"):
    st.session_state["bias_subject"] = clicked[0]
st.session_state["bias_clicked"] = clicked[0] if clicked else None
if st.session_state.get("bias_subject") not in order:
    st.session_state["bias_subject"] = order[0]
g1, g2, g3 = st.columns([2, 3, 1])
subject = g1.selectbox("Occupation", order, key="bias_subject")
try:
    images = data.image_labels(run, probe, attribute)
except DiffauditError as e:
    st.error(f"probes/{probe}: {ui.md(e)}")
    st.stop()
images = images[images["subject"] == subject]
if template != "all":
    images = images[images["template"] == template]
statuses = sorted(images["status"].unique())
view = f"{probe}_{attribute}_{template}_{subject}"
shown = g2.multiselect("Predicted label", statuses, default=statuses, key=f"bias_labels_{view}",
                       help="'abstained' shows the images the probe declined to label, with its reason.")
images = images[images["status"].isin(shown)].reset_index(drop=True)
pages = max(1, -(-len(images) // PAGE))
page = g3.number_input(f"Page (of {pages})", 1, pages, 1, key=f"bias_page_{view}") if pages > 1 else 1
st.caption(f"{len(images)} image(s) of {ui.md(subject)}: " + ", ".join(
    f"{s} {int(c)}" for s, c in images["status"].value_counts().sort_index().items()))
window = images.iloc[(page - 1) * PAGE: page * PAGE]
captions = [
    f"{row.status}" + (f" ({row.abstain_reason})" if row.status == "abstained" and isinstance(
        row.abstain_reason, str) else "") + f" · {row.image_id}"
    for row in window.itertuples()
]
ui.image_grid(run, window["path"].tolist(), captions)
