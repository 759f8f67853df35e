"""Runs: every run under the runs root with its kind (generated, imported, reference), model, suite, image
count, stages done and dates; for imported runs, what the source told and what stays unknown."""

from __future__ import annotations

import streamlit as st

from dashboard import data, ui
from diffaudit.errors import DiffauditError

st.title("Runs")
runs = data.overview()
if runs.empty:
    st.info(f"No runs in `{data.runs_root()}` yet. Generate one with `diffaudit generate`, or bring images made "
            "elsewhere with `diffaudit import FOLDER --out RUN`.")
    st.stop()


def kind_of(info: dict) -> str:
    """generated | imported | reference (real images, imported to compare model runs against)."""
    gen = info.get("generation") if isinstance(info.get("generation"), dict) else {}
    if not gen.get("imported"):
        return "generated"
    return "reference" if gen.get("kind") == "reference" else "imported"


kinds = []
for name in runs["run"]:
    try:
        kinds.append(kind_of(data.open_run(name).info))
    except DiffauditError:
        kinds.append(ui.MISSING)
runs.insert(1, "kind", kinds)
st.caption(f"{len(runs)} run(s). Pick one or two in the sidebar: the first is reviewed on every page, "
           "the two are set side by side on Compare (a reference run is the baseline there).")
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
    st.markdown(f"**{row['kind']}** · **model** {ui.md(row['model'])} · **suite** {ui.md(row['suite'])} · "
                f"**images** {row['images']} · **created** {ui.md(row['created'])}")
    if row["kind"] in ("imported", "reference"):
        gens = ui.table(run, "generations")
        gen = info.get("generation") or {}
        st.markdown("**imported from** " + ", ".join(f"`{ui.md(s)}`" for s in gen.get("sources", [])))
        unknown = {col: int(gens[col].isna().sum()) for col in ("model", "prompt", "seed", "scheduler", "steps")
                   if col in gens and gens[col].isna().any()}
        st.caption("unknown (the source did not record it): " + (", ".join(
            f"{c} for {n} of {len(gens)}" for c, n in unknown.items()) or "nothing") + ". Never filled with defaults.")
        if "c2pa_status" in gens and gens["c2pa_status"].notna().any():
            counts = gens["c2pa_status"].value_counts()
            order = ["Trusted", "Valid", "Invalid", "none"]
            counts = counts.reindex(sorted(counts.index, key=lambda k: (order.index(k) if k in order else 9, k)))
            st.caption("embedded C2PA credentials on import: " + ", ".join(
                f"{'no manifest' if k == 'none' else ui.md(k)} {v}" for k, v in counts.items()))
            signed = gens[gens["c2pa_manifest"].fillna(False).astype(bool)]
            if len(signed):
                st.table(ui.md_table(signed[["image_id", "c2pa_status", "c2pa_claim_generator", "c2pa_source_type",
                                             "c2pa_software_agent", "c2pa_signer", "model"]].fillna(ui.MISSING),
                                     "image_id", "c2pa_claim_generator", "c2pa_source_type", "c2pa_software_agent",
                                     "c2pa_signer", "model", "c2pa_status"), hide_index=True)
    stages = info.get("stages", {}) or {}
    if stages:
        st.table({"stage": [ui.md(s) for s in stages],
                  "seconds": [ui.number(s.get("seconds"), 1) for s in stages.values()],
                  "finished": [str(s.get("finished", ui.MISSING)) for s in stages.values()]}, hide_index=True)
    tables = run.tables()
    st.caption("tables: " + (", ".join(tables) if tables else "none"))
    with st.expander("run.json"):
        st.json(info, expanded=False)
