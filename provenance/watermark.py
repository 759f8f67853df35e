"""Invisible watermarks carrying a short, checked payload that identifies one stamped image.

Methods (registered in ``diffaudit.registry.WATERMARKS``):

- ``ssTile`` (ours): a spread-spectrum luminance pattern, one 64x64 tile repeated over the image, whose
  mid-frequency Fourier coefficients (periods 5-14 px) carry a sync pilot and the payload bits. It is
  built to be found again after what happens to images: the decoder folds the image onto one tile (a crop
  is a circular shift, found by the pilot), reads mirrored copies from the same fold, rescales to sizes
  the image may have had, and finds scale and rotation from the lattice of peaks the repeated tile puts in
  the image's spectrum (a synchronisation template). Embedding is informed: it measures what the image
  itself adds to each bit and spends the energy where it is needed, at a fixed PSNR (40 dB by default).
- ``dwtDctSvd``: quantises the top singular value of each 4x4 block of the Haar DWT approximation of
  the U channel (imwatermark's method, scale 36). Survives JPEG q90; not resizing, cropping, mirroring
  or a brightness change (the block grid and the quantiser break).
- ``dwtDct``: quantises each block's largest AC coefficient (imwatermark's ``maxDct``). Fragile.
- ``rivaGan``: the RivaGAN ONNX encoder/decoder shipped inside the imwatermark wheel, run with
  onnxruntime (32 bits only) at a fixed working size (256x256; the residual is resized to the image).
- ``trustMark``: TrustMark's ONNX encoder/decoder from a folder the user supplies (``$DIFFAUDIT_TRUSTMARK``;
  nothing is downloaded), run the same way (``_OnnxResidual``), its 100 bits carrying our own layout.

The DWT methods are re-implemented here, vectorised over blocks with numpy, and stay bit-compatible with
imwatermark's decoders (a test checks it). Deliberate differences when embedding: only U changes
(imwatermark also swaps the horizontal and vertical detail bands, a visible artefact), pixels are rounded
and clipped instead of wrapped, and dwtDct keeps its marked coefficient the largest in its block.
Nothing here imports torch: imwatermark's package ``__init__`` does (for RivaGAN), so it is never imported.

Payload layout (most significant bit first, ``id_bits + crc_bits`` bits embedded):

==========  =======  ======  =====================================================================
method      id bits  check   check value
==========  =======  ======  =====================================================================
ssTile      40       32      CRC-32/MPEG-2 (poly 0x04C11DB7, init 0xFFFFFFFF) over b"DA" + id (5 bytes)
dwtDctSvd   40       24      CRC-24/OpenPGP (poly 0x864CFB, init 0xB704CE) over b"DA" + id (5 bytes)
dwtDct      40       24      same
rivaGan     24       8       CRC-8 (poly 0x07, init 0xFF) over b"DA" + id (3 bytes)
trustMark   64       32      CRC-32/MPEG-2 over b"DA" + id (8 bytes), then 4 bits 1111 (not checked)
==========  =======  ======  =====================================================================

The ``b"DA"`` prefix is not embedded; it keeps all-zero / all-one bit strings (what flat images decode
to) from passing the check. Decoding is soft: each bit comes with ``p``, its probability of being 1. If
the hard bits fail the check, the ``chase_bits`` least reliable bits are tried flipped (Chase decoding).

False positives. Every candidate word that is checked could pass by chance with probability
``2**-crc_bits``, so one decode's bound is ``2**chase_bits / 2**crc_bits`` and a robust decode that makes
``T`` tries reports the union bound over all of them (``Detection.false_positive_bound``; extra tries are
checked without Chase flips). For ssTile a robust decode makes 2 x (1 + sizes + 3) tries (as is, each
rescale, three sync hypotheses; each also mirrored) of 64 words: with the default sizes at most 14 tries,
14 x 64 / 2**32 = 2.1e-7 per image, and never more than 40 tries (16 sizes at most), 6.0e-7. For dwtDctSvd
one plain decode is already 256 / 2**24 = 1.5e-5, and rivaGan's 8-bit check gives 1 in 256 per try.
trustMark (Chase 8 on the first try, one word per later try, at most 34 tries): below 6.7e-8 per image.
Measured on 1,000 clean held-out images (``python bench/provenance.py --heldout``): 0 false payloads and
0 words passing the check for ssTile and for dwtDctSvd (95% upper bound 0.4%: a rate of 1e-6 cannot be
measured, only bounded).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pywt

MAGIC = b"DA"
# What `stamp` embeds unless told otherwise, and what `verify` tries on a file no store knows: ssTile is the
# method that survives crops, resizes, rotations and screenshots on the held-out benchmark (README); the
# older dwtDctSvd stays readable so files stamped with it before still verify.
DEFAULT_METHOD = "ssTile"
UNSTORED_METHODS = ("ssTile", "dwtDctSvd")
MIN_PIXELS = 256 * 256  # imwatermark's own lower bound; fewer blocks make too few votes per bit
_U_TO_RGB = np.array([0.0, -0.395, 2.032], dtype=np.float32)  # OpenCV YUV->RGB coefficients of U
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)     # BT.601 luma from RGB

#: Sizes a generated image commonly has (width, height): SD 1.x/2.x, SDXL and their aspect buckets.
#: ``detect_robust`` rescales a resized copy back to those of them with the copy's aspect ratio.
GENERATION_SIZES: tuple[tuple[int, int], ...] = (
    (512, 512), (768, 768), (1024, 1024), (512, 768), (768, 512), (768, 1024), (1024, 768),
    (576, 1024), (1024, 576), (832, 1216), (1216, 832), (896, 1152), (1152, 896), (768, 1344), (1344, 768))


def crc(data: bytes, *, width: int, poly: int, init: int) -> int:
    """A plain MSB-first CRC (no reflection, no final xor), enough for a short payload check."""
    top, mask, reg = 1 << (width - 1), (1 << width) - 1, init
    for byte in data:
        reg ^= byte << (width - 8)
        for _ in range(8):
            reg = ((reg << 1) ^ poly) & mask if reg & top else (reg << 1) & mask
    return reg


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of one shape (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


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
    geometry: str = "as is"  # what the decode undid: "as is", "mirrored", "rescaled to 512x512", ...
    tries: int = 1           # geometric tries made (each one counted in the bound)
    sync: float | None = None  # ssTile: the pilot's correlation peak in noise units (>= 8: clearly marked)


@dataclass(frozen=True)
class Embedded:
    """A stamped copy and what its read-back found (``embed_verified``).

    ``readable`` is False when the mark never read back at any strength within the PSNR floor; ``rgb``
    is then the unmarked original, and the caller should record ``watermark: unreadable`` and register
    no payload. ``strength`` is the method's strength relative to its default (1.0; ssTile raises it in
    1 dB steps of PSNR). ``checks`` says, per re-encoding of the last strength tried, whether the payload
    read back.
    """

    rgb: np.ndarray
    payload: str
    method: str
    psnr: float
    strength: float
    readable: bool
    checks: dict[str, bool] = field(default_factory=dict)


def _travel(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """The copies a stamped image most likely travels as: a PNG (lossless) and a JPEG q90 with 4:2:0."""
    from PIL import Image

    out = {}
    for name, kw in (("png", {"format": "PNG", "compress_level": 1}),
                     ("jpeg_q90", {"format": "JPEG", "quality": 90, "subsampling": 2})):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, **kw)
        out[name] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    inter = cv2.INTER_AREA if width * height < rgb.shape[0] * rgb.shape[1] else cv2.INTER_CUBIC
    return cv2.resize(rgb, (width, height), interpolation=inter)


def rescale_sizes(shape: Sequence[int], sizes: Iterable[Sequence[int]], *, tolerance: float = 0.02,
                  limit: int = 16) -> list[tuple[int, int]]:
    """The (width, height) among ``sizes`` an image of ``shape`` (H, W, ...) may have been resized from:
    same aspect ratio within ``tolerance``, not its own size; nearest in scale first, at most ``limit``."""
    h, w = int(shape[0]), int(shape[1])
    out: list[tuple[int, int]] = []
    for size in sizes:
        sw, sh = int(size[0]), int(size[1])
        if (sw, sh) == (w, h) or (sw, sh) in out or sw <= 0 or sh <= 0:
            continue
        if abs(np.log((sw / sh) / (w / h))) <= tolerance:
            out.append((sw, sh))
    out.sort(key=lambda s: abs(np.log(s[0] / w)))
    return out[:limit]


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
    #: strengths ``embed_verified`` may raise to (relative to 1.0); the DWT decoders assume one quantiser
    #: step, so they have a single strength.
    strengths: tuple[float, ...] = (1.0,)

    @property
    def payload_bits(self) -> int:
        return self.id_bits + self.crc_bits

    # -- payload ---------------------------------------------------------------------------------
    def check_value(self, ident: int) -> int:
        data = MAGIC + ident.to_bytes(self.id_bits // 8, "big")
        if self.crc_bits == 32:
            return crc(data, width=32, poly=0x04C11DB7, init=0xFFFFFFFF)
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

    def encode(self, rgb: np.ndarray, payload: str, *, strength: float = 1.0) -> np.ndarray:
        """Return a watermarked copy of ``rgb`` carrying ``payload`` (hex)."""
        if self.too_small(rgb):
            raise ValueError(f"image {rgb.shape} is too small to watermark (needs >= 256x256 pixels, RGB)")
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        bits = self.payload_to_bits(payload)
        if strength == 1.0:
            return self._embed_bits(rgb, bits)
        if len(self.strengths) == 1:
            raise ValueError(f"{self.name} has a single strength (its decoder assumes one quantiser step)")
        return self._embed_bits(rgb, bits, strength)

    def detect(self, rgb: np.ndarray) -> Detection:
        """Decode, check and threshold the image as it is. Never raises on a small or odd image: says why."""
        if self.too_small(rgb):
            return Detection(self.name, False, None, 0.0, False, np.zeros(0, np.uint8),
                             reason="image smaller than 256x256 or not RGB")
        return self._decide(self._scores(np.ascontiguousarray(rgb, dtype=np.uint8)), self.chase_bits)

    def _decide(self, p: np.ndarray, chase_bits: int, *, bound: float | None = None, **extra) -> Detection:
        """Hard bits, Chase candidates (most likely first), the check and the confidence threshold."""
        confidence = float(np.mean(np.abs(2 * p - 1)))
        hard = (p * 255 > 127).astype(np.uint8)  # imwatermark's rule: an exact tie reads as 1
        bound = self.false_positive_bound(chase_bits=chase_bits) if bound is None else bound
        for flips in self._candidates(p, chase_bits):
            bits = hard.copy()
            bits[flips] ^= 1
            word = int("".join(map(str, bits)), 2)
            ident, check = word >> self.crc_bits, word & ((1 << self.crc_bits) - 1)
            if check == self.check_value(ident):
                detected = confidence >= self.threshold
                payload = f"{ident:0{self.id_bits // 4}x}" if detected else None
                return Detection(self.name, detected, payload, confidence, True, bits, len(flips),
                                 false_positive_bound=bound, **extra)
        return Detection(self.name, False, None, confidence, False, hard, false_positive_bound=bound, **extra)

    def false_positive_bound(self, tries: int = 1, *, chase_bits: int | None = None) -> float:
        """Union bound on a clean image passing the check: every candidate word of every try counts."""
        chase = self.chase_bits if chase_bits is None else chase_bits
        return min(1.0, tries * (1 << chase) / 2.0 ** self.crc_bits)

    def _candidates(self, p: np.ndarray, chase_bits: int | None = None) -> list[np.ndarray]:
        """Bit positions to flip, most likely pattern first: none, then subsets of the least reliable."""
        chase = self.chase_bits if chase_bits is None else chase_bits
        if not chase:
            return [np.zeros(0, dtype=int)]
        weak = np.argsort(np.abs(2 * p - 1), kind="stable")[:chase]
        cost = np.abs(2 * p - 1)[weak]
        masks = np.arange(1 << len(weak))
        chosen = (masks[:, None] >> np.arange(len(weak))[None, :]) & 1
        order = np.argsort(chosen @ cost, kind="stable")
        return [weak[chosen[m].astype(bool)] for m in order]

    # -- robust decoding -------------------------------------------------------------------------
    def detect_robust(self, rgb: np.ndarray, *, sizes: Iterable[Sequence[int]] | None = None,
                      mirror: bool = True) -> Detection:
        """Decode as is, mirrored, and rescaled to ``sizes`` (W, H) the image may have had (default
        ``GENERATION_SIZES``); stop at the first payload that passes. Extra tries use no Chase flips, and
        ``false_positive_bound`` is the union bound over all the tries this image gets."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            return Detection(self.name, False, None, 0.0, False, np.zeros(0, np.uint8), reason="not RGB")
        plan: list[tuple[str, tuple[int, int] | None, bool]] = [("as is", None, False)]
        if mirror:
            plan.append(("mirrored", None, True))
        for w, h in rescale_sizes(rgb.shape, GENERATION_SIZES if sizes is None else sizes):
            plan.append((f"rescaled to {w}x{h}", (w, h), False))
            if mirror:
                plan.append((f"rescaled to {w}x{h}, mirrored", (w, h), True))
        words = (1 << self.chase_bits) + len(plan) - 1
        bound = min(1.0, words / 2.0 ** self.crc_bits)
        last: Detection | None = None
        for tries, (geometry, size, flip) in enumerate(plan, start=1):
            img = _resize(rgb, *size) if size else rgb
            img = np.ascontiguousarray(img[:, ::-1]) if flip else img
            if self.too_small(img):
                continue
            det = self._decide(self._scores(img), self.chase_bits if tries == 1 else 0,
                               geometry=geometry, tries=tries)
            last = det
            if det.detected:
                break
        if last is None:
            return Detection(self.name, False, None, 0.0, False, np.zeros(0, np.uint8), false_positive_bound=bound,
                             reason="image smaller than 256x256 at every size tried", tries=len(plan))
        return _with(last, false_positive_bound=bound, tries=last.tries if last.detected else len(plan))

    def _embed_bits(self, rgb: np.ndarray, bits: np.ndarray, strength: float = 1.0) -> np.ndarray:
        raise NotImplementedError

    def _scores(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _with(det: Detection, **changes) -> Detection:
    from dataclasses import replace

    return replace(det, **changes)


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


# --- ssTile: a repeated spread-spectrum tile with a sync pilot ----------------------------------

def _keyed_order(label: str, n: int) -> np.ndarray:
    """A fixed permutation of ``range(n)`` from SHA-256 (not numpy's generators, whose streams may change
    between versions: a stamp must read back with any later numpy)."""
    words = bytearray()
    counter = 0
    while len(words) < 8 * n:
        words += hashlib.sha256(f"diffaudit/{label}/{counter}".encode()).digest()
        counter += 1
    rand = np.frombuffer(bytes(words[:8 * n]), dtype=">u8")
    order = np.arange(n)
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = int(rand[i] % np.uint64(i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def _keyed_signs(label: str, n: int) -> np.ndarray:
    order = _keyed_order(label, 2 * n)
    return np.where(order[:n] % 2 == 0, 1.0, -1.0)


@dataclass(frozen=True)
class _Layout:
    """Which Fourier coefficients of the N x N tile carry the pilot and each payload bit, with their signs.

    Coefficients are those of ``numpy.fft.rfft2`` with 0 < kx < N/2 (no self-conjugate column) whose
    period lies in ``band`` pixels; each gives two dimensions (real and imaginary part)."""

    n: int
    rows: np.ndarray        # (dims,) coefficient row index
    cols: np.ndarray        # (dims,) coefficient column index
    imag: np.ndarray        # (dims,) bool: the imaginary part
    sign: np.ndarray        # (dims,) +-1
    pilot: np.ndarray       # (pilot dims,) indices into the above
    bits: np.ndarray        # (payload bits, dims per bit) indices into the above
    pilot_spectrum: np.ndarray  # (N, N//2+1) complex: the pilot's coefficients
    points: np.ndarray      # (coefficients, 2) (kx, ky) of every used coefficient, for the sync search

    @staticmethod
    @functools.cache
    def build(n: int, band: tuple[float, float], nbits: int, pilot_share: float) -> _Layout:
        ky = np.fft.fftfreq(n) * n
        kx = np.arange(n // 2 + 1)
        KY, KX = np.meshgrid(ky, kx, indexing="ij")
        radius = np.hypot(KY, KX)
        ok = (radius >= n / band[1]) & (radius <= n / band[0]) & (KX > 0) & (KX < n // 2)
        rows, cols = np.nonzero(ok)
        rows = np.repeat(rows, 2)
        cols = np.repeat(cols, 2)
        imag = np.tile([False, True], len(rows) // 2)
        order = _keyed_order(f"ssTile/{n}/{band}/dims", len(rows))
        rows, cols, imag = rows[order], cols[order], imag[order]
        sign = _keyed_signs(f"ssTile/{n}/{band}/signs", len(rows))
        npilot = int(round(pilot_share * len(rows)))
        per = (len(rows) - npilot) // nbits
        pilot = np.arange(npilot)
        bits = npilot + np.arange(nbits * per).reshape(nbits, per)
        spec = np.zeros((n, n // 2 + 1), np.complex128)
        np.add.at(spec, (rows[pilot], cols[pilot]), np.where(imag[pilot], 1j, 1.0) * sign[pilot])
        coef = np.unique(np.stack([rows, cols], axis=1), axis=0)
        points = np.stack([coef[:, 1], np.where(coef[:, 0] < n // 2, coef[:, 0], coef[:, 0] - n)], axis=1)
        return _Layout(n, rows, cols, imag, sign, pilot, bits, spec, points.astype(np.float64))


class SpreadTile(Watermark):
    """A repeated, informed spread-spectrum luminance tile with a sync pilot (diffaudit's own method).

    Embed: the payload's bits (40-bit id + CRC-32) and a fixed pilot are written, with keyed signs, into
    the mid-frequency Fourier coefficients of one 64x64 tile (periods 5-14 px: below what JPEG and a 0.5x
    resize remove, above most image content); the tile is repeated over the image and added equally to R,
    G and B (a luminance change, so JPEG's chroma subsampling does not touch it) at the target PSNR. The
    embedder first measures, per bit, what the image itself contributes at the decoder (host interference)
    and puts more of the energy budget into the bits the image works against.

    Decode: a high-pass residual, weighted down where the image is busy, is folded onto one tile (summed
    over all tile positions); the pilot's circular correlation gives the shift (a crop), its peak the sync
    strength, and the aligned coefficients the soft bits. Mirrored copies are read from the same fold;
    ``detect_robust`` adds rescaling to known sizes and a search of the tile lattice's spectral peaks for
    scale (0.3x-2.2x) and rotation (+-10 degrees).
    """

    name = "ssTile"
    id_bits = 40
    crc_bits = 32
    chase_bits = 6
    threshold = 0.5          # mean |2p - 1|; clean images' decodes sit near 0.6 but fail the CRC-32
    tile = 64
    band = (5.0, 14.0)       # periods in pixels
    pilot_share = 0.3        # of the dimensions (and of the energy)
    pilot_shares = (0.45, 0.6)   # raised to, in turn, while the stamped copy's sync is below pilot_sync
    pilot_sync = 8.0
    target_psnr = 40.0       # at strength 1.0; each strength step costs 1 dB
    strengths = (1.0, 10 ** 0.05, 10 ** 0.1)   # 40, 39 and 38 dB
    min_side = 64            # decoding needs one tile's worth of pixels at the tile's own scale
    noise_floor = 2.0        # residual weighting 1 / (local activity^2 + noise_floor^2)
    sync_candidates = 3      # scale/rotation hypotheses read (each one a counted try)

    @property
    def layout(self) -> _Layout:
        return _Layout.build(self.tile, self.band, self.payload_bits, self.pilot_share)

    def too_small(self, rgb: np.ndarray) -> bool:
        return rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < self.min_side or (
            rgb.shape[0] * rgb.shape[1] < MIN_PIXELS)

    # -- embedding -------------------------------------------------------------------------------
    def _tile(self, bits: np.ndarray, amp: np.ndarray, share: float) -> np.ndarray:
        """The N x N pattern (unit RMS): the pilot at ``share`` of the energy, each bit at amplitude ``amp``."""
        lay = self.layout
        n = lay.n
        per = lay.bits.shape[1]
        vals = np.zeros(len(lay.rows))
        vals[lay.pilot] = lay.sign[lay.pilot] * np.sqrt(share / len(lay.pilot))
        scale = np.sqrt((1 - share) / (per * np.sum(amp ** 2)))
        vals[lay.bits] = lay.sign[lay.bits] * ((2.0 * bits - 1.0) * amp * scale)[:, None]
        spec = np.zeros((n, n // 2 + 1), np.complex128)
        np.add.at(spec, (lay.rows, lay.cols), np.where(lay.imag, 1j * vals, vals))
        t = np.fft.irfft2(spec, s=(n, n))
        return (t / np.sqrt(np.mean(t ** 2))).astype(np.float32)

    def _render(self, x: np.ndarray, bits: np.ndarray, amp: np.ndarray, target_psnr: float,
                share: float) -> np.ndarray:
        h, w = x.shape[:2]
        n = self.tile
        pattern = np.tile(self._tile(bits, amp, share), (h // n + 1, w // n + 1))[:h, :w, None]
        target = 255.0 ** 2 / 10 ** (target_psnr / 10)
        gain = np.sqrt(target)
        for _ in range(4):  # clipping at 0/255 removes part of the change: scale up to the target MSE
            out = np.clip(np.rint(x + gain * pattern), 0, 255)
            mse = float(np.mean((out - x) ** 2))
            if mse <= 0 or abs(mse / target - 1) < 0.02:
                break
            gain *= min(2.0, np.sqrt(target / mse))
        return np.clip(np.rint(x + gain * pattern), 0, 255).astype(np.uint8)

    def _embed_bits(self, rgb: np.ndarray, bits: np.ndarray, strength: float = 1.0) -> np.ndarray:
        target = self.target_psnr - 20 * np.log10(strength)
        x = rgb.astype(np.float32)
        sgn = 2.0 * bits - 1.0
        host = self._raw(rgb)[0] * sgn  # what the image adds to each bit, in the decoder's units
        amp = np.ones(len(bits))
        share = self.pilot_share
        out = self._render(x, bits, amp, target, share)
        gain = self._raw(out)[0] * sgn - host
        if np.median(gain) > 0:  # informed: spend the budget where the image works against a bit
            gain = np.maximum(gain, 0.2 * np.median(gain))
            lo, hi = float(np.min(host)), float(np.max(host + 4 * gain))
            for _ in range(50):  # the common margin tau that uses exactly the uniform energy
                tau = 0.5 * (lo + hi)
                a = np.maximum(0.3, (tau - host) / gain)
                lo, hi = (tau, hi) if np.sum(a * a) <= len(bits) else (lo, tau)
            amp = np.maximum(0.3, (lo - host) / gain)
            out = self._render(x, bits, amp, target, share)
        # an image whose own content hides the pilot (sharp periodic patterns) gets a larger pilot share:
        # without a clear pilot a crop or rescale cannot be undone, whatever the bits' margins
        for share in self.pilot_shares:
            if self._raw(out)[1] >= self.pilot_sync:
                break
            out = self._render(x, bits, amp, target, share)
        return out

    # -- decoding --------------------------------------------------------------------------------
    def _residual(self, y: np.ndarray) -> np.ndarray:
        """High-pass luminance, weighted by 1 / (local activity^2 + floor^2) and clipped: busy regions and
        strong edges count less than flat ones, where the pattern stands alone."""
        e = y - cv2.GaussianBlur(y, (0, 0), 4.0)
        hp = y - cv2.GaussianBlur(y, (0, 0), 2.0)
        e = e / (cv2.GaussianBlur(hp * hp, (0, 0), 4.0) + self.noise_floor ** 2)
        c = 3.0 * 1.4826 * float(np.median(np.abs(e[::2, ::2]))) + 1e-12
        return np.clip(e, -c, c)

    def _fold(self, e: np.ndarray) -> np.ndarray:
        n = self.tile
        h, w = e.shape
        hp, wp = -(-h // n) * n, -(-w // n) * n
        pad = np.zeros((hp, wp), np.float64)
        pad[:h, :w] = e
        return pad.reshape(hp // n, n, wp // n, n).sum(axis=(0, 2))

    @staticmethod
    def _luma(rgb: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rgb, dtype=np.float32) @ _LUMA

    def _raw(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """Per-bit sums at the tile's own alignment (no shift search), and the pilot's sync: the embedder's
        view of the decoder."""
        lay = self.layout
        fold = self._fold(self._residual(self._luma(rgb)))
        spec = np.fft.rfft2(fold)
        v = spec[lay.rows, lay.cols]
        v = np.where(lay.imag, v.imag, v.real) * lay.sign
        return v[lay.bits].sum(axis=1), self._read(fold)[0]

    def _read(self, fold: np.ndarray) -> tuple[float, np.ndarray]:
        """(sync, p) from a folded tile: the pilot's correlation peak in robust noise units (its position
        is the circular shift, refined to sub-pixel) and each bit's probability of being 1."""
        lay = self.layout
        n = lay.n
        spec = np.fft.rfft2(fold)
        corr = np.fft.irfft2(spec * np.conj(lay.pilot_spectrum), s=(n, n))
        sy, sx = np.unravel_index(int(np.argmax(corr)), corr.shape)
        med = float(np.median(corr))
        spread = 1.4826 * float(np.median(np.abs(corr - med))) + 1e-30
        sync = (float(corr[sy, sx]) - med) / spread

        def vertex(a: float, b: float, c: float) -> float:
            d = a - 2 * b + c
            return 0.0 if d == 0 else 0.5 * (a - c) / d

        fy = sy + vertex(corr[(sy - 1) % n, sx], corr[sy, sx], corr[(sy + 1) % n, sx])
        fx = sx + vertex(corr[sy, (sx - 1) % n], corr[sy, sx], corr[sy, (sx + 1) % n])
        ky = np.fft.fftfreq(n)[:, None]
        kx = (np.arange(n // 2 + 1) / n)[None, :]
        aligned = spec * np.exp(2j * np.pi * (ky * fy + kx * fx))
        v = aligned[lay.rows, lay.cols]
        v = (np.where(lay.imag, v.imag, v.real) * lay.sign)[lay.bits]  # (bits, dims per bit)
        per = v.shape[1]
        total = v.sum(axis=1)
        noise = np.sqrt(np.mean((v - total[:, None] / per) ** 2) * per) + 1e-30
        return sync, 1.0 / (1.0 + np.exp(-np.clip(2.0 * total / noise, -50, 50)))

    def _scores(self, rgb: np.ndarray) -> np.ndarray:
        return self._read(self._fold(self._residual(self._luma(rgb))))[1]

    def detect(self, rgb: np.ndarray) -> Detection:
        if self.too_small(rgb):
            return Detection(self.name, False, None, 0.0, False, np.zeros(0, np.uint8),
                             reason=f"image smaller than {self.min_side} px a side or not RGB")
        sync, p = self._read(self._fold(self._residual(self._luma(rgb))))
        return self._decide(p, self.chase_bits, sync=round(sync, 2))

    def detect_robust(self, rgb: np.ndarray, *, sizes: Iterable[Sequence[int]] | None = None,
                      mirror: bool = True) -> Detection:
        """As is and mirrored (a crop is handled by the fold), rescaled to ``sizes`` (W, H; default
        ``GENERATION_SIZES``) and mirrored, then at the ``sync_candidates`` best scale/rotation hypotheses
        from the spectral lattice search and mirrored. Each read is a try with Chase flips; the bound is
        tries x 2**chase_bits / 2**crc_bits over every try this image gets."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 32:
            return Detection(self.name, False, None, 0.0, False, np.zeros(0, np.uint8),
                             reason="image smaller than 32 px a side or not RGB")
        flips = (False, True) if mirror else (False,)
        rescales = rescale_sizes(rgb.shape, GENERATION_SIZES if sizes is None else sizes)
        planned = len(flips) * (1 + len(rescales) + self.sync_candidates)
        bound = self.false_positive_bound(planned)
        y = self._luma(rgb)
        tries = 0
        best: Detection | None = None

        def attempt(fold: np.ndarray, geometry: str) -> Detection | None:
            nonlocal tries, best
            for flip in flips:
                tries += 1
                sync, p = self._read(fold[:, ::-1] if flip else fold)
                where = ("mirrored" if geometry == "as is" else geometry + ", mirrored") if flip else geometry
                det = self._decide(p, self.chase_bits, sync=round(sync, 2), tries=tries, bound=bound, geometry=where)
                if det.detected:
                    return det
                if best is None or (det.sync or 0) > (best.sync or 0):
                    best = det
            return None

        def stages():
            if min(y.shape) >= self.min_side:
                yield self._fold(self._residual(y)), "as is"
            for w, h in rescales:
                inter = cv2.INTER_AREA if w * h < y.size else cv2.INTER_CUBIC
                yield self._fold(self._residual(cv2.resize(y, (w, h), interpolation=inter))), f"rescaled to {w}x{h}"
            e = self._residual(y)
            for scale, angle in self._sync_search(e):
                yield self._fold(self._rectify(e, scale, angle)), f"scale {scale:.3f}, rotation {angle:+.2f} deg"

        for fold, geometry in stages():
            det = attempt(fold, geometry)
            if det is not None:
                return det
        if best is None:
            return Detection(self.name, False, None, 0.0, False, np.zeros(0, np.uint8), false_positive_bound=bound,
                             reason="nothing to read at any size tried", tries=tries)
        return _with(best, tries=tries, geometry="none found")

    # -- synchronisation: the repeated tile's lattice of spectral peaks -------------------------------
    def _spectrum(self, e: np.ndarray, side: int = 512) -> tuple[np.ndarray, int]:
        """Whitened power spectrum of the (windowed, central, at most ``side``-square) residual ``e``,
        zero-padded to a square ``m`` so that bins are isotropic; fftshifted (DC at ``m // 2``)."""
        h, w = min(side, e.shape[0]), min(side, e.shape[1])
        y0, x0 = (e.shape[0] - h) // 2, (e.shape[1] - w) // 2
        c = e[y0:y0 + h, x0:x0 + w].astype(np.float32)
        c = (c - c.mean()) * np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
        m = max(h, w)
        power = np.abs(np.fft.fftshift(np.fft.fft2(c, s=(m, m)))).astype(np.float32) ** 2
        return power / (cv2.GaussianBlur(power, (0, 0), 3.0) + 1e-20), m

    def _lattice_score(self, power: np.ndarray, m: int, scale: np.ndarray, angle: float) -> np.ndarray:
        """Mean whitened power at the tile's coefficients for each scale (image = scale x tile), one angle."""
        th = np.deg2rad(angle)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        base = self.layout.points @ rot.T * (m / self.tile)
        f = base[None, :, :] / scale[:, None, None] + m // 2
        ok = np.all((f >= 1) & (f <= m - 2), axis=2)
        fx = np.clip(np.rint(f[..., 0]).astype(int), 0, m - 1)
        fy = np.clip(np.rint(f[..., 1]).astype(int), 0, m - 1)
        vals = np.where(ok, power[fy, fx], 0.0)
        count = ok.sum(axis=1)
        return np.where(count >= 24, vals.sum(axis=1) / np.maximum(count, 1), 0.0)

    def _sync_search(self, e: np.ndarray) -> list[tuple[float, float]]:
        """The ``sync_candidates`` best (scale, angle in degrees) hypotheses for the residual ``e``."""
        if min(e.shape) < 48:
            return []
        power, m = self._spectrum(e)
        coarse = cv2.dilate(power, np.ones((3, 3), np.uint8))
        scales = np.exp(np.arange(np.log(0.3), np.log(2.2), 0.01))
        grid = [(float(s), float(a), float(v)) for a in np.arange(-10.0, 10.01, 0.5)
                for s, v in zip(scales, self._lattice_score(coarse, m, scales, a), strict=True)]
        grid.sort(key=lambda t: -t[2])
        out: list[tuple[float, float, float]] = []
        for s, a, _ in grid[: 8 * self.sync_candidates]:
            s, a, v = self._refine(power, m, s, a)
            if all(abs(np.log(s / s2)) > 0.01 or abs(a - a2) > 0.3 for s2, a2, _ in out):
                out.append((s, a, v))
            if len(out) == self.sync_candidates:
                break
        out.sort(key=lambda t: -t[2])
        return [(s, a) for s, a, _ in out]

    def _refine(self, power: np.ndarray, m: int, scale: float, angle: float) -> tuple[float, float, float]:
        value = 0.0
        for ds, da in ((0.004, 0.12), (0.001, 0.03), (0.0003, 0.01)):
            cands = [(float(v), scale * np.exp(i * ds), angle + j * da) for j in range(-3, 4)
                     for i, v in zip(range(-3, 4), self._lattice_score(
                         power, m, scale * np.exp(np.arange(-3, 4) * ds), angle + j * da), strict=True)]
            value, scale, angle = max(cands)
        return float(scale), float(angle), float(value)

    @staticmethod
    def _rectify(e: np.ndarray, scale: float, angle: float) -> np.ndarray:
        """The residual ``e`` with ``scale`` and ``angle`` undone (warped back onto the tile's grid), zero
        outside the image and near its edge."""
        h, w = e.shape
        wo, ho = int(np.ceil(w / scale)) + 2, int(np.ceil(h / scale)) + 2
        a = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0 / scale)
        a[:, 2] += (wo / 2 - w / 2, ho / 2 - h / 2)
        out = cv2.warpAffine(e.astype(np.float32), a, (wo, ho), flags=cv2.INTER_CUBIC)
        inside = cv2.warpAffine(np.ones_like(e, dtype=np.float32), a, (wo, ho), flags=cv2.INTER_LINEAR)
        return out * (cv2.erode(inside, np.ones((5, 5), np.uint8)) > 0.99)


# --- learned watermarks run with onnxruntime: RivaGAN, TrustMark ---------------------------------

def _imwatermark_dir() -> Path:
    """imwatermark's folder, found without running its ``__init__`` (which imports torch)."""
    spec = importlib.util.find_spec("imwatermark")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("invisible-watermark is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def onnx_providers() -> list[str]:
    """onnxruntime providers to use: CUDA first when this onnxruntime has it, then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have] or have


def _onnx_session(path: Path, method: str):
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise ImportError(f"the {method} watermark needs onnxruntime: pip install onnxruntime") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=onnx_providers())


@functools.cache
def _riva_sessions():
    folder = _imwatermark_dir()
    return (_onnx_session(folder / "rivagan_encoder.onnx", "rivaGan"),
            _onnx_session(folder / "rivagan_decoder.onnx", "rivaGan"))


class _OnnxResidual(Watermark):
    """Shared plumbing of a learned encoder/decoder pair run with onnxruntime at a fixed working size.

    Embed: the image is resized to the encoder's frame (``work_size`` square; None: the image as it is, one
    image per call), the encoder marks the frame, and the change it made (the residual, in 0-255 levels) is
    resized back to the image and added, so the image keeps its own size and detail. Decode: the image is
    resized to the decoder's frame (``decode_size``) and read. ``encode_batch``/``scores_batch`` run up to
    ``batch`` images per call (the CUDA provider is used when onnxruntime has it). A subclass says how
    frames, bits and outputs look to its networks (``_frames``, ``_unframe``, ``_encoder_feed``,
    ``_decoder_feed``, ``_probabilities``) and where its sessions come from (``_sessions``).
    """

    work_size: int | None = 256
    batch: int = 16
    residual_interpolation: int = cv2.INTER_CUBIC

    @property
    def decode_size(self) -> int | None:
        return self.work_size

    # -- what a subclass provides ---------------------------------------------------------------------
    def _sessions(self):
        raise NotImplementedError

    def _frames(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _unframe(self, out: np.ndarray) -> np.ndarray:
        """The encoder's first output as [B, H, W, 3] RGB float levels (0-255)."""
        raise NotImplementedError

    def _encoder_feed(self, frames: np.ndarray, bits: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _decoder_feed(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _probabilities(self, out: np.ndarray) -> np.ndarray:
        """The decoder's first output as [B, payload_bits] probabilities that each bit is 1."""
        raise NotImplementedError

    def _scaled(self, delta: np.ndarray, strength: float) -> np.ndarray:
        """The residual at the working size, in levels, as it is added (RivaGAN: unchanged)."""
        return delta

    # -- shared -------------------------------------------------------------------------------------
    @staticmethod
    def _fit(rgb: np.ndarray, side: int | None) -> np.ndarray:
        return rgb if side is None or rgb.shape[:2] == (side, side) else _resize(rgb, side, side)

    def encode_batch(self, rgbs: Sequence[np.ndarray], payloads: Sequence[str], *,
                     strength: float = 1.0) -> list[np.ndarray]:
        """Watermark several images, up to ``batch`` per encoder call; equal to ``encode`` image by image."""
        if len(rgbs) != len(payloads):
            raise ValueError("one payload per image")
        if any(self.too_small(r) for r in rgbs):
            raise ValueError("an image is too small to watermark (needs >= 256x256 pixels, RGB)")
        if strength != 1.0 and len(self.strengths) == 1:
            raise ValueError(f"{self.name} has a single strength")
        bits = np.stack([self.payload_to_bits(p) for p in payloads]) if payloads else np.zeros((0, 0))
        return self._embed([np.ascontiguousarray(r, dtype=np.uint8) for r in rgbs], bits, strength)

    def _embed(self, rgbs: list[np.ndarray], bits: np.ndarray, strength: float) -> list[np.ndarray]:
        encoder, _ = self._sessions()
        work = [self._fit(r, self.work_size) for r in rgbs]
        step = self.batch if self.work_size else 1
        out = []
        for i in range(0, len(work), step):
            chunk = work[i:i + step]
            feed = self._encoder_feed(self._frames(chunk), bits[i:i + len(chunk)].astype(np.float32))
            marked = self._unframe(encoder.run(None, feed)[0])
            for k, m in enumerate(marked):
                src = rgbs[i + k]
                delta = self._scaled(m - chunk[k].astype(np.float32), strength)
                if delta.shape[:2] != src.shape[:2]:
                    delta = cv2.resize(delta, (src.shape[1], src.shape[0]), interpolation=self.residual_interpolation)
                out.append(np.clip(np.rint(src + delta), 0, 255).astype(np.uint8))
        return out

    def scores_batch(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        """Per-bit probabilities for several images, up to ``batch`` per decoder call."""
        _, decoder = self._sessions()
        work = [self._fit(np.ascontiguousarray(r, dtype=np.uint8), self.decode_size) for r in rgbs]
        step = self.batch if self.decode_size else 1
        outs = [decoder.run(None, self._decoder_feed(self._frames(work[i:i + step])))[0]
                for i in range(0, len(work), step)]
        return self._probabilities(np.concatenate(outs))

    def _embed_bits(self, rgb: np.ndarray, bits: np.ndarray, strength: float = 1.0) -> np.ndarray:
        return self._embed([rgb], bits[None], strength)[0]

    def _scores(self, rgb: np.ndarray) -> np.ndarray:
        return self.scores_batch([rgb])[0]


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -50, 50)))


class RivaGan(_OnnxResidual):
    """RivaGAN (Zhang et al. 2019) via the ONNX models inside the imwatermark wheel; 32 bits only.

    The networks run at a fixed working size (``work_size``, 256x256): the encoder's change is resized to
    the image and added, and the decoder reads the image resized to that size. Cost is then one 256x256
    pass per image whatever its size (on one CPU core ~0.4 s to embed, ~0.6 s to decode), and a resized
    copy decodes as the original. ``encode_batch``/``scores_batch`` run many images in one call (the CUDA
    provider is used when onnxruntime has it).
    """

    name = "rivaGan"
    id_bits = 24
    crc_bits = 8
    chase_bits = 0  # an 8-bit check leaves no room for guessing
    threshold = 0.9
    work_size: int | None = 256

    def _sessions(self):
        return _riva_sessions()

    def _frames(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        """[B, 3, 1, H, W] float frames in [-1, 1], BGR (the models were trained on BGR frames)."""
        bgr = np.stack([r[:, :, ::-1] for r in rgbs]).astype(np.float32) / 127.5 - 1.0
        return np.ascontiguousarray(bgr.transpose(0, 3, 1, 2)[:, :, None])

    def _unframe(self, out: np.ndarray) -> np.ndarray:
        return ((np.clip(out[:, :, 0], -1.0, 1.0).transpose(0, 2, 3, 1) + 1.0) * 127.5)[..., ::-1]

    def _encoder_feed(self, frames: np.ndarray, bits: np.ndarray) -> dict[str, np.ndarray]:
        return {"frame": frames, "data": bits}

    def _decoder_feed(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        return {"frame": frames}

    def _probabilities(self, out: np.ndarray) -> np.ndarray:
        return _sigmoid(out)


#: The environment variable naming the folder with a user's TrustMark ONNX weights (nothing is downloaded),
#: and the one choosing a variant when that folder holds several (default: Q, else the only one there).
TRUSTMARK_ENV = "DIFFAUDIT_TRUSTMARK"
TRUSTMARK_VARIANT_ENV = "DIFFAUDIT_TRUSTMARK_VARIANT"
#: Input names accepted: ours (cover, secret, stego) and those of Adobe's released ONNX exports.
_TM_COVER = ("cover", "onnx::Concat_0")
_TM_SECRET = ("secret", "onnx::Gemm_1")
_TM_STEGO = ("stego", "image")
_TM_PATTERNS = ("encoder_{v}.onnx", "decoder_{v}.onnx"), ("trustmark_{v}_encoder.onnx", "trustmark_{v}_decoder.onnx")
_TM_GAIN = {"P": 1.25}  # residual gain per variant, as Adobe's own tools apply it


def trustmark_files(folder: str | os.PathLike | None = None, variant: str | None = None) -> tuple[Path, Path, str]:
    """(encoder, decoder, variant) ONNX files of the TrustMark weights in ``folder`` (default: the folder
    named by ``$DIFFAUDIT_TRUSTMARK``). Files are ``encoder_V.onnx`` + ``decoder_V.onnx`` or
    ``trustmark_V_encoder.onnx`` + ``trustmark_V_decoder.onnx`` for a variant V (``variant``, else
    ``$DIFFAUDIT_TRUSTMARK_VARIANT``, else Q, else the only one present). Raises ``ConfigError`` (one line)."""
    import re

    from diffaudit.errors import ConfigError

    if folder is None:
        folder = os.environ.get(TRUSTMARK_ENV) or None
        if folder is None:
            raise ConfigError(f"the trustMark watermark needs TrustMark ONNX weights: set {TRUSTMARK_ENV} to the "
                              "folder holding encoder_Q.onnx and decoder_Q.onnx (nothing is downloaded)")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{TRUSTMARK_ENV}: {path} is not a folder (it should hold encoder_Q.onnx and decoder_Q.onnx)")
    variant = variant or os.environ.get(TRUSTMARK_VARIANT_ENV) or None
    found: dict[str, tuple[Path, Path]] = {}
    for enc_pattern, dec_pattern in _TM_PATTERNS:
        rx = re.compile(re.escape(enc_pattern).replace(r"\{v\}", "([A-Za-z0-9]+)") + "$")
        for f in sorted(path.iterdir()):
            m = rx.match(f.name)
            dec = path / dec_pattern.format(v=m.group(1)) if m else None
            if m and dec.is_file() and m.group(1) not in found:
                found[m.group(1)] = (f, dec)
    if variant is None:
        variant = "Q" if "Q" in found or len(found) != 1 else next(iter(found))
    if variant not in found:
        have = (f"it has variant(s) {', '.join(sorted(found))} (choose with {TRUSTMARK_VARIANT_ENV})" if found
                else "it has no encoder/decoder pair")
        raise ConfigError(f"{TRUSTMARK_ENV}: no TrustMark variant {variant} in {path} (expected encoder_{variant}.onnx "
                          f"and decoder_{variant}.onnx, or trustmark_{variant}_encoder.onnx and "
                          f"trustmark_{variant}_decoder.onnx); {have}")
    return found[variant][0], found[variant][1], variant


@dataclass(frozen=True)
class _TrustMarkModel:
    encoder: object
    decoder: object
    cover: str            # the encoder's image input
    secret: str           # the encoder's bits input
    stego: str            # the decoder's input
    decode_size: int
    batch: int            # images per call: the models' fixed batch size, or 16 when the axis is dynamic
    logits: bool          # the decoder outputs logits (else probabilities)


def _dims(arg) -> list:
    return list(arg.shape) if arg.shape is not None else []


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


_TM_CACHE: dict[tuple, _TrustMarkModel] = {}


def _trustmark_model(encoder_path: Path, decoder_path: Path) -> _TrustMarkModel:
    """Load and check the TrustMark pair (cached per file and its modification): encoder inputs
    cover [B,3,256,256] and secret [B,100], first output the marked frame; decoder input stego [B,3,S,S],
    first output [B,100]. Whether the decoder gives logits or probabilities is read from two probe frames
    (mid-grey and fixed noise): any value outside [0, 1] means logits. ``InputError`` (one line) otherwise."""
    from diffaudit.errors import InputError

    key = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in (encoder_path, decoder_path))
    if key in _TM_CACHE:
        return _TM_CACHE[key]

    def fail(path: Path, what: str, args) -> InputError:
        got = ", ".join(f"{a.name} {_dims(a)}" for a in args) or "none"
        return InputError(f"trustMark: {path} does not look like a TrustMark {what} (it has {got})")

    def load(path: Path):
        try:
            return _onnx_session(path, "trustMark")
        except ImportError:
            raise
        except Exception as e:  # onnxruntime's own error for a file that is not an ONNX model
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(f"trustMark: cannot load {path} as an ONNX model ({why})") from e

    enc, dec = load(encoder_path), load(decoder_path)
    ins = {a.name: a for a in enc.get_inputs()}
    cover = next((n for n in _TM_COVER if n in ins), None)
    secret = next((n for n in _TM_SECRET if n in ins), None)
    if cover is None or secret is None or len(ins) != 2:
        raise fail(encoder_path, "encoder: expected inputs cover [B,3,256,256] and secret [B,100]", enc.get_inputs())
    c, s = _dims(ins[cover]), _dims(ins[secret])
    if (len(c) != 4 or _fixed(c[1]) != 3 or any(_fixed(d) not in (None, 256) for d in c[2:])
            or len(s) != 2 or _fixed(s[1]) != 100 or not enc.get_outputs()):
        raise fail(encoder_path, "encoder: expected cover [B,3,256,256] and secret [B,100]", enc.get_inputs())
    dins = dec.get_inputs()
    if len(dins) != 1 or dins[0].name not in _TM_STEGO:
        raise fail(decoder_path, "decoder: expected one input stego [B,3,S,S]", dins)
    d = _dims(dins[0])
    side = _fixed(d[2]) if len(d) == 4 else None
    if len(d) != 4 or _fixed(d[1]) != 3 or _fixed(d[3]) != side or (side is not None and side < 32):
        raise fail(decoder_path, "decoder: expected one input stego [B,3,S,S]", dins)
    side = side or 256
    fixed = {b for b in (_fixed(c[0]), _fixed(s[0]), _fixed(d[0])) if b is not None}
    if fixed - {1}:
        raise InputError(f"trustMark: {encoder_path.parent} has a fixed batch of {max(fixed)}; export it with "
                         "batch 1 or a dynamic batch axis")
    batch = 1 if fixed else 16
    rng = np.random.default_rng(0)
    probes = np.stack([np.zeros((3, side, side), np.float32),
                       rng.uniform(-1, 1, (3, side, side)).astype(np.float32)])
    outs = np.concatenate([dec.run(None, {dins[0].name: probes[i:i + 1]})[0] for i in range(2)])
    if outs.ndim != 2 or outs.shape[1] != 100:
        raise InputError(f"trustMark: {decoder_path} outputs {list(outs.shape)}, expected [B,100] (one value per bit)")
    model = _TrustMarkModel(enc, dec, cover, secret, dins[0].name, side, batch,
                            logits=bool(np.any((outs < 0) | (outs > 1))))
    _TM_CACHE[key] = model
    return model


class TrustMark(_OnnxResidual):
    """TrustMark (Bui et al. 2023, "TrustMark: Universal Watermarking for Arbitrary Resolution Images")
    with weights the user supplies: ONNX encoder and decoder in a local folder, nothing downloaded.

    ``TrustMark(folder)``, or ``$DIFFAUDIT_TRUSTMARK`` when no folder is given (``trustmark_files`` names
    the files accepted; ``$DIFFAUDIT_TRUSTMARK_VARIANT`` picks a variant). The encoder takes cover
    [B,3,256,256] RGB in [-1, 1] and secret [B,100] bits in {0, 1} (inputs named ``cover``/``secret``, or
    ``onnx::Concat_0``/``onnx::Gemm_1`` as in Adobe's exports); its first output is the marked frame in
    [-1, 1]. The decoder takes stego [B,3,S,S] (``stego`` or ``image``; S from the model's input shape,
    256 when it is dynamic: 224 for variant P) and gives 100 values, logits or probabilities: the model is
    probed once at load and read as logits when any value falls outside [0, 1]. The whole image is resized
    to the frame; the residual (stego - cover) times the strength (x1.25 for variant P, as Adobe's tools do)
    is clamped to +-0.2, resized bilinearly to the image and added. Adobe's tools also crop the centre of
    wide images and blend the border; we do not, which does not matter for our own payload below.

    Payload: the 100 raw bits carry diffaudit's own layout, not one of TrustMark's BCH schemas: a 64-bit
    id, a CRC-32 (poly 0x04C11DB7, init 0xFFFFFFFF, over b"DA" + id), then the 4-bit version field set to
    1111, a schema TrustMark does not define (0-5 are BCH ones), so Adobe's readers report it as unsupported
    rather than decoding a wrong id. Hence the C2PA soft binding names our algorithm
    (``org.diffaudit.watermark.trustMark.1``), not Adobe's registered ``com.adobe.trustmark.*``: those say
    "TrustMark with a BCH schema", and this layout is not one. Chase decoding flips up to the 8 least
    reliable bits; false positives: 2**8 / 2**32 = 6.0e-8 per plain decode, and a robust decode's union
    bound stays below (2**8 + 33) / 2**32 = 6.7e-8 (34 tries at most). Threshold and strengths are not
    calibrated (no weights ship with diffaudit): the real-weight test prints what a user's weights reach.
    """

    name = "trustMark"
    id_bits = 64
    crc_bits = 32
    chase_bits = 8
    threshold = 0.2
    strengths = (1.0, 1.25, 1.5)
    model_bits = 100
    version_bits = np.ones(4, dtype=np.uint8)  # our layout's version field: 1111, no TrustMark schema
    clamp = 0.2                                # the residual's bound in [-1, 1] units, as in Adobe's tools
    residual_interpolation = cv2.INTER_LINEAR
    work_size = 256

    def __init__(self, folder: str | os.PathLike | None = None, *, variant: str | None = None):
        self.encoder_path, self.decoder_path, self.variant = trustmark_files(folder, variant)
        self.model = _trustmark_model(self.encoder_path, self.decoder_path)
        self.batch = self.model.batch

    @property
    def decode_size(self) -> int:
        return self.model.decode_size

    @property
    def decoder_output(self) -> str:
        return "logits" if self.model.logits else "probabilities"

    def _sessions(self):
        return self.model.encoder, self.model.decoder

    def _frames(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        """[B, 3, H, W] float frames in [-1, 1], RGB."""
        return np.ascontiguousarray((np.stack(rgbs).astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))

    def _unframe(self, out: np.ndarray) -> np.ndarray:
        return (np.clip(out, -1.0, 1.0).transpose(0, 2, 3, 1) + 1.0) * 127.5

    def _encoder_feed(self, frames: np.ndarray, bits: np.ndarray) -> dict[str, np.ndarray]:
        pad = np.broadcast_to(self.version_bits.astype(np.float32), (len(bits), len(self.version_bits)))
        return {self.model.cover: frames, self.model.secret: np.ascontiguousarray(np.hstack([bits, pad]))}

    def _decoder_feed(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        return {self.model.stego: frames}

    def _probabilities(self, out: np.ndarray) -> np.ndarray:
        out = out[:, :self.payload_bits]
        return _sigmoid(out) if self.model.logits else np.clip(out.astype(np.float64), 0.0, 1.0)

    def _scaled(self, delta: np.ndarray, strength: float) -> np.ndarray:
        bound = self.clamp * 127.5
        return np.clip(delta * np.float32(strength * _TM_GAIN.get(self.variant, 1.0)), -bound, bound)


# --- module API ----------------------------------------------------------------------------------

def available() -> list[str]:
    """Registered watermark methods usable here: rivaGan needs onnxruntime, trustMark also its weights
    (``$DIFFAUDIT_TRUSTMARK`` naming a folder with an encoder/decoder pair; see ``trustmark_files``)."""
    from diffaudit.errors import ConfigError

    names = ["ssTile", "dwtDctSvd", "dwtDct"]
    if importlib.util.find_spec("onnxruntime") is not None:
        names.append("rivaGan")
        if os.environ.get(TRUSTMARK_ENV):
            try:
                trustmark_files()
                names.append("trustMark")
            except ConfigError:
                pass
    return names


@functools.cache
def get(name: str) -> Watermark:
    """The watermark method registered as ``name`` (one shared instance per name)."""
    from diffaudit.registry import WATERMARKS

    return WATERMARKS.load(name)()


def embed_verified(rgb: np.ndarray, payload: str, *, method: str = "ssTile", min_psnr: float = 38.0) -> Embedded:
    """Embed ``payload``, then read it back from the copies the image will likely travel as (PNG and JPEG
    q90 with 4:2:0 chroma); raise the strength while the PSNR stays >= ``min_psnr`` until both read back.

    ``readable=False`` means no strength within the floor read back: ``rgb`` is the original, and the
    caller records ``watermark: unreadable`` and registers no payload. Raises ``ValueError`` for an image
    the method cannot carry at all (below 256x256 or not RGB), as ``encode`` does.
    """
    wm = get(method)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    checks: dict[str, bool] = {}
    last_psnr, last_strength = float("inf"), 1.0
    for strength in wm.strengths:
        marked = wm.encode(rgb, payload, strength=strength)
        quality = psnr(rgb, marked)
        if quality < min_psnr and strength != wm.strengths[0]:
            break
        last_psnr, last_strength = quality, strength
        checks = {name: wm.detect(copy).payload == payload for name, copy in _travel(marked).items()}
        if all(checks.values()) and quality >= min_psnr:
            return Embedded(marked, payload, method, round(quality, 2), strength, True, checks)
    return Embedded(rgb.copy(), payload, method, round(last_psnr, 2), last_strength, False, checks)


def detect_robust(rgb: np.ndarray, *, method: str = "ssTile", sizes: Iterable[Sequence[int]] | None = None,
                  mirror: bool = True) -> Detection:
    """Decode ``method``'s watermark from an image that may have been resized, screenshotted, cropped,
    rotated a little or mirrored: the method's own search (see ``Watermark.detect_robust``). ``sizes``:
    (width, height) the image could have had (the store's original sizes); None means
    ``GENERATION_SIZES``. ``Detection.false_positive_bound`` counts every try."""
    return get(method).detect_robust(rgb, sizes=sizes, mirror=mirror)
