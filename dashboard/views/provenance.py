"""Provenance: the stamps the run recorded (``diffaudit stamp``) with their status, the watermark
robustness table, and a verifier for any file a user uploads (C2PA state, failure codes in plain words,
watermark and manifest-store recovery). Uploads are size-capped, written only to a fresh temp folder
and deleted after the check."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, ui

MAX_UPLOAD_MB = 20
TYPES = ["png", "jpg", "jpeg", "webp", "avif", "heic", "tif", "tiff", "gif"]


def _facts(value: Any) -> str:
    """A small dict as ``key value · key value`` (nested values shown as they are)."""
    if isinstance(value, dict):
        return " · ".join(f"{k.replace('_', ' ')} {ui.md(v)}" for k, v in value.items()
                          if v not in (None, "", [], {}))
    return ui.md(value)


def show_result(result: dict[str, Any]) -> None:
    """The C2PA state, each failure code in plain words, and what the watermark and the store found.

    Reads ``provenance.stamp.VerifyResult.to_dict()`` (status, credentials{failure_codes, failures, signer,
    generation}, watermark, recovered, problem)."""
    creds = result.get("credentials") or {}
    status = str(result["status"])
    signer = creds.get("signer")
    box = {"Trusted": st.success, "Valid": st.info, "Invalid": st.error}.get(status, st.warning)
    words = {"Trusted": "signed, intact, and the signer is in your trust anchors",
             "Valid": "signed and intact, but the signer is not in your trust anchors",
             "Invalid": "credentials present but they do not validate",
             "none": "no content credentials embedded"}.get(status)
    box(f"C2PA: **{ui.md(status)}**" + (f": {words}" if words else ""))
    if signer:
        st.markdown(f"**signer**: {_facts(signer)}")
    explanations = {f.get("code"): f.get("explanation") for f in creds.get("failures") or [] if isinstance(f, dict)}
    for code in creds.get("failure_codes") or []:
        extra = explanations.get(code)
        st.markdown(f"- {ui.md(ui.plain(str(code)))}" + (f" ({ui.md(extra)})" if extra else ""))
    if creds.get("generation"):
        st.markdown(f"**generation**: {_facts(creds['generation'])}")
    for key, value in result.items():
        if key.startswith(("watermark", "store", "recover")) and value not in (None, "", [], {}):
            st.markdown(f"**{key.replace('_', ' ')}**: {_facts(value)}")
    if not result.get("watermark") and not result.get("recovered") and status in ("none", "Invalid"):
        st.caption("No watermark found and no match in the manifest store.")
    if result.get("problem"):
        st.warning(ui.md(result["problem"]))
    with st.expander("Full result"):
        st.json(result, expanded=False)


# -- the run's stamps -----------------------------------------------------------------------------------
st.title("Provenance")
names = ui.picked()
if names:
    run = ui.current_run()
    stamps = ui.table(run, "provenance/stamps")
    if stamps.empty:
        ui.missing_stage("provenance stamps", f"diffaudit stamp {run.root}")
    else:
        st.subheader("Stamped images")
        counts = stamps["status"].value_counts()
        cols = st.columns(4)
        for col, status in zip(cols, ["Trusted", "Valid", "Invalid", "none"], strict=True):
            col.metric(status, int(counts.get(status, 0)))
        view = pd.DataFrame({
            "image": stamps["image_id"],
            "status": stamps["status"],
            "failures": ["; ".join(ui.plain(c) for c in codes) if codes is not None and len(codes) else ""
                         for codes in stamps["failure_codes"]],
            "watermark": stamps["watermark"],
            "payload": stamps["payload"],
            "format": stamps["format"],
            "stamped file": stamps["stamped_path"],
        })
        st.dataframe(view, hide_index=True, width="stretch")
        problems = view[view["status"].isin(["Invalid", "none"]) | (view["failures"] != "")]
        if len(problems):
            st.markdown("**Stamps that need a look**")
            st.table(ui.md_table(problems[["image", "status", "failures"]], "image", "status", "failures"),
                     hide_index=True)
    robustness = ui.table(run, "provenance/robustness")
    if len(robustness):
        st.subheader("Watermark robustness")
        st.caption("Bit accuracy and detection rate per attack, as `diffaudit provenance robustness` measured them.")
        st.vega_lite_chart(spec=charts.robustness_bars(robustness), width="stretch")
        st.dataframe(robustness, hide_index=True, width="stretch")

# -- verify any file ------------------------------------------------------------------------------------
st.subheader("Verify a file")
st.caption(f"Any image up to {MAX_UPLOAD_MB} MB. It is written to a temporary folder for the check and deleted "
           "right after; nothing is stored.")
upload = st.file_uploader("Image to verify", type=TYPES, max_upload_size=MAX_UPLOAD_MB, key="verify_upload")
anchors = st.file_uploader("Trust anchors (PEM bundle, optional)", type=["pem", "crt"],
                           max_upload_size=1, key="verify_anchors")
if upload is not None:
    if upload.size > MAX_UPLOAD_MB * 1024 * 1024:
        st.error(f"{ui.md(upload.name)} is {upload.size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
        st.stop()
    from provenance import verify_paths  # imported only when a user asks to verify
    suffix = re.sub(r"[^a-z0-9]", "", Path(upload.name).suffix.lower())[:5] or "bin"
    with tempfile.TemporaryDirectory(prefix="diffaudit-verify-") as tmp:
        target = Path(tmp) / f"upload.{suffix}"
        target.write_bytes(upload.getvalue())
        trust = None
        if anchors is not None:
            trust = Path(tmp) / "anchors.pem"
            trust.write_bytes(anchors.getvalue())
        try:
            results = verify_paths([target], trust_anchors=trust)
        except Exception as e:  # a bad file must give a message, never a crash of the page
            st.error(f"Could not verify {ui.md(upload.name)}: {ui.md(e)}")
            st.stop()
    st.markdown(f"**{ui.md(upload.name)}**")
    for result in results:
        show_result(result.to_dict())
