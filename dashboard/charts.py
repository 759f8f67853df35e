"""The charts, built with altair once per distinct input and cached as Vega-Lite specs: building and
validating an altair chart costs ~0.3 s, which a warm page load should not pay again.
Pages draw a spec with ``st.vega_lite_chart(spec=...)``."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

UNIT = alt.Scale(domain=[0, 1])
Spec = dict[str, Any]


@st.cache_data(show_spinner=False, max_entries=64)
def share_intervals(rows: pd.DataFrame, order: list[str], *, group: str, title: str,
                    reference: pd.DataFrame | None = None, pick: bool = False) -> Spec:
    """Per subject (rows, sorted as ``order``), a dot per ``group`` value at ``share`` with its
    ``ci_low``..``ci_high`` line, and a black tick at ``reference_share`` from ``reference``."""
    y = alt.Y("subject:N", sort=order, title=None)
    base = alt.Chart(rows).encode(y=y, yOffset=f"{group}:N", color=alt.Color(f"{group}:N", title=None))
    lines = base.mark_rule(strokeWidth=2).encode(x=alt.X("ci_low:Q", scale=UNIT, title=title), x2="ci_high:Q")
    tooltip = ["subject", group, alt.Tooltip("share:Q", format=".2f"), "interval"]
    dots = base.mark_point(filled=True, size=50).encode(
        x=alt.X("share:Q", scale=UNIT, title=title),
        tooltip=tooltip + [c for c in ("n", "q_value", "delta") if c in rows.columns])
    if pick:
        dots = dots.add_params(alt.selection_point(name="pick", fields=["subject"]))
    layers = [lines, dots]
    if reference is not None and len(reference):
        offset = {"yOffset": f"{group}:N"} if group in reference.columns else {}
        layers.append(alt.Chart(reference).mark_tick(color="black", thickness=2, size=14).encode(
            y=y, x=alt.X("reference_share:Q", scale=UNIT), tooltip=["subject", "reference_share"], **offset))
    groups = max(2, rows[group].nunique())
    return alt.layer(*layers).properties(height=40 + 22 * len(order) * groups).to_dict()


@st.cache_data(show_spinner=False, max_entries=64)
def parity_scatter(rows: pd.DataFrame, reference: str) -> Spec:
    """Run share against reference share per subject, with intervals and the parity (y = x) line."""
    sc = alt.Chart(rows).encode(x=alt.X("reference_share:Q", scale=UNIT, title=f"reference share ({reference})"))
    err = sc.mark_rule(opacity=0.5).encode(y=alt.Y("ci_low:Q", scale=UNIT, title="run share"), y2="ci_high:Q",
                                           color=alt.Color("flag:N", title=None))
    dots = sc.mark_circle(size=60).encode(
        y=alt.Y("share:Q", scale=UNIT), color=alt.Color("flag:N", title=None),
        tooltip=["subject", alt.Tooltip("share:Q", format=".2f"), "interval",
                 alt.Tooltip("reference_share:Q", format=".2f"), alt.Tooltip("q_value:Q", format=".4f")])
    parity = alt.Chart(pd.DataFrame({"x": [0.0, 1.0], "y": [0.0, 1.0]})).mark_line(
        strokeDash=[4, 4], color="gray").encode(x="x:Q", y="y:Q")
    return alt.layer(parity, err, dots).properties(height=420).to_dict()


@st.cache_data(show_spinner=False, max_entries=16)
def rate_bars(rows: pd.DataFrame) -> Spec:
    """Memorization rate per prompt with its interval."""
    base = alt.Chart(rows).encode(y=alt.Y("prompt_id:N", sort="-x", title=None))
    return alt.layer(
        base.mark_bar(opacity=0.6).encode(x=alt.X("rate:Q", title="memorization rate", scale=UNIT),
                                          tooltip=["prompt_id", "matched", "images", "interval"]),
        base.mark_rule().encode(x="ci_low:Q", x2="ci_high:Q"),
    ).properties(height=40 + 32 * len(rows)).to_dict()


@st.cache_data(show_spinner=False, max_entries=16)
def robustness_bars(rows: pd.DataFrame) -> Spec:
    """Watermark detection rate per attack and method."""
    return alt.Chart(rows).mark_bar().encode(
        x=alt.X("detection_rate:Q", scale=UNIT, title="detection rate"),
        y=alt.Y("attack:N", sort="-x", title=None), yOffset="method:N", color="method:N",
        tooltip=["method", "attack", "images", alt.Tooltip("bit_accuracy:Q", format=".3f"),
                 alt.Tooltip("detection_rate:Q", format=".2f"), "c2pa_survives"],
    ).properties(height=40 + 22 * len(rows)).to_dict()
