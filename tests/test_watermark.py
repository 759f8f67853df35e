"""Watermarks that survive what happens to images: read-back at stamp time, robust decoding (rescale,
mirror, crop, rotation) and the false-positive bound over every try.

Images come from the ``test`` split of ``diffaudit.corpus`` or are purpose-made; no strength or threshold
was chosen on them (those came from the ``calibration`` split).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from diffaudit.corpus import corpus
from provenance.watermark import (
    GENERATION_SIZES,
    SpreadTile,
    detect_robust,
    embed_verified,
    get,
    psnr,
    rescale_sizes,
)


def _test_images(n: int, seed: int, kinds=("document", "graphic", "texture"), size=(448, 640)):
    """Test-split images. Sharp periodic patterns are left out of the geometric tests: their own spectral
    lines can hide the pilot, the known weak case (the held-out benchmark reports it per kind)."""
    return [s.rgb for s in corpus(n, split="test", seed=seed, min_side=size[0], max_side=size[1], kinds=kinds)]


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, subsampling=2)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _resized(rgb: np.ndarray, factor: float) -> np.ndarray:
    img = Image.fromarray(rgb)
    return np.asarray(img.resize((round(img.width * factor), round(img.height * factor)), Image.BICUBIC))


@pytest.fixture(scope="module")
def stamped():
    """Three test-split images stamped with ssTile through the read-back: (original, stamped, payload)."""
    wm = get("ssTile")
    out = []
    for rgb in _test_images(3, seed=41):
        payload = wm.new_payload()
        emb = embed_verified(rgb, payload)
        assert emb.readable and emb.checks == {"png": True, "jpeg_q90": True}
        out.append((rgb, emb.rgb, payload))
    return out


# --- read-back at stamp time ---------------------------------------------------------------------

def test_read_back_reports_psnr_and_both_travel_checks(stamped):
    for original, marked, _ in stamped:
        assert 38.0 <= psnr(original, marked) < 41.0  # the 40 dB target, within the floor


@pytest.mark.parametrize("method,image", [
    ("ssTile", "binary_noise"),   # every pixel 0 or 255 at random: no room to add a pattern that reads back
    ("dwtDctSvd", "white"),       # a white page: the U channel cannot move without clipping
])
def test_read_back_refuses_an_image_that_cannot_carry_a_readable_mark(method, image):
    rng = np.random.default_rng(3)
    rgb = {"binary_noise": (rng.integers(0, 2, (256, 256)) * 255).astype(np.uint8)[..., None].repeat(3, 2),
           "white": np.full((256, 256, 3), 255, np.uint8)}[image]
    wm = get(method)
    payload = wm.new_payload()
    emb = embed_verified(rgb, payload, method=method)
    assert not emb.readable and not all(emb.checks.values())
    assert np.array_equal(emb.rgb, rgb)                    # nothing half-readable is written
    marked = wm.encode(rgb, payload, strength=wm.strengths[-1])
    assert wm.detect(marked).payload != payload             # and indeed it does not read back
    assert emb.psnr >= 38.0 or emb.strength == wm.strengths[0]


def test_read_back_raises_strength_within_the_floor_only():
    wm = get("ssTile")
    rgb = _test_images(1, seed=5)[0]
    strengths = [psnr(rgb, wm.encode(rgb, wm.new_payload(), strength=s)) for s in wm.strengths]
    assert strengths == sorted(strengths, reverse=True) and min(strengths) >= 37.9
    with pytest.raises(ValueError, match="single strength"):
        get("dwtDctSvd").encode(rgb, get("dwtDctSvd").new_payload(), strength=1.5)


# --- robust decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [0.5, 0.75])
def test_rescaled_copy_is_recovered_from_known_sizes_and_without_them(stamped, factor):
    for original, marked, payload in stamped:
        small = _resized(marked, factor)
        assert get("ssTile").detect(small).payload != payload          # read as is, it is lost
        h, w = original.shape[:2]
        known = detect_robust(small, sizes=[(w, h)])
        assert known.payload == payload and known.geometry == f"rescaled to {w}x{h}"
        found = detect_robust(small, sizes=[])                         # no size known: the sync search
        assert found.payload == payload and found.geometry.startswith("scale ")
        assert abs(float(found.geometry.split()[1].rstrip(",")) - factor) < 0.01


def test_screenshot_rotation_and_crop_are_recovered(stamped):
    for _, marked, payload in stamped:
        shot = _jpeg(_resized(marked, 0.8), 85)
        assert detect_robust(shot, sizes=[]).payload == payload
        img = Image.fromarray(marked)
        rotated = np.asarray(img.rotate(3, Image.BICUBIC))
        det = detect_robust(rotated, sizes=[])
        assert det.payload == payload and "rotation" in det.geometry
        w, h = img.size
        cropped = np.asarray(img.crop((w // 8, h // 8, w - w // 8, h - h // 8)))
        det = detect_robust(cropped, sizes=[])
        assert det.payload == payload and det.geometry == "as is"   # a crop is a shift of the fold


@pytest.mark.parametrize("method", ["ssTile", "dwtDctSvd"])
def test_mirrored_copy_is_recovered(method):
    wm = get(method)
    rgb = _test_images(1, seed=9, kinds=("graphic",), size=(384, 384))[0]
    payload = wm.new_payload()
    emb = embed_verified(rgb, payload, method=method)
    assert emb.readable
    mirrored = np.ascontiguousarray(emb.rgb[:, ::-1])
    assert wm.detect(mirrored).payload != payload
    det = detect_robust(mirrored, method=method)
    assert det.payload == payload and det.geometry == "mirrored" and det.tries == 2


def test_false_positive_bound_counts_every_try():
    wm = get("ssTile")
    clean = _test_images(1, seed=13, kinds=("texture",), size=(512, 512))[0]
    sizes = [(1024, 1024), (768, 768), (640, 480)]                   # two with the clean image's aspect
    det = detect_robust(clean, sizes=sizes)
    tries = 2 * (1 + 2 + wm.sync_candidates)                         # (as is + 2 rescales + sync) x mirror
    assert not det.detected and det.payload is None and det.tries == tries
    assert det.false_positive_bound == pytest.approx(tries * 2 ** wm.chase_bits / 2 ** wm.crc_bits)
    assert det.false_positive_bound > wm.detect(clean).false_positive_bound == pytest.approx(2 ** -26)
    # the default sizes keep ssTile's bound below the 1e-6 per image the issue asks for
    most = 2 * (1 + len(rescale_sizes((1024, 1024), GENERATION_SIZES)) + wm.sync_candidates)
    assert most * 2 ** wm.chase_bits / 2 ** wm.crc_bits < 1e-6
    # the generic decoder: Chase on the first try only, one word per later try
    dwt = get("dwtDctSvd")
    d = dwt.detect_robust(clean, sizes=sizes)
    assert d.tries == 6 and d.false_positive_bound == pytest.approx((2 ** 8 + 5) / 2 ** 24)


def test_clean_images_give_no_payload_under_robust_decoding():
    for rgb in _test_images(6, seed=17, kinds=("document", "flat", "texture", "pattern", "graphic")):
        for method in ("ssTile", "dwtDctSvd"):
            det = detect_robust(rgb, method=method)
            assert not det.detected and det.payload is None


def test_jpeg_and_brightness_decoded_as_is(stamped):
    for _, marked, payload in stamped:
        assert detect_robust(_jpeg(marked, 50)).payload == payload
        darker = np.clip(marked.astype(np.float32) * 0.8 + 20, 0, 255).astype(np.uint8)  # contrast-like
        assert detect_robust(darker).payload == payload


# --- format stability and compatibility ------------------------------------------------------------

def test_sstile_layout_is_fixed():
    """Old stamps must read back with any later version: the keyed layout comes from SHA-256, not from a
    random generator whose stream may change. A change here breaks every stamp ever made."""
    lay = SpreadTile().layout
    digest = hashlib.sha256(np.concatenate([lay.rows, lay.cols, lay.imag, lay.sign, lay.bits.ravel()])
                            .astype(np.int64).tobytes()).hexdigest()
    assert (len(lay.rows), len(lay.pilot), lay.bits.shape) == (424, 127, (72, 4))
    assert digest == "1bee0b2bbe3d66c450b73c910834d5049ebda03e395130f970251bc908e71529"


def test_robust_decoder_reads_imwatermark_own_embedding():
    """Bit-compatibility kept: imwatermark's encoder writes the payload, our robust decoder reads it back,
    also from a mirrored copy (a try imwatermark itself does not make)."""
    import importlib.util

    from provenance.watermark import _imwatermark_dir

    spec = importlib.util.spec_from_file_location("_ref_dwtDctSvd", _imwatermark_dir() / "dwtDctSvd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    wm = get("dwtDctSvd")
    rgb = _test_images(1, seed=21, kinds=("texture",), size=(384, 384))[0]
    payload = wm.new_payload()
    bits = wm.payload_to_bits(payload)
    theirs = np.ascontiguousarray(mod.EmbedDwtDctSvd(watermarks=list(bits), wmLen=wm.payload_bits)
                                  .encode(rgb[:, :, ::-1].copy())[:, :, ::-1])
    assert detect_robust(theirs, method="dwtDctSvd").payload == payload
    assert detect_robust(np.ascontiguousarray(theirs[:, ::-1]), method="dwtDctSvd").payload == payload


# --- the CLI -----------------------------------------------------------------------------------------

def test_cli_robustness_runs_the_grid_on_a_folder(capsys, monkeypatch, tmp_path):
    """`diffaudit provenance robustness FOLDER` stamps copies (C2PA + store), attacks them and prints the
    decode rate with its interval; an unknown attack is a one-line error."""
    from diffaudit.cli import main

    monkeypatch.setenv("DIFFAUDIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")  # a wide table: no cell is cut
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_test_images(1, seed=29, kinds=("graphic",), size=(320, 320))[0]).save(folder / "a.png")

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as done:
            main(["provenance", "robustness", str(folder), "--methods", "ssTile", *args])
        out = capsys.readouterr()
        return done.value.code or 0, out.out, out.err

    code, out, _ = run("--attacks", "none,flip,crop_75")
    assert code == 0
    rows = [line for line in out.splitlines() if "ssTile" in line]
    assert len(rows) == 3 and all("100%" in r for r in rows)
    code, _, err = run("--attacks", "none,sepia")
    assert code == 2 and "sepia" in err and err.count("\n") == 1
