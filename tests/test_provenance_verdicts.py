"""``verify`` never attributes credentials wrongly: each case of issue 13 (img2img source photo, flat image,
near-identical pair, half-replaced watermarked image, Invalid manifest, stale trust status, per-manifest
codes, restamping, ingredient hashes, remote manifest, store migration, killed stamps)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo_run, png_bytes, skimage_photo
from PIL import Image, ImageFilter

from diffaudit import verdicts as V
from diffaudit.corpus import corpus
from diffaudit.errors import InputError
from diffaudit.runs import sha256_file
from provenance import c2pa as cc
from provenance.keys import init_identity
from provenance.stamp import Stamper, stamp_files, stamp_run
from provenance.store import ManifestStore
from provenance.verify import verify_bytes, verify_paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFAUDIT_HOME", str(tmp_path / "diffaudit-home"))


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return init_identity(tmp_path_factory.mktemp("ident") / "id")


@pytest.fixture(scope="module")
def other_identity(tmp_path_factory):
    return init_identity(tmp_path_factory.mktemp("ident2") / "id", common_name="someone else")


def jpeg(img: Image.Image | bytes, q: int = 85) -> bytes:
    if isinstance(img, bytes):
        img = Image.open(io.BytesIO(img))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def check(data: bytes, store: ManifestStore, trust: cc.TrustSettings | None = None):
    return verify_bytes(data, name="query", context=cc.reader_context(trust), store=store, trust=trust)


def img2img_like(src: Image.Image, other: Image.Image) -> Image.Image:
    a = np.asarray(src, np.float32) * 0.65 + np.asarray(other.resize(src.size), np.float32) * 0.35
    out = Image.fromarray(a.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(out, np.float32) + np.random.default_rng(0).normal(0, 12, np.asarray(out).shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_img2img_source_photo_is_its_source_not_ai_output(tmp_path, identity):
    """The issue's first case: a real photo given to img2img must never come back as the model's output."""
    run = make_photo_run(tmp_path / "run", ("astronaut", "coffee"), size=320)
    gens = run.read_table("generations")
    edit = img2img_like(skimage_photo("astronaut", 320), skimage_photo("coffee", 320))
    run.path(gens.loc[0, "path"]).write_bytes(png_bytes(edit))
    gens.loc[0, ["mode", "source_image", "strength"]] = ["img2img", "skimage:astronaut", 0.6]
    run.write_table("generations", gens)
    db = tmp_path / "store.sqlite"
    stamp_run(run.root, identity=identity, store=db)
    label = run.read_table("provenance/stamps").set_index("image_id").loc[gens.loc[0, "image_id"], "manifest_label"]
    from provenance.stamp import source_bytes

    with ManifestStore(db, readonly=True) as store:
        source = check(source_bytes("skimage:astronaut"), store)
        assert source.conclusion == V.SOURCE and source.record["manifest_label"] == label
        assert source.record["role"] == "source of"
        shot = check(jpeg(skimage_photo("astronaut"), 80), store)      # the photo as posted somewhere
        assert shot.conclusion == V.SOURCE
        stamped = run.path(run.read_table("provenance/stamps").set_index("manifest_label").loc[label, "stamped_path"])
        out = check(jpeg(stamped.read_bytes()), store)                  # the AI output, stripped
        assert out.conclusion == V.SAME and out.record["manifest_label"] == label


def test_flat_images_never_match(tmp_path, identity):
    """Black (a safety checker's output), grey and near-flat images look alike to a fingerprint: a
    never-stamped one is never given a stamped one's credentials."""
    db = tmp_path / "s.sqlite"
    with ManifestStore(db) as store:
        stamper = Stamper(identity, store=store, watermark="none")
        for value in (0, 128):
            stamper.stamp(png_bytes(Image.new("RGB", (384, 384), (value,) * 3)), {"model": "m"}, title="flat.png")
    noise = np.clip(128 + np.random.default_rng(1).normal(0, 2, (300, 300, 3)), 0, 255).astype(np.uint8)
    with ManifestStore(db, readonly=True) as store:
        for img in (Image.new("RGB", (512, 512), (0, 0, 0)), Image.new("RGB", (256, 256), (129, 128, 128)),
                    Image.fromarray(noise)):
            r = check(png_bytes(img), store)
            assert r.conclusion == V.NONE and r.record is None
            assert r.fingerprint["degenerate"].startswith("low texture")
        flats = [s for s in corpus(40, split="test", seed=5, kinds=["flat"])]
        assert all(check(png_bytes(Image.fromarray(s.rgb)), store).conclusion == V.NONE for s in flats)


def test_near_identical_pair_is_ambiguous_unless_the_watermark_settles_it(tmp_path, identity):
    base = np.asarray(skimage_photo("astronaut", 320))
    twin = np.clip(base.astype(np.int16) + np.random.default_rng(2).integers(-2, 3, base.shape), 0, 255).astype(np.uint8)
    for mark in ("none", "dwtDctSvd"):
        db = tmp_path / f"{mark}.sqlite"
        with ManifestStore(db) as store:
            stamper = Stamper(identity, store=store, watermark=mark)
            a = stamper.stamp(png_bytes(Image.fromarray(base)), {"model": "m"}, title="a.png")
            b = stamper.stamp(png_bytes(Image.fromarray(twin)), {"model": "m"}, title="b.png")
        with ManifestStore(db, readonly=True) as store:   # a copy about as far from either
            r = check(png_bytes(pixels(a.data).resize((240, 240))), store)
        qualifying = {c["manifest_label"] for c in r.fingerprint["candidates"] if c["qualifies"]}
        assert qualifying == {a.manifest_label, b.manifest_label} and r.fingerprint["more_than_one"]
        if mark == "none":                                         # the pixels alone cannot tell them apart
            assert r.conclusion == V.AMBIGUOUS and r.record is None
        else:                                                      # the watermark names one, the pixels agree
            assert r.conclusion == V.SAME and r.record["manifest_label"] == a.manifest_label
            assert r.watermark["payload"] == a.payload and r.watermark["geometry"] == "rescaled to 320x320"


def test_half_replaced_watermarked_image_is_an_edited_copy(tmp_path, identity):
    """A watermark only names a candidate: with half of the picture replaced, the claim is "edited copy"."""
    db = tmp_path / "s.sqlite"
    with ManifestStore(db) as store:
        st = Stamper(identity, store=store).stamp(png_bytes(skimage_photo("astronaut", 512)), {"model": "m"},
                                                   title="a.png")
    px = np.asarray(pixels(st.data)).copy()
    px[256:] = np.asarray(skimage_photo("coffee", 512))[256:]      # the bottom half replaced
    with ManifestStore(db, readonly=True) as store:
        r = check(jpeg(Image.fromarray(px), 90), store)
    assert r.watermark["detected"] and r.watermark["payload"] == st.payload
    assert r.conclusion == V.EDITED and r.record["manifest_label"] == st.manifest_label
    assert r.record["role"] == "derived from" and "the pixels differ" in r.reason


def splice(signed: bytes, new_png: bytes) -> bytes:
    from test_provenance import splice as _splice

    return _splice(signed, new_png)


def test_invalid_manifest_is_tampered_and_the_original_only_derived_from(tmp_path, identity):
    db = tmp_path / "s.sqlite"
    with ManifestStore(db) as store:
        st = Stamper(identity, store=store).stamp(png_bytes(skimage_photo("chelsea", 384)), {"model": "m"},
                                                   title="c.png")
    px = np.asarray(pixels(st.data)).copy()
    px[:40, :40] = 255 - px[:40, :40]
    with ManifestStore(db, readonly=True) as store:
        r = check(splice(st.data, png_bytes(Image.fromarray(px))), store, cc.dev_root_trust(identity))
    assert r.status == "Invalid" and "assertion.dataHash.mismatch" in r.failure_codes
    assert r.conclusion == V.TAMPERED
    assert r.record["role"] == "derived from" and r.record["manifest_label"] == st.manifest_label


def test_stored_status_is_recorded_then_and_rechecked_now(tmp_path, identity, other_identity):
    db = tmp_path / "s.sqlite"
    with ManifestStore(db) as store:
        st = Stamper(identity, store=store).stamp(png_bytes(skimage_photo("rocket", 384)), {"model": "m"},
                                                   title="r.png")
    query = jpeg(st.data, 90)
    with ManifestStore(db, readonly=True) as store:
        theirs = check(query, store, cc.anchors_from_pem(other_identity.trust_anchors, "their-root.pem"))
        ours = check(query, store, cc.anchors_from_pem(identity.trust_anchors, "root-ca.pem"))
        bare = check(query, store)
    for r in (theirs, ours, bare):
        assert r.conclusion == V.SAME
        assert r.record["recorded_at_stamp_time"]["status"] == "Trusted (development root)"
        assert r.record["recorded_at_stamp_time"]["words"].endswith("as recorded at stamp time")
    assert theirs.record["checked_now"]["status"] == "Valid"        # someone else's root: not trusted now
    assert bare.record["checked_now"]["status"] == "Valid"
    assert ours.record["checked_now"] == {"status": "Trusted", "trust": "development root", "failure_codes": [],
                                          "words": "Trusted (development root)"}


def test_failure_codes_are_kept_per_manifest_and_deduplicated(tmp_path, identity, other_identity):
    """An ingredient signed by someone outside the trust settings: its untrusted code is the ingredient's,
    listed once, and the file's own manifest is Trusted with no failure."""
    src = tmp_path / "theirs" / "photo.png"
    src.parent.mkdir()
    src.write_bytes(png_bytes(skimage_photo("coffee", 320)))
    stamp_files([src], tmp_path / "signed-by-them", identity=other_identity, store=tmp_path / "a.sqlite")
    stamp_files([tmp_path / "signed-by-them" / "photo.png"], tmp_path / "ours", identity=identity,
                store=tmp_path / "b.sqlite")
    r = verify_paths([tmp_path / "ours" / "photo.png"], trust_anchors=identity.folder / "root-ca.pem",
                     default_store=False)[0]
    assert r.status == "Trusted" and r.failure_codes == [] and r.conclusion == V.INTACT
    manifests = r.credentials["manifests"]
    assert [m["role"] for m in manifests] == ["active", "ingredient"]
    recorded = [f["code"] for f in manifests[1]["recorded_failures"]]
    assert recorded == ["signingCredential.untrusted"]                 # the ingredient's, once, not the file's
    assert manifests[1]["label"] == r.credentials["ingredients"][0]["manifest"]


def test_restamping_keeps_the_credentials_as_parent_with_its_hash(tmp_path, identity):
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    src.write_bytes(png_bytes(skimage_photo("camera", 320)))
    first = stamp_files([src], tmp_path / "one", identity=identity, store=tmp_path / "s.sqlite", model="m")[0]
    second = stamp_files([tmp_path / "one" / "a.png"], tmp_path / "two", identity=identity,
                         store=tmp_path / "s.sqlite")[0]
    assert second["restamped"] and not first["restamped"]
    r = verify_paths([tmp_path / "two" / "a.png"], trust_anchors=identity.folder / "root-ca.pem",
                     default_store=False)[0]
    c = r.credentials
    assert [a["action"] for a in c["actions"]] == ["c2pa.opened", "c2pa.edited", "c2pa.watermarked"]
    assert c["ingredients"][0]["relationship"] == "parentOf"
    assert c["ingredients"][0]["manifest"] == first["manifest_label"]
    assert c["ingredients"][0]["sha256"] == sha256_file(tmp_path / "one" / "a.png")
    assert c["soft_binding"]["alg"] == "org.diffaudit.watermark.ssTile.1"
    assert c["soft_binding"]["blocks"][0]["value"]


def test_remote_manifest_is_named_not_fetched(tmp_path, identity):
    import c2pa

    signer = cc.ManifestSigner(identity)
    builder = c2pa.Builder(cc.manifest_definition({"model": "m"}, title="r.png"), context=signer.context)
    builder.set_no_embed()
    builder.set_remote_url("https://manifests.example.org/abc.c2pa")
    out = io.BytesIO()
    builder.sign(signer.signer, "image/png", io.BytesIO(png_bytes(skimage_photo("rocket", 128))), out)
    (tmp_path / "remote.png").write_bytes(out.getvalue())
    r = verify_paths([tmp_path / "remote.png"], default_store=False)[0]
    assert r.status == "none" and r.credentials["remote_manifest"] == "https://manifests.example.org/abc.c2pa"
    assert r.problem.startswith("remote manifest, not fetched (offline): https://manifests.example.org/abc.c2pa")
    assert "damaged" not in json.dumps(r.to_dict())


def test_a_version_1_store_is_read_as_it_is_and_migrated_for_writing(tmp_path, identity):
    from provenance.store import _SCHEMA_V1

    st = Stamper(identity, watermark="dwtDctSvd").stamp(png_bytes(skimage_photo("astronaut", 384)),
                                                        {"model": "m", "prompt": "p"}, title="a.png")
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(_SCHEMA_V1)
    con.execute("INSERT INTO stamps (manifest_label, method, payload, phash, sha256, credentials, manifest) "
                "VALUES (?,?,?,?,?,?,?)", (st.manifest_label, "dwtDctSvd", st.payload, 0, "x",
                                          json.dumps(st.credentials), st.manifest))
    con.commit()
    con.close()
    with ManifestStore(db, readonly=True) as store:
        assert store.version == 1 and len(store) == 1
        r = check(jpeg(st.data, 90), store)
        assert r.conclusion == V.EDITED and "the store kept no thumbnail" in r.reason  # named, never "same"
        assert r.record["recorded_at_stamp_time"]["status"] == "Trusted (development root)"
    with ManifestStore(db) as store:
        assert store.version == 2 and len(store) == 1 and {"coeffs", "thumb", "committed"} <= store.columns


_KILL = """
import os, sys
sys.path.insert(0, {root!r})
import provenance.stamp as s
from provenance.keys import load_identity
point, after = sys.argv[1], int(sys.argv[2])
calls = {{"n": 0}}
if point == "write":            # killed after the store row and before the table row (or the file)
    real = s.atomic_write_bytes
    def hook(*a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            os._exit(9)
        return real(*a, **k)
    s.atomic_write_bytes = hook
else:                           # killed between the table flush and the store commit
    real_commit = s.ManifestStore.commit
    def commit(self, labels):
        os._exit(9)
    s.ManifestStore.commit = commit
s.stamp_run({run!r}, identity=load_identity({ident!r}), store={db!r}, flush_every=2)
"""


@pytest.mark.parametrize("point", ["write", "commit"])
def test_a_killed_stamp_leaves_no_orphan_store_rows(tmp_path, identity, point):
    run = make_photo_run(tmp_path / "run", size=256)
    db = tmp_path / "store.sqlite"
    code = _KILL.format(root=str(ROOT), run=str(run.root), ident=str(identity.folder), db=str(db))
    out = subprocess.run([sys.executable, "-c", code, point, "3"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 9, out.stderr[-2000:]
    with ManifestStore(db, readonly=True) as store:   # flush_every=2: rows of images 1-2 reached the table
        assert (len(store), store.pending()) == ((2, 2) if point == "write" else (0, 2))
    assert len(run.read_table("provenance/stamps")) == 2
    summary = stamp_run(run.root, identity=identity, store=db)
    table = run.read_table("provenance/stamps")
    assert len(table) == 5 and summary["total"] == 5
    with ManifestStore(db, readonly=True) as store:
        assert store.pending() == 0 and len(store) == 5
        for row in table.itertuples():
            rec = store.get(row.manifest_label)
            assert rec is not None and rec.sha256 == row.sha256 == sha256_file(run.path(row.stamped_path))
    settled = summary["store_rows_settled"]
    assert summary["stamped"] == 3
    if point == "commit":   # the table had the rows: they are committed, not stamped again
        assert settled == {"committed": 2, "deleted": 0}
    else:                   # images 3-4 never reached the table: their rows are orphans, deleted
        assert settled == {"committed": 0, "deleted": 2}


def test_stamp_names_a_truncated_image(tmp_path, identity, capsys):
    run = make_photo_run(tmp_path / "run", size=256)
    gens = run.read_table("generations")
    bad = run.path(gens.loc[2, "path"])
    bad.write_bytes(bad.read_bytes()[:3000])
    with pytest.raises(InputError, match=str(bad)):
        stamp_run(run.root, identity=identity, store=tmp_path / "s.sqlite")
    from diffaudit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["stamp", str(run.root), "--identity", str(identity.folder), "--store", str(tmp_path / "s.sqlite")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and str(bad) in err and err.count("\n") == 1


def test_a_bad_crc_png_still_gets_watermark_and_store_checks(tmp_path, identity):
    """A broken ancillary chunk makes decoders refuse the whole PNG; verify reads the pixels without it and
    says so, never printing a Python object's repr."""
    import struct
    import zlib

    db = tmp_path / "s.sqlite"
    with ManifestStore(db) as store:
        st = Stamper(identity, store=store).stamp(png_bytes(skimage_photo("coffee", 384)), {"model": "m"},
                                                   title="c.png")
    stripped = png_bytes(pixels(st.data))
    body = b"comment\x00hello"
    bad_chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body) ^ 1)
    broken = stripped[:33] + bad_chunk + stripped[33:]
    with ManifestStore(db, readonly=True) as store:
        r = check(broken, store)
    assert r.conclusion == V.SAME and r.record["manifest_label"] == st.manifest_label
    assert "bad CRC in PNG chunk(s) tEXt" in r.problem
    assert "<_io." not in json.dumps(r.to_dict())


def test_identical_bytes_of_an_ingredient_and_sha256s_in_the_store(tmp_path, identity):
    src = png_bytes(skimage_photo("astronaut", 300))
    out = png_bytes(img2img_like(skimage_photo("astronaut", 300), skimage_photo("rocket", 300)))
    db = tmp_path / "s.sqlite"
    with ManifestStore(db) as store:
        st = Stamper(identity, store=store).stamp(out, {"model": "m", "mode": "img2img"}, title="o.png",
                                                   ingredients=[cc.Ingredient("src.png", src, "inputTo")])
        ing = store.ingredients_of(st.manifest_label)
    assert ing[0].sha256 == hashlib.sha256(src).hexdigest() and ing[0].fingerprint is not None
    assert st.credentials["ingredients"][0]["sha256"] == hashlib.sha256(src).hexdigest()
    with ManifestStore(db, readonly=True) as store:
        r = check(src, store)
    assert r.conclusion == V.SOURCE and r.record["manifest_label"] == st.manifest_label


def test_the_demos_img2img_source_photos_come_back_as_sources(tmp_path):
    """The issue's measurement: the demo's img2img sources (astronaut, coffee) were "recovered" as AI output."""
    from diffaudit.demo import run_demo
    from diffaudit.runs import Run
    from provenance.stamp import source_bytes

    config = run_demo(tmp_path / "runs", images_per_prompt=1, subjects=("ceo",), log=lambda m: None)
    run = Run.open(config.out)
    sources = {r["source_image"]: r["image_id"] for r in run.read_table("generations").to_dict("records")
               if r["mode"] in ("img2img", "inpaint")}
    labels = run.read_table("provenance/stamps").set_index("image_id")["manifest_label"]
    with ManifestStore(config.provenance.store, readonly=True) as store:
        for ref in ("skimage:astronaut", "skimage:coffee"):
            for data in (source_bytes(ref), jpeg(source_bytes(ref), 85)):
                r = check(data, store)
                assert r.conclusion == V.SOURCE, (ref, r.conclusion, r.reason)
                named = run.read_table("generations").set_index("image_id").loc[
                    labels[labels == r.record["manifest_label"]].index[0]]
                assert named["source_image"] == ref and ref in sources


def test_readme_report_and_dashboard_name_the_same_conclusions(tmp_path, identity):
    from diffaudit.report import build_report

    readme = (ROOT / "README.md").read_text()
    run = make_photo_run(tmp_path / "run", ("astronaut", "rocket"), size=256)
    stamp_run(run.root, identity=identity, store=tmp_path / "s.sqlite")
    md_path, _ = build_report(run.root)
    md = md_path.read_text()
    page = (ROOT / "dashboard" / "views" / "provenance.py").read_text()
    assert "verdicts.CONCLUSIONS" in page                      # the upload box explains them from the same table
    for name in V.CONCLUSIONS:
        assert f"| {name} |" in readme, name
        assert f"| {name} |" in md, name
    assert "Checked at stamp time: Trusted (development root): 2" in md
