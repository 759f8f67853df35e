"""Runs: every run under the runs root with model, suite, image count, stages done and dates."""

from __future__ import annotations

import streamlit as st

from dashboard import data, ui
from diffaudit.errors import DiffauditError

st.title("Runs")
runs = data.overview()
if runs.empty:
    st.info(f"No runs in `{data.runs_root()}` yet. Generate one with `diffaudit generate`.")
    st.stop()

st.caption(f"{len(runs)} run(s). Pick one or two in the sidebar: the first is reviewed on every page, "
           "the two are set side by side on Compare.")
st.dataframe(runs, hide_index=True, width="stretch")

for name in ui.picked():
    try:
        run = data.open_run(name)
    except DiffauditError as e:
        st.error(str(e))
        continue
    info = run.info
    row = runs[runs["run"] == name].iloc[0]
    st.subheader(name)
    st.markdown(f"**model** {ui.md(row['model'])} · **suite** {ui.md(row['suite'])} · **images** {row['images']} · "
                f"**created** {ui.md(row['created'])}")
    stages = info.get("stages", {}) or {}
    if stages:
        st.table({"stage": [ui.md(s) for s in stages],
                  "seconds": [ui.number(s.get("seconds"), 1) for s in stages.values()],
                  "finished": [str(s.get("finished", ui.MISSING)) for s in stages.values()]}, hide_index=True)
    tables = run.tables()
    st.caption("tables: " + (", ".join(tables) if tables else "none"))
    with st.expander("run.json"):
        st.json(info, expanded=False)
