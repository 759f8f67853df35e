"""Attacks a stamped image meets in the wild, and the robustness table of each watermark method.

Each attack maps encoded image bytes to new bytes, as a platform or a screenshot would. The grid is fixed
(issue 16) so that figures are comparable across methods and runs: JPEG q95/90/75/50 (4:2:0), resize
0.75x/0.5x, centre crop to 90%/75% per side, rotation by 1 and 3 degrees (same canvas, black corners),
brightness x1.15, contrast x0.8, Gaussian blur radius 1, Gaussian noise sigma 5, a screenshot (0.8x then
JPEG q85), a horizontal flip and a plain metadata strip (decode and re-save, identical pixels).

``robustness`` stamps every image with each method, applies every attack and decodes with the method's
robust decoder (``watermark.detect_robust``; told the stamped copy's size, as the manifest store knows
it): per (method, attack) the decode rate with its 95% Wilson interval, bit accuracy, PSNR of the stamps,
seconds per decode and the false-positive bound; with ``c2pa=True`` it stamps through ``Stamper`` (C2PA
manifest + store) and also says whether the manifest survives and whether ``verify`` could recover the
credentials (embedded, or from the store by watermark or pHash). ``clean_corpus`` makes varied unmarked
images cheaply (for false positives).
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageFilter

from diffaudit import imaging
from diffaudit.errors import InputError
from provenance.keys import Identity


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    return imaging.open_image(data, mode="RGB")  # the one decode policy: the pixel cap before decoding


def jpeg(quality: int) -> Callable[[bytes], bytes]:
    """Re-encode as JPEG with 4:2:0 chroma subsampling (what social platforms do)."""
    return lambda data: _save(_open(data), "JPEG", quality=quality, subsampling=2)


def _pixels(fn: Callable[[Image.Image], Image.Image]) -> Callable[[bytes], bytes]:
    return lambda data: _save(fn(_open(data)))


def _scaled(img: Image.Image, factor: float) -> Image.Image:
    return img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BICUBIC)


def _crop(img: Image.Image, keep: float = 0.9) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * keep), round(h * keep)
    x, y = (w - cw) // 2, (h - ch) // 2
    return img.crop((x, y, x + cw, y + ch))


def _noise(img: Image.Image, sigma: float = 5.0) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, sigma, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _screenshot(data: bytes) -> bytes:
    return _save(_scaled(_open(data), 0.8), "JPEG", quality=85, subsampling=2)


ATTACKS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda data: data,
    "metadata_strip": _pixels(lambda im: im),
    "jpeg_q95": jpeg(95),
    "jpeg_q90": jpeg(90),
    "jpeg_q75": jpeg(75),
    "jpeg_q50": jpeg(50),
    "resize_0.75": _pixels(lambda im: _scaled(im, 0.75)),
    "resize_0.5": _pixels(lambda im: _scaled(im, 0.5)),
    "crop_90": _pixels(lambda im: _crop(im, 0.9)),
    "crop_75": _pixels(lambda im: _crop(im, 0.75)),
    "rotate_1": _pixels(lambda im: im.rotate(1, Image.BICUBIC)),
    "rotate_3": _pixels(lambda im: im.rotate(3, Image.BICUBIC)),
    "brightness_1.15": _pixels(lambda im: ImageEnhance.Brightness(im).enhance(1.15)),
    "contrast_0.8": _pixels(lambda im: ImageEnhance.Contrast(im).enhance(0.8)),
    "blur_r1": _pixels(lambda im: im.filter(ImageFilter.GaussianBlur(1.0))),
    "noise_s5": _pixels(_noise),
    "screenshot": _screenshot,
    "flip": _pixels(lambda im: im.transpose(Image.FLIP_LEFT_RIGHT)),
}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (honest at 0 and at n, unlike the normal approximation)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def robustness(images: Iterable[bytes], *, methods: Iterable[str] = ("ssTile", "dwtDctSvd"),
               identity: Identity | None = None, attacks: Iterable[str] | None = None,
               progress: bool = True, c2pa: bool = True, kinds: Iterable[str] | None = None,
               known_size: bool = True) -> pd.DataFrame:
    """One row per (method, attack); see the module docstring. ``c2pa=False`` measures the watermark alone
    (``embed_verified``, no manifest or store: C2PA columns are left empty). ``kinds``: a label per image
    (e.g. the corpus kind); when given, rows per (method, kind, attack) follow under attack ``kind/attack``.
    ``known_size=False``: the decoder is not told the stamped size (what ``verify`` faces without a store)."""
    from provenance.stamp import progress_bar
    from provenance.watermark import embed_verified, get

    images = list(images)
    labels = list(kinds) if kinds is not None else None
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
        with tempfile.TemporaryDirectory(prefix="diffaudit-robustness-") as tmp:
            store = stamper = None
            if c2pa:
                from provenance.stamp import Stamper
                from provenance.store import ManifestStore

                store = ManifestStore(Path(tmp) / "store.sqlite")
                stamper = Stamper(identity, watermark=method, store=store)
            per: list[dict] = []   # one entry per (image, attack)
            psnrs: list[float] = []
            embed_seconds: list[float] = []
            try:
                for index, data in enumerate(progress_bar(images, f"robustness {method}", progress)):
                    if not _fits(data):
                        continue
                    original = np.asarray(_open(data))
                    t0 = time.perf_counter()
                    if stamper is not None:
                        stamp = stamper.stamp(data, {"model": "robustness"}, title="robustness.png")
                        payload, stamped = stamp.payload, stamp.data
                        marked = np.asarray(_open(stamped))
                    else:
                        payload = wm.new_payload()
                        emb = embed_verified(original, payload, method=method)
                        marked = emb.rgb
                        if not emb.readable:
                            payload = None
                        stamped = _save(Image.fromarray(marked))
                    embed_seconds.append(time.perf_counter() - t0)
                    if payload is not None:
                        psnrs.append(_psnr(original, marked))
                    truth = wm.payload_to_bits(payload) if payload else None
                    size = [(original.shape[1], original.shape[0])] if known_size else []
                    for a in names:
                        attacked = ATTACKS[a](stamped)
                        img = _open(attacked)
                        t0 = time.perf_counter()
                        det = wm.detect_robust(np.asarray(img), sizes=size) if payload else None
                        seconds = time.perf_counter() - t0
                        entry = {"attack": a, "kind": labels[index] if labels else None, "payload": payload,
                                 "det": bool(det and det.payload == payload), "seconds": seconds if det else None,
                                 "bits": (float(np.mean(det.bits == truth)) if det is not None
                                          and det.bits.size == truth.size else 0.0),
                                 "bound": det.false_positive_bound if det else None}
                        if stamper is not None:
                            from provenance import c2pa as cc
                            from provenance.store import phash

                            entry["c2pa"] = cc.read_credentials(attacked, stamper.reader).status in ("Trusted", "Valid")
                            match = store.by_payload(method, det.payload) if det and det.detected else None
                            match = match or store.by_phash(phash(img))
                            entry["found"] = entry["c2pa"] or (match is not None
                                                               and match.manifest_label == stamp.manifest_label)
                        per.append(entry)
            finally:
                if store is not None:
                    store.close()
        table = pd.DataFrame(per)
        groups = [(a, table[table["attack"] == a]) for a in names]
        if labels:
            for kind in dict.fromkeys(labels):
                groups += [(f"{kind}/{a}", table[(table["attack"] == a) & (table["kind"] == kind)]) for a in names]
        for label, g in groups:
            if not len(g):
                continue
            hits = int(g["det"].sum())
            low, high = wilson(hits, len(g))
            seconds = g["seconds"].dropna()
            rows.append({"method": method, "attack": label, "images": len(g), "bit_accuracy": float(g["bits"].mean()),
                         "detection_rate": hits / len(g), "detection_low": low, "detection_high": high,
                         "c2pa_survives": float(g["c2pa"].mean()) if "c2pa" in g else None,
                         "credentials_recovered": float(g["found"].mean()) if "found" in g else None,
                         "psnr": float(np.mean(psnrs)) if psnrs else None,
                         "decode_seconds": float(seconds.mean()) if len(seconds) else None,
                         "embed_seconds": float(np.mean(embed_seconds)) if embed_seconds else None,
                         "false_positive_bound": float(g["bound"].max()) if g["bound"].notna().any() else None,
                         "unreadable": int(g["payload"].isna().sum())})
    return pd.DataFrame(rows)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from provenance.watermark import psnr

    return psnr(a, b)


def _fits(data: bytes) -> bool:
    """Whether an image is large enough to carry a watermark (reads the header only)."""
    from provenance.watermark import MIN_PIXELS

    try:
        w, h = imaging.image_size(data)
        imaging.check_pixels(w, h)
    except InputError:  # not an image, or over the pixel cap: skipped, never decoded
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
