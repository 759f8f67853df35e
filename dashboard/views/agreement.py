"""Agreement: how far two probes that label the same attribute agree (Cohen's kappa and raw agreement with
their intervals), overall and per subject, the confusion table, and a gallery of the images they disagree on.

Everything comes from ``bias/agreement``, ``bias/confusion`` and ``bias/agreement_images`` (written by
``diffaudit audit bias``); this page filters and draws, it computes no statistic."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from audit.agreement import lowest_agreement_first
from dashboard import ui

PAGE = 24  # images per gallery page

st.title("Agreement between probes")
run = ui.current_run()
table = ui.table(run, "bias/agreement")
if table.empty:
    ui.missing_stage("agreement between two probes of one attribute (e.g. clip and faces_attr)",
                     f"diffaudit audit bias {run.root} --probes clip,faces,faces_attr,skin_tone")
    st.stop()

pairs = sorted({(a, b) for a, b in zip(table["probe_a"], table["probe_b"], strict=True)})
c1, c2, c3 = st.columns(3)
pair = c1.selectbox("Probes", pairs, format_func=lambda p: f"{p[0]} vs {p[1]}", key="agree_pair")
rows = table[(table["probe_a"] == pair[0]) & (table["probe_b"] == pair[1])]
attribute = c2.selectbox("Attribute", sorted(rows["attribute"].unique()), key="agree_attribute")
rows = rows[rows["attribute"] == attribute]
subjects = ["all"] + sorted(s for s in rows["subject"].unique() if s != "all")
subject = c3.selectbox("Subject", subjects, key="agree_subject", help="'all' pools every subject's images.")
now = rows[rows["subject"] == subject].iloc[0]

st.caption(f"`{pair[0]}` and `{pair[1]}` both labelled `{attribute}`. Raw agreement: share of images labelled "
           "alike (95% Wilson interval). Cohen's kappa: agreement beyond what the two probes' label shares give by "
           "chance (95% interval from the Dirichlet posterior of the confusion table); 0 is chance, 1 perfect. Images either probe abstained "
           "on are counted apart. Labels are perceived presentation, never identity.")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Images both labelled", f"{int(now['n'])} of {int(now['images'])}",
          help=f"{int(now['abstained_a'])} abstained by {pair[0]}, {int(now['abstained_b'])} by {pair[1]}.")
m2.metric("Raw agreement", ui.number(now["raw_agreement"]), help=ui.interval(now["raw_ci_low"], now["raw_ci_high"]))
m3.metric("Chance agreement", ui.number(now["chance_agreement"]))
m4.metric("Cohen's kappa", "undefined" if pd.isna(now["kappa"]) else ui.number(now["kappa"]),
          help="95% interval " + ui.interval(now["kappa_ci_low"], now["kappa_ci_high"])
          + ("" if pd.notna(now["kappa"]) else ": both probes gave every image one and the same label"))

st.subheader("Confusion table")
cells = ui.table(run, "bias/confusion")
cells = cells[(cells["probe_a"] == pair[0]) & (cells["probe_b"] == pair[1]) & (cells["attribute"] == attribute)
              & (cells["subject"] == subject)]
if len(cells):
    grid = cells.pivot_table(index="label_a", columns="label_b", values="count", aggfunc="sum", sort=False)
    grid.index.name, grid.columns.name = f"{pair[0]} (rows)", f"{pair[1]} (columns)"
    st.dataframe(grid, width="stretch")

per = lowest_agreement_first(rows[rows["subject"] != "all"])
if len(per):
    st.subheader("By subject, lowest agreement first")
    st.dataframe(pd.DataFrame({
        "subject": per["subject"], "both labelled": per["n"],
        "raw agreement": per["raw_agreement"],
        "interval": [ui.interval(lo, hi) for lo, hi in zip(per["raw_ci_low"], per["raw_ci_high"], strict=True)],
        "kappa": per["kappa"],
        "kappa interval": [ui.interval(lo, hi) for lo, hi in zip(per["kappa_ci_low"], per["kappa_ci_high"],
                                                                  strict=True)]}),
        hide_index=True, width="stretch",
        column_config={"raw agreement": st.column_config.NumberColumn(format="percent")})

st.subheader("Images the two probes disagree on")
images = ui.table(run, "bias/agreement_images")
images = images[(images["probe_a"] == pair[0]) & (images["probe_b"] == pair[1]) & (images["attribute"] == attribute)]
if subject != "all":
    images = images[images["subject"] == subject]
apart = images[images["label_a"].notna() & images["label_b"].notna() & (images["label_a"] != images["label_b"])]
if apart.empty:
    st.info("No image with two different labels for these filters.")
    st.stop()
kinds = sorted({(a, b) for a, b in zip(apart["label_a"], apart["label_b"], strict=True)})
kind = st.selectbox("Disagreement", ["every kind", *kinds], key=f"agree_kind_{pair}_{attribute}_{subject}",
                    format_func=lambda k: k if isinstance(k, str) else f"{pair[0]}: {k[0]} · {pair[1]}: {k[1]}")
if kind != "every kind":
    apart = apart[(apart["label_a"] == kind[0]) & (apart["label_b"] == kind[1])]
paths = ui.table(run, "generations").set_index("image_id")["path"]
apart = apart[apart["image_id"].isin(paths.index)].reset_index(drop=True)
pages = max(1, -(-len(apart) // PAGE))
page = st.number_input(f"Page (of {pages})", 1, pages, 1, key=f"agree_page_{pair}_{attribute}_{subject}") \
    if pages > 1 else 1
window = apart.iloc[(page - 1) * PAGE: page * PAGE]
st.caption(f"{len(apart)} image(s) labelled differently.")
ui.image_grid(run, [paths[i] for i in window["image_id"]],
              [f"{pair[0]}: {r.label_a} · {pair[1]}: {r.label_b} · {r.image_id}" for r in window.itertuples()])
