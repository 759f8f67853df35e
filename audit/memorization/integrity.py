"""``diffaudit index info --check``: is every shard of an index what ``meta.json`` says it is?

A shard is three files written before ``meta.json`` names it (``codes/``, ``idents/``, ``items/``). Damage
(two writers interleaved before indexes had a lock, a file copied over from another index, a disk error)
shows as files that disagree with each other or with the meta: counts that differ, identities that are not
the items', an item indexed twice, or codes that are not the hash of the image their item row names. The
last is checked on a sample of items whose source files are still there, by hashing them again.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.memorization.index import ITEMS, Index, identities
from diffaudit.errors import DiffauditError

SAMPLE = 8  # items re-hashed per shard
MAX_LISTED = 20  # problems listed in full (the rest are counted)


def _origin(unit: str) -> str:
    """The hash parquet (or tar shard) a shard's unit id names: ``kind:path:size:mtime`` -> ``path``."""
    kind, _, rest = unit.partition(":")
    if kind in ("hashes", "tar"):
        return rest.rsplit(":", 2)[0]
    return ""


def _load_npy(path) -> np.ndarray:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != np.uint64 or arr.ndim != 1:
        raise ValueError(f"holds {arr.dtype} of shape {arr.shape}, not a vector of uint64")
    return arr


def _recompute(hasher, row: dict[str, Any]) -> list[int] | None:
    """The code of one item hashed again from its source (with and without JPEG draft decoding, as
    ``--exact`` builds and default builds hash), or None when the source cannot be read now."""
    from audit.memorization.hashing import square_crop
    from audit.memorization.sources import NoSuchImageFile, SkipImage, decode_image

    source, member, offset, size = row["source"], row["member"], row["offset"], row["size"]
    if not source:
        return None
    try:
        if member is None:
            data: bytes | str = source
        elif offset is not None and size is not None and str(source).endswith(".tar"):
            with open(source, "rb") as f:
                f.seek(int(offset))
                data = f.read(int(size))
        else:
            return None  # a member of a compressed tar: reading it back means streaming the whole shard
        codes = []
        for draft in (hasher.draft, None) if hasher.draft else (None,):
            img = decode_image(data, draft=draft)
            if row["variant"] == "square":
                img = square_crop(img)
            codes.append(hasher.hash_image(img))
        return codes
    except (SkipImage, NoSuchImageFile, OSError):
        return None


def check_index(index: Index, *, sample: int = SAMPLE, seed: int = 0) -> dict[str, Any]:
    """Check every shard of ``index``; returns ``ok``, the problems found and what was checked.

    Per shard: its three files exist and load; codes, items and identities each hold the shard's count
    of rows; the identities are those of its items; ``sample`` items with a readable source hash again to
    their stored code (not in shards read from a hash parquet: how those codes were made is not known).
    Across shards: names and units are unique, no item is indexed twice, and the meta's count is the sum
    of the shards'. Files no shard names (a killed build's last shard) are listed as
    ``orphans``: a rerun overwrites them, so they are no damage."""
    from audit.memorization.hashing import get_hasher

    problems: list[str] = []
    shards = index.meta["shards"]
    rng = np.random.default_rng(seed)
    hasher = get_hasher(index.hash_name)
    rehash = sample > 0 and index.meta.get("hash_version", hasher.version) == hasher.version
    rehashed = differed = unreadable = 0
    names = [s["name"] for s in shards]
    for what, values in (("shard name", names), ("unit", [s["unit"] for s in shards])):
        dup = sorted(v for v, n in Counter(values).items() if n > 1)
        if dup:
            problems.append(f"meta.json names the {what}(s) {dup[:3]} more than once")
    total = sum(int(s["count"]) for s in shards)
    if total != index.count:
        problems.append(f"meta.json says {index.count} codes but its shards hold {total}")
    seen: list[np.ndarray] = []
    for s in shards:
        name, count = s["name"], int(s["count"])
        where = f"shard {name}"
        try:
            codes = _load_npy(index.root / "codes" / f"{name}.npy")
            idents = _load_npy(index.root / "idents" / f"{name}.npy")
            table = pq.read_table(index.root / "items" / f"{name}.parquet")
        except (OSError, ValueError, pa.ArrowException) as e:
            problems.append(f"{where}: a file is missing or unreadable ({str(e).splitlines()[0]})")
            continue
        if not set(ITEMS.names) <= set(table.column_names):
            problems.append(f"{where}: items lack the columns {sorted(set(ITEMS.names) - set(table.column_names))}")
            continue
        items = table.select(ITEMS.names).to_pandas()
        lengths = {"codes": len(codes), "items": len(items)}
        if any(n != count for n in lengths.values()):
            problems.append(f"{where}: meta.json says {count} items but it holds "
                            + ", ".join(f"{n} {k}" for k, n in lengths.items()))
            continue
        expected = identities(items, _origin(s["unit"]))
        if len(np.unique(expected)) != len(expected):
            problems.append(f"{where}: {len(expected) - len(np.unique(expected))} item(s) appear twice")
        if not np.array_equal(np.asarray(idents), np.unique(expected)):
            problems.append(f"{where}: its identities are not those of its items (the files come from "
                            "different builds)")
        seen.append(np.unique(expected))
        if not rehash or s["unit"].startswith("hashes:"):  # a hash parquet's codes are the user's, not ours
            continue
        rows = table.select(ITEMS.names).to_pylist()  # None, not NaN, where a cell is empty
        with_source = [i for i, r in enumerate(rows) if r["source"]]
        picked = rng.choice(with_source, size=min(sample, len(with_source)), replace=False) if with_source else []
        done, off = 0, []  # (item, bits from the fresh hash)
        for i in map(int, picked):
            again = _recompute(hasher, rows[i])
            if again is None:
                unreadable += 1
                continue
            done += 1
            stored = int(codes[i])
            if stored not in again:
                off.append((i, min(bin(stored ^ c).count("1") for c in again)))
        rehashed += done
        differed += len(off)
        if off:
            i, bits = off[0]
            problems.append(f"{where}: {len(off)} of {done} sampled codes are not the hash of their item's image "
                            f"(item {i}, {rows[i]['source']}: {bits} bits off); the shard is damaged, or its "
                            "files changed since they were indexed")
    if seen:
        allid = np.concatenate(seen)
        twice = len(allid) - len(np.unique(allid))
        if twice:
            problems.append(f"{twice} item(s) are indexed in more than one shard")
    named = set(names)
    orphans = sorted(f"{d}/{p.name}" for d in ("codes", "idents", "items") if (index.root / d).is_dir()
                     for p in (index.root / d).iterdir() if p.name.split(".")[0] not in named
                     and not p.name.startswith("."))
    return {"ok": not problems, "shards": len(shards), "problems": problems[:MAX_LISTED],
            "more_problems": max(0, len(problems) - MAX_LISTED), "rehashed": rehashed, "differed": differed,
            "source_unreadable": unreadable, "rehash_skipped": None if rehash else
            ("--sample 0" if sample <= 0 else "the index was built by another version of its hash"),
            "orphans": orphans}


class IndexDamaged(DiffauditError):
    """``index info --check`` found damage (exit code 1: the command ran, the index failed its check)."""

    exit_code = 1
