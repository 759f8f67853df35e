"""Lazy thumbnails: made on first view, cached in memory (never written into a run), so a page of a
20k-image run decodes only the images it shows, once."""

from __future__ import annotations

import io
from pathlib import Path

import streamlit as st
from PIL import Image, UnidentifiedImageError

from dashboard import data
from diffaudit.imaging import max_pixels, to_8bit
from diffaudit.runs import Run

THUMB = 192


@st.cache_data(show_spinner=False, max_entries=4096)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """A JPEG thumbnail of ``path``; the mtime argument makes a rewritten file a new cache entry."""
    del mtime_ns
    with Image.open(path) as img:
        if img.width * img.height > max_pixels():  # the one pixel cap (diffaudit.imaging)
            raise UnidentifiedImageError(f"{img.width}x{img.height} is too large to preview")
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale
        img = to_8bit(img).convert("RGB")  # a 16-bit or float image scaled as viewers show it, not clipped white
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def thumbnail(run: Run, relative: str | None, size: int = THUMB) -> bytes | None:
    """The thumbnail of a file a table row names, or None when it is missing or unreadable.

    Raises ``data.PathRefusedError`` for a path that leaves the run (it is never opened)."""
    path: Path = data.run_file(run, relative)
    try:
        return _thumbnail(str(path), path.stat().st_mtime_ns, size)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
