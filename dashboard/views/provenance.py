"""Provenance: the stamps the run recorded (``diffaudit stamp``) with their status, the watermark
robustness table, and a verifier for any file a user uploads, which shows the same evidence and the same
conclusion as ``diffaudit verify``. The verifier looks in the manifest store the picked run was stamped
with (read-only, and only when that store lies inside the runs folder) and says which store it used.
Uploads are size-capped, decoded under the one pixel cap, written only to a fresh temp folder and deleted
after the check."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, data, ui
from diffaudit import verdicts
from diffaudit.errors import DiffauditError

MAX_UPLOAD_MB = 20
TYPES = ["png", "jpg", "jpeg", "webp", "avif", "heic", "heif", "tif", "tiff", "gif", "jxl", "dng", "pdf", "mp4",
         "mov", "m4v"]


def _facts(value: Any) -> str:
    """A small dict as ``key value · key value`` (nested values shown as they are)."""
    if isinstance(value, dict):
        return " · ".join(f"{k.replace('_', ' ')} {ui.md(v)}" for k, v in value.items()
                          if v not in (None, "", [], {}))
    return ui.md(value)


def _words(status: str, trust: str | None) -> str:
    if status == "Trusted":
        return f"Trusted ({trust})" if trust else "Trusted"
    return {"Valid": "Valid: intact, but the signer is not in your trust anchors",
            "Invalid": "Invalid: credentials present but they do not validate",
            "none": "none: no content credentials embedded"}.get(status, status)


def show_result(result: dict[str, Any]) -> None:
    """One verdict: the conclusion in plain words, then each piece of evidence apart (embedded manifest and
    its per-manifest failure codes; watermark; fingerprint candidates; the stored record, its status as
    recorded at stamp time and as re-checked now). Reads ``provenance.verify.VerifyResult.to_dict()``."""
    conclusion = str(result.get("conclusion") or verdicts.NONE)
    box = {verdicts.INTACT: st.success, verdicts.SAME: st.success, verdicts.TAMPERED: st.error,
           verdicts.EDITED: st.warning, verdicts.SOURCE: st.info, verdicts.AMBIGUOUS: st.warning}.get(conclusion, st.info)
    box(f"Conclusion: **{ui.md(conclusion)}**. {ui.md(result.get('reason') or '')}")
    st.caption(ui.md(verdicts.CONCLUSIONS.get(conclusion, "")))
    creds = result.get("credentials") or {}
    status = str(result.get("status"))
    manifest = _words(status, creds.get("trust"))
    if creds.get("remote_manifest"):
        manifest = f"none: remote manifest, not fetched (offline): {creds['remote_manifest']}"
    st.markdown(f"**C2PA: {ui.md(status)}** · {ui.md(manifest)}")
    signer = creds.get("signer")
    if signer:
        st.markdown(f"**signer**: {_facts(signer)}")
    for m in creds.get("manifests") or []:
        if not m.get("failures"):
            continue
        who = "this file" if m.get("role") == "active" else f"ingredient {m.get('title')}"
        st.markdown(f"**failures of {ui.md(who)}** ({ui.md(m.get('label'))})")
        for f in m["failures"]:
            code = str(f.get("code"))
            st.markdown(f"- {ui.md(ui.plain(code))}" + (f" ({ui.md(f['explanation'])})" if f.get("explanation") else ""))
    if creds.get("generation"):
        st.markdown(f"**generation**: {_facts(creds['generation'])}")
    w = result.get("watermark")
    if w:
        if w.get("detected"):
            st.markdown(f"**watermark**: {ui.md(w.get('method'))} payload {ui.md(w.get('payload'))} · CRC ok · "
                        f"{w.get('corrected_bits')} bit(s) corrected · false-positive bound "
                        f"{float(w.get('false_positive_bound') or 0):.1e}")
        else:
            st.markdown(f"**watermark**: none found (tried {ui.md(', '.join(w.get('tried') or []))})")
        if w.get("not_tried"):
            st.markdown(f"**watermark**: not tried: {ui.md(', '.join(w['not_tried']))} (the store holds such "
                        "stamps; their weights are not configured here)")
    fp = result.get("fingerprint")
    if fp:
        if fp.get("degenerate"):
            st.markdown(f"**fingerprint**: {ui.md(fp['degenerate'])}; never matched")
        elif fp.get("candidates"):
            st.markdown("**fingerprint candidates**" + (" (more than one qualifies)" if fp.get("more_than_one") else ""))
            st.table(pd.DataFrame([{"stamp": c["manifest_label"], "role": c["role"], "image": c.get("image_id"),
                                    "pixel ratio": c.get("pixel_ratio"), "qualifies": c.get("qualifies")}
                                   for c in fp["candidates"]]), hide_index=True)
    rec = result.get("record")
    if rec:
        now = rec.get("checked_now") or {}
        st.markdown(f"**stored stamp** ({ui.md(rec.get('role'))}, found by {ui.md(rec.get('found_by'))}): "
                    f"{ui.md(rec.get('manifest_label'))} · image {ui.md(rec.get('image_id'))} · run {ui.md(rec.get('run'))}")
        st.markdown(f"- status **{ui.md(rec['recorded_at_stamp_time']['status'])}, as recorded at stamp time**"
                    + (f"; checked now with your trust settings: **{ui.md(now.get('words'))}**" if now.get("words") else ""))
        gen = (rec.get("credentials") or {}).get("generation")
        if gen:
            st.markdown(f"- recorded generation: {_facts(gen)}")
    if result.get("problem"):
        st.warning(ui.md(result["problem"]))
    with st.expander("Full result"):
        st.json(result, expanded=False)


def run_store(run) -> tuple[Path | None, str]:
    """The manifest store ``run`` was stamped with, if it exists inside the runs root; and what to say."""
    recorded = ((run.info.get("stages") or {}).get("stamp") or {}).get("store")
    if not recorded:
        return None, f"{run.name} records no manifest store (not stamped with `diffaudit stamp`): store look-up skipped."
    try:
        path = data.confine(data.runs_root(), recorded)
    except DiffauditError:
        return None, (f"The store {run.name} was stamped with ({recorded}) lies outside the runs folder: the "
                      "dashboard does not open it; use `diffaudit verify --store` instead.")
    if not path.is_file():
        return None, f"The store {run.name} was stamped with ({recorded}) is missing: store look-up skipped."
    return path, f"Looking for stripped credentials in {run.name}'s manifest store ({path.name}), read-only."


# -- the run's stamps -----------------------------------------------------------------------------------
st.title("Provenance")
names = ui.picked()
run = None
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
        trust = stamps["trust"] if "trust" in stamps else pd.Series([None] * len(stamps))
        dev = int(((stamps["status"] == "Trusted") & (trust == "development root")).sum())
        if dev:
            st.caption(f"{dev} stamp(s) are Trusted (development root): checked at stamp time against the root "
                       "the identity made itself, which vouches for no one else. Verifiers decide with their own "
                       "trust anchors.")
        view = pd.DataFrame({
            "image": stamps["image_id"],
            "status": [_words(s, t).split(":")[0] if s == "Trusted" else s for s, t in zip(stamps["status"], trust,
                                                                                             strict=True)],
            "failures": ["; ".join(ui.plain(c) for c in codes) if codes is not None and len(codes) else ""
                         for codes in stamps["failure_codes"]],
            "watermark": stamps["watermark"],
            "payload": stamps["payload"],
            "format": stamps["format"],
            "stamped file": stamps["stamped_path"],
        })
        st.dataframe(view, hide_index=True, width="stretch")
        problems = view[stamps["status"].isin(["Invalid", "none"]).to_numpy() | (view["failures"] != "")]
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
st.caption(f"Any image (or other file C2PA reads) up to {MAX_UPLOAD_MB} MB. It is written to a temporary folder "
           "for the check and deleted right after; nothing is stored.")
store_path, store_note = run_store(run) if run is not None else (None, "Pick a run to look for stripped credentials "
                                                                         "in the manifest store it was stamped with.")
st.caption(ui.md(store_note))
with st.expander("What the conclusions mean"):
    for name, words in verdicts.CONCLUSIONS.items():
        st.markdown(f"- **{ui.md(name)}**: {ui.md(words)}")
upload = st.file_uploader("File to verify", type=TYPES, max_upload_size=MAX_UPLOAD_MB, key="verify_upload")
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
            results = verify_paths([target], trust_anchors=trust, store=store_path, default_store=False)
        except Exception as e:  # a bad file must give a message, never a crash of the page
            st.error(f"Could not verify {ui.md(upload.name)}: {ui.md(e)}")
            st.stop()
    st.markdown(f"**{ui.md(upload.name)}**")
    for result in results:
        show_result(result.to_dict())
