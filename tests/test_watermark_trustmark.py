"""trustMark: TrustMark's ONNX encoder/decoder from a folder the user supplies (``$DIFFAUDIT_TRUSTMARK``).

No weights ship with diffaudit and nothing is downloaded, so these tests build a tiny stand-in with the
real models' inputs and outputs: a linear encoder that adds one fixed block pattern per bit (+ for a 1,
- for a 0) and a decoder that averages 8x8 blocks and correlates with the patterns. The patterns are
orthonormal and zero-mean per channel, so on flat covers (any colour, plus noise) the decoder reads
exactly what the encoder wrote: what these tests check is diffaudit's side (framing, working-size
residual resized to the image, batching, loading and its errors, the false-positive bound), not
TrustMark's robustness. The stand-in is written as ONNX directly (``_onnx``): ``torch.onnx.export``
needs the ``onnx`` package, which diffaudit does not depend on.

With real weights (Adobe's released ONNX exports, e.g. ``encoder_Q.onnx`` / ``decoder_Q.onnx``):

    DIFFAUDIT_TRUSTMARK_REAL=/path/to/folder pytest -q -s tests/test_watermark_trustmark.py -k real
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffaudit.corpus import corpus
from diffaudit.errors import ConfigError, DiffauditError, InputError
from provenance import watermark as W
from provenance.watermark import TrustMark, available, embed_verified, get, psnr

GRID = 32           # pattern blocks per side (8 px at the encoder's 256)
AMPLITUDE = 0.11    # pattern scale in [-1, 1] units: residual rms ~0.02 (2.5 levels, ~40 dB)
GAIN = 6.0          # decoder logits are +-GAIN for a clean read


# --- a minimal ONNX writer (protobuf wire format) ------------------------------------------------

class _onnx:
    """Just enough of onnx.proto (ModelProto, GraphProto, NodeProto, TensorProto, ValueInfoProto) to
    write a small graph that onnxruntime loads: field numbers as in onnx/onnx.proto, opset 17."""

    @staticmethod
    def varint(v: int) -> bytes:
        v &= (1 << 64) - 1
        out = bytearray()
        while True:
            b, v = v & 0x7F, v >> 7
            out.append(b | 0x80 if v else b)
            if not v:
                return bytes(out)

    @classmethod
    def int(cls, field: int, v: int) -> bytes:
        return cls.varint(field << 3) + cls.varint(v)

    @classmethod
    def bytes(cls, field: int, data: bytes | str) -> bytes:
        data = data.encode() if isinstance(data, str) else data
        return cls.varint(field << 3 | 2) + cls.varint(len(data)) + data

    @classmethod
    def tensor(cls, name: str, a: np.ndarray) -> bytes:
        a = np.ascontiguousarray(a)
        dtype = {np.dtype(np.float32): 1, np.dtype(np.int64): 7}[a.dtype]
        return b"".join(cls.int(1, d) for d in a.shape) + cls.int(2, dtype) + cls.bytes(8, name) + \
            cls.bytes(9, a.tobytes())

    @classmethod
    def value(cls, name: str, shape) -> bytes:
        dims = b"".join(cls.bytes(1, cls.bytes(2, d) if isinstance(d, str) else cls.int(1, d)) for d in shape)
        return cls.bytes(1, name) + cls.bytes(2, cls.bytes(1, cls.int(1, 1) + cls.bytes(2, dims)))

    @classmethod
    def node(cls, op: str, inputs, outputs, **attrs) -> bytes:
        def attr(k, v):
            if isinstance(v, list):
                return cls.bytes(1, k) + b"".join(cls.int(8, i) for i in v) + cls.int(20, 7)
            if isinstance(v, float):
                return cls.bytes(1, k) + cls.varint(2 << 3 | 5) + struct.pack("<f", v) + cls.int(20, 1)
            return cls.bytes(1, k) + cls.int(3, v) + cls.int(20, 2)
        return (b"".join(cls.bytes(1, i) for i in inputs) + b"".join(cls.bytes(2, o) for o in outputs)
                + cls.bytes(4, op) + b"".join(cls.bytes(5, attr(k, v)) for k, v in attrs.items()))

    @classmethod
    def model(cls, nodes, inputs, outputs, init) -> bytes:
        graph = (b"".join(cls.bytes(1, n) for n in nodes) + cls.bytes(2, "g")
                 + b"".join(cls.bytes(5, cls.tensor(k, v)) for k, v in init.items())
                 + b"".join(cls.bytes(11, cls.value(n, s)) for n, s in inputs)
                 + b"".join(cls.bytes(12, cls.value(n, s)) for n, s in outputs))
        return cls.int(1, 8) + cls.bytes(2, "diffaudit-test") + cls.bytes(7, graph) + cls.bytes(8, cls.int(2, 17))


def _patterns(seed: int = 0) -> np.ndarray:
    """[100, 3 * GRID * GRID] orthonormal rows, zero mean per channel (flat covers read as nothing)."""
    g = np.random.default_rng(seed).normal(size=(100, 3, GRID * GRID))
    g -= g.mean(axis=2, keepdims=True)
    q, _ = np.linalg.qr(g.reshape(100, -1).T)
    return q.T.astype(np.float32)


def write_stand_in(folder: Path, *, variant: str = "Q", decode_size: int = 256, names: str = "ours",
                   probabilities: bool = False, batch="B", layout: str = "encoder_{v}.onnx",
                   secret_bits: int = 100) -> Path:
    """Write a linear TrustMark stand-in (see the module docstring) as two ONNX files into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cover, secret, stego_out, stego_in, bits_out = {
        "ours": ("cover", "secret", "stego", "stego", "bits"),
        "adobe": ("onnx::Concat_0", "onnx::Gemm_1", "image", "image", "output"),
        "wrong": ("picture", "message", "marked", "stego", "bits")}[names]
    p = _patterns()[:secret_bits]
    block = 256 // GRID
    enc = _onnx.model(
        [_onnx.node("Mul", [secret, "two"], ["s2"]), _onnx.node("Sub", ["s2", "one"], ["s"]),
         _onnx.node("MatMul", ["s", "W"], ["z"]), _onnx.node("Reshape", ["z", "shape"], ["z4"]),
         _onnx.node("ConvTranspose", ["z4", "K"], ["up"], strides=[block, block], group=3,
                    kernel_shape=[block, block]),
         _onnx.node("Add", [cover, "up"], [stego_out])],
        [(cover, [batch, 3, 256, 256]), (secret, [batch, secret_bits])], [(stego_out, [batch, 3, 256, 256])],
        {"two": np.array(2, np.float32), "one": np.array(1, np.float32), "W": AMPLITUDE * p,
         "shape": np.array([-1, 3, GRID, GRID], np.int64), "K": np.ones((3, 1, block, block), np.float32)})
    pool = decode_size // GRID
    nodes = [_onnx.node("AveragePool", [stego_in], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
             _onnx.node("Reshape", ["pooled", "flat"], ["f"]),
             _onnx.node("MatMul", ["f", "D"], ["logits" if probabilities else bits_out])]
    if probabilities:
        nodes.append(_onnx.node("Sigmoid", ["logits"], [bits_out]))
    dec = _onnx.model(nodes, [(stego_in, [batch, 3, decode_size, decode_size])], [(bits_out, [batch, secret_bits])],
                      {"flat": np.array([-1, 3 * GRID * GRID], np.int64), "D": (GAIN / AMPLITUDE) * p.T})
    enc_name = layout.format(v=variant)
    (folder / enc_name).write_bytes(enc)
    (folder / enc_name.replace("encoder", "decoder")).write_bytes(dec)
    return folder


def flat(h: int, w: int, colour=(128, 120, 140), seed: int = 0, noise: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.asarray(colour, np.float32)[None, None] + rng.normal(0, noise, (h, w, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """The stand-in configured through $DIFFAUDIT_TRUSTMARK; ``get``'s shared instances are reset."""
    folder = write_stand_in(tmp_path / "trustmark")
    monkeypatch.setenv(W.TRUSTMARK_ENV, str(folder))
    monkeypatch.delenv(W.TRUSTMARK_VARIANT_ENV, raising=False)
    get.cache_clear()
    yield folder
    get.cache_clear()


# --- loading and its errors ----------------------------------------------------------------------

def test_available_and_get_follow_the_environment(weights, monkeypatch):
    assert "trustMark" in available()
    wm = get("trustMark")
    assert isinstance(wm, TrustMark) and wm.variant == "Q" and wm.decode_size == 256
    assert wm.decoder_output == "logits" and wm.batch == 16
    assert (wm.payload_bits, wm.model_bits) == (96, 100)
    monkeypatch.delenv(W.TRUSTMARK_ENV)
    get.cache_clear()
    assert "trustMark" not in available() and "rivaGan" in available()
    with pytest.raises(ConfigError, match=W.TRUSTMARK_ENV) as e:
        get("trustMark")
    assert "\n" not in str(e.value)


def test_missing_folder_or_files_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(W.TRUSTMARK_VARIANT_ENV, raising=False)
    monkeypatch.setenv(W.TRUSTMARK_ENV, str(tmp_path / "nowhere"))
    assert "trustMark" not in available()
    with pytest.raises(ConfigError, match="is not a folder"):
        TrustMark()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "encoder_Q.onnx").write_bytes(b"")    # a decoder is missing
    with pytest.raises(ConfigError, match="no TrustMark variant Q .* no encoder/decoder pair") as e:
        TrustMark(tmp_path / "empty")
    assert "\n" not in str(e.value)
    write_stand_in(tmp_path / "pv", variant="P", decode_size=224)
    with pytest.raises(ConfigError, match="variant B .* it has variant\\(s\\) P"):
        TrustMark(tmp_path / "pv", variant="B")
    (tmp_path / "junk").mkdir()
    for name in ("encoder_Q.onnx", "decoder_Q.onnx"):
        (tmp_path / "junk" / name).write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot load") as e:
        TrustMark(tmp_path / "junk")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind,message", [
    ("names", "does not look like a TrustMark encoder: expected inputs cover"),
    ("secret", "does not look like a TrustMark encoder: expected cover \\[B,3,256,256\\] and secret \\[B,100\\]"),
])
def test_wrong_inputs_are_one_line_errors(tmp_path, kind, message):
    folder = write_stand_in(tmp_path / kind, **({"names": "wrong"} if kind == "names" else {"secret_bits": 64}))
    with pytest.raises(InputError, match=message) as e:
        TrustMark(folder)
    assert "\n" not in str(e.value) and ("picture [" in str(e.value) or "secret ['B', 64]" in str(e.value))


def test_adobe_names_other_file_layout_variant_and_probabilities(tmp_path):
    """Adobe's export names (onnx::Concat_0, onnx::Gemm_1, image), trustmark_P_*.onnx files, a decoder at
    224 with a fixed batch of 1 that outputs probabilities: all read from the models, same payload."""
    folder = write_stand_in(tmp_path / "p", variant="P", decode_size=224, names="adobe", probabilities=True,
                            batch=1, layout="trustmark_{v}_encoder.onnx")
    wm = TrustMark(folder)
    assert (wm.variant, wm.decode_size, wm.batch, wm.decoder_output) == ("P", 224, 1, "probabilities")
    rgbs = [flat(256, 256, seed=1), flat(320, 400, (90, 160, 110), seed=2)]
    payloads = [wm.new_payload() for _ in rgbs]
    for rgb, payload, marked in zip(rgbs, payloads, wm.encode_batch(rgbs, payloads), strict=True):
        det = wm.detect(marked)
        assert det.payload == payload and det.corrected == 0 and det.confidence > 0.95
        assert np.array_equal(marked, wm.encode(rgb, payload))


# --- the framing and the residual path -------------------------------------------------------------

def test_round_trip_carries_the_framed_payload(weights):
    wm = get("trustMark")
    rgb = flat(256, 256)
    payload = wm.new_payload()
    assert len(payload) == 16
    bits = wm.payload_to_bits(payload)
    marked = wm.encode(rgb, payload)
    assert 38.0 < psnr(rgb, marked) < 45.0
    p = wm.scores_batch([marked])[0]
    assert p.shape == (96,) and np.array_equal((p > 0.5).astype(np.uint8), bits)
    det = wm.detect(marked)
    assert det.detected and det.payload == payload and det.check_ok and det.corrected == 0
    assert np.array_equal(det.bits, bits)
    # what the model was given: the 96 framed bits, then the version field 1111 (no TrustMark schema)
    feed = wm._encoder_feed(wm._frames([rgb]), bits[None].astype(np.float32))["secret"]
    assert feed.shape == (1, 100) and np.array_equal(feed[0, 96:], np.ones(4))
    # the unmarked cover gives nothing: the check fails
    clean = wm.detect(rgb)
    assert not clean.detected and clean.payload is None and not clean.check_ok


def test_chase_corrects_the_least_reliable_bits(weights):
    wm = get("trustMark")
    payload = wm.new_payload()
    p = wm.scores_batch([wm.encode(flat(256, 256), payload)])[0]
    weak = p.copy()
    weak[[3, 40, 77]] = 1.0 - 0.45 * (p[[3, 40, 77]] > 0.5) - 0.275   # three bits read wrong, barely
    det = wm._decide(weak, wm.chase_bits)
    assert det.payload == payload and det.corrected == 3


@pytest.mark.parametrize("size", [(384, 512), (300, 700), (512, 256)])
def test_residual_is_made_at_256_and_resized_to_the_image(weights, size):
    wm = get("trustMark")
    h, w = size
    payload = wm.new_payload()
    small, big = flat(256, 256, noise=0), flat(h, w, noise=0)    # the same flat colour: one working frame
    r256 = wm.encode(small, payload).astype(np.float32) - small
    marked = wm.encode(big, payload)
    assert marked.shape == (h, w, 3)
    expected = W.cv2.resize(r256, (w, h), interpolation=W.cv2.INTER_LINEAR)
    assert np.abs(marked.astype(np.float32) - big - expected).max() <= 1.0   # rounding of each copy
    assert wm.detect(marked).payload == payload
    noisy = flat(h, w, (70, 90, 200), seed=5)
    assert wm.detect(wm.encode(noisy, payload)).payload == payload


def test_batch_equals_single(weights):
    wm = get("trustMark")
    rgbs = [flat(256, 256, seed=i, colour=(60 + 40 * i, 128, 190 - 30 * i)) for i in range(3)] + \
        [flat(384, 512, seed=9), flat(600, 300, seed=10)]
    payloads = [wm.new_payload() for _ in rgbs]
    batch = wm.encode_batch(rgbs, payloads)
    for rgb, payload, b in zip(rgbs, payloads, batch, strict=True):
        assert np.array_equal(b, wm.encode(rgb, payload))
    scores = wm.scores_batch(batch)
    single = np.stack([wm.scores_batch([b])[0] for b in batch])
    assert np.allclose(scores, single, atol=1e-6)
    assert [wm.detect(b).payload for b in batch] == payloads
    with pytest.raises(ValueError, match="one payload per image"):
        wm.encode_batch(rgbs, payloads[:2])


def test_strength_scales_the_residual_within_its_clamp(weights):
    wm = get("trustMark")
    rgb, payload = flat(256, 256, noise=0), wm.new_payload()
    r1, r15 = (wm.encode(rgb, payload, strength=s).astype(np.float32) - rgb for s in (1.0, 1.5))
    assert np.abs(r15 - 1.5 * r1).max() <= 1.6    # rounding of both
    assert np.abs(r15).max() <= wm.clamp * 127.5 + 0.5
    emb = embed_verified(rgb, payload, method="trustMark")
    assert emb.readable and emb.strength == 1.0 and emb.checks == {"png": True, "jpeg_q90": True}


def test_mirrored_copy_is_found_and_tries_are_counted(weights):
    wm = get("trustMark")
    payload = wm.new_payload()
    marked = wm.encode(flat(256, 320, seed=4), payload)
    mirrored = np.ascontiguousarray(marked[:, ::-1])
    assert wm.detect(mirrored).payload != payload
    det = W.detect_robust(mirrored, method="trustMark", sizes=[(640, 512)])   # W x H: 2x this one
    assert det.payload == payload and det.geometry == "mirrored" and det.tries == 2
    assert det.false_positive_bound == pytest.approx((2 ** 8 + 3) / 2 ** 32)   # 4 planned tries


# --- false positives ---------------------------------------------------------------------------------

def test_false_positive_bound_and_clean_images(weights):
    wm = get("trustMark")
    assert wm.detect(flat(256, 256)).false_positive_bound == pytest.approx(2 ** 8 / 2 ** 32)
    # the most tries a robust decode makes (as is + 16 rescales, each mirrored) stays far below 1e-6
    worst = (2 ** wm.chase_bits + 2 * (1 + 16) - 1) / 2 ** wm.crc_bits
    assert worst < 1e-7 and wm.false_positive_bound(34, chase_bits=wm.chase_bits) < 3e-6
    # clean images (test split: real content the stand-in decoder reads as arbitrary logits): no payload
    for s in corpus(8, split="test", seed=71, min_side=256, max_side=512):
        det = W.detect_robust(s.rgb, method="trustMark")
        assert not det.detected and det.payload is None and det.false_positive_bound <= worst
    # random soft bits, as a decoder on unmarked images gives: none of 200 x 256 Chase words passes the
    # CRC-32 (expected 200 x 256 / 2**32 = 1.2e-5 passes)
    rng = np.random.default_rng(5)
    assert sum(wm._decide(rng.random(96), wm.chase_bits).check_ok for _ in range(200)) == 0


# --- C2PA soft binding and the CLI --------------------------------------------------------------------

def test_soft_binding_alg_is_ours_not_adobes(weights, tmp_path, monkeypatch):
    from provenance import c2pa as cc
    from provenance.keys import init_identity
    from provenance.stamp import Stamper, verify_bytes
    from provenance.store import ManifestStore

    monkeypatch.setenv("DIFFAUDIT_HOME", str(tmp_path / "home"))
    buf = io.BytesIO()
    Image.fromarray(flat(320, 320, seed=8)).save(buf, "PNG")
    with ManifestStore(tmp_path / "store.sqlite") as store:
        stamp = Stamper(init_identity(tmp_path / "id"), watermark="trustMark", store=store).stamp(
            buf.getvalue(), {"model": "m", "seed": 1}, title="flat.png")
        assert stamp.watermark == "trustMark" and len(stamp.payload) == 16
        alg = cc.Watermarked("trustMark", stamp.payload, b"").alg
        assert alg == "org.diffaudit.watermark.trustMark.1" and alg.encode() in stamp.manifest
        assert b"com.adobe.trustmark" not in stamp.manifest
        resaved = io.BytesIO()       # a re-save strips the manifest; the watermark names the stamp
        Image.open(io.BytesIO(stamp.data)).convert("RGB").save(resaved, "PNG")
        r = verify_bytes(resaved.getvalue(), store=store)
        assert r.watermark["method"] == "trustMark" and r.watermark["payload"] == stamp.payload
        monkeypatch.delenv(W.TRUSTMARK_ENV)  # a verifier without the weights: said, not an error
        get.cache_clear()
        r = verify_bytes(resaved.getvalue(), store=store)
        assert r.watermark["not_tried"] == ["trustMark"] and "trustMark" not in r.watermark["tried"]


def test_cli_stamp_without_weights_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from diffaudit.cli import main

    monkeypatch.delenv(W.TRUSTMARK_ENV, raising=False)
    monkeypatch.setenv("DIFFAUDIT_HOME", str(tmp_path / "home"))
    get.cache_clear()
    Image.fromarray(flat(256, 256)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as done:
        main(["stamp", str(tmp_path / "a.png"), "--watermark", "trustMark", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and W.TRUSTMARK_ENV in err and err.strip().count("\n") == 0
    assert issubclass(ConfigError, DiffauditError)


# --- real weights (skipped unless DIFFAUDIT_TRUSTMARK_REAL names a folder) -------------------------------

REAL = os.environ.get("DIFFAUDIT_TRUSTMARK_REAL")


@pytest.mark.skipif(not REAL, reason="set DIFFAUDIT_TRUSTMARK_REAL to a folder with TrustMark's ONNX weights")
def test_real_weights_round_trip_and_clean_images(monkeypatch):
    monkeypatch.setenv(W.TRUSTMARK_ENV, REAL)
    get.cache_clear()
    try:
        wm = get("trustMark")
        print(f"\ntrustMark {wm.variant}: decode at {wm.decode_size}, batch {wm.batch}, {wm.decoder_output}")
        images = [s.rgb for s in corpus(6, split="test", seed=73, min_side=256, max_side=768)]
        readable, quality = 0, []
        for rgb in images:
            emb = embed_verified(rgb, wm.new_payload(), method="trustMark")
            det = wm.detect(emb.rgb)
            readable += emb.readable and det.payload == emb.payload
            quality.append(emb.psnr)
            print(f"  {rgb.shape[1]}x{rgb.shape[0]}: PSNR {emb.psnr:.1f} dB at strength {emb.strength}, "
                  f"confidence {det.confidence:.3f}, read back {emb.checks}")
        clean = [wm.detect_robust(s.rgb) for s in corpus(20, split="test", seed=79, max_side=768)]
        print(f"  readable {readable}/{len(images)}; clean images passing the check {sum(d.check_ok for d in clean)}/20, "
              f"their confidence {np.mean([d.confidence for d in clean]):.3f}")
        assert readable >= len(images) - 1
        assert not any(d.detected for d in clean)
    finally:
        get.cache_clear()
