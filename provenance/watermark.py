"""Invisible watermarks carrying a short, checked payload that identifies one stamped image.

Methods (registered in ``diffaudit.registry.WATERMARKS``) follow invisible-watermark (imwatermark):

- ``dwtDctSvd`` (default): quantises the top singular value of each 4x4 block of the Haar DWT
  approximation of the U channel (scale 36). Survives JPEG q90 with chroma subsampling.
- ``dwtDct``: quantises each block's largest AC coefficient (imwatermark's ``maxDct``). Fragile.
- ``rivaGan``: the RivaGAN ONNX encoder/decoder shipped inside the imwatermark wheel, run with
  onnxruntime (32 bits only; ~2 s per 512² image on one CPU core).

The DWT methods are re-implemented here, vectorised over blocks with numpy (batched top singular
vectors instead of a Python loop with one SVD per block: ~4x faster to embed and to decode), and stay
bit-compatible with imwatermark's decoders (a test checks it). Deliberate differences when embedding:
only U changes (imwatermark also swaps the horizontal and vertical detail bands, a visible artefact),
pixels are rounded and clipped instead of wrapped, and dwtDct keeps its marked coefficient the largest
in its block (else the decoder reads another one).
Nothing here imports torch: imwatermark's package ``__init__`` does (for RivaGAN), so it is never imported.

Payload layout (most significant bit first, ``id_bits + crc_bits`` bits embedded):

==========  =======  ======  =====================================================================
method      id bits  check   check value
==========  =======  ======  =====================================================================
dwtDctSvd   40       24      CRC-24/OpenPGP (poly 0x864CFB, init 0xB704CE) over b"DA" + id (5 bytes)
dwtDct      40       24      same
rivaGan     24       8       CRC-8 (poly 0x07, init 0xFF) over b"DA" + id (3 bytes)
==========  =======  ======  =====================================================================

The ``b"DA"`` prefix is not embedded; it keeps all-zero / all-one bit strings (what flat images decode
to) from passing the check. Decoding is soft: each bit comes with ``p``, the share of its blocks voting 1
(or the RivaGAN decoder's sigmoid). If the hard bits fail the check, the DWT methods try flipping subsets
of the 8 least reliable bits (256 candidates, most likely first; Chase decoding), which repairs the few
bits a JPEG re-save flips while keeping the chance that noise passes the check below 256 / 2^24 = 1.5e-5.
An image is *detected* when a candidate passes the check AND the mean per-bit confidence
``mean(|2 p - 1|)`` reaches the method's ``threshold``.

False-positive rate, measured with ``python bench/provenance.py --false-positives 1200`` (CPU) on 1,200
clean images from ``provenance.attacks.clean_corpus`` (random crops, rescales, flips, rotations and colour
jitter of the scikit-image / scikit-learn photos, and one in five a noise, gradient or plasma texture;
256-768 px): dwtDctSvd 0/1200 detected, 0/1200 even passing the check (95% upper bound 0.25%); dwtDct
0/1200 (same bound). Flat and smooth images reach confidence 1.0 (all blocks vote alike), so it is the
check that rejects clean images; the confidence threshold only drops noise-level decodes. rivaGan:
0/60 at 256² (decoding costs ~1-3 s per image on a shared CPU core; 95% upper bound 5%), but clean
confidences reach 0.97, above its 0.9 threshold, so its rate is essentially its 8-bit check's: about
1 in 256 clean images. Trust a rivaGan detection only when the payload is found in the manifest store.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pywt

MAGIC = b"DA"
MIN_PIXELS = 256 * 256  # imwatermark's own lower bound; fewer blocks make too few votes per bit
_U_TO_RGB = np.array([0.0, -0.395, 2.032], dtype=np.float32)  # OpenCV YUV->RGB coefficients of U


def crc(data: bytes, *, width: int, poly: int, init: int) -> int:
    """A plain MSB-first CRC (no reflection, no final xor), enough for a short payload check."""
    top, mask, reg = 1 << (width - 1), (1 << width) - 1, init
    for byte in data:
        reg ^= byte << (width - 8)
        for _ in range(8):
            reg = ((reg << 1) ^ poly) & mask if reg & top else (reg << 1) & mask
    return reg


@dataclass(frozen=True)
class Detection:
    """What a decoder found in one image."""

    method: str
    detected: bool          # check passed and confidence >= threshold
    payload: str | None     # the embedded id as hex, when detected
    confidence: float       # mean |2p - 1| over the payload bits, 0 (noise) .. 1 (clean watermark)
    check_ok: bool
    bits: np.ndarray        # the decoded bits (after correction), id then check
    corrected: int = 0      # bits flipped by Chase decoding to pass the check
    reason: str | None = None  # why nothing could be decoded (too small, not an image)
    #: Upper bound on the chance that an unmarked image yields a payload passing the check in this
    #: decode: candidate words tried (Chase patterns x geometric tries) / 2**crc_bits (union bound).
    false_positive_bound: float = 0.0


class Watermark:
    """A watermark method: ``embed``/``scores`` work on bits; ``encode``/``detect`` add the checked payload.

    Images are RGB ``uint8`` arrays of shape (H, W, 3). Subclasses implement ``_embed_bits`` and
    ``_scores`` (probability per bit that it is 1).
    """

    name: str = ""
    id_bits: int = 40
    crc_bits: int = 24
    chase_bits: int = 8      # least reliable bits tried flipped when the check fails (0: none)
    threshold: float = 0.2

    @property
    def payload_bits(self) -> int:
        return self.id_bits + self.crc_bits

    # -- payload ---------------------------------------------------------------------------------
    def check_value(self, ident: int) -> int:
        data = MAGIC + ident.to_bytes(self.id_bits // 8, "big")
        if self.crc_bits == 24:
            return crc(data, width=24, poly=0x864CFB, init=0xB704CE)
        if self.crc_bits == 8:
            return crc(data, width=8, poly=0x07, init=0xFF)
        raise ValueError(f"no check defined for {self.crc_bits} bits")

    def payload_to_bits(self, payload: str) -> np.ndarray:
        """Bits to embed for a payload given as hex (``id_bits // 4`` digits)."""
        ident = int(payload, 16)
        if ident >> self.id_bits or len(payload) != self.id_bits // 4:
            raise ValueError(f"{self.name} payloads are {self.id_bits // 4} hex digits, got {payload!r}")
        word = (ident << self.crc_bits) | self.check_value(ident)
        return np.array([(word >> (self.payload_bits - 1 - i)) & 1 for i in range(self.payload_bits)],
                        dtype=np.uint8)

    def new_payload(self) -> str:
        """A fresh random id as hex: no coordination across runs or machines. Ids can collide (40 bits: about
        a 40% chance of one pair among a million stamps), so the store breaks payload ties by pHash."""
        return os.urandom(self.id_bits // 8).hex()

    # -- image level -----------------------------------------------------------------------------
    def too_small(self, rgb: np.ndarray) -> bool:
        return rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] * rgb.shape[1] < MIN_PIXELS

    def encode(self, rgb: np.ndarray, payload: str) -> np.ndarray:
        """Return a watermarked copy of ``rgb`` carrying ``payload`` (hex)."""
        if self.too_small(rgb):
            raise ValueError(f"image {rgb.shape} is too small to watermark (needs >= 256x256 pixels, RGB)")
        return self._embed_bits(np.ascontiguousarray(rgb, dtype=np.uint8), self.payload_to_bits(payload))

    def detect(self, rgb: np.ndarray) -> Detection:
        """Decode, check and threshold. Never raises on a small or odd image: says why instead."""
        if self.too_small(rgb):
            return Detection(self.name, False, None, 0.0, False, np.zeros(0, np.uint8),
                             reason="image smaller than 256x256 or not RGB")
        p = self._scores(np.ascontiguousarray(rgb, dtype=np.uint8))
        confidence = float(np.mean(np.abs(2 * p - 1)))
        hard = (p * 255 > 127).astype(np.uint8)  # imwatermark's rule: an exact tie reads as 1
        for flips in self._candidates(p):
            bits = hard.copy()
            bits[flips] ^= 1
            word = int("".join(map(str, bits)), 2)
            ident, check = word >> self.crc_bits, word & ((1 << self.crc_bits) - 1)
            if check == self.check_value(ident):
                detected = confidence >= self.threshold
                payload = f"{ident:0{self.id_bits // 4}x}" if detected else None
                return Detection(self.name, detected, payload, confidence, True, bits, len(flips),
                                 false_positive_bound=self.false_positive_bound())
        return Detection(self.name, False, None, confidence, False, hard,
                         false_positive_bound=self.false_positive_bound())

    def false_positive_bound(self, tries: int = 1) -> float:
        """Union bound on a clean image passing the check: every candidate word of every try counts."""
        return min(1.0, tries * (1 << self.chase_bits) / 2.0 ** self.crc_bits)

    def _candidates(self, p: np.ndarray) -> list[np.ndarray]:
        """Bit positions to flip, most likely pattern first: none, then subsets of the least reliable."""
        if not self.chase_bits:
            return [np.zeros(0, dtype=int)]
        weak = np.argsort(np.abs(2 * p - 1), kind="stable")[: self.chase_bits]
        cost = np.abs(2 * p - 1)[weak]
        subsets = [[weak[i] for i in range(len(weak)) if m >> i & 1] for m in range(1 << len(weak))]
        order = np.argsort([sum(cost[i] for i in range(len(weak)) if m >> i & 1)
                            for m in range(1 << len(weak))], kind="stable")
        return [np.array(subsets[i], dtype=int) for i in order]

    def _embed_bits(self, rgb: np.ndarray, bits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _scores(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError


# --- the DWT methods ---------------------------------------------------------------------------

class _DwtBlocks(Watermark):
    """Shared plumbing: U channel -> Haar approximation -> 4x4 blocks in raster order -> bit votes."""

    scale: float = 36.0
    block: int = 4

    def _blocks(self, rgb: np.ndarray) -> tuple[np.ndarray, int, int]:
        h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
        yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV)  # == imwatermark's BGR2YUV on its BGR input
        # Haar level 1 approximation, (a + b + c + d) / 2 per 2x2 cell, computed by pywt as imwatermark
        # does, so that ties (integer pixels make many) round the same way in both decoders.
        ca = pywt.dwt2(yuv[:h, :w, 1], "haar")[0]
        b = self.block
        nr, nc = ca.shape[0] // b, ca.shape[1] // b
        blocks = ca[:nr * b, :nc * b].reshape(nr, b, nc, b).transpose(0, 2, 1, 3).reshape(-1, b, b)
        return blocks, nr, nc

    def _votes(self, values: np.ndarray) -> np.ndarray:
        """Per-block votes (1 if ``value mod scale`` is in the upper half) averaged per payload bit."""
        votes = (np.mod(values, self.scale) > 0.5 * self.scale).astype(np.float64)
        idx = np.arange(votes.size) % self.payload_bits
        return np.bincount(idx, weights=votes, minlength=self.payload_bits) / np.maximum(
            np.bincount(idx, minlength=self.payload_bits), 1)

    def _quantise(self, values: np.ndarray, bits: np.ndarray) -> np.ndarray:
        return (np.floor_divide(values, self.scale) + 0.25 + 0.5 * bits) * self.scale

    def _apply(self, rgb: np.ndarray, delta_blocks: np.ndarray, nr: int, nc: int) -> np.ndarray:
        """Add block deltas of the approximation band to the U channel and return RGB uint8.

        Only U changes, so RGB moves along OpenCV's YUV->RGB column for U: (0, -0.395, 2.032) per unit.
        """
        b = self.block
        h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
        d_ca = np.zeros((h // 2, w // 2), dtype=np.float32)
        d_ca[:nr * b, :nc * b] = delta_blocks.reshape(nr, nc, b, b).transpose(0, 2, 1, 3).reshape(nr * b, nc * b)
        # Inverse Haar with unchanged details: each pixel of a 2x2 cell moves by d_ca / 2.
        d_u = np.repeat(np.repeat(d_ca / 2.0, 2, axis=0), 2, axis=1)
        out = rgb.copy()
        out[:h, :w] = np.clip(np.rint(rgb[:h, :w] + d_u[:, :, None] * _U_TO_RGB), 0, 255).astype(np.uint8)
        return out


def top_singular(blocks: np.ndarray, squarings: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top singular value and vectors of many small matrices at once, by repeated squaring of B^T B.

    One batched matmul chain instead of one LAPACK call per block (~10x faster than ``np.linalg.svd``
    here). Exact to float precision whenever s0 > s1, which DC-dominated U-channel blocks always have
    (the U offset of 128 makes every block nearly rank one); for ties any top vector gives the same s0.
    """
    m = np.swapaxes(blocks, 1, 2) @ blocks
    for _ in range(squarings):
        m = m / np.maximum(np.trace(m, axis1=1, axis2=2), 1e-30)[:, None, None]
        m = m @ m
    v = m @ np.full((blocks.shape[2], 1), 0.5)
    norm = np.linalg.norm(v, axis=(1, 2), keepdims=True)
    v = np.where(norm > 1e-30, v / np.maximum(norm, 1e-30), 0.5)
    bv = blocks @ v
    s0 = np.linalg.norm(bv, axis=(1, 2))
    u = np.where(s0[:, None, None] > 1e-9, bv / np.maximum(s0, 1e-9)[:, None, None], 0.5)
    return s0, u, v


class DwtDctSvd(_DwtBlocks):
    """imwatermark ``dwtDctSvd``: the DCT is orthonormal, so a block's singular values equal its DCT's."""

    name = "dwtDctSvd"

    def _embed_bits(self, rgb: np.ndarray, bits: np.ndarray) -> np.ndarray:
        blocks, nr, nc = self._blocks(rgb)
        s0, u, v = top_singular(blocks)
        target = self._quantise(s0, bits[np.arange(len(blocks)) % self.payload_bits])
        delta = (target - s0)[:, None, None] * (u @ np.swapaxes(v, 1, 2))
        return self._apply(rgb, delta, nr, nc)

    def _scores(self, rgb: np.ndarray) -> np.ndarray:
        blocks, _, _ = self._blocks(rgb)
        return self._votes(top_singular(blocks)[0])


class DwtDct(_DwtBlocks):
    """imwatermark ``dwtDct`` (its ``maxDct``): quantise each block's largest non-DC coefficient."""

    name = "dwtDct"

    def _largest(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = blocks.reshape(len(blocks), -1)
        pos = np.argmax(np.abs(flat[:, 1:]), axis=1) + 1
        return pos, flat[np.arange(len(flat)), pos]

    def _embed_bits(self, rgb: np.ndarray, bits: np.ndarray) -> np.ndarray:
        blocks, nr, nc = self._blocks(rgb)
        pos, val = self._largest(blocks)
        mag = self._quantise(np.abs(val), bits[np.arange(len(blocks)) % self.payload_bits])
        # Unlike imwatermark, keep the marked coefficient the largest (else the decoder reads another one):
        # raise it by whole quantisation steps above the runner-up, which leaves its bit unchanged.
        flat = np.abs(blocks.reshape(len(blocks), -1)[:, 1:])
        runner_up = np.sort(flat, axis=1)[:, -2] + 1.0
        mag += np.ceil(np.maximum(runner_up - mag, 0) / self.scale) * self.scale
        target = np.sign(val + (val == 0)) * mag
        delta = np.zeros_like(blocks).reshape(len(blocks), -1)
        delta[np.arange(len(blocks)), pos] = target - val
        return self._apply(rgb, delta.reshape(blocks.shape), nr, nc)

    def _scores(self, rgb: np.ndarray) -> np.ndarray:
        blocks, _, _ = self._blocks(rgb)
        return self._votes(np.abs(self._largest(blocks)[1]))


# --- RivaGAN -----------------------------------------------------------------------------------

def _imwatermark_dir() -> Path:
    """imwatermark's folder, found without running its ``__init__`` (which imports torch)."""
    spec = importlib.util.find_spec("imwatermark")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("invisible-watermark is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _riva_sessions():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise ImportError("the rivaGan watermark needs onnxruntime: pip install onnxruntime") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    folder = _imwatermark_dir()
    return (ort.InferenceSession(str(folder / "rivagan_encoder.onnx"), opts),
            ort.InferenceSession(str(folder / "rivagan_decoder.onnx"), opts))


class RivaGan(Watermark):
    """RivaGAN (Zhang et al. 2019) via the ONNX models inside the imwatermark wheel; 32 bits only."""

    name = "rivaGan"
    id_bits = 24
    crc_bits = 8
    chase_bits = 0  # an 8-bit check leaves no room for guessing
    threshold = 0.9

    @staticmethod
    def _frame(rgb: np.ndarray) -> np.ndarray:
        bgr = rgb[:, :, ::-1].astype(np.float32) / 127.5 - 1.0  # the models were trained on BGR frames
        return np.ascontiguousarray(bgr.transpose(2, 0, 1)[None, :, None])

    def _embed_bits(self, rgb: np.ndarray, bits: np.ndarray) -> np.ndarray:
        encoder, _ = _riva_sessions()
        out = encoder.run(None, {"frame": self._frame(rgb), "data": bits[None].astype(np.float32)})[0]
        bgr = (np.clip(out[0, :, 0], -1.0, 1.0).transpose(1, 2, 0) + 1.0) * 127.5
        return np.clip(np.rint(bgr[:, :, ::-1]), 0, 255).astype(np.uint8)

    def _scores(self, rgb: np.ndarray) -> np.ndarray:
        _, decoder = _riva_sessions()
        logits = decoder.run(None, {"frame": self._frame(rgb)})[0][0].astype(np.float64)
        return 1.0 / (1.0 + np.exp(-logits))


def available() -> list[str]:
    """Registered watermark methods usable here (rivaGan needs onnxruntime)."""
    names = ["dwtDctSvd", "dwtDct"]
    if importlib.util.find_spec("onnxruntime") is not None:
        names.append("rivaGan")
    return names


@functools.cache
def get(name: str) -> Watermark:
    """The watermark method registered as ``name`` (one shared instance per name)."""
    from diffaudit.registry import WATERMARKS

    return WATERMARKS.load(name)()
