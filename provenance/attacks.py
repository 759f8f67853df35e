"""Attacks a stamped image meets in the wild, and the robustness table of each watermark method.

Each attack maps encoded image bytes to new bytes, as a platform or a screenshot would: re-encode,
resize, crop, rotate, blur, noise, brightness, flip, or a plain metadata strip (decode and re-save with
identical pixels). ``robustness`` stamps images with each method (watermark + C2PA manifest), applies
every attack and measures the watermark's bit accuracy and detection rate and whether the C2PA
manifest still validates, and whether the image's credentials can still be had at all: embedded, or
recovered from the manifest store by watermark or pHash (durable credentials). ``clean_corpus`` makes varied unmarked images cheaply (for false positives).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageFilter

from diffaudit.errors import InputError
from provenance import c2pa as cc
from provenance.keys import Identity


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def jpeg(quality: int) -> Callable[[bytes], bytes]:
    """Re-encode as JPEG with 4:2:0 chroma subsampling (what social platforms do)."""
    return lambda data: _save(_open(data), "JPEG", quality=quality, subsampling=2)


def _pixels(fn: Callable[[Image.Image], Image.Image]) -> Callable[[bytes], bytes]:
    return lambda data: _save(fn(_open(data)))


def _crop(img: Image.Image, keep: float = 0.9) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * keep), round(h * keep)
    x, y = (w - cw) // 2, (h - ch) // 2
    return img.crop((x, y, x + cw, y + ch))


def _noise(img: Image.Image, sigma: float = 5.0) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, sigma, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


ATTACKS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda data: data,
    "metadata_strip": _pixels(lambda im: im),
    "jpeg_q90": jpeg(90),
    "jpeg_q70": jpeg(70),
    "jpeg_q50": jpeg(50),
    "resize_0.5": _pixels(lambda im: im.resize((im.width // 2, im.height // 2), Image.BICUBIC)),
    "crop_90": _pixels(_crop),
    "rotate_2": _pixels(lambda im: im.rotate(2, Image.BICUBIC)),
    "rotate_5": _pixels(lambda im: im.rotate(5, Image.BICUBIC)),
    "blur": _pixels(lambda im: im.filter(ImageFilter.GaussianBlur(1.0))),
    "noise": _pixels(_noise),
    "brightness": _pixels(lambda im: ImageEnhance.Brightness(im).enhance(1.2)),
    "flip": _pixels(lambda im: im.transpose(Image.FLIP_LEFT_RIGHT)),
}


def robustness(images: Iterable[bytes], *, methods: Iterable[str] = ("dwtDctSvd", "dwtDct"),
               identity: Identity | None = None, attacks: Iterable[str] | None = None,
               progress: bool = True) -> pd.DataFrame:
    """One row per (method, attack): images, bit accuracy, detection rate and C2PA survival."""
    from provenance.stamp import Stamper, progress_bar
    from provenance.store import ManifestStore, phash
    from provenance.watermark import get

    images = list(images)
    names = list(attacks) if attacks is not None else list(ATTACKS)
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise InputError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    if not any(_fits(data) for data in images):
        raise InputError(f"none of the {len(images)} image(s) is a PNG, JPEG or WebP of at least 256x256 pixels "
                         "(the watermark's minimum): nothing to measure; use larger images")
    rows = []
    for method in methods:
        wm = get(method)
        with tempfile.TemporaryDirectory(prefix="diffaudit-robustness-") as tmp, \
                ManifestStore(Path(tmp) / "store.sqlite") as store:
            stamper = Stamper(identity, watermark=method, store=store)
            stats = {a: {"bits": [], "det": [], "c2pa": [], "found": []} for a in names}
            for data in progress_bar(images, f"robustness {method}", progress):
                stamp = stamper.stamp(data, {"model": "robustness"}, title="robustness.png")
                if stamp.payload is None:
                    continue
                truth = wm.payload_to_bits(stamp.payload)
                for a in names:
                    attacked = ATTACKS[a](stamp.data)
                    img = _open(attacked)
                    det = wm.detect(np.asarray(img))
                    s = stats[a]
                    s["bits"].append(float(np.mean(det.bits == truth)) if det.bits.size == truth.size else 0.0)
                    s["det"].append(det.payload == stamp.payload)
                    s["c2pa"].append(cc.read_credentials(attacked, stamper.reader).status in ("Trusted", "Valid"))
                    # what `verify` would recover: by watermark payload, else by the nearest pHash
                    match = store.by_payload(method, det.payload) if det.detected else None
                    match = match or store.by_phash(phash(img))
                    s["found"].append(s["c2pa"][-1] or (match is not None
                                                        and match.manifest_label == stamp.manifest_label))
        for a in names:
            s = stats[a]
            rows.append({"method": method, "attack": a, "images": len(s["bits"]), "bit_accuracy": _mean(s["bits"]),
                         "detection_rate": _mean(s["det"]), "c2pa_survives": _mean(s["c2pa"]),
                         "credentials_recovered": _mean(s["found"])})
    return pd.DataFrame(rows)


def _fits(data: bytes) -> bool:
    """Whether an image is large enough to carry a watermark (reads the header only)."""
    from provenance.watermark import MIN_PIXELS

    try:
        w, h = Image.open(io.BytesIO(data)).size
    except (OSError, ValueError):
        return False
    return w * h >= MIN_PIXELS


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


# --- a cheap corpus of varied clean images -----------------------------------------------------

def _photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry",
                 "retina", "page", "text", "moon", "brick", "grass", "gravel", "colorwheel"):
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a photo a given scikit-image lacks is simply skipped
            continue
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append(np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8))
    out += [np.asarray(a) for a in load_sample_images().images]
    return out


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    kind = rng.integers(3)
    if kind == 0:  # white noise
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == 1:  # colour gradient with a little noise
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([(a * xx + b * yy) % 1.0 for a, b in rng.uniform(-2, 2, (3, 2))], axis=-1) * 255
        return np.clip(base + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
    # plasma: smoothed noise at a random scale
    import cv2

    small = rng.uniform(0, 255, (max(2, h // int(rng.integers(4, 64))), max(2, w // int(rng.integers(4, 64))), 3))
    return cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def clean_corpus(n: int, *, seed: int = 0, min_side: int = 256, max_side: int = 768) -> Iterator[np.ndarray]:
    """``n`` varied unmarked RGB images: random crops, rescales, flips, rotations and colour jitter of the
    photos scikit-image and scikit-learn ship, and one in five a random texture."""
    import cv2

    rng = np.random.default_rng(seed)
    photos = _photos()
    for _ in range(n):
        size = (int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1)))
        if rng.random() < 0.2:
            yield _texture(rng, size)
            continue
        src = photos[int(rng.integers(len(photos)))]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = cv2.resize(src[y:y + ch, x:x + cw], (size[1], size[0]), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        if rng.random() < 0.3:
            img = np.rot90(img)
        gain = rng.uniform(0.8, 1.2, 3)
        yield np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8).copy()
