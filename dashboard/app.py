"""diffaudit dashboard: ``streamlit run dashboard/app.py`` with ``$DIFFAUDIT_RUNS_DIR`` set (what
``diffaudit dashboard RUNS_DIR`` does). Read-only: pages render what the audit stages wrote."""

from __future__ import annotations

import streamlit as st

from dashboard import data, ui

st.set_page_config(page_title="diffaudit", page_icon=":material/fact_check:", layout="wide")

root = data.runs_root()
names = data.run_names(root)

# The picker lives here, rendered on every page, so the choice survives page switches.
if ui.PICKED not in st.session_state:
    wanted = st.query_params.get_all("run")
    st.session_state[ui.PICKED] = [n for n in wanted if n in names][:2] or names[:1]
elif any(n not in names for n in st.session_state[ui.PICKED]):  # a run folder went away
    st.session_state[ui.PICKED] = [n for n in st.session_state[ui.PICKED] if n in names]

with st.sidebar:
    st.multiselect("Runs: one to review, two to compare", names, key=ui.PICKED, max_selections=2,
                   help="The first run is the one the Bias, Memorization and Provenance pages show.")
    st.query_params["run"] = st.session_state[ui.PICKED]  # the URL names the picked runs: shareable
    st.caption(f"Runs root: `{root}` (read-only)")
    if not names:
        st.warning(f"No runs in {root}. Start the dashboard on a folder of runs: `diffaudit dashboard RUNS_DIR`.")

# The page scripts live in views/, not pages/: a pages/ folder beside the main script switches Streamlit
# to its older folder-based navigation for a session's first run, which would skip this script.
pages = [
    st.Page("views/runs.py", title="Runs", icon=":material/folder_open:", url_path="runs", default=True),
    st.Page("views/bias.py", title="Bias", icon=":material/balance:", url_path="bias"),
    st.Page("views/agreement.py", title="Agreement", icon=":material/join_inner:", url_path="agreement"),
    st.Page("views/memorization.py", title="Memorization", icon=":material/content_copy:",
            url_path="memorization"),
    st.Page("views/provenance.py", title="Provenance", icon=":material/verified:", url_path="provenance"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
]
st.navigation(pages).run()
