"""One decode policy and one perceptual hash for every stage.

Every entry point that decodes a user's image (stamp, verify, index build and query, import, generation
sources, the dashboard) goes through ``open_image`` / ``decode_rgb``: the pixel count is read from the
file header *before* any pixels are decoded, so a 400 KB PNG that claims 20000x20000 pixels is refused in
milliseconds instead of allocating gigabytes. The cap is ``DEFAULT_MAX_PIXELS`` (64 megapixels, e.g.
8000x8000), raised or lowered with the environment variable ``DIFFAUDIT_MAX_PIXELS``.

``phash`` is the 64-bit DCT hash of ``imagehash.phash`` (same bits, same order), used by the manifest
store and the memorization index alike, so a code means the same thing wherever it is stored. On flat
images and some periodic patterns most DCT coefficients tie at the median, so their bits are set by
rounding noise (they differ from imagehash's by 20-31 bits): such hashes are degenerate and must never be
taken as evidence of a match.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffaudit.errors import InputError

DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "DIFFAUDIT_MAX_PIXELS"
LANCZOS = Image.Resampling.LANCZOS


class ImageTooLarge(InputError):
    """An image whose header claims more pixels than the cap (a decompression bomb, or just too big)."""

    reason = "too_large"


class UnreadableImage(InputError):
    """Bytes that are not a decodable image (not an image, truncated, corrupt)."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


def max_pixels() -> int:
    """The pixel cap in force: ``$DIFFAUDIT_MAX_PIXELS`` if set to a positive integer, else the default."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise InputError(f"{MAX_PIXELS_ENV}={raw!r} is not a whole number of pixels") from None
    if value <= 0:
        raise InputError(f"{MAX_PIXELS_ENV}={raw!r} must be positive")
    return value


def _allow_up_to_cap() -> int:
    """Our cap governs, not Pillow's: raise Pillow's own bomb limit to the cap when the cap is higher."""
    cap = max_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and cap > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = cap
    return cap


def _too_large(label: str) -> ImageTooLarge:
    return ImageTooLarge(f"{label}: the header claims more pixels than the cap of {max_pixels():,}; "
                         f"set {MAX_PIXELS_ENV} to a larger number to accept it")


def check_pixels(width: int, height: int, name: str = "image") -> None:
    """Raise ``ImageTooLarge`` (one line, saying how to raise the cap) when ``width x height`` is over it."""
    cap = max_pixels()
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"{name}: the header gives an empty size {width}x{height}", "corrupt")
    if width * height > cap:
        raise ImageTooLarge(f"{name}: {width}x{height} = {width * height:,} pixels is over the cap of "
                            f"{cap:,}; set {MAX_PIXELS_ENV} to a larger number to accept it")


def _source(data: bytes | str | os.PathLike) -> tuple[object, str]:
    if isinstance(data, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(data)), "<bytes>"
    return data, str(data)


def image_size(data: bytes | str | os.PathLike, name: str | None = None) -> tuple[int, int]:
    """(width, height) from the header only; ``UnreadableImage`` when it is not an image Pillow knows."""
    src, label = _source(data)
    label = name or label
    _allow_up_to_cap()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                return img.size
    except Image.DecompressionBombError:
        raise _too_large(label) from None
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label} is a folder, not an image file") from None
    except PermissionError:
        raise InputError(f"{label}: permission denied") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise UnreadableImage(f"{label}: not an image file this tool can read", "not_image") from None


def open_image(data: bytes | str | os.PathLike, *, name: str | None = None,
               draft: tuple[int, int] | None = None, mode: str | None = None) -> Image.Image:
    """Decode bytes or a file into a loaded PIL image, after checking the header's size against the cap.

    ``draft`` asks the JPEG decoder for a grayscale image scaled down in the DCT domain (fast hashing);
    ``mode`` converts (e.g. ``"RGB"``). Raises ``ImageTooLarge`` / ``UnreadableImage`` / ``InputError``.
    """
    src, label = _source(data)
    label = name or label
    _allow_up_to_cap()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap decides, not Pillow's
            img = Image.open(src)
            check_pixels(*img.size, name=label)
            if draft is not None and img.format == "JPEG":
                img.draft("L", draft)
            img.load()
            img = to_8bit(img)
            return img.convert(mode) if mode and img.mode != mode else img
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label} is a folder, not an image file") from None
    except PermissionError:
        raise InputError(f"{label}: permission denied") from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"{label}: not an image file this tool can read", "not_image") from None
    except Image.DecompressionBombError:
        raise _too_large(label) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        raise UnreadableImage(f"{label}: damaged image ({e})", "corrupt") from None


_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(img: Image.Image) -> Image.Image:
    """An 8-bit grey ``L`` image from a deep one (16-bit grey PNG/TIFF as ``I;16``, 32-bit ``I``, float
    ``F``), scaled as viewers show it; other images are returned as they are. Pillow's own ``convert``
    clips these to 0..255, so a 16-bit picture turned white and a float one in [0, 1] black.

    ``I;16`` is on the 16-bit scale; ``I`` too when a value exceeds 255 (else it holds 8-bit values);
    ``F`` holds fractions when no value exceeds 1.0, else 8-bit values."""
    if img.mode not in _DEEP_MODES:
        return img
    arr = np.asarray(img).astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or top > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))


def decode_rgb(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """RGB uint8 pixels of encoded bytes: header size checked first, then OpenCV (fast) or Pillow. Pixels
    as stored, like ``open_image``: OpenCV's own EXIF rotation is turned off (see ``upright``)."""
    check_pixels(*image_size(data, name), name=name)
    import cv2

    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if bgr is None or bgr.dtype != np.uint8:
        return np.asarray(open_image(data, name=name, mode="RGB"))
    return np.ascontiguousarray(bgr[:, :, ::-1])


_ORIENTATION = 0x0112  # the EXIF orientation tag


def upright(img: Image.Image) -> Image.Image | None:
    """``img`` turned as its EXIF orientation tells viewers to (phone and camera photos), or None when it
    has none to apply (or EXIF too damaged to read one: then it stays as stored).

    The orientation policy: every stage reads pixels *as stored* (both decoders above), so a hash, a
    probe or a watermark means the same pixels wherever it is computed. The two places where a user's file
    becomes a new file, ``import`` and ``stamp``, write the picture upright (as viewers show it) without
    the tag, so what the stages read is what people see."""
    try:
        if img.getexif().get(_ORIENTATION, 1) in (None, 1):
            return None
        return ImageOps.exif_transpose(img)
    except (ValueError, TypeError, KeyError, IndexError, OSError, SyntaxError, struct.error):
        return None


def max_file_bytes(width: int, height: int) -> int:
    """The most bytes an encoded ``width x height`` image takes: 16 per pixel (uncompressed float RGBA)
    plus 64 MiB of metadata. A file larger than that is padded (a valid header, then gigabytes), and
    reading it whole would be a bomb by size rather than by pixels."""
    return 16 * width * height + (64 << 20)


def check_file_bytes(size: int, width: int, height: int, name: str = "image") -> None:
    """Raise ``ImageTooLarge`` when a file of ``size`` bytes is larger than its header's image can be."""
    if size > max_file_bytes(width, height):
        raise ImageTooLarge(f"{name}: {size:,} bytes is more than a {width}x{height} image takes in any "
                            "encoding (a padded file); it is not read")


def check_file(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file whose header passed the pixel cap and whose size the bound of
    ``max_file_bytes``; nothing but the header is read."""
    p = Path(path)
    width, height = image_size(p)
    check_pixels(width, height, name=str(p))
    check_file_bytes(p.stat().st_size, width, height, name=str(p))
    return width, height


def read_bytes_checked(path: str | os.PathLike) -> bytes:
    """A file's bytes after ``check_file`` passed (for callers that read a whole file and decode it later)."""
    check_file(path)
    return Path(path).read_bytes()


def read_bytes_bounded(path: str | os.PathLike) -> bytes:
    """A file's bytes for callers that take any file type (``verify``): an image whose file is larger than
    its header's pixels can take (``max_file_bytes``; the pixel cap stands in for an over-cap header) is
    refused as padded before it is read; a file Pillow does not know (PDF, MP4, ...) is read as it is."""
    p = Path(path)
    try:
        width, height = image_size(p)
    except ImageTooLarge:
        width, height = max_pixels(), 1
    except UnreadableImage:
        return p.read_bytes()
    check_file_bytes(p.stat().st_size, width, height, name=str(p))
    return p.read_bytes()


# -- pHash ------------------------------------------------------------------------------------------

def _dct_matrix(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of scipy's unnormalized DCT-II of length ``n``: 2 cos(pi j (2i+1) / 2n)."""
    j = np.arange(k)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * j * (2 * i + 1) / (2 * n))


_DCT_32_8 = _dct_matrix(32, 8)


def phash_reduce(img: Image.Image) -> np.ndarray:
    """pHash's input: 32x32 grayscale (Lanczos), float64, as imagehash computes it."""
    return np.asarray(img.convert("L").resize((32, 32), LANCZOS), dtype=np.float64)


def phash_bits(batch: np.ndarray) -> np.ndarray:
    """(n, 32, 32) reduced images -> (n, 64) booleans in imagehash's order (top-left 8x8 DCT above median)."""
    low = _DCT_32_8 @ batch @ _DCT_32_8.T
    flat = low.reshape(len(batch), 64)
    return flat > np.median(flat, axis=1, keepdims=True)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(n, 64) booleans, most significant first -> (n,) uint64 codes."""
    packed = np.packbits(bits.reshape(len(bits), 64).astype(np.uint8), axis=1)
    return packed.view(">u8").ravel().astype(np.uint64)


def phash(img: Image.Image) -> int:
    """The 64-bit pHash of one image as an unsigned int (``format(h, "016x") == str(imagehash.phash(img))``)."""
    return int(pack_bits(phash_bits(phash_reduce(img)[None]))[0])


def hamming(a: int, b: int) -> int:
    """Differing bits between two 64-bit codes (signed or unsigned ints)."""
    mask = (1 << 64) - 1
    return ((a & mask) ^ (b & mask)).bit_count()
