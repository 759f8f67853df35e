"""64-bit perceptual hashes, bit-compatible with ``imagehash`` (same hex string, same bit order).

The base class owns decoding, batching and parallelism (imagededup's layout); a hash implements only
``reduce`` (one image -> a small grayscale array) and ``bits`` (a batch of those -> 64 booleans each).
Codes are uint64 with the first bit of imagehash's flattened array as the most significant bit, so
``format(code, "016x") == str(imagehash.phash(img))``.

Speed: JPEGs are decoded in draft mode (the decoder scales by 1/2..1/8 in the DCT domain, to no less
than 128x128), the pHash DCT is one batched matrix product, and chunks run on all cores.

Agreement with imagehash 4.3.2 (measured; see tests and ``bench/memorization.py``): with ``exact=True``
(full decode) every code is identical (420/420 JPEG/PNG photos and copies, 1000/1000 bench JPEGs, all
three hashes). The default draft decoding changes pHash slightly: 87% identical codes, mean 0.26 and at
most 4 differing bits on 1000 512x512 JPEG crops; 75% identical, mean 0.55, max 4 bits on the 18 package
photos and their copies at q95/75/50 (a draft target of 64 instead of 128 reached 10 bits). wHash decodes
in full (its scale depends on the image size), so it is always identical.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from PIL import Image

from audit.memorization.sources import NoSuchImageFile, SkipImage, decode_image
from diffaudit.imaging import pack_bits, phash_bits, phash_reduce

LANCZOS = Image.Resampling.LANCZOS
BATCH = 256
SQUARE_MIN_ASPECT = 1.15


def square_crop(img: Image.Image) -> Image.Image:
    """The centred square crop (what text-to-image training pipelines feed the model)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def unpack_bits(codes: np.ndarray) -> np.ndarray:
    """(n,) uint64 codes -> (n, 64) booleans, most significant first."""
    be = np.ascontiguousarray(np.asarray(codes, dtype=np.uint64).astype(">u8")).view(np.uint8)
    return np.unpackbits(be.reshape(-1, 8), axis=1).astype(bool)


def to_hex(code: int) -> str:
    return format(int(code), "016x")


def from_hex(text: str) -> int:
    """A 16-digit hex hash (imagehash's ``str(h)``) as an int; raises ValueError otherwise."""
    text = text.strip().lower()
    if len(text) != 16:
        raise ValueError(f"{text!r} is not a 64-bit hex hash")
    return int(text, 16)


class Hasher:
    """A 64-bit perceptual hash. Subclasses set ``name`` and implement ``reduce`` and ``bits``."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    #: JPEG draft target: decode no smaller than this (None: full decode, e.g. when size matters).
    draft: ClassVar[tuple[int, int] | None] = None

    def reduce(self, img: Image.Image) -> np.ndarray:
        """One image -> a fixed-shape float array (the algorithm's downscaled grayscale input)."""
        raise NotImplementedError

    def bits(self, batch: np.ndarray) -> np.ndarray:
        """A stacked batch of ``reduce`` outputs -> (n, 64) booleans in imagehash's order."""
        raise NotImplementedError

    # -- plumbing ---------------------------------------------------------------------------------
    def codes(self, images: list[Image.Image]) -> np.ndarray:
        """Hash decoded images (in one batched transform)."""
        if not images:
            return np.empty(0, np.uint64)
        return pack_bits(self.bits(np.stack([self.reduce(im) for im in images])))

    def hash_image(self, img: Image.Image) -> int:
        return int(self.codes([img])[0])

    def reduce_many(self, items: list[bytes | str], *, exact: bool = False, square: bool = False
                    ) -> tuple[list[np.ndarray], list[int], list[str], list[str | None]]:
        """Decode bytes or paths and reduce them: (arrays, owning item index, variant, skip reason per item).

        With ``square``, an image whose sides differ by more than ``SQUARE_MIN_ASPECT`` also yields its
        centred square crop (variant ``square``): text-to-image models train on such crops, so a memorized
        generation matches the crop rather than the whole wide or tall photo."""
        reduced, owners, variants, reasons = [], [], [], []
        for i, item in enumerate(items):
            try:
                img = decode_image(item, draft=None if exact else self.draft)
            except (SkipImage, NoSuchImageFile) as e:
                reasons.append(e.reason)
                continue
            reasons.append(None)
            reduced.append(self.reduce(img))
            owners.append(i)
            variants.append("full")
            w, h = img.size
            if square and max(w, h) > SQUARE_MIN_ASPECT * min(w, h):
                reduced.append(self.reduce(square_crop(img)))
                owners.append(i)
                variants.append("square")
        return reduced, owners, variants, reasons

    def pack(self, reduced: list[np.ndarray]) -> np.ndarray:
        """Codes of ``reduce`` outputs, transformed in batches."""
        codes = [pack_bits(self.bits(np.stack(reduced[i:i + BATCH]))) for i in range(0, len(reduced), BATCH)]
        return np.concatenate(codes) if codes else np.empty(0, np.uint64)

    def hash_data(self, items: list[bytes | str], *, exact: bool = False) -> tuple[np.ndarray, np.ndarray,
                                                                                     list[str | None]]:
        """Decode and hash bytes or paths. Returns (codes of good ones, their indices, skip reason per item).

        ``exact=True`` disables JPEG draft decoding (bit-identical to imagehash on the full image)."""
        reduced, owners, _, reasons = self.reduce_many(items, exact=exact)
        return self.pack(reduced), np.asarray(owners, dtype=np.int64), reasons

    def hash_files(self, paths: list[str], *, workers: int | None = None, exact: bool = False,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Hash many files on all cores: chunks go to a process pool; same result as ``hash_data``."""
        import os
        from concurrent.futures import ProcessPoolExecutor

        workers = workers or os.cpu_count() or 1
        if workers <= 1 or len(paths) < 32:
            return self.hash_data(list(paths), exact=exact)
        step = max(8, min(BATCH, len(paths) // (workers * 4)))
        chunks = [list(paths[i:i + step]) for i in range(0, len(paths), step)]
        codes, good, reasons = [], [], []
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_hash_chunk, [self.name] * len(chunks), chunks, [exact] * len(chunks))
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(chunks), unit="chunk", desc=f"{self.name}")
            for start, (c, g, r) in zip(range(0, len(paths), step), results, strict=True):
                codes.append(c)
                good.append(g + start)
                reasons += r
        return np.concatenate(codes), np.concatenate(good), reasons


def _hash_chunk(name: str, chunk: list[str], exact: bool) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    return get_hasher(name).hash_data(chunk, exact=exact)


def get_hasher(name: str) -> Hasher:
    """A hasher by its registry name (``diffaudit list hashes``)."""
    from diffaudit.registry import HASHES

    return HASHES.load(name)()


class PHash(Hasher):
    """pHash (imagehash.phash): 32x32 grayscale, 2-D DCT-II, top-left 8x8 above their median. The kernel
    is ``diffaudit.imaging``'s, the one the manifest store uses too."""

    name = "phash"
    draft = (128, 128)

    def reduce(self, img: Image.Image) -> np.ndarray:
        return phash_reduce(img)

    def bits(self, batch: np.ndarray) -> np.ndarray:
        return phash_bits(batch)


class DHash(Hasher):
    """dHash (imagehash.dhash): 9x8 grayscale, is each pixel brighter than its left neighbour."""

    name = "dhash"
    draft = (128, 128)

    def reduce(self, img: Image.Image) -> np.ndarray:
        return np.asarray(img.convert("L").resize((9, 8), LANCZOS), dtype=np.int16)

    def bits(self, batch: np.ndarray) -> np.ndarray:
        return (batch[:, :, 1:] > batch[:, :, :-1]).reshape(len(batch), 64)


class WHash(Hasher):
    """wHash (imagehash.whash, Haar): the 8x8 LL band of a Haar DWT, after removing the image mean.

    The working scale depends on the image's own size, so it decodes in full (no draft).
    """

    name = "whash"

    def reduce(self, img: Image.Image) -> np.ndarray:
        import pywt

        scale = max(2 ** int(np.log2(min(img.size))), 8)
        ll_max = int(np.log2(scale))
        pixels = np.asarray(img.convert("L").resize((scale, scale), LANCZOS)) / 255.0
        coeffs = list(pywt.wavedec2(pixels, "haar", level=ll_max))
        coeffs[0] *= 0
        pixels = pywt.waverec2(coeffs, "haar")
        return pywt.wavedec2(pixels, "haar", level=ll_max - 3)[0]

    def bits(self, batch: np.ndarray) -> np.ndarray:
        flat = batch.reshape(len(batch), 64)
        return flat > np.median(flat, axis=1, keepdims=True)
