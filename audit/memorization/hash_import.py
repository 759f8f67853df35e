"""Import precomputed hashes from parquet at full speed: column-wise with pyarrow and numpy, no per-row Python.

Users of LAION-scale sets already hold a pHash per image in parquet files. A hash parquet has a ``key``
column, a hash column (``<hash name>``, ``hash`` or ``code``: 16 hex digits, optionally ``0x``-prefixed, in
any case, or an integer column: uint64 as is, int64 as its two's-complement bits), and optionally ``uri``
(or ``url``/``URL``) and ``caption`` (or ``text``/``TEXT``). Rows whose hash is null or not 16 hex digits
are counted as ``skipped_bad_hash``, rows without a key as ``skipped_no_key``.

Item identities (what lets a rebuild skip what is indexed) are hashed here too, column-wise
(``string_hash64``): a Python ``hashlib`` call per row cost ~3-12 us, far more than the rest of the import.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffaudit.errors import InputError

URI_COLUMNS = ("uri", "url", "URL")
CAPTION_COLUMNS = ("caption", "text", "TEXT")
ROWS_PER_STEP = 1 << 20          # hex parsing works on blocks of this many rows (bounded temporaries)

_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_K = np.uint64(0x9E3779B97F4A7C15)
_SEED = np.uint64(0x6469666661756474)  # "diffaudt"
_MASKS = np.asarray([0] + [(1 << (8 * i)) - 1 for i in range(1, 8)] + [2**64 - 1], dtype=np.uint64)
_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection that mixes every bit into every bit), in place."""
    h ^= h >> np.uint64(33)
    h *= _M1
    h ^= h >> np.uint64(33)
    h *= _M2
    h ^= h >> np.uint64(33)
    return h


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, data padded with 8 zero bytes) of a string or binary array without nulls."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        off_type = np.int64
    elif pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        off_type = np.int32
    else:
        raise TypeError(f"not a string array: {arr.type}")
    _, offs, data = arr.buffers()
    width = np.dtype(off_type).itemsize
    offsets = np.frombuffer(offs, off_type, count=len(arr) + 1, offset=arr.offset * width).astype(np.int64)
    raw = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    padded = np.zeros(len(raw) + 8, np.uint8)
    padded[:len(raw)] = raw
    return offsets, padded


def string_hash64(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string's UTF-8 bytes, computed 8 bytes at a time across all rows at once.

    Per row: ``h = seed ^ len * K``; for each 8-byte little-endian word ``w`` (the last one zero-padded):
    ``h = fmix64(h ^ w) * K``; finally ``fmix64(h ^ len)``. Not cryptographic: an identity for
    de-duplication, as the 64-bit blake2b it replaces was (its birthday bound is the same)."""
    offsets, padded = _buffers(pc.fill_null(arr, ""))
    lengths = offsets[1:] - offsets[:-1]
    n = len(lengths)
    # words[i] = the 8 bytes starting at byte i (an unaligned, overlapping view: no copy)
    words = np.ndarray((max(len(padded) - 7, 0),), dtype="<u8", buffer=padded, strides=(1,))
    order = np.argsort(-lengths, kind="stable")
    lens = lengths[order]
    starts = offsets[:-1][order]
    h = _SEED ^ (lens.astype(np.uint64) * _K)
    n_words = int((lens[0] + 7) // 8) if n else 0
    for j in range(n_words):
        c = int(np.searchsorted(-lens, -8 * j, side="left"))  # rows longer than 8 * j bytes come first
        if not c:
            break
        rem = np.minimum(lens[:c] - 8 * j, 8)
        w = words[starts[:c] + 8 * j] & _MASKS[rem]
        part = h[:c]
        part ^= w
        _fmix(part)
        part *= _K
    h ^= lens.astype(np.uint64)
    _fmix(h)
    out = np.empty(n, np.uint64)
    out[order] = h
    return out


def fast_identities(where: pa.Array, member: pa.Array, variant: pa.Array) -> np.ndarray:
    """``string_hash64`` of ``where \\0 member \\0 variant``: the identity of items that no image file holds."""
    text = pc.binary_join_element_wise(pc.fill_null(where, ""), pc.fill_null(member, ""),
                                       pc.fill_null(variant, ""), "\0")
    return string_hash64(text)


def _strings(col: pd.Series) -> pa.Array:
    """A string array from an item column (object or Arrow-backed); anything not a string becomes null."""
    try:
        return pa.array(col, type=pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if isinstance(v, str) else None for v in col], type=pa.string())


def item_where(items: pd.DataFrame, origin: str) -> pa.Array:
    """What identifies a source-less item: its ``uri``, else ``origin#key``."""
    uri = pc.fill_null(_strings(items["uri"]), "")
    key = pc.fill_null(_strings(items["key"]), "")
    alt = pc.binary_join_element_wise(pa.scalar(origin), key, "#")
    return pc.if_else(pc.greater(pc.binary_length(uri), 0), uri, alt)


# -- parsing hash columns ----------------------------------------------------------------------
def hex_codes(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, valid) from 16-digit hex strings (surrounding spaces and a ``0x`` prefix allowed)."""
    if not pc.all(pc.equal(pc.binary_length(arr), 16)).as_py():  # rarely: trim, drop 0x (else all 16 digits)
        arr = pc.utf8_trim_whitespace(arr)
        arr = pc.if_else(pc.starts_with(pc.fill_null(arr, ""), "0x"), pc.utf8_slice_codeunits(arr, 2), arr)
    valid = np.asarray(pc.fill_null(pc.equal(pc.binary_length(arr), 16), False), dtype=bool)
    codes = np.zeros(len(valid), np.uint64)
    rows = np.flatnonzero(valid)
    offsets, padded = _buffers(arr.filter(pa.array(valid)))  # contiguous: 16 bytes per row
    for a in range(0, len(rows), ROWS_PER_STEP):
        b = min(a + ROWS_PER_STEP, len(rows))
        block = padded[offsets[a]:offsets[b]].reshape(-1, 16)
        nib = _NIBBLE[block]
        ok = (nib < 16).all(axis=1)
        packed = (nib[:, 0::2] << 4) | nib[:, 1::2]  # 8 bytes, most significant first
        r = rows[a:a + ROWS_PER_STEP]
        codes[r] = np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)
        valid[r[~ok]] = False
    codes[~valid] = 0
    return codes, valid


def int_codes(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, valid) from an integer column: uint64 as is, signed integers as their 64-bit two's complement."""
    valid = np.asarray(pc.is_valid(arr), dtype=bool)
    target = pa.uint64() if pa.types.is_unsigned_integer(arr.type) else pa.int64()
    values = pc.fill_null(pc.cast(arr, target), 0).to_numpy(zero_copy_only=False)
    return values.astype(values.dtype, copy=False).view(np.uint64).copy(), valid


def _pick(cols: list[str], names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in cols), None)


def _typed_nulls(n: int, typ: pa.DataType) -> pd.Series:
    return pd.Series(pd.arrays.ArrowExtensionArray(pa.nulls(n, typ)))


def read_hash_parquet(path: str, hash_name: str) -> tuple[np.ndarray, pd.DataFrame, Counter]:
    """Codes and item rows (``index.ITEMS`` columns, Arrow-backed) of a hash parquet, and its counts."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    cols = schema.names
    col = _pick(cols, (hash_name, "hash", "code"))
    if "key" not in cols or col is None:
        raise InputError(f"{path}: a hash parquet needs a 'key' column and a '{hash_name}', 'hash' or "
                         f"'code' column (16-digit hex or integer); it has {cols}")
    typ = schema.field(col).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)):
        raise InputError(f"{path}: column {col!r} holds {typ}; hashes must be 16-digit hex strings or "
                         "uint64/int64 integers")
    uri_col, cap_col = _pick(cols, URI_COLUMNS), _pick(cols, CAPTION_COLUMNS)
    try:
        table = pq.read_table(path, columns=[c for c in ("key", col, uri_col, cap_col) if c])
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path} is not a readable parquet file of hashes ({str(e).splitlines()[0]})") from None
    counts: Counter = Counter(seen=table.num_rows)
    values = table.column(col)
    codes, valid = int_codes(values) if pa.types.is_integer(typ) else hex_codes(values)
    bad = int((~valid).sum())
    key = pc.cast(table.column("key"), pa.string())
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(key)), 0)  # a match would name no training image
    has_key = np.asarray(pc.fill_null(pc.invert(blank), False), dtype=bool)
    if bad:
        counts["skipped_bad_hash"] += bad
    if (~has_key & valid).any():
        counts["skipped_no_key"] += int((~has_key & valid).sum())
    keep = valid & has_key
    mask = pa.array(keep)
    n = int(keep.sum())

    def column(name: str | None) -> pa.Array:
        if name is None:
            return pa.nulls(n, pa.string())
        arr = table.column(name).filter(mask)
        return pc.cast(arr, pa.string()).combine_chunks() if arr.num_chunks else pa.array([], pa.string())

    uri = column(uri_col)
    # an item's source is its uri when that names a file here (a URL never does; only local paths are looked at)
    local = np.flatnonzero(np.asarray(pc.fill_null(pc.and_(pc.greater(pc.binary_length(uri), 0),
                                                           pc.invert(pc.match_substring(uri, "://"))), False)))
    source = np.full(n, None, object)
    if len(local):
        paths = uri.take(pa.array(local)).to_pylist()
        source[local] = [p if os.path.isfile(p) else None for p in paths]
    items = pd.DataFrame({
        "key": pd.arrays.ArrowExtensionArray(column("key")),
        "uri": pd.arrays.ArrowExtensionArray(uri),
        "caption": pd.arrays.ArrowExtensionArray(column(cap_col)),
        "source": pd.arrays.ArrowExtensionArray(pa.array(source, pa.string())),
        "member": _typed_nulls(n, pa.string()),
        "offset": _typed_nulls(n, pa.int64()),
        "size": _typed_nulls(n, pa.int64()),
        "variant": pd.arrays.ArrowExtensionArray(pa.array(np.full(n, "full", object), pa.string())),
    })
    return codes[keep], items, counts
