"""Second-stage confirmation of hash candidates: tiled normalized L2 (Carlini et al. 2023) and SSIM.

Hashes match unrelated images at large radii and miss small crops, so every candidate pair is compared
in pixels. *Tiled L2* follows "Extracting Training Data from Diffusion Models" (Carlini et al., USENIX
Security 2023, Sec. 4): images scaled to [0, 1], normalized L2 ``sqrt(mean((a - b)**2))``, computed on each
of 4x4 non-overlapping tiles and the maximum taken, so that a copy must match everywhere and a large
flat background cannot hide a different subject (the paper uses 128x128 tiles of 512x512 images and
calls a generation extracted below 0.15). Here both images are resized to a common square side: 256, or
the smaller image's shorter side when that is below 256 (a 64 px generation holds no detail at 256, and
upscaling it would be judged as blur, not as a different image). SSIM is
``skimage.metrics.structural_similarity`` on the same grayscale pair.

Small crops are handled by also comparing centre crops of the generated image (scales ``CROPS``) and
keeping the best; the reported distances are that best pair's.

Verdicts, calibrated on the 18 photos shipped with scikit-image and scikit-learn (tests): their copies
(JPEG q50, half size, 5% centre crop, brightness x1.2) reach tile_l2 <= 0.16 (brightness costs the most)
and ssim >= 0.89, while the closest distinct pairs reach tile_l2 0.14 (brick vs moon, ssim 0.38) and
ssim 0.77 (clock vs moon, tile_l2 0.25; at 64 px: 0.25 and 0.61). Hence ``memorized`` needs both
tile_l2 <= 0.20 (Carlini's 0.15 plus room for global brightness changes) and ssim >= 0.85;
``near_duplicate`` needs tile_l2 <= 0.20 and ssim >= 0.70 (the demo's 64 px img2img outputs of a photo
reach tile_l2 0.11-0.13 and ssim 0.82-0.84 against it); anything else is ``unconfirmed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 256
TILES = 4
CROPS = (1.0, 0.95, 0.9)
MEMORIZED_L2 = 0.20
MEMORIZED_SSIM = 0.85
NEAR_L2 = 0.20
NEAR_SSIM = 0.70

#: Optional third opinion: a callable (generated, training) -> cosine similarity of image embeddings.
#: Left as a hook (None): no embedding model ships offline; a caller may set one (e.g. open_clip).
EMBEDDING: Callable[[Image.Image, Image.Image], float] | None = None


@dataclass(frozen=True)
class Confirmation:
    tile_l2: float
    ssim: float
    embedding_sim: float | None
    verdict: str


def center_crop(img: Image.Image, scale: float) -> Image.Image:
    """The centred crop keeping ``scale`` of each side."""
    if scale >= 1.0:
        return img
    w, h = img.size
    dx, dy = round(w * (1 - scale) / 2), round(h * (1 - scale) / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def _pixels(img: Image.Image, side: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def tiled_l2(a: np.ndarray, b: np.ndarray, tiles: int = TILES) -> float:
    """Max over tiles x tiles non-overlapping tiles of the normalized L2 (RMS) difference, images in [0, 1]."""
    h, w = a.shape[:2]
    th, tw = h // tiles, w // tiles
    diff = (a[: th * tiles, : tw * tiles] - b[: th * tiles, : tw * tiles]) ** 2
    per_tile = diff.reshape(tiles, th, tiles, tw, -1).mean(axis=(1, 3, 4))
    return float(np.sqrt(per_tile.max()))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    gray = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return float(structural_similarity(a @ gray, b @ gray, data_range=1.0))


def verdict(tile_l2: float, ssim_value: float) -> str:
    if tile_l2 <= MEMORIZED_L2 and ssim_value >= MEMORIZED_SSIM:
        return "memorized"
    if tile_l2 <= NEAR_L2 and ssim_value >= NEAR_SSIM:
        return "near_duplicate"
    return "unconfirmed"


def confirm(generated: Image.Image, training: Image.Image) -> Confirmation:
    """Compare a generated image with a training candidate; the best of the centre crops counts."""
    side = min(SIZE, *generated.size, *training.size)
    train = _pixels(training, side)
    best = min((tiled_l2(_pixels(center_crop(generated, s), side), train), s) for s in CROPS)
    gen = _pixels(center_crop(generated, best[1]), side)
    s = ssim(gen, train)
    emb = float(EMBEDDING(generated, training)) if EMBEDDING is not None else None
    return Confirmation(tile_l2=best[0], ssim=s, embedding_sim=emb, verdict=verdict(best[0], s))
