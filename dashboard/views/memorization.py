"""Memorization: each match as an aligned pair (generated | training image warped into the generated image's
frame, grey outside their overlap) with its Hamming distance, tile-L2, SSIM, agreement, overlap and the
transform found; a threshold slider; and the per-prompt rates the audit wrote (``diffaudit audit
memorization``). Counts are the rates table's, the same numbers ``run.json`` and the report show."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from audit.memorization import verdicts as vd
from dashboard import charts, ui

PAIRS = 12  # pairs per page

st.title("Memorization")
run = ui.current_run()
matches = ui.table(run, "memorization/matches")
rates = ui.table(run, "memorization/rates")
if matches.empty and rates.empty:
    ui.missing_stage("memorization check", f"diffaudit audit memorization {run.root} --index IDX")
    st.stop()


def _count(column: str) -> int | None:
    if column not in rates or rates[column].isna().all():
        return None
    return int(rates[column].fillna(0).sum())


# -- per-prompt rates -------------------------------------------------------------------------------
if len(rates):
    st.subheader("Memorization rate per prompt")
    r = rates.sort_values(["rate", "matched"], ascending=False).reset_index(drop=True)
    r["interval"] = [ui.interval(lo, hi) for lo, hi in zip(r["ci_low"], r["ci_high"], strict=True)]
    c1, c2, c3 = st.columns(3)
    c1.metric("Images matched", f"{int(r['matched'].sum())} of {int(r['images'].sum())}",
              help="Images whose best candidate is memorized or near_duplicate (the same count as run.json "
                   "and the report).")
    c2.metric("Prompts with a match", f"{int((r['matched'] > 0).sum())} of {len(r)}")
    degenerate = _count("degenerate")
    if degenerate is not None:
        c3.metric("Too flat to judge", str(degenerate), help=f"{vd.DEGENERATE}: {vd.HELP[vd.DEGENERATE]}")
    memorized, near = _count("memorized"), _count("near_duplicate")
    if memorized is not None and near is not None:
        st.caption(f"Of the matched images: {memorized} {vd.MEMORIZED}, {near} {vd.NEAR_DUPLICATE}. "
                   "Rates are matched / judged (images that are not degenerate), with 95% Wilson intervals.")
    flagged = r[r["matched"] > 0]
    if len(flagged):
        st.table(ui.md_table(flagged[["prompt_id", "subject", "matched", "images", "rate", "interval"]].assign(
            rate=[ui.number(v, 3) for v in flagged["rate"]]), "prompt_id", "subject"), hide_index=True)
        bars = flagged[["prompt_id", "matched", "images", "rate", "ci_low", "ci_high", "interval"]]
        st.vega_lite_chart(spec=charts.rate_bars(bars), width="stretch")
    with st.expander(f"All {len(r)} prompts"):
        st.dataframe(r.drop(columns=["ci_low", "ci_high"]), hide_index=True, width="stretch")

# -- matches side by side -----------------------------------------------------------------------------
st.subheader("Matches: generated | training, aligned")
if matches.empty:
    st.info("No generated image matched the training index.")
    st.stop()
c1, c2 = st.columns([2, 2])
top = int(matches["hamming"].max())
threshold = c1.slider("Largest Hamming distance shown (of 64 bits)", 0, max(top, 1), top, key="mem_threshold")
verdicts = sorted(matches["verdict"].unique(), key=vd.rank)
chosen = c2.multiselect("Verdict", verdicts, default=verdicts, key="mem_verdicts",
                        help="; ".join(f"{v}: {vd.HELP[v]}" for v in vd.ORDER)
                        + ". memorized and near_duplicate count as matched.")
shown = matches[(matches["hamming"] <= threshold) & matches["verdict"].isin(chosen)]
shown = shown.sort_values("hamming", kind="stable").reset_index(drop=True)  # the table's order within a distance
stage = (run.info.get("stages") or {}).get("memorization") or {}
searched = f" (searched with {stage['hash']} at radius {stage['radius']})" if {"hash", "radius"} <= set(stage) else ""
st.caption(f"{len(shown)} of {len(matches)} match(es) at Hamming <= {threshold}{searched}. The aligned training "
           "image is shown in the generated image's frame; grey is outside their overlap.")


def _get(m, name: str):
    """A row's value, None when missing (older runs lack the alignment columns)."""
    value = getattr(m, name, None)
    try:
        return None if value is None or pd.isna(value) else value
    except (TypeError, ValueError):
        return value


def _alignment_line(m) -> str | None:
    """Overlap and transform in words, or None for rows without an alignment (older runs, degenerate)."""
    if not isinstance(_get(m, "alignment"), str):
        return None
    parts = []
    overlap, train_overlap = _get(m, "overlap"), _get(m, "train_overlap")
    if overlap is not None and train_overlap is not None:
        parts.append(f"overlap {100 * overlap:.0f}% of the generated image, {100 * train_overlap:.0f}% of the "
                     "training image")
    words = f"aligned by {m.alignment}" + (" (mirrored)" if _get(m, "mirrored") is True else "")
    try:
        t = json.loads(m.transform)
        words += f": scale {t['scale']:.2f}, rotation {t['rotation']:+.1f}°, shift ({t['shift'][0]:.0f}, " \
                 f"{t['shift'][1]:.0f}) px"
    except (TypeError, ValueError, KeyError, IndexError):
        pass
    parts.append(words)
    if _get(m, "agreement") is not None:
        parts.append(f"agreement {ui.number(m.agreement, 2)} of textured tiles")
    if _get(m, "query_variant") is not None and "hash" in (_get(m, "source") or "hash"):  # not descriptor-only
        parts.append(f"hash hit by the {ui.md(m.query_variant)} variant")
    if _get(m, "confirm_ms") is not None:
        parts.append(f"confirmed in {ui.number(m.confirm_ms, 0)} ms")
    return " · ".join(parts)


gens = ui.table(run, "generations").set_index("image_id")["path"]
pages = max(1, -(-len(shown) // PAIRS))
page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="mem_page") if pages > 1 else 1
for m in shown.iloc[(page - 1) * PAIRS: page * PAIRS].itertuples():
    left, right, facts = st.columns([2, 2, 3])
    aligned = _get(m, "aligned_path")
    with left:
        ui.show_image(run, gens.get(m.image_id), f"generated · {m.image_id}")
    with right:
        if isinstance(aligned, str):
            ui.show_image(run, aligned, f"training · {m.train_key}")
        elif isinstance(m.evidence_path, str):
            ui.show_image(run, m.evidence_path, f"training · {m.train_key}")
        else:
            st.caption(f"training · {ui.md(m.train_key)}: no evidence image stored in the run")
    with facts:
        st.markdown(f"**{ui.md(m.verdict)}**  \nHamming **{m.hamming}** · tile-L2 {ui.number(m.tile_l2, 3)} · "
                    f"SSIM {ui.number(m.ssim, 3)}"
                    + (f" · embedding {ui.number(m.embedding_sim, 3)}" if ui.number(m.embedding_sim) != ui.MISSING else ""))
        line = _alignment_line(m)
        if line:
            st.caption(line)
        found = _get(m, "source")
        sim = _get(m, "descriptor_sim")
        st.caption(f"prompt {ui.md(m.prompt_id)}"
                   + (f" · found by {ui.md(found)}" if found else "")
                   + (f" (similarity {ui.number(sim, 3)})" if found and sim is not None else "")
                   + (f" · source {ui.md(m.train_uri)}" if isinstance(m.train_uri, str) else ""))
        if isinstance(aligned, str) and isinstance(m.evidence_path, str):
            with st.expander("Training image as indexed"):
                ui.show_image(run, m.evidence_path, f"as indexed · {m.train_key}")
    st.divider()
