"""Hash-parquet import (audit.memorization.hash_import): column-wise parsing that agrees with the per-row
rules it replaces, identities that make a rebuild add nothing twice, and one-line errors."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.memorization.build import build_index
from audit.memorization.hash_import import hex_codes, int_codes, string_hash64
from audit.memorization.hashing import from_hex
from audit.memorization.index import Index, identities, identity
from diffaudit.errors import InputError

MASK = (1 << 64) - 1


def reference_hash(text: str) -> int:
    """``string_hash64`` of one string, written out per byte (the definition the vectorised code follows)."""
    def fmix(h: int) -> int:
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & MASK
        h ^= h >> 33
        h = (h * 0xC4CEB9FE1A85EC53) & MASK
        return h ^ (h >> 33)

    data, k = text.encode(), 0x9E3779B97F4A7C15
    h = 0x6469666661756474 ^ ((len(data) * k) & MASK)
    for j in range(0, len(data), 8):
        h = (fmix(h ^ int.from_bytes(data[j:j + 8].ljust(8, b"\0"), "little")) * k) & MASK
    return fmix(h ^ len(data))


def test_string_hash_matches_its_definition_on_every_length():
    rng = np.random.default_rng(0)
    texts = ["", "a", "ab", "abcdefg", "abcdefgh", "abcdefghi", "é" * 13, "日本語のキャプション", "x" * 1000]
    texts += ["".join(chr(c) for c in rng.integers(32, 0x2FF, int(n))) for n in rng.integers(0, 40, 200)]
    expected = [reference_hash(t) for t in texts]
    assert string_hash64(pa.array(texts)).tolist() == expected
    assert string_hash64(pa.array(texts, pa.large_string())).tolist() == expected
    chunked = pa.chunked_array([pa.array(texts[:50]), pa.array(texts[50:])])
    assert string_hash64(chunked).tolist() == expected
    assert string_hash64(pa.array(["zz", *texts]).slice(1)).tolist() == expected  # an offset array
    assert string_hash64(pa.array([None, ""])).tolist() == [reference_hash("")] * 2
    assert len(set(expected)) == len(set(texts))


def test_hex_and_integer_columns_parse_as_the_per_row_rules_did():
    good = ["00000000000000ff", "FFFFFFFFFFFFFFFF", " 0123456789abcdef ", "0xfedcba9876543210", "8000000000000000"]
    bad = ["123", "zzzzzzzzzzzzzzzz", "0123456789abcdef0", None, ""]
    codes, valid = hex_codes(pa.array(good + bad))
    assert valid.tolist() == [True] * len(good) + [False] * len(bad)
    assert codes[:len(good)].tolist() == [from_hex(t.strip().removeprefix("0x")) for t in good]
    ints = [-1, 0, 5, -(2**63), 2**63 - 1, None]
    codes, valid = int_codes(pa.array(ints, pa.int64()))
    assert valid.tolist() == [True] * 5 + [False]
    assert codes[:5].tolist() == [v & MASK for v in ints[:5]]
    codes, valid = int_codes(pa.array([2**64 - 1, 7], pa.uint64()))
    assert codes.tolist() == [2**64 - 1, 7] and valid.all()
    codes, _ = int_codes(pa.array([-2, 3], pa.int32()))
    assert codes.tolist() == [(-2) & MASK, 3]


def write(path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_import_keeps_keys_uris_captions_and_counts_bad_rows(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2**64 - 1, 6, dtype=np.uint64)
    hexes = [format(int(c), "016x") for c in codes]
    hexes[2] = "not a hash"
    keys = ["k0", "k1", "k2", None, "k4", "k5"]
    a = write(tmp_path / "a.parquet", key=keys, phash=hexes, URL=[f"https://laion.example/{i}.jpg" for i in range(6)],
              TEXT=[f"caption {i}" for i in range(6)])
    b = write(tmp_path / "b.parquet", key=pa.array([10, 11]), hash=pa.array(codes[:2].view(np.int64)))
    summary = build_index([a, b], str(tmp_path / "idx"), progress=False, workers=1)
    assert summary["counts"] == {"indexed": 6, "seen": 8, "skipped_bad_hash": 1, "skipped_no_key": 1}
    index = Index.open(tmp_path / "idx")
    assert np.asarray(index.codes).tolist() == [int(codes[i]) for i in (0, 1, 4, 5, 0, 1)]
    items = index.items(np.arange(index.count))
    assert items["key"].tolist() == ["k0", "k1", "k4", "k5", "10", "11"]
    assert items["uri"].tolist()[:4] == [f"https://laion.example/{i}.jpg" for i in (0, 1, 4, 5)]
    assert items["caption"].tolist()[:4] == [f"caption {i}" for i in (0, 1, 4, 5)]
    assert pd.isna(items["uri"].iloc[4]) and items["source"].isna().all() and (items["variant"] == "full").all()
    assert items[["member", "offset", "size"]].isna().all().all()
    found = index.search(codes[[4]], 0)
    assert index.items(found[1])["key"].tolist() == ["k4"]


def test_reimport_adds_nothing_and_overlapping_files_add_only_new_rows(tmp_path):
    rng = np.random.default_rng(2)
    n = 5000
    codes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    urls = [f"https://laion.example/img/{i}.jpg" for i in range(n)]
    first = write(tmp_path / "part0.parquet", key=[str(i) for i in range(n)], phash=pa.array(codes),
                  url=urls)
    out = str(tmp_path / "idx")
    assert build_index([first], out, progress=False, workers=1)["count"] == n
    os.utime(first, (1, 1))  # the unit changed: read again, but every row is already indexed
    again = build_index([first], out, progress=False, workers=1)
    assert again["count"] == n and again["counts"]["skipped_already_indexed"] == n
    # another export holding half the same images (same URLs) and new ones
    second = write(tmp_path / "part1.parquet", key=[f"b{i}" for i in range(n)], phash=pa.array(codes),
                   url=urls[n // 2:] + [f"https://laion.example/new/{i}.jpg" for i in range(n // 2)])
    grown = build_index([first, second], out, progress=False, workers=1)
    assert grown["count"] == n + n // 2 and grown["counts"]["skipped_already_indexed"] == n // 2
    # rows without a uri are told apart by file and key
    third = write(tmp_path / "part2.parquet", key=["x", "y"], phash=pa.array(codes[:2]))
    fourth = write(tmp_path / "part3.parquet", key=["x", "y"], phash=pa.array(codes[:2]))
    assert build_index([third, fourth], out, progress=False, workers=1)["count"] == n + n // 2 + 4


def test_a_row_naming_an_indexed_local_file_is_that_file(tmp_path):
    """A hash row whose uri is a file here takes the file's identity (per row, as before), so a folder
    indexed by hashing and the same files imported from a hash parquet are one image each."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(3):
        p = folder / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        paths.append(str(p.resolve()))
    out = str(tmp_path / "idx")
    built = build_index([str(folder)], out, progress=False, workers=1, square=False)
    codes = np.asarray(Index.open(out).codes)
    hp = write(tmp_path / "h.parquet", key=["a", "b", "c", "d"], phash=pa.array([*codes, np.uint64(1)]),
               uri=[*paths, "https://elsewhere.example/d.jpg"])
    after = build_index([hp], out, progress=False, workers=1)
    assert after["count"] == built["count"] + 1 and after["counts"]["skipped_already_indexed"] == 3
    items = pd.DataFrame({"key": ["a"], "uri": [paths[0]], "caption": [None], "source": [paths[0]],
                          "member": [None], "offset": [None], "size": [None], "variant": ["full"]})
    assert identities(items).tolist() == [identity(paths[0], None, "full")]


def test_bad_hash_parquets_are_one_line_errors(tmp_path):
    floats = write(tmp_path / "f.parquet", key=["a"], phash=pa.array([1.5]))
    with pytest.raises(InputError, match="16-digit hex strings or uint64/int64"):
        build_index([floats], str(tmp_path / "i1"), progress=False, workers=1)
    nokey = write(tmp_path / "n.parquet", id=["a"], phash=["00000000000000ff"])
    with pytest.raises(InputError, match="needs a 'key' column"):
        build_index([nokey], str(tmp_path / "i2"), progress=False, workers=1)


def test_a_truncated_hash_parquet_is_a_one_line_error(tmp_path):
    good = write(tmp_path / "g.parquet", key=[str(i) for i in range(1000)],
                 phash=[format(i, "016x") for i in range(1000)])
    data = open(good, "rb").read()
    broken = tmp_path / "b.parquet"
    broken.write_bytes(data[:200] + data[-300:])  # the footer survives, the column chunks do not
    with pytest.raises(InputError, match="not a readable parquet"):
        build_index([str(broken)], str(tmp_path / "idx"), progress=False, workers=1)
