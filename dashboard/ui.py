"""Small pieces the pages share: the picked runs, number formats, plain words for failure codes,
image grids. Rendering only; data comes from ``dashboard.data``."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import pandas as pd
import streamlit as st

from dashboard import data, thumbs
from diffaudit.errors import DiffauditError
from diffaudit.runs import Run
from diffaudit.schema import schema_for

PICKED = "picked_runs"

# C2PA validation status codes (C2PA 2.x specification, section "Validation") in plain words.
C2PA_CODES: dict[str, str] = {
    "claimSignature.mismatch": "the signature does not match the claim: the credentials were altered",
    "claimSignature.missing": "the claim has no signature",
    "claimSignature.insideValidity": "signed while the certificate was valid",
    "claimSignature.outsideValidity": "signed outside the certificate's validity period",
    "signingCredential.untrusted": "signed by a certificate outside your trust anchors",
    "signingCredential.invalid": "the signing certificate is malformed or not allowed to sign",
    "signingCredential.revoked": "the signing certificate was revoked",
    "signingCredential.expired": "the signing certificate has expired",
    "assertion.dataHash.mismatch": "the image bytes changed after signing (edited, re-encoded or cropped)",
    "assertion.boxesHash.mismatch": "the file's boxes changed after signing",
    "assertion.bmffHash.mismatch": "the media data changed after signing",
    "assertion.hashedURI.mismatch": "an assertion changed after signing",
    "assertion.missing": "an assertion the claim lists is missing",
    "assertion.multipleHardBindings": "the claim binds the content more than once",
    "assertion.undeclared": "the manifest holds an assertion its claim does not list",
    "assertion.inaccessible": "an assertion could not be read",
    "assertion.action.ingredientMismatch": "an action names an ingredient that is not there",
    "ingredient.hashedURI.mismatch": "an ingredient's manifest changed after signing",
    "manifest.inaccessible": "the manifest could not be read",
    "manifest.missing": "the file carries no content credentials",
    "manifest.multipleParents": "the manifest lists more than one parent",
    "claim.missing": "the manifest holds no claim",
    "claim.malformed": "the claim is malformed",
    "timeStamp.mismatch": "the time stamp does not match the signature",
    "timeStamp.outsideValidity": "the time stamp is outside the certificate's validity",
    "general.error": "the validator failed on this file",
}


_MARKDOWN = re.compile(r"([\\`*\[\]!<>$~|#])")


def md(value: object) -> str:
    """Text from a table or an uploaded file, escaped so that Streamlit's markdown (st.markdown,
    captions, st.table cells) shows it literally: no links, remote images, HTML or math from data."""
    return _MARKDOWN.sub(r"\\\1", str(value))


def md_table(df: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """``df`` with the text ``columns`` that come from data escaped with :func:`md`, for ``st.table``
    (which renders markdown in cells); the figures the page formats itself stay as they are."""
    return df.assign(**{c: df[c].map(md) for c in columns})


def plain(code: str) -> str:
    """A C2PA failure code followed by what it means (codes we do not know are shown as they are)."""
    base = code.split(":")[0].strip()
    words = C2PA_CODES.get(base)
    return f"{code}: {words}" if words else code


MISSING = "n/a"  # not "-": a lone dash in a table cell renders as a markdown bullet


def interval(low: float | None, high: float | None, digits: int = 2) -> str:
    """``[0.12, 0.34]``, or ``n/a`` when either end is missing."""
    if low is None or high is None or _nan(low) or _nan(high):
        return MISSING
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def number(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None or _nan(value) else f"{value:.{digits}f}"


def _nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def picked() -> list[str]:
    """The runs picked in the sidebar (one to review, two to compare), in picking order."""
    return list(st.session_state.get(PICKED) or [])


def current_run(position: int = 0) -> Run:
    """The picked run at ``position``; stops the page with a hint when there is none."""
    names = picked()
    if len(names) <= position:
        st.info("Pick a run in the sidebar." if position == 0 else "Pick a second run in the sidebar.")
        st.stop()
    try:
        return data.open_run(names[position])
    except DiffauditError as e:
        st.error(str(e))
        st.stop()
    raise AssertionError("unreachable")  # st.stop() raises


def table(run: Run, name: str) -> pd.DataFrame:
    """``data.table``, with a table that fails its schema check reported on the page (and read as empty)
    instead of breaking the page."""
    try:
        return data.table(run, name)
    except DiffauditError as e:
        st.error(f"{name}: {e}")
        return pd.DataFrame(columns=schema_for(name).names)


def missing_stage(what: str, command: str) -> None:
    st.info(f"This run has no {what} yet. Run `{command}` and reload.")


def image_grid(run: Run, paths: Iterable[str | None], captions: Iterable[str], width: int = 180) -> None:
    """Thumbnails in one wrapping grid (one element, so a page of 24 renders at once); a path that
    leaves the run is refused and said so, never opened."""
    thumbs_, shown = [], []
    for rel, caption in zip(paths, captions, strict=True):
        thumb = _thumb_or_reason(run, rel, caption)
        if thumb is not None:
            thumbs_.append(thumb)
            shown.append(md(caption))
    if thumbs_:
        st.image(thumbs_, caption=shown, width=width)


def show_image(run: Run, rel: str | None, caption: str) -> None:
    """One thumbnail with a caption, or a one-line reason why it cannot be shown."""
    thumb = _thumb_or_reason(run, rel, caption)
    if thumb is not None:
        st.image(thumb, caption=md(caption), width="stretch")


def _thumb_or_reason(run: Run, rel: str | None, caption: str):
    """The thumbnail, or None after saying on the page why it cannot be shown (refused or unreadable)."""
    try:
        thumb = thumbs.thumbnail(run, rel)
    except data.PathRefusedError as e:
        st.warning(f"{md(caption)}: {md(e)}")
        return None
    if thumb is None:
        st.caption(f"{md(caption)} (image missing or unreadable: {md(rel)})")
    return thumb


def first_with_reference(rows: pd.DataFrame, column: str, reference: str = "reference_share") -> list[str]:
    """The values of ``column`` (a probe, an attribute), those with a reference share first."""
    has = set(rows.loc[rows[reference].notna(), column])
    return sorted(rows[column].dropna().unique(), key=lambda a: (a not in has, a))
