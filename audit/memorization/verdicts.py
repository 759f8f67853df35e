"""The memorization verdicts, defined once: their names, their order, and which of them count as a hit.

Every table, summary, report and dashboard view reads these (``matches.verdict``, the ``rates`` counts,
``run.json``'s memorization stage, ``index query``), so a number printed in one place is the number
printed in every other.

- ``memorized``: aligned, the pixels agree closely over most of both images (a copy, possibly re-encoded,
  resized, cropped by a few percent, shifted, slightly rotated, mirrored, recoloured or captioned);
- ``near_duplicate``: aligned, the pixels agree by looser thresholds (a visibly altered copy, e.g. an
  img2img output at low strength); a hit as well;
- ``unconfirmed``: a hash candidate whose pixels do not agree (or that shows too little of its training
  image): not a hit;
- ``degenerate``: the query or the training image has almost no texture (one colour, faint noise, a
  gradient): its hash and pixels would match any other such image, so nothing can be said; not a hit;
- ``unavailable``: the training image could not be read again to confirm it: not a hit.

An image's verdict is its best candidate's (``best``); an image is *matched* when that verdict is a hit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

MEMORIZED = "memorized"
NEAR_DUPLICATE = "near_duplicate"
UNCONFIRMED = "unconfirmed"
DEGENERATE = "degenerate"
UNAVAILABLE = "unavailable"

#: Best first.
ORDER = (MEMORIZED, NEAR_DUPLICATE, UNCONFIRMED, UNAVAILABLE, DEGENERATE)
HITS = frozenset({MEMORIZED, NEAR_DUPLICATE})
HELP = {
    MEMORIZED: "a copy: aligned, the pixels agree closely over most of both images",
    NEAR_DUPLICATE: "a near-copy: aligned, the pixels agree by looser thresholds",
    UNCONFIRMED: "the hash matched but the pixels do not (or too little of the training image is shown)",
    DEGENERATE: "almost no texture (flat colour, faint noise, a gradient): nothing can be said",
    UNAVAILABLE: "the training image could not be read again to confirm the hash match",
}


def is_hit(verdict: str | None) -> bool:
    """Whether a verdict counts as a memorization hit (``memorized`` or ``near_duplicate``)."""
    return verdict in HITS


def rank(verdict: str | None) -> int:
    """Position in ``ORDER`` (unknown names last)."""
    return ORDER.index(verdict) if verdict in ORDER else len(ORDER)


def best(verdicts: Iterable[str | None]) -> str | None:
    """The best of several candidates' verdicts (None for none)."""
    found = [v for v in verdicts if v is not None]
    return min(found, key=rank) if found else None


def image_verdicts(matches: pd.DataFrame) -> pd.Series:
    """Each image's verdict (its best candidate's), indexed by ``image_id``, from a matches table."""
    import pandas as pd

    if matches.empty:
        return pd.Series(dtype=object)
    return matches.groupby("image_id")["verdict"].agg(best)


def image_counts(matches: pd.DataFrame, degenerate: Iterable[str] = ()) -> dict[str, int]:
    """Image counts by verdict: the numbers ``rates``, ``run.json``, the report and the dashboard all show.
    ``matched_images`` (hits) = ``memorized_images`` + ``near_duplicate_images``; ``degenerate_images``
    counts images flagged degenerate (``degenerate``: with or without a candidate), never matched."""
    v = image_verdicts(matches)
    flagged = set(degenerate) | set(v.index[v == DEGENERATE])
    return {"matched_images": int(v.map(is_hit).sum()), "memorized_images": int((v == MEMORIZED).sum()),
            "near_duplicate_images": int((v == NEAR_DUPLICATE).sum()), "degenerate_images": len(flagged),
            "candidates": len(matches)}
