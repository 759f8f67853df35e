"""The shared decode policy, the one pHash and the calibration/held-out corpus."""

from __future__ import annotations

import io
import struct
import zlib

import imagehash
import numpy as np
import pytest
from PIL import Image

from diffaudit import corpus, imaging


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width x height`` (a decompression bomb's header, no real pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_pixel_cap_is_read_from_the_header_and_can_be_raised(monkeypatch):
    bomb = _png_header_only(20000, 20000)
    with pytest.raises(imaging.ImageTooLarge, match="DIFFAUDIT_MAX_PIXELS"):
        imaging.open_image(bomb)
    with pytest.raises(imaging.ImageTooLarge):
        imaging.decode_rgb(bomb)
    monkeypatch.setenv("DIFFAUDIT_MAX_PIXELS", "100")
    small = io.BytesIO()
    Image.new("RGB", (11, 10)).save(small, "PNG")
    with pytest.raises(imaging.ImageTooLarge, match="110 pixels"):
        imaging.open_image(small.getvalue())
    monkeypatch.setenv("DIFFAUDIT_MAX_PIXELS", "nonsense")
    with pytest.raises(imaging.InputError, match="whole number"):
        imaging.max_pixels()


def test_unreadable_bytes_are_one_input_error():
    with pytest.raises(imaging.UnreadableImage):
        imaging.open_image(b"not an image at all")
    with pytest.raises(imaging.InputError, match="no such file"):
        imaging.open_image("/nonexistent/x.png")


def test_phash_is_imagehash_bit_for_bit_on_textured_images():
    """Flat images and some patterns have degenerate pHashes (rounding decides their bits): not compared."""
    for sample in corpus.corpus(24, split="test", seed=5, max_side=320, kinds=("document", "graphic", "texture")):
        img = Image.fromarray(sample.rgb)
        assert format(imaging.phash(img), "016x") == str(imagehash.phash(img)), sample.kind


def test_corpus_splits_are_reproducible_and_hold_disjoint_photos():
    assert not set(corpus.PHOTOS_CALIBRATION) & set(corpus.PHOTOS_HELDOUT)
    a = [s.rgb for s in corpus.corpus(6, split="heldout", seed=1, max_side=300)]
    b = [s.rgb for s in corpus.corpus(6, split="heldout", seed=1, max_side=300)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    held = {s.source for s in corpus.corpus(80, split="heldout", max_side=300) if s.kind == "photo"}
    cal = {s.source for s in corpus.corpus(80, split="calibration", max_side=300) if s.kind == "photo"}
    assert held <= set(corpus.PHOTOS_HELDOUT) and cal <= set(corpus.PHOTOS_CALIBRATION) and held and cal
    assert {s.kind for s in corpus.corpus(40, split="test", max_side=300)} <= set(corpus.KINDS) - {"photo"}


def test_probe_decoding_refuses_a_bomb_from_its_header(tmp_path):
    """An imported run may hold any file: the probes decode under the same cap as every other stage."""
    from audit.probes.base import decode

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(imaging.ImageTooLarge, match="cannot read image x at .*the cap of"):
        decode("x", str(path))


def test_a_padded_image_file_is_refused_before_it_is_read_by_verify_and_stamp(tmp_path):
    """A valid 32x32 PNG followed by 100 MB (a sparse file: a bomb by size, not by pixels) is not read whole;
    a file type Pillow does not know is still read, for C2PA to look at."""
    from provenance.stamp import stamp_files
    from provenance.verify import verify_paths

    padded = tmp_path / "padded.png"
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="PNG")
    padded.write_bytes(buf.getvalue())
    with padded.open("r+b") as f:
        f.truncate(imaging.max_file_bytes(32, 32) + 1)
    with pytest.raises(imaging.ImageTooLarge, match="padded"):
        imaging.read_bytes_bounded(padded)
    r = verify_paths([padded], default_store=False)[0]
    assert r.status == "none" and "padded" in r.problem
    with pytest.raises(imaging.ImageTooLarge, match="padded"):
        stamp_files([padded], tmp_path / "out", identity=None, store=tmp_path / "s.sqlite")
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.sqlite").exists()
    other = tmp_path / "doc.pdf"
    other.write_bytes(b"%PDF-1.4\n%%EOF\n")
    assert imaging.read_bytes_bounded(other) == other.read_bytes()


def test_both_decoders_read_pixels_as_stored_and_stamp_writes_them_upright(tmp_path):
    """One orientation policy: ``decode_rgb`` (OpenCV) and ``open_image`` (Pillow) agree on a phone photo
    with EXIF orientation 6 (OpenCV alone would turn it); ``stamp`` writes the picture upright."""
    from provenance.keys import init_identity
    from provenance.stamp import Stamper

    identity = init_identity(tmp_path / "id")
    rng = np.random.default_rng(5)
    stored = np.repeat(np.repeat(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8), 16, 0), 16, 1)  # 192x320
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    a = imaging.decode_rgb(data)
    b = np.asarray(imaging.open_image(data, mode="RGB"))
    assert a.shape == b.shape == stored.shape and np.abs(a.astype(int) - b).mean() < 2
    out = Stamper(identity, watermark="none").stamp(data, {"model": "m"}, title="phone.jpg")
    shown = np.asarray(imaging.open_image(out.data, mode="RGB"))
    assert shown.shape == (320, 192, 3)  # as viewers show the original
    assert Image.open(io.BytesIO(out.data)).getexif().get(0x0112, 1) == 1
