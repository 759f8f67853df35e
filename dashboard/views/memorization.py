"""Memorization: each match as a pair (generated | training) with its Hamming distance, tile-L2 and SSIM,
a threshold slider, and the per-prompt rates the audit wrote (``diffaudit audit memorization``)."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, ui

PAIRS = 12  # pairs per page

st.title("Memorization")
run = ui.current_run()
matches = ui.table(run, "memorization/matches")
rates = ui.table(run, "memorization/rates")
if matches.empty and rates.empty:
    ui.missing_stage("memorization check", f"diffaudit audit memorization {run.root} --index IDX")
    st.stop()

# -- per-prompt rates -------------------------------------------------------------------------------
if len(rates):
    st.subheader("Memorization rate per prompt")
    r = rates.sort_values(["rate", "matched"], ascending=False).reset_index(drop=True)
    r["interval"] = [ui.interval(lo, hi) for lo, hi in zip(r["ci_low"], r["ci_high"], strict=True)]
    c1, c2 = st.columns(2)
    c1.metric("Images matched", f"{int(r['matched'].sum())} of {int(r['images'].sum())}")
    c2.metric("Prompts with a match", f"{int((r['matched'] > 0).sum())} of {len(r)}")
    flagged = r[r["matched"] > 0]
    if len(flagged):
        st.table(ui.md_table(flagged[["prompt_id", "subject", "matched", "images", "rate", "interval"]].assign(
            rate=[ui.number(v, 3) for v in flagged["rate"]]), "prompt_id", "subject"), hide_index=True)
        bars = flagged[["prompt_id", "matched", "images", "rate", "ci_low", "ci_high", "interval"]]
        st.vega_lite_chart(spec=charts.rate_bars(bars), width="stretch")
    with st.expander(f"All {len(r)} prompts"):
        st.dataframe(r.drop(columns=["ci_low", "ci_high"]), hide_index=True, width="stretch")

# -- matches side by side -----------------------------------------------------------------------------
st.subheader("Matches: generated | training")
if matches.empty:
    st.info("No generated image matched the training index.")
    st.stop()
c1, c2 = st.columns([2, 2])
top = int(matches["hamming"].max())
threshold = c1.slider("Largest Hamming distance shown (of 64 bits)", 0, max(top, 1), top, key="mem_threshold")
verdicts = sorted(matches["verdict"].unique())
chosen = c2.multiselect("Verdict", verdicts, default=verdicts, key="mem_verdicts",
                        help="memorized: a copy by strict tile-L2/SSIM thresholds; near_duplicate: a near-copy by looser "
                             "ones (both count as matched); unconfirmed: the hash matched but the pixels did not.")
shown = matches[(matches["hamming"] <= threshold) & matches["verdict"].isin(chosen)]
shown = shown.sort_values(["hamming", "tile_l2"], na_position="last").reset_index(drop=True)
stage = (run.info.get("stages") or {}).get("memorization") or {}
searched = f" (searched with {stage['hash']} at radius {stage['radius']})" if {"hash", "radius"} <= set(stage) else ""
st.caption(f"{len(shown)} of {len(matches)} match(es) at Hamming <= {threshold}{searched}.")

gens = ui.table(run, "generations").set_index("image_id")["path"]
pages = max(1, -(-len(shown) // PAIRS))
page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="mem_page") if pages > 1 else 1
for m in shown.iloc[(page - 1) * PAIRS: page * PAIRS].itertuples():
    left, right, facts = st.columns([2, 2, 3])
    with left:
        ui.show_image(run, gens.get(m.image_id), f"generated · {m.image_id}")
    with right:
        if isinstance(m.evidence_path, str):
            ui.show_image(run, m.evidence_path, f"training · {m.train_key}")
        else:
            st.caption(f"training · {ui.md(m.train_key)}: no evidence image stored in the run")
    with facts:
        st.markdown(f"**{ui.md(m.verdict)}**  \nHamming **{m.hamming}** · tile-L2 {ui.number(m.tile_l2, 3)} · "
                    f"SSIM {ui.number(m.ssim, 3)}"
                    + (f" · embedding {ui.number(m.embedding_sim, 3)}" if ui.number(m.embedding_sim) != ui.MISSING else ""))
        st.caption(f"prompt {ui.md(m.prompt_id)}"
                   + (f" · source {ui.md(m.train_uri)}" if isinstance(m.train_uri, str) else ""))
    st.divider()
