"""Source images and masks for img2img and inpainting requests.

A source is ``skimage:NAME`` or ``sklearn:NAME`` (photos the packages ship, so the demo is offline) or
a path; a mask is ``box:x0,y0,x1,y1`` in fractions of the image or a path to an image of the same size
as its source (white = repaint). Both are resized to the generation size (a plain resize, no crop: it
keeps the whole picture, which is what a copy check against the original compares).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffaudit.errors import InputError
from diffaudit.imaging import open_image
from prompts.suites import load_source  # noqa: F401  (re-exported: the stage's one way to open sources)


def make_mask(ref: str, source_size: tuple[int, int]) -> Image.Image:
    """The mask of an inpainting request as a binary ``L`` image of ``source_size``, or ``InputError``."""
    scheme, _, spec = ref.partition(":")
    if scheme == "box":
        try:
            x0, y0, x1, y1 = (float(v) for v in spec.split(","))
        except ValueError:
            raise InputError(f"mask {ref!r} must look like box:x0,y0,x1,y1 (fractions of the image)") from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise InputError(f"mask box {ref!r} must lie inside [0, 1] with x0 < x1 and y0 < y1")
        w, h = source_size
        mask = np.zeros((h, w), np.uint8)
        mask[round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)] = 255
        return Image.fromarray(mask, "L")
    mask = _open(ref, "mask")
    if mask.size != tuple(source_size):
        raise InputError(f"mask {ref} is {mask.size[0]}x{mask.size[1]} but its source image is "
                         f"{source_size[0]}x{source_size[1]}; give a mask of the same size")
    return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)


def prepare(ref: str, mask_ref: str | None, size: tuple[int, int]) -> tuple[Image.Image, Image.Image | None]:
    """Source (and mask) resized to the generation ``size`` (width, height)."""
    source = load_source(ref)
    mask = make_mask(mask_ref, source.size) if mask_ref else None
    source = source.resize(size, Image.Resampling.LANCZOS)
    if mask is not None:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return source, mask


def _open(path: str, what: str) -> Image.Image:
    """A mask file through the one decode policy (header size against the pixel cap, then decode)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{what} {path} does not exist")
    return open_image(p, name=f"{what} {path}")
