"""Provenance: keys, C2PA sign/verify and tampering, watermarks, the manifest store, stamping a run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo_run, png_bytes, skimage_photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffaudit.errors import InputError
from diffaudit.runs import Run, sha256_file
from provenance import c2pa as cc
from provenance.keys import describe, from_callback, from_pem, init_identity
from provenance.stamp import Stamper, stamp_run, verify_bytes, verify_paths
from provenance.store import ManifestStore
from provenance.watermark import DwtDct, DwtDctSvd, get

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Never touch the user's default identity or store."""
    monkeypatch.setenv("DIFFAUDIT_HOME", str(tmp_path / "diffaudit-home"))


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return init_identity(tmp_path_factory.mktemp("identity") / "id")


@pytest.fixture(scope="module")
def anchors(identity) -> Path:
    return identity.folder / "root-ca.pem"


@pytest.fixture(scope="module")
def signed(identity) -> bytes:
    """A 512² photo, watermarked and signed (no store)."""
    return Stamper(identity).stamp(png_bytes(skimage_photo("astronaut", 512)), {"model": "m", "seed": 1},
                                   title="a.png").data


def trusted_ctx(anchors: Path):
    return cc.reader_context(cc.load_trust(anchors))


# --- PNG surgery: keep the manifest chunk, change what it signed --------------------------------

def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def build(parts: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in parts)
    return b"\x89PNG\r\n\x1a\n" + body


def splice(signed: bytes, new_png: bytes) -> bytes:
    """``new_png``'s pixels with ``signed``'s manifest chunk, as a tool that keeps metadata would write."""
    manifest = [c for c in chunks(signed) if c[0] == b"caBX"]
    assert manifest, "the signed PNG has no caBX chunk"
    new = chunks(new_png)
    return build(new[:1] + manifest + new[1:])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()


# --- keys ------------------------------------------------------------------------------------------

def test_key_files_are_0600_and_never_overwritten(identity):
    assert stat.S_IMODE(os.stat(identity.folder / "signer.key").st_mode) == 0o600
    assert not (identity.folder / "root-ca.key").exists() and not (identity.folder / "intermediate.key").exists()
    with pytest.raises(InputError, match="already holds"):
        init_identity(identity.folder)
    rows = describe(identity.folder)
    assert [r["role"] for r in rows] == ["signer", "intermediate", "root"]
    assert all(len(r["sha256"].split(":")) == 32 for r in rows)


def test_user_pem_and_callback_signer(identity, anchors, tmp_path):
    user = from_pem(identity.folder / "signer.pem", identity.folder / "signer.key")
    assert user.alg == "es256" and user.signer_name == "diffaudit signer"
    other = init_identity(tmp_path / "other")
    with pytest.raises(InputError, match="does not match"):
        from_pem(identity.folder / "signer.pem", other.folder / "signer.key")

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(identity.key_pem, None)
    calls = []

    def kms_sign(data: bytes) -> bytes:  # stands in for a KMS/HSM call
        calls.append(len(data))
        return key.sign(data, ec.ECDSA(hashes.SHA256()))

    remote = from_callback(identity.chain_pem, kms_sign)
    out = Stamper(remote, watermark="none").stamp(png_bytes(skimage_photo("coffee", 256)), {"model": "m"},
                                                  title="c.png")
    assert calls and cc.read_credentials(out.data, trusted_ctx(anchors)).status == "Trusted"


# --- C2PA sign and verify ----------------------------------------------------------------------

def test_signed_is_trusted_with_our_anchors_and_valid_untrusted_without(signed, anchors):
    trusted = cc.read_credentials(signed, trusted_ctx(anchors))
    assert trusted.status == "Trusted" and trusted.failure_codes == []
    assert trusted.signer["common_name"] == "diffaudit signer"
    assert trusted.claim_generator.startswith("diffaudit")
    created = trusted.actions[0]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == cc.TRAINED and created["softwareAgent"]["name"] == "m"
    assert trusted.generation == {"model": "m", "seed": 1}
    untrusted = cc.read_credentials(signed, cc.reader_context())
    assert untrusted.status == "Valid" and untrusted.failure_codes == ["signingCredential.untrusted"]


def test_changed_pixel_is_invalid_with_data_hash_mismatch(signed, anchors):
    px = pixels(signed)
    px[100, 100] = 255 - px[100, 100]
    creds = cc.read_credentials(splice(signed, png_bytes(Image.fromarray(px))), trusted_ctx(anchors))
    assert creds.status == "Invalid" and "assertion.dataHash.mismatch" in creds.failure_codes


def test_flipped_byte_inside_manifest_is_invalid(signed, anchors):
    start = signed.index(b"caBX") + 4
    length = struct.unpack(">I", signed[start - 8:start - 4])[0]
    broken = {}
    for offset in (length // 4, length // 2, length - 40):
        b = bytearray(signed)
        b[start + offset] ^= 0xFF
        broken[offset] = cc.read_credentials(bytes(b), trusted_ctx(anchors))
    for creds in broken.values():
        assert creds.status == "Invalid"
        assert set(creds.failure_codes) & {"claimSignature.mismatch", "assertion.hashedURI.mismatch",
                                           "assertion.cbor.invalid", "assertion.dataHash.mismatch",
                                           "claim.malformed", cc.UNREADABLE}, creds.failure_codes


def test_recompression_and_crop_lose_or_break_credentials(signed, anchors):
    ctx = trusted_ctx(anchors)
    img = Image.open(io.BytesIO(signed)).convert("RGB")
    jpg = io.BytesIO()
    img.save(jpg, "JPEG", quality=90)
    assert cc.read_credentials(jpg.getvalue(), ctx).status == "none"          # re-save strips it
    recompressed = io.BytesIO()
    img.save(recompressed, "PNG", compress_level=9)                           # same pixels, new bytes
    kept = cc.read_credentials(splice(signed, recompressed.getvalue()), ctx)
    assert kept.status == "Invalid" and "assertion.dataHash.mismatch" in kept.failure_codes
    cropped = png_bytes(img.crop((20, 20, 480, 480)))
    assert cc.read_credentials(cropped, ctx).status == "none"
    kept = cc.read_credentials(splice(signed, cropped), ctx)
    assert kept.status == "Invalid" and "assertion.dataHash.mismatch" in kept.failure_codes


def test_bad_files_give_a_clear_result(tmp_path, signed):
    files = {"empty.png": b"", "truncated.png": signed[:2000], "text.png": b"hello, not an image\n" * 20,
             "header-only.jpg": b"\xff\xd8\xff\xe0" + b"\0" * 10}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "wrong-extension.jpg").write_bytes(signed)
    results = {Path(r.path).name: r for r in verify_paths([tmp_path])}
    assert results["empty.png"].status == "none" and results["empty.png"].problem == "empty file"
    assert results["text.png"].problem.startswith("unsupported file type")
    assert results["truncated.png"].status in ("none", "Invalid") and results["truncated.png"].problem
    assert results["header-only.jpg"].status == "none" and results["header-only.jpg"].problem
    assert results["wrong-extension.jpg"].format == "image/png" and results["wrong-extension.jpg"].status == "Valid"
    with pytest.raises(InputError, match="no such file"):  # a missing path is the user's error, not a verdict
        verify_paths([tmp_path / "nope.png"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_never_crash(signed, data):
    kind = data.draw(st.sampled_from(["random", "truncate", "flip"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=256))
        blob = data.draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP"])) + blob
    elif kind == "truncate":
        blob = signed[: data.draw(st.integers(0, len(signed)))]
    else:
        b = bytearray(signed)
        for i in data.draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=4)):
            b[i] ^= 0xFF
        blob = bytes(b)
    r = verify_bytes(blob, methods=["dwtDctSvd"])
    assert r.status in cc.STATES
    assert r.status in ("Trusted", "Valid") or r.problem or r.failure_codes or r.status == "none"


# --- watermarks --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_default_watermark_survives_jpeg_q90(name):
    wm = get("dwtDctSvd")
    payload = wm.new_payload()
    marked = wm.encode(np.asarray(skimage_photo(name, 512)), payload)
    psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - np.asarray(skimage_photo(name, 512))) ** 2))
    assert psnr > 38
    buf = io.BytesIO()
    Image.fromarray(marked).save(buf, "JPEG", quality=90, subsampling=2)
    det = wm.detect(pixels(buf.getvalue()))
    assert det.detected and det.payload == payload


def _reference(module: str):
    """imwatermark's own embedder class, loaded from its file (its package __init__ imports torch)."""
    import importlib.util

    from provenance.watermark import _imwatermark_dir

    spec = importlib.util.spec_from_file_location(f"_ref_{module}", _imwatermark_dir() / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("cls,module,attr", [(DwtDctSvd, "dwtDctSvd", "EmbedDwtDctSvd"),
                                              (DwtDct, "maxDct", "EmbedMaxDct")])
def test_vectorised_methods_are_bit_compatible_with_imwatermark(cls, module, attr):
    ref = getattr(_reference(module), attr)
    wm = cls()
    rgb = np.asarray(skimage_photo("chelsea", 512))
    payload = wm.new_payload()
    bits = wm.payload_to_bits(payload)
    ours = wm.encode(rgb, payload)
    theirs = np.ascontiguousarray(
        ref(watermarks=list(bits), wmLen=wm.payload_bits).encode(rgb[:, :, ::-1].copy())[:, :, ::-1])
    for img in (ours, theirs, rgb):  # both decoders read the same bits from any image
        ref_bits = ref(watermarks=[], wmLen=wm.payload_bits).decode(img[:, :, ::-1].copy()).astype(np.uint8)
        assert (ref_bits == (wm._scores(img) * 255 > 127)).all()
    assert wm.detect(ours).payload == payload
    if cls is DwtDctSvd:  # imwatermark's maxDct can mark a coefficient that is no longer the largest
        assert wm.detect(theirs).payload == payload


def test_checked_payload_rejects_flat_and_clean_images():
    from provenance.attacks import clean_corpus

    wm = get("dwtDctSvd")
    for value in (0, 1):
        bits = np.full(wm.payload_bits, value, dtype=np.uint8)
        word = int("".join(map(str, bits)), 2)
        assert word & 0xFFFFFF != wm.check_value(word >> 24)
    flat = np.full((300, 300, 3), 128, dtype=np.uint8)
    assert not wm.detect(flat).detected
    assert not wm.detect(np.zeros((100, 100, 3), np.uint8)).detected  # too small: a reason, no crash
    assert sum(wm.detect(img).detected for img in clean_corpus(40, seed=3, max_side=384)) == 0


def test_rivagan_roundtrip_without_torch():
    code = ("import sys, cv2, skimage.data; from provenance.watermark import get; wm = get('rivaGan');"
            "rgb = cv2.resize(skimage.data.astronaut(), (256, 256));"
            "p = wm.new_payload(); d = wm.detect(wm.encode(rgb, p));"
            "print(d.payload == p, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]


# --- store and stamping a run ------------------------------------------------------------------

def _img2img_run(photo_run: Run) -> Run:
    gens = photo_run.read_table("generations")
    gens.loc[0, ["mode", "source_image", "strength"]] = ["img2img", "skimage:astronaut", 0.6]
    gens.loc[1, ["mode", "source_image", "mask", "strength"]] = ["inpaint", "skimage:coffee",
                                                                 "box:0.5,0.5,0.9,0.9", 1.0]
    photo_run.write_table("generations", gens)
    return photo_run


def test_stamp_run_writes_copies_table_store_and_resumes(photo_run, identity, anchors, tmp_path):
    run = _img2img_run(photo_run)
    originals = {r["image_id"]: sha256_file(r["file"]) for r in run.images().to_dict("records")}
    db = tmp_path / "store.sqlite"
    summary = stamp_run(run.root, identity=identity, store=db)
    assert summary["stamped"] == 5 and summary["status"] == {"Trusted": 5}
    assert {r["image_id"]: sha256_file(r["file"]) for r in run.images().to_dict("records")} == originals
    table = run.read_table("provenance/stamps")
    assert len(table) == 5 and set(table["watermark"]) == {"ssTile"}
    assert all(sha256_file(run.path(p)) == h for p, h in zip(table["stamped_path"], table["sha256"], strict=True))
    assert run.stage_done("stamp")
    with ManifestStore(db) as store:
        assert len(store) == 5
    assert stamp_run(run.root, identity=identity, store=db)["stamped"] == 0     # resumable

    results = {Path(r.path).parent.name: r for r in
               verify_paths([run.root / "provenance" / "stamped"], trust_anchors=anchors, store=db)}
    assert {r.status for r in results.values()} == {"Trusted"}
    astro = results["photo-astronaut"].credentials
    assert [{k: i[k] for k in ("title", "relationship", "format")} for i in astro["ingredients"]] == [
        {"title": "skimage:astronaut", "relationship": "inputTo", "format": "image/png"}]
    from provenance.stamp import source_bytes

    assert astro["ingredients"][0]["sha256"] == hashlib.sha256(source_bytes("skimage:astronaut")).hexdigest()
    assert astro["generation"]["mode"] == "img2img" and astro["generation"]["run"] == run.name
    coffee = results["photo-coffee"].credentials
    assert coffee["ingredients"][0]["relationship"] == "parentOf"
    assert [a["action"] for a in coffee["actions"]] == ["c2pa.opened", "c2pa.edited", "c2pa.watermarked"]



def test_stamps_table_says_none_where_no_watermark_fit(identity, tmp_path):
    """64x64 images are below the watermark's minimum: their rows say watermark "none" with no payload
    (not the method asked for), and a rerun with the same method does not restamp them."""
    run = make_photo_run(tmp_path / "small", ("astronaut", "coffee"), size=64)
    db = tmp_path / "store.sqlite"
    assert stamp_run(run.root, identity=identity, store=db)["stamped"] == 2
    table = run.read_table("provenance/stamps")
    assert list(table["watermark"]) == ["none", "none"] and table["payload"].isna().all()
    assert stamp_run(run.root, identity=identity, store=db)["stamped"] == 0
    assert stamp_run(run.root, identity=identity, store=db, watermark="none")["stamped"] == 0

def test_stripped_file_is_recovered_through_the_store(photo_run, identity, tmp_path):
    db = tmp_path / "store.sqlite"
    stamp_run(photo_run.root, identity=identity, store=db)
    table = photo_run.read_table("provenance/stamps").set_index("image_id")
    row = table.loc["photo-chelsea-1002"]
    img = Image.open(photo_run.path(row["stamped_path"])).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    (tmp_path / "screenshot.jpg").write_bytes(buf.getvalue())
    small = img.resize((200, 200))
    (tmp_path / "small.png").write_bytes(png_bytes(small))
    res = {Path(r.path).name: r for r in verify_paths([tmp_path / "screenshot.jpg", tmp_path / "small.png"],
                                                      store=db)}
    shot = res["screenshot.jpg"]
    assert shot.status == "none" and shot.watermark["payload"] == row["payload"]
    assert shot.conclusion == "same image, credentials stripped"
    assert shot.record["found_by"] == "watermark + pixels" and shot.record["manifest_label"] == row["manifest_label"]
    assert shot.record["credentials"]["generation"]["prompt"] == "a photo of chelsea"
    assert shot.record["recorded_at_stamp_time"]["status"] == "Trusted (development root)"
    tiny = res["small.png"]
    assert tiny.conclusion == "same image, credentials stripped"   # resized: the robust decoder may read it back
    assert tiny.record["found_by"] in ("fingerprint + pixels", "watermark + pixels")
    assert tiny.record["manifest_label"] == row["manifest_label"]


def test_robustness_table(identity):
    from provenance.attacks import robustness

    table = robustness([png_bytes(skimage_photo("astronaut", 384))], methods=["dwtDctSvd"], identity=identity,
                       attacks=["none", "metadata_strip", "jpeg_q90", "flip"], progress=False)
    by = table.set_index("attack")
    assert by.loc["none", "detection_rate"] == 1.0 and by.loc["none", "c2pa_survives"] == 1.0
    assert by.loc["metadata_strip", "detection_rate"] == 1.0 and by.loc["metadata_strip", "c2pa_survives"] == 0.0
    assert by.loc["jpeg_q90", "bit_accuracy"] > 0.95
    assert by.loc["jpeg_q90", "credentials_recovered"] == 1.0    # through the watermark
    assert by.loc["flip", "detection_rate"] == 1.0               # the robust decoder reads the mirror image
    assert by.loc["flip", "credentials_recovered"] == 1.0        # and the store finds it by payload


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_keys_stamp_verify_json_without_torch(tmp_path):
    env = {**os.environ, "DIFFAUDIT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(skimage_photo("rocket", 256)))

    def cli(*args: str) -> subprocess.CompletedProcess:
        code = ("import sys; from diffaudit.cli import main\ntry: main(sys.argv[1:])\n"
                "finally: print('TORCH', 'torch' in sys.modules, file=sys.stderr)")
        return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    assert cli("keys", "init").returncode == 0
    shown = cli("keys", "show")
    assert "sha256" in shown.stdout and "BEGIN" not in shown.stdout + shown.stderr
    assert cli("stamp", "in/a.png", "--out", "out").returncode == 0
    anchors = tmp_path / "home" / "identity" / "root-ca.pem"
    out = cli("verify", "out", "in", "--json", "--trust-anchors", str(anchors))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["status"] for r in rows] == ["Trusted", "none"]
    assert rows[1]["conclusion"] == "same image, credentials stripped"
    assert "TORCH False" in out.stderr
    bad = cli("verify", "in", "--trust-anchors", str(tmp_path / "in" / "a.png"))
    assert bad.returncode == 2 and "not a PEM" in bad.stderr


def test_stamp_files_keeps_jpeg_and_webp(identity, anchors, tmp_path):
    from provenance.stamp import stamp_files

    photo = skimage_photo("coffee", 320)
    for fmt, name in (("JPEG", "a.jpg"), ("WEBP", "b.webp")):
        buf = io.BytesIO()
        photo.save(buf, fmt, quality=95)
        (tmp_path / name).write_bytes(buf.getvalue())
    db = tmp_path / "store.sqlite"
    rows = stamp_files([tmp_path / "a.jpg", tmp_path / "b.webp"], tmp_path / "out", identity=identity, store=db,
                       model="my-model")
    assert [r["status"] for r in rows] == ["Trusted", "Trusted"]
    before = db.stat().st_mtime_ns
    results = verify_paths([tmp_path / "out"], trust_anchors=anchors.parent, store=db)  # a folder of PEMs
    assert [(Path(r.path).name, r.format, r.status) for r in results] == [("a.jpg", "image/jpeg", "Trusted"),
                                                                          ("b.webp", "image/webp", "Trusted")]
    assert results[0].credentials["actions"][0]["softwareAgent"]["name"] == "my-model"
    assert db.stat().st_mtime_ns == before  # verifying never writes the store
    with pytest.raises(InputError, match="output folder"):
        stamp_files([tmp_path / "a.jpg"], tmp_path, identity=identity, store=db)


def test_store_breaks_payload_collisions_by_phash(tmp_path):
    from provenance.store import phash

    a, b = skimage_photo("astronaut", 256), skimage_photo("rocket", 256)
    with ManifestStore(tmp_path / "s.sqlite") as store:
        for label, img in (("urn:a", a), ("urn:b", b)):
            store.add(manifest_label=label, method="dwtDctSvd", payload="00000000ff", phash=phash(img),
                      sha256=label, credentials={"status": "Trusted"})
        assert store.by_payload("dwtDctSvd", "00000000ff", phash(b)).manifest_label == "urn:b"
        assert store.by_payload("dwtDctSvd", "00000000ff", phash(a)).manifest_label == "urn:a"
        assert store.by_phash(phash(b.resize((128, 128)).resize((256, 256)))).manifest_label == "urn:b"
        assert store.by_payload("dwtDctSvd", "0000000000") is None


def test_stamp_files_keeps_folder_layout_and_refuses_duplicate_names(identity, tmp_path):
    from provenance.stamp import stamp_files

    for prompt_id, name in (("p1", "astronaut"), ("p2", "rocket")):
        (tmp_path / "images" / prompt_id).mkdir(parents=True)
        (tmp_path / "images" / prompt_id / "0.png").write_bytes(png_bytes(skimage_photo(name, 64)))
    db = tmp_path / "store.sqlite"
    rows = stamp_files([tmp_path / "images"], tmp_path / "st", identity=identity, store=db)
    assert sorted(Path(r["stamped"]).relative_to(tmp_path / "st").as_posix() for r in rows) == ["p1/0.png",
                                                                                                 "p2/0.png"]
    loose = [tmp_path / "images" / "p1" / "0.png", tmp_path / "images" / "p2" / "0.png"]
    with pytest.raises(InputError, match="would both be stamped to"):
        stamp_files(loose, tmp_path / "st2", identity=identity, store=db)
    assert not (tmp_path / "st2").exists()  # refused up front: nothing written


def test_manifest_names_a_path_source_by_file_name_only(photo_run, identity, anchors, tmp_path):
    src = tmp_path / "private" / "holiday.png"
    src.parent.mkdir()
    src.write_bytes(png_bytes(skimage_photo("coffee", 64)))
    gens = photo_run.read_table("generations")
    gens.loc[0, ["mode", "source_image", "strength"]] = ["img2img", str(src), 0.6]
    gens.loc[1, ["mode", "source_image", "strength"]] = ["img2img", "skimage:astronaut", 0.6]
    photo_run.write_table("generations", gens)
    stamp_run(photo_run.root, identity=identity, store=tmp_path / "store.sqlite")
    table = photo_run.read_table("provenance/stamps").set_index("image_id")
    creds = {i: verify_paths([photo_run.path(table.loc[i, "stamped_path"])], trust_anchors=anchors,
                             store=tmp_path / "store.sqlite")[0].credentials for i in gens["image_id"][:2]}
    first, second = creds.values()
    assert first["generation"]["source_image"] == "holiday.png"
    assert first["ingredients"][0]["title"] == "holiday.png"
    assert str(tmp_path) not in json.dumps(first)
    assert second["generation"]["source_image"] == "skimage:astronaut"
    assert second["ingredients"][0]["title"] == "skimage:astronaut"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process (as the entry point does) and return (exit code, stdout, stderr)."""
    from diffaudit.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


def _one_line_error(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err


def test_cli_bad_inputs_are_one_line_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _one_line_error(cli(capsys, "stamp", "x.png", "--cert", "nope.pem", "--key", "nope.key"), "nope.pem")
    _one_line_error(cli(capsys, "stamp", "nofile.png", "--out", "st2"), "nofile.png", "no such file")
    _one_line_error(cli(capsys, "provenance", "robustness", "nofile.png"), "nofile.png")
    _one_line_error(cli(capsys, "verify", "nofile.png"), "nofile.png", "no such file")
    (tmp_path / "empty").mkdir()
    _one_line_error(cli(capsys, "verify", "empty"), "empty", "no files of a type C2PA reads")
    junk = tmp_path / "junkdir"
    junk.mkdir()
    (junk / "a.png").write_bytes(png_bytes(skimage_photo("rocket", 64)))
    (junk / "b.png").write_bytes(b"not an image at all")
    _one_line_error(cli(capsys, "stamp", "junkdir", "--out", "st3"), str(Path("junkdir") / "b.png"))
    assert not (tmp_path / "st3").exists()  # refused before stamping a.png


def test_robustness_refuses_images_below_the_watermark_minimum(capsys, tmp_path):
    run = make_photo_run(tmp_path / "small", size=64)
    _one_line_error(cli(capsys, "provenance", "robustness", str(run.root)), "256x256")
    assert not run.table_path("provenance/robustness").exists()


def test_verify_prints_only_the_generation_facts_a_loose_file_has(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(png_bytes(skimage_photo("rocket", 64)))
    assert cli(capsys, "stamp", "a.png", "--out", "out", "--model", "my-model")[0] == 0
    code, out, err = cli(capsys, "verify", "out")
    assert code == 0, err
    assert "  generated   by my-model\n" in out and "None" not in out


def test_restamping_a_run_keeps_its_identity_and_store(photo_run, identity, tmp_path, capsys):
    """`diffaudit stamp RUN` after `audit run` (which stamped with the config's identity and store) must not
    sign the new images with a freshly made default identity into the default store (found in review)."""
    import pandas as pd

    from provenance.keys import default_identity_dir

    db = tmp_path / "run-store.sqlite"
    stamp_run(photo_run.root, identity=identity, store=db)
    recorded = photo_run.info["stages"]["stamp"]
    assert recorded["identity"] == str(identity.folder.resolve()) and recorded["store"] == str(db.resolve())
    gens = photo_run.read_table("generations")
    extra = gens.iloc[:1].assign(image_id="extra-1", seed=99)
    extra["path"] = photo_run.image_relpath(extra["prompt_id"].iloc[0], 99)
    photo_run.path(extra["path"].iloc[0]).write_bytes(photo_run.path(gens["path"].iloc[0]).read_bytes())
    photo_run.write_table("generations", pd.concat([gens, extra], ignore_index=True))
    code, out, _ = cli(capsys, "stamp", str(photo_run.root))
    assert code == 0 and "signing with the identity this run was stamped with" in out
    assert f"store {db.resolve()}" in out and "stamped 1 image(s)" in out
    assert not (default_identity_dir() / "signer.pem").exists()  # no default identity was made
    with ManifestStore(db) as store:
        assert len(store) == len(gens) + 1
