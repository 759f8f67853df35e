"""Memorization scores: Wen et al.'s per-prompt scores as ``diffaudit audit memorization`` wrote them
(``memorization/prompt_scores``), with or without an index: the score histogram against the threshold,
the flagged prompts with their images, and the detector's AUC when the run holds both reference suites."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data, ui
from diffaudit.errors import DiffauditError

st.title("Memorization scores")
run = ui.current_run()
try:
    scores = data.prompt_scores(run)
except DiffauditError as e:  # a table that fails its schema check: said on the page, not a broken page
    st.error(f"memorization/prompt_scores: {e}")
    st.stop()
table, scored, flagged, threshold, stage = scores.table, scores.scored, scores.flagged, scores.threshold, scores.stage
if table.empty:
    ui.missing_stage("memorization score", f"diffaudit audit memorization {run.root}")
    st.stop()
st.caption("Wen et al. (ICLR 2024): a prompt that makes the model reproduce a training image gives an abnormally "
           "large text-conditional noise prediction || eps(x_t, prompt) - eps(x_t, empty) || from the first step. "
           "A flag is evidence, not proof: confirm it against an index of the training data.")
c1, c2, c3 = st.columns(3)
c1.metric("Prompts flagged", f"{len(flagged)} of {len(scored)}")
c2.metric("Threshold", f"{threshold:.3g}", help=f"{stage.get('threshold_source', '')}: {stage.get('threshold_note', '')}")
auc = stage.get("auc")
if auc:
    c3.metric("Detector AUC on this run", f"{auc['auc']:.3f}",
              help=f"95% bootstrap CI {auc['auc_ci'][0]:.3f}-{auc['auc_ci'][1]:.3f}; {auc['memorized_prompts']} "
                   f"memorized vs {auc['ordinary_prompts']} ordinary prompts; {auc['tpr_at_1pct_fpr']:.0%} caught at "
                   "1% false positives")
st.caption(f"Threshold from {ui.md(stage.get('threshold_source', '?'))}: {ui.md(stage.get('threshold_note', ''))}")
if str((run.info.get("generation") or {}).get("model")) == "tiny":
    st.warning("The tiny model has random weights: these scores prove the plumbing, not memorization.")


@st.cache_data(show_spinner=False, max_entries=16)
def histogram(rows: pd.DataFrame, threshold: float) -> dict:
    """Prompt scores binned, coloured by suite, with the threshold as a red rule."""
    bars = alt.Chart(rows).mark_bar(opacity=0.8).encode(
        x=alt.X("score:Q", bin=alt.Bin(maxbins=40), title="prompt score"),
        y=alt.Y("count():Q", title="prompts", stack=True), color=alt.Color("suite:N", title=None),
        tooltip=["suite", "count()"])
    rule = alt.Chart(pd.DataFrame({"threshold": [threshold]})).mark_rule(color="red", strokeWidth=2).encode(
        x="threshold:Q")
    return alt.layer(bars, rule).properties(height=260).to_dict()


st.subheader("Score distribution")
st.vega_lite_chart(spec=histogram(scored.assign(suite=scored["suite"].fillna("-"))[["score", "suite"]], threshold),
                   width="stretch")

st.subheader("Flagged prompts")
if flagged.empty:
    st.info("No prompt is above the threshold.")
else:
    show = flagged.assign(
        score=[ui.number(v, 3) for v in flagged["score"]],
        above=[f"{a}/{n}" for a, n in zip(flagged["images_above"], flagged["scored"], strict=True)],
        copy=[ui.MISSING if pd.isna(c) else ("yes" if c else "no") for c in flagged["copy_found"]])
    st.table(ui.md_table(show[["rank", "prompt_id", "prompt", "suite", "score", "above", "copy"]].rename(
        columns={"above": "images above", "copy": "copy found"}), "prompt_id", "prompt", "suite"), hide_index=True)
    pick = st.selectbox("Images of a flagged prompt", flagged["prompt_id"].tolist(), key="score_pick")
    mine = scores.images(run, pick)
    ui.image_grid(run, mine["path"], [f"{i} · score {ui.number(v, 3)}"
                                      for i, v in zip(mine["image_id"], mine["mem_score_step1"], strict=True)])

with st.expander(f"All {len(table)} prompts"):
    st.dataframe(table, hide_index=True, width="stretch")
