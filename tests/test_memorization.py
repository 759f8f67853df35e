"""Memorization checks on real photos (scikit-image + scikit-learn), their transformed copies, tar shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zlib

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import skimage_photo
from PIL import Image, ImageEnhance

from audit.memorization import confirm as cf
from audit.memorization.build import build_index
from audit.memorization.check import check_run, search_images
from audit.memorization.hashing import get_hasher, square_crop, to_hex
from audit.memorization.index import Index, MultiIndexHash, flat_search
from audit.memorization.sources import load_train_image, plan
from diffaudit.errors import InputError
from diffaudit.runs import Run

PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text")
COPIES = ("jpeg50", "half", "crop5", "bright")


def sample_photo(name: str) -> Image.Image:
    """A photo from scikit-learn (china, flower) or scikit-image, at most 512 pixels a side (test speed)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = Image.fromarray(load_sample_image(f"{name}.jpg"))
    else:
        img = skimage_photo(name)
    img.thumbnail((512, 512), Image.Resampling.LANCZOS)
    return img


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def copy_of(img: Image.Image, kind: str) -> Image.Image:
    """The transformed copies the issue names: JPEG q50, half size, a 5% centre crop, brightness x1.2."""
    w, h = img.size
    if kind == "jpeg50":
        return Image.open(io.BytesIO(jpeg(img, 50)))
    if kind == "half":
        return img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    if kind == "crop5":
        return cf.center_crop(img, 0.95)
    return ImageEnhance.Brightness(img).enhance(1.2)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {n: sample_photo(n) for n in (*PHOTOS, "china", "flower")}


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, photos):
    """An index over every photo (JPEG q95) and its four copies (the q50 copy as saved, others q95)."""
    folder = tmp_path_factory.mktemp("train")
    for name, img in photos.items():
        (folder / f"{name}.jpg").write_bytes(jpeg(img, 95))
        for kind in COPIES:
            data = jpeg(img, 50) if kind == "jpeg50" else jpeg(copy_of(img, kind), 95)
            (folder / f"{name}__{kind}.jpg").write_bytes(data)
    out = tmp_path_factory.mktemp("idx") / "index"
    summary = build_index([str(folder)], str(out), workers=1, progress=False)
    return Index.open(out), summary


# -- hashes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, reference", [("phash", imagehash.phash), ("dhash", imagehash.dhash),
                                             ("whash", imagehash.whash)])
def test_hashes_are_bit_identical_to_imagehash(photos, name, reference):
    hasher = get_hasher(name)
    for img in list(photos.values())[:8]:
        for data in (jpeg(img, 90), jpeg(copy_of(img, "half"), 50)):
            expected = str(reference(Image.open(io.BytesIO(data))))
            codes, good, _ = hasher.hash_data([data], exact=True)
            assert to_hex(codes[0]) == expected
        assert to_hex(hasher.hash_image(img)) == str(reference(img))


def test_draft_decoding_stays_within_a_few_bits(photos):
    hasher = get_hasher("phash")
    data = [jpeg(img, q) for img in photos.values() for q in (95, 50)]
    fast, _, _ = hasher.hash_data(data)
    exact = np.asarray([int(str(imagehash.phash(Image.open(io.BytesIO(d)))), 16) for d in data], np.uint64)
    bits = np.bitwise_count(fast ^ exact)
    assert bits.max() <= 4 and bits.mean() <= 1.0 and (bits == 0).mean() >= 0.5


def test_parallel_hashing_equals_serial(tmp_path, photos):
    files = []
    for i in range(100):
        img = list(photos.values())[i % len(photos)]
        f = tmp_path / f"{i}.jpg"
        f.write_bytes(jpeg(img.resize((64, 64)), 80 + i % 10))
        files.append(str(f))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    files.insert(7, str(tmp_path / "bad.jpg"))
    hasher = get_hasher("phash")
    serial = hasher.hash_data(files)
    parallel = hasher.hash_files(files, workers=2)
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])
    assert parallel[2][7] == "not_image" and 7 not in parallel[1] and len(parallel[0]) == 100


# -- the index finds copies and nothing else ------------------------------------------------------
def test_index_finds_every_copy_and_confirms_it(photo_index, photos):
    index, summary = photo_index
    c = summary["counts"]
    assert c["indexed"] == len(photos) * 5 and summary["count"] == c["indexed"] + c["square_crops"]
    assert c["square_crops"] > 10  # the wide and tall photos and their copies
    keys = index.items(np.arange(index.count))["key"].tolist()
    found = search_images(index, list(photos.values()), 10)
    for (name, img), cands in zip(photos.items(), found, strict=True):
        hit = {keys[i].split("__")[0].removesuffix(".jpg") for i in cands["id"]}
        assert hit == {name}, f"{name} matched {hit}"
        assert {keys[i] for i in cands["id"]} == {f"{name}.jpg"} | {f"{name}__{k}.jpg" for k in COPIES}
        for i in cands["id"]:
            row = index.items([i]).iloc[0]
            c = cf.confirm(img, load_train_image(row["source"], None, None, None))
            assert c.verdict == "memorized", (keys[i], c)


def test_distinct_photos_never_match_or_confirm(photo_index, photos):
    index, _ = photo_index
    codes = np.asarray(index.codes)
    photo = index.items(np.arange(index.count))["key"].str.split("__").str[0].str.removesuffix(".jpg").to_numpy()
    d = np.bitwise_count(codes[:, None] ^ codes[None, :])
    assert d[photo[:, None] != photo[None, :]].min() > 10  # any code of one photo vs any code of another
    names = list(photos)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert cf.confirm(photos[names[a]], photos[names[b]]).verdict != "memorized", (names[a], names[b])


def test_multi_index_hashing_is_exact():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**64 - 1, size=100_000, dtype=np.uint64)
    base = codes[rng.integers(0, len(codes), 300)]
    flips = np.zeros(300, np.uint64)
    for i, k in enumerate(rng.integers(0, 16, 300)):  # neighbours at every distance 0..15
        for b in rng.choice(64, k, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(b)
    queries = np.concatenate([base ^ flips, rng.integers(0, 2**64 - 1, 50, dtype=np.uint64)])
    for m in (3, 4, 7):
        mih = MultiIndexHash.build(codes, m)
        for r in (0, 2, 10, 14):
            expected = flat_search(codes, queries, r)
            got = mih.search(queries, r)
            assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True)), (m, r)
            assert len(expected[0]) >= (np.bitwise_count(flips) <= r).sum()


def test_index_grows_resumes_and_persists_search_tables(tmp_path, photos):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i, (name, img) in enumerate(photos.items()):
        img.resize((96, 96)).save((a if i % 2 else b) / f"{name}.png")
    out = tmp_path / "idx"
    first = build_index([str(a)], str(out), progress=False)
    second = build_index([str(a), str(b)], str(out), progress=False)
    assert second["units_skipped"] == 1 and second["count"] == len(photos) > first["count"]
    index = Index.open(out)
    assert len(index.meta["shards"]) == 2 and isinstance(np.load(out / "codes" / "000000.npy", mmap_mode="r"),
                                                          np.memmap)
    hasher = get_hasher("phash")
    q = np.asarray([hasher.hash_image(photos["coffee"].resize((96, 96)))], np.uint64)
    ids, dists = index.topk(q, 3)
    assert index.items(ids[0])["key"].iloc[0] == "coffee.png" and dists[0, 0] == 0 and dists[0, 1] > 10
    mih = index.search(q, 10, method="mih")
    assert (out / "mih" / "tables.json").is_file()
    assert [np.array_equal(x, y) for x, y in zip(mih, index.search(q, 10, method="flat"), strict=True)] == [True] * 3

    # the cached tables are keyed on the shard list, not only the count: another index's tables are rebuilt
    other = tmp_path / "other"
    other.mkdir()
    for name, img in list(photos.items())[:len(photos)]:
        img.rotate(90).resize((96, 96)).save(other / f"{name}.png")
    assert build_index([str(other)], str(tmp_path / "idx2"), progress=False)["count"] == index.count
    shutil.rmtree(tmp_path / "idx2" / "mih", ignore_errors=True)
    shutil.copytree(out / "mih", tmp_path / "idx2" / "mih")
    index2 = Index.open(tmp_path / "idx2")
    got = index2.search(q, 64, method="mih")
    assert [np.array_equal(x, y) for x, y in zip(got, index2.search(q, 64, method="flat"), strict=True)] == [True] * 3


def test_rebuild_over_grown_sources_adds_only_the_new_images(tmp_path, photos):
    from audit.memorization.check import query_files

    folder = tmp_path / "photos"
    folder.mkdir()
    wide = ("astronaut", "coffee", "china", "flower")  # coffee, china and flower are wide: square variants too
    for name in wide[:3]:
        photos[name].save(folder / f"{name}.png")
    out = str(tmp_path / "idx")
    first = build_index([str(folder)], out, progress=False)
    photos[wide[3]].save(folder / f"{wide[3]}.png")
    added = build_index([str(folder / f"{wide[3]}.png")], str(tmp_path / "alone"), progress=False)["count"]
    second = build_index([str(folder)], out, progress=False)
    assert added == 2 and second["count"] == first["count"] + added
    assert second["counts"]["skipped_already_indexed"] == 3 and second["counts"]["indexed"] == 1
    [result] = query_files([str(folder / "coffee.png")], out, confirm_matches=False)
    found = [(m["key"], m["variant"]) for m in result["matches"]]
    assert ("coffee.png", "full") in found and len(found) == len(set(found))
    # a touched (mtime only) tar shard is read again, but none of its images is added twice
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    write_shard(shard, {n: photos[n] for n in wide}, evil=False)
    third = build_index([str(shard)], out, progress=False)
    os.utime(shard, (shard.stat().st_atime, shard.stat().st_mtime + 60))
    fourth = build_index([str(shard)], out, progress=False)
    assert third["count"] == second["count"] + 4 and fourth["units_skipped"] == 0
    assert fourth["count"] == third["count"] and fourth["counts"]["skipped_already_indexed"] == 4


def test_precomputed_hash_parquet(tmp_path, photos):
    hasher = get_hasher("phash")
    names = list(photos)[:5]
    pq.write_table(pa.table({"key": names, "hash": [to_hex(hasher.hash_image(photos[n])) for n in names],
                             "uri": [f"https://example.org/{n}.jpg" for n in names]}), tmp_path / "h.parquet")
    summary = build_index([str(tmp_path / "h.parquet")], str(tmp_path / "idx"), progress=False)
    index = Index.open(tmp_path / "idx")
    assert summary["count"] == 5
    cands = search_images(index, [photos[names[2]]], 0)[0]
    assert index.items(cands["id"])["uri"].tolist() == [f"https://example.org/{names[2]}.jpg"]


# -- tar shards -----------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bomb() -> bytes:
    """A tiny PNG whose header claims 100000 x 100000 pixels."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def write_shard(path, photos: dict[str, Image.Image], evil: bool = True) -> None:
    good = jpeg(next(iter(photos.values())).resize((128, 96)), 85)
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(photos):
            _add(tar, f"{i:06d}.jpg", jpeg(photos[name].resize((96, 96)), 85))
            _add(tar, f"{i:06d}.txt", f"a photo of {name}".encode())
            _add(tar, f"{i:06d}.json", json.dumps({"url": f"https://example.org/{name}"}).encode())
        if evil:
            _add(tar, "100000.jpg", good[: len(good) // 2])                  # truncated
            _add(tar, "100001.jpg", b"\x00" * 300)                           # not an image
            _add(tar, "100002.bin", b"binary payload")                       # not an image member
            _add(tar, "100003.png", _bomb())                                 # decompression bomb
            _add(tar, "../../escape/100004.jpg", good)                       # path traversal
            link = tarfile.TarInfo("100005.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)


def test_tar_shards_are_read_safely_with_counts(tmp_path, photos, monkeypatch):
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    subset = {n: photos[n] for n in list(photos)[:4]}
    write_shard(shard, subset)
    pq.write_table(pa.table({"key": ["000001"], "url": ["https://img2dataset.example/1"],
                             "caption": ["from parquet"]}), shard.with_suffix(".parquet"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    summary = build_index([str(shard.parent)], str(tmp_path / "idx"), progress=False)
    c = summary["counts"]
    assert summary["count"] == 5 + c.get("square_crops", 0) and c["indexed"] == 5
    assert c["skipped_corrupt"] == 1 and c["skipped_not_image"] == 2 and c["skipped_too_large"] == 1
    assert c["skipped_not_file"] == 1 and c["unsafe_names"] == 1
    assert not list(work.rglob("*")) and not (tmp_path / "escape").exists()
    items = Index.open(tmp_path / "idx").items(np.arange(summary["count"]))
    items = items[items["variant"] == "full"].reset_index(drop=True)
    assert items["key"].tolist() == ["000000", "000001", "000002", "000003", "escape/100004"]
    assert items["uri"].iloc[1] == "https://img2dataset.example/1" and items["caption"].iloc[1] == "from parquet"
    assert items["uri"].iloc[0] == f"https://example.org/{list(subset)[0]}"
    assert items["caption"].iloc[2] == f"a photo of {list(subset)[2]}"
    row = items.iloc[4]
    back = load_train_image(row["source"], row["member"], int(row["offset"]), int(row["size"]))
    assert back.size == (128, 96)


@pytest.mark.slow  # starting Ray takes 10-30 s on a shared machine
def test_ray_engine_builds_the_same_index_as_local(tmp_path, photos):
    names = list(photos)
    (tmp_path / "shards").mkdir()
    for i in range(2):
        write_shard(tmp_path / "shards" / f"{i:05d}.tar", {n: photos[n] for n in names[i * 3:i * 3 + 3]},
                    evil=i == 1)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = build_index([str(tmp_path / "shards")], str(tmp_path / "ray"), engine="ray", progress=False)
    finally:
        ray.shutdown()
    local = build_index([str(tmp_path / "shards")], str(tmp_path / "local"), progress=False)
    assert remote["counts"] == local["counts"] and remote["counts"]["indexed"] == 7
    a, b = Index.open(tmp_path / "ray"), Index.open(tmp_path / "local")
    assert a.count == b.count and np.array_equal(np.asarray(a.codes), np.asarray(b.codes))
    pd.testing.assert_frame_equal(a.items(np.arange(a.count)), b.items(np.arange(b.count)))


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    import diffaudit.commands.memorization  # noqa: F401 - registers the commands
    from diffaudit.cli import main

    with pytest.raises(InputError, match="no index at"):
        Index.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        plan([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="does not exist"):
        build_index([str(tmp_path / "missing")], str(tmp_path / "x"), progress=False)
    img = tmp_path / "one.png"
    Image.new("RGB", (40, 30), "red").save(img)
    build_index([str(img)], str(tmp_path / "idx"), progress=False)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    (tmp_path / "idx" / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(InputError, match="version 99"):
        Index.open(tmp_path / "idx")
    for drop in ("hash", "count", "shards"):
        (tmp_path / "idx" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != drop}))
        with pytest.raises(InputError, match=f"lacks {drop}"):
            Index.open(tmp_path / "idx")
    (tmp_path / "idx" / "meta.json").write_text(json.dumps({**meta, "shards": [{"name": "000000"}]}))
    with pytest.raises(InputError, match="lacks shards"):
        Index.open(tmp_path / "idx")
    (tmp_path / "idx" / "meta.json").write_text(json.dumps({**meta, "version": 99}))  # `index info` fails below
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(InputError, match="no usable images"):
        build_index([str(tmp_path / "junk")], str(tmp_path / "idx2"), progress=False)
    assert not (tmp_path / "idx2").exists()
    for argv in (["index", "info", str(tmp_path / "idx")],
                 ["index", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "i3")],
                 ["audit", "memorization", str(tmp_path), "--index", str(tmp_path / "nothing")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_query_of_a_missing_path_says_no_such_file(tmp_path, capsys):
    import diffaudit.commands.memorization  # noqa: F401 - registers the commands
    from diffaudit.cli import main

    img = tmp_path / "one.png"
    Image.new("RGB", (40, 30), "red").save(img)
    build_index([str(img)], str(tmp_path / "idx"), progress=False)
    for spec, expected in (("nosuch.png", "error: no such file: nosuch.png"),
                           ("skimage:astronaut", "error: no such file: skimage:astronaut"),
                           (str(tmp_path), f"error: {tmp_path} is a folder, not an image file")):
        with pytest.raises(SystemExit) as e:
            main(["index", "query", spec, "--index", str(tmp_path / "idx")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(expected) and "corrupt" not in err and "\n" not in err
    # an index build that meets a file gone since planning counts it and goes on
    _, _, _, reasons = get_hasher("phash").reduce_many([str(tmp_path / "gone.png"), str(img)])
    assert reasons == ["missing", None]


# -- end to end on a run --------------------------------------------------------------------------
def test_check_run_flags_the_memorized_image(photo_run: Run, tmp_path, photos):
    train = tmp_path / "train"
    train.mkdir()
    (train / "coffee-q50.jpg").write_bytes(jpeg(skimage_photo("coffee"), 50))
    for name in ("china", "flower", "brick"):
        photos[name].save(train / f"{name}.png")
    build_index([str(train)], str(tmp_path / "idx"), progress=False)
    summary = check_run(photo_run.root, tmp_path / "idx", progress=False)
    matches = photo_run.read_table("memorization/matches")
    rates = photo_run.read_table("memorization/rates")
    assert summary["memorized_images"] == 1
    row = matches.loc[matches["verdict"] == "memorized"].iloc[0]
    assert row["prompt_id"] == "photo-coffee" and row["train_key"] == "coffee-q50.jpg" and row["hamming"] <= 10
    assert row["agreement"] >= cf.MEMORIZED_AGREEMENT and row["ssim"] >= cf.MEMORIZED_SSIM
    assert row["overlap"] > 0.95 and row["alignment"] in ("resize", "keypoints", "phase") and not row["mirrored"]
    for rel in (row["evidence_path"], row["aligned_path"]):
        evidence = photo_run.path(rel)
        assert evidence.is_file() and evidence.is_relative_to(photo_run.root) and Image.open(evidence).size[0] <= 384
    assert summary["matched_images"] == rates["matched"].sum() == 1 and summary["confirm_ms_per_candidate"] > 0
    assert len(rates) == 5 and rates.set_index("prompt_id")["matched"].to_dict()["photo-coffee"] == 1
    assert rates["matched"].sum() == 1 and (rates["ci_low"] <= rates["rate"]).all()
    assert photo_run.stage_done("memorization") and photo_run.info["stages"]["memorization"]["radius"] == 10


def test_rates_count_every_near_copy_confirmed_in_pixels():
    """Both verdicts confirmed in pixels count; a hash hit that the pixels did not confirm does not (the demo's
    8 confirmed near_duplicate img2img copies were reported with per-prompt rates of 0)."""
    from audit.memorization.check import _rates

    gens = pd.DataFrame({"image_id": ["a1", "a2", "b1", "b2", "c1"], "prompt_id": ["a", "a", "b", "b", "c"],
                         "subject": ["x", "x", "y", "y", "z"]})
    matches = pd.DataFrame({"image_id": ["a1", "b1", "b2", "c1"],
                            "verdict": ["memorized", "near_duplicate", "near_duplicate", "unconfirmed"]})
    rates = _rates(gens, matches).set_index("prompt_id")
    assert rates["matched"].to_dict() == {"a": 1, "b": 2, "c": 0}
    assert rates.loc["b", "rate"] == 1.0 and rates.loc["a", "rate"] == 0.5


def test_check_run_decodes_each_generated_image_once(photo_run: Run, tmp_path, monkeypatch):
    from audit.memorization import check

    train = tmp_path / "train"
    train.mkdir()
    for q in (40, 60, 80):  # three candidates for the coffee image
        (train / f"coffee-q{q}.jpg").write_bytes(jpeg(skimage_photo("coffee"), q))
    build_index([str(train)], str(tmp_path / "idx"), progress=False)
    opened: list[str] = []
    real = check._open
    monkeypatch.setattr(check, "_open", lambda path: opened.append(str(path)) or real(path))
    summary = check_run(photo_run.root, tmp_path / "idx", progress=False)
    assert summary["candidates"] >= 3 and summary["memorized_images"] == 1
    assert len(opened) == summary["images"] + 1  # hashing reads each image once, confirming coffee once more


def test_check_run_without_matches_and_cli_query(photo_run: Run, tmp_path, photos, capsys):
    import diffaudit.commands.memorization  # noqa: F401 - registers the commands
    from diffaudit.cli import main as cli

    def main(argv: list[str]) -> None:
        with pytest.raises(SystemExit) as done:
            cli(argv)
        assert done.value.code == 0, capsys.readouterr().err

    train = tmp_path / "train"
    train.mkdir()
    for name in ("china", "flower"):
        (train / f"{name}.jpg").write_bytes(jpeg(photos[name], 90))
    main(["index", "build", str(train), "--out", str(tmp_path / "idx"), "--workers", "1", "--no-square"])
    assert json.loads(capsys.readouterr().out)["count"] == 2
    main(["audit", "memorization", str(photo_run.root), "--index", str(tmp_path / "idx")])
    assert json.loads(capsys.readouterr().out)["memorized_images"] == 0
    assert photo_run.read_table("memorization/matches").empty
    assert photo_run.read_table("memorization/rates")["rate"].tolist() == [0.0] * 5
    query = tmp_path / "q.png"
    photos["flower"].resize((200, 150)).save(query)
    main(["index", "query", str(query), "--index", str(tmp_path / "idx"), "--json", "--top-k", "2"])
    result = json.loads(capsys.readouterr().out)
    assert [m["key"] for m in result["matches"]] == ["flower.jpg"] and result["matches"][0]["verdict"] == "memorized"
    assert [n["key"] for n in result["nearest"]] == ["flower.jpg", "china.jpg"]
    main(["index", "info", str(tmp_path / "idx")])
    assert json.loads(capsys.readouterr().out)["count"] == 2


def test_square_crop_of_a_wide_training_photo_is_found(tmp_path, photos):
    """Text-to-image training feeds centred square crops: a generation reproducing one must be caught."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "china.jpg").write_bytes(jpeg(photos["china"], 90))   # 512 x 341
    (tmp_path / "train" / "rocket.jpg").write_bytes(jpeg(photos["rocket"], 90))
    build_index([str(tmp_path / "train")], str(tmp_path / "idx"), progress=False)
    no_square = build_index([str(tmp_path / "train")], str(tmp_path / "flat"), square=False, progress=False)
    generated = Image.open(io.BytesIO(jpeg(square_crop(photos["china"]).resize((256, 256)), 90)))
    index = Index.open(tmp_path / "idx")
    cands = search_images(index, [generated], 10)[0]
    rows = index.items(cands["id"])
    assert rows["key"].tolist() == ["china.jpg"] and rows["variant"].tolist() == ["square"]
    assert search_images(Index.open(tmp_path / "flat"), [generated], 10)[0].empty and no_square["count"] == 2
    train = square_crop(load_train_image(rows["source"].iloc[0], None, None, None))
    assert cf.confirm(generated, train).verdict == "memorized"


def test_low_resolution_generations_are_compared_at_their_own_resolution():
    """A 64 px copy is judged at 64 px (not as blur at 256); distinct photos stay unconfirmed there too."""
    from audit.memorization.confirm import confirm

    astronaut, clock, moon = (sample_photo(n) for n in ("astronaut", "clock", "moon"))
    small = astronaut.resize((64, 64), Image.Resampling.BICUBIC)
    assert confirm(small, astronaut).verdict == "memorized"
    assert confirm(clock.resize((64, 64)), moon).verdict == "unconfirmed"
    assert confirm(moon.resize((64, 64)), clock).verdict == "unconfirmed"
