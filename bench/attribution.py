"""False-attribution benchmark for ``diffaudit verify`` (and the calibration of its fingerprint thresholds).

Builds a set from ``diffaudit.corpus`` images no test uses, stamps a part of it into a fresh store,
verifies every query with the default settings and prints, as JSON lines:

- per query group (benign copies, edited copies, near-identical stamped pairs, img2img sources and
  outputs, never-stamped images, flat images, tampered files): how many were answered correctly, wrongly,
  ``ambiguous`` or ``no evidence``;
- the totals, with the Clopper-Pearson 95% interval of the wrong-attribution rate.

A *wrong attribution* is any answer that gives a file credentials that are not its own: naming another
stamp, naming any stamp for a never-stamped file, calling an img2img source the stamped output (or the
output its source). Naming the right stamp with too strong a relation (``same image`` for an edited
copy) is counted apart, as *overstated*.

``--calibrate`` runs on the ``calibration`` split instead and prints the distributions behind the
constants of ``provenance.fingerprint`` (stable-bit margin, texture gates, pixel ratio): benign copies
must pass, distinct images (shifted crops, local edits, blends, unrelated images) must not.

    python bench/attribution.py            # held-out benchmark, >= 1,000 queries (~10 min on one core)
    python bench/attribution.py --quick    # ~250 queries, a minute or two
    python bench/attribution.py --calibrate
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffaudit import corpus  # noqa: E402
from diffaudit import verdicts as V  # noqa: E402
from provenance.watermark import DEFAULT_METHOD  # noqa: E402


def png(img: Image.Image | np.ndarray) -> bytes:
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(img: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q, subsampling=2)
    return buf.getvalue()


def rgb_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _resize(img: Image.Image, f: float) -> Image.Image:
    return img.resize((max(16, round(img.width * f)), max(16, round(img.height * f))), Image.BICUBIC)


def _noise(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    a = np.asarray(img, dtype=np.float32) + np.random.default_rng(seed).normal(0, sigma, np.asarray(img).shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def shift(img: Image.Image, f: float) -> Image.Image:
    """A crop that drops ``f`` of each side at the top-left, scaled back: a near-identical, distinct frame."""
    dx, dy = max(1, round(img.width * f)), max(1, round(img.height * f))
    return img.crop((dx, dy, img.width, img.height)).resize(img.size, Image.BICUBIC)


def patch(img: Image.Image, frac: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.asarray(img).copy()
    h, w = a.shape[:2]
    ph, pw = max(2, int(h * frac ** 0.5)), max(2, int(w * frac ** 0.5))
    y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    a[y:y + ph, x:x + pw] = rng.integers(0, 256, 3)
    return Image.fromarray(a)


def half_replaced(img: Image.Image, other: Image.Image) -> Image.Image:
    """The bottom half replaced by another picture (block watermarks still read from the top half)."""
    a = np.asarray(img).copy()
    b = np.asarray(other.resize(img.size))
    a[a.shape[0] // 2:] = b[a.shape[0] // 2:]
    return Image.fromarray(a)


def blend(img: Image.Image, other: Image.Image, alpha: float) -> Image.Image:
    a, b = np.asarray(img, np.float32), np.asarray(other.resize(img.size), np.float32)
    return Image.fromarray(np.clip((1 - alpha) * a + alpha * b, 0, 255).astype(np.uint8))


def img2img_like(src: Image.Image, other: Image.Image, seed: int) -> Image.Image:
    """What an img2img edit does to its source, roughly: new texture and colour mixed in, detail blurred."""
    out = blend(src, other, 0.35).filter(ImageFilter.GaussianBlur(1.5))
    return _noise(out, 12, seed)


#: Copies that keep the picture (the answer for a stamp's copy is "same image").
BENIGN = {
    "png_resave": lambda im: png(im),
    "jpeg_q90": lambda im: jpeg(im, 90),
    "jpeg_q70": lambda im: jpeg(im, 70),
    "jpeg_q50": lambda im: jpeg(im, 50),
    "resize_0.5": lambda im: png(_resize(im, 0.5)),
    "resize_0.75_jpeg80": lambda im: jpeg(_resize(im, 0.75), 80),
    "upscale_1.5": lambda im: png(_resize(im, 1.5)),
    "blur_1": lambda im: png(im.filter(ImageFilter.GaussianBlur(1.0))),
    "noise_4": lambda im: png(_noise(im, 4)),
    "webp_q80": lambda im: _webp(im),
}


def _webp(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "WEBP", quality=80)
    return buf.getvalue()


#: Copies that change the picture (the answer is "edited copy", or nothing).
EDITS = {
    "crop_90": lambda im, o, s: png(im.crop((im.width // 20, im.height // 20, im.width * 19 // 20, im.height * 19 // 20))),
    "shift_3pct": lambda im, o, s: png(shift(im, 0.03)),
    "rotate_3": lambda im, o, s: png(im.rotate(3, Image.BICUBIC)),
    "flip": lambda im, o, s: png(im.transpose(Image.FLIP_LEFT_RIGHT)),
    "brightness_1.3": lambda im, o, s: png(ImageEnhance.Brightness(im).enhance(1.3)),
    "patch_5pct": lambda im, o, s: png(patch(im, 0.05, s)),
    "half_replaced_jpeg90": lambda im, o, s: jpeg(half_replaced(im, o), 90),
    "blend_30": lambda im, o, s: png(blend(im, o, 0.3)),
}


@dataclass
class Query:
    group: str
    attack: str
    data: bytes
    truth: str | None          # manifest label of the stamp the file derives from (None: never stamped)
    expected: str              # the conclusion a perfect verifier gives
    kind: str = ""


def splice(signed: bytes, new_png: bytes) -> bytes:
    """``new_png``'s pixels under ``signed``'s manifest chunk (a tool that keeps metadata while editing)."""
    import struct
    import zlib

    def chunks(d: bytes) -> list[tuple[bytes, bytes]]:
        out, pos = [], 8
        while pos < len(d):
            (n,) = struct.unpack(">I", d[pos:pos + 4])
            out.append((d[pos + 4:pos + 8], d[pos + 8:pos + 8 + n]))
            pos += 12 + n
        return out

    man = [c for c in chunks(signed) if c[0] == b"caBX"]
    new = chunks(new_png)
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
                    for t, d in new[:1] + man + new[1:])
    return b"\x89PNG\r\n\x1a\n" + body


def build(n_base: int, seed: int, *, split: str = "heldout", watermark: str = DEFAULT_METHOD,
          log=print) -> tuple[list[Query], Path, object]:
    """Stamp half of ``n_base`` corpus images (plus near-identical twins and img2img outputs) into a fresh
    store and return the queries, the store path and the temp folder (kept alive by the caller)."""
    from provenance import c2pa as cc
    from provenance.keys import init_identity
    from provenance.stamp import Stamper
    from provenance.store import ManifestStore

    tmp = tempfile.TemporaryDirectory(prefix="diffaudit-attribution-")
    root = Path(tmp.name)
    identity = init_identity(root / "identity")
    store_path = root / "store.sqlite"
    store = ManifestStore(store_path)
    stamper = Stamper(identity, store=store, watermark=watermark)
    rng = np.random.default_rng(seed)
    samples = list(corpus.corpus(n_base, split=split, seed=seed, min_side=256, max_side=512))
    # flat images are over-sampled: they are where fingerprints collide
    flats = list(corpus.corpus(max(8, n_base // 6), split=split, seed=seed + 1, min_side=256, max_side=384,
                               kinds=["flat"]))
    queries: list[Query] = []
    t0 = time.perf_counter()

    def stamp(img: Image.Image, title: str, **kw):
        return stamper.stamp(png(img), {"model": "bench", **kw.pop("gen", {})}, title=title, **kw)

    stamped: list[tuple[corpus.Sample, Image.Image, object]] = []
    stamped_samples = [s for i, s in enumerate(samples) if i % 2 == 0]
    unstamped = [s for i, s in enumerate(samples) if i % 2 == 1]
    for i, s in enumerate(stamped_samples):
        st = stamp(Image.fromarray(s.rgb), f"s{i}.png")
        stamped.append((s, Image.fromarray(s.rgb), st))
    for i, s in enumerate(flats[: len(flats) // 2]):
        st = stamp(Image.fromarray(s.rgb), f"flat{i}.png")
        stamped.append((s, Image.fromarray(s.rgb), st))
    unstamped += flats[len(flats) // 2:]
    log(f"stamped {len(stamped)} images in {time.perf_counter() - t0:.0f} s")

    # near-identical stamped pairs: a twin (3% shift, or a 5% patch) of some photos, stamped too
    photos = [x for x in stamped if x[0].kind == "photo"]
    twins = []
    for j, (s, img, _st) in enumerate(photos[: max(4, len(photos) // 3)]):
        # (not the recipes of EDITS: an edit of A that reproduces its twin B *is* B's picture)
        twin = shift(img, 0.06) if j % 2 == 0 else patch(img, 0.04, seed + 7919 * (j + 1))
        tst = stamp(twin, f"twin{j}.png")
        twins.append((s, twin, tst))
    # img2img: an unstamped source photo, its edit stamped with the source as ingredient
    sources = [x for x in unstamped if x.kind == "photo"][: max(4, n_base // 10)]
    unstamped = [x for x in unstamped if all(x is not y for y in sources)]
    edits = []
    for j, s in enumerate(sources):
        src = Image.fromarray(s.rgb)
        k = (j * 7 + 3) % len(samples)
        other = Image.fromarray(samples[k if samples[k] is not s else (k + 1) % len(samples)].rgb)
        out = img2img_like(src, other, seed + j)
        est = stamp(out, f"edit{j}.png", gen={"mode": "img2img"},
                    ingredients=[cc.Ingredient(f"source{j}.png", png(src), "inputTo")])
        edits.append((s, src, out, est))
    log(f"stamped {len(twins)} twins and {len(edits)} img2img edits; store holds {len(store)} stamps")

    def others(this: corpus.Sample) -> Image.Image:
        """Another corpus image than ``this`` (a blend with itself would be the same picture)."""
        while True:
            o = samples[int(rng.integers(len(samples)))]
            if o is not this:
                return Image.fromarray(o.rgb)

    for s, _img, st in stamped:
        signed = rgb_of(st.data)  # the stamped pixels (watermarked)
        group = "flat (stamped)" if s.kind == "flat" else "stamped, benign copy"
        for name in rng.choice(list(BENIGN), size=3 if s.kind != "flat" else 2, replace=False):
            queries.append(Query(group, name, BENIGN[name](signed), st.manifest_label, V.SAME, s.kind))
        if s.kind == "flat":
            continue
        for name in rng.choice(list(EDITS), size=2, replace=False):
            data = EDITS[name](signed, others(s), int(rng.integers(1 << 30)))
            queries.append(Query("stamped, edited copy", name, data, st.manifest_label, V.EDITED, s.kind))
    for s, _twin, tst in twins:
        a = next(x for x in stamped if x[0] is s)
        for who, st in (("A", a[2]), ("B", tst)):
            signed = rgb_of(st.data)
            for name in ("jpeg_q70", "resize_0.5"):
                queries.append(Query("near-identical stamped pair", f"{who}:{name}", BENIGN[name](signed),
                                     st.manifest_label, V.SAME, s.kind))
        queries.append(Query("near-identical, never stamped", "shift_2pct of a stamped photo's original",
                             png(shift(a[1], 0.02)), None, V.NONE, s.kind))
    for s, src, _out, est in edits:
        queries.append(Query("img2img source", "as is", png(src), est.manifest_label, V.SOURCE, s.kind))
        queries.append(Query("img2img source", "jpeg_q80", jpeg(src, 80), est.manifest_label, V.SOURCE, s.kind))
        signed = rgb_of(est.data)
        queries.append(Query("img2img output", "jpeg_q80", jpeg(signed, 80), est.manifest_label, V.SAME, s.kind))
        queries.append(Query("img2img output", "resize_0.5", BENIGN["resize_0.5"](signed), est.manifest_label,
                             V.SAME, s.kind))
    for s in unstamped:
        img = Image.fromarray(s.rgb)
        group = "flat, never stamped" if s.kind == "flat" else "never stamped"
        queries.append(Query(group, "as is", png(img), None, V.NONE, s.kind))
        name = str(rng.choice(list(BENIGN)))
        queries.append(Query(group, name, BENIGN[name](img), None, V.NONE, s.kind))
        if s.kind != "flat":
            ename = str(rng.choice(list(EDITS)))
            queries.append(Query(group, ename, EDITS[ename](img, others(s), int(rng.integers(1 << 30))), None,
                                 V.NONE, s.kind))
    # the unstamped originals of stamped images are the same picture (watermark aside): "same image" is right
    for s, img, st in stamped[:: max(1, len(stamped) // 20)]:
        if s.kind != "flat":
            queries.append(Query("stamped, original before stamping", "as is", png(img), st.manifest_label, V.SAME,
                                 s.kind))
    # tampered: the stamped manifest kept, pixels changed
    for s, _img, st in stamped[1:: max(1, len(stamped) // 15)]:
        px = np.asarray(rgb_of(st.data)).copy()
        px[: px.shape[0] // 8, : px.shape[1] // 8] = 255 - px[: px.shape[0] // 8, : px.shape[1] // 8]
        queries.append(Query("tampered (manifest kept, pixels changed)", "inverted corner",
                             splice(st.data, png(px)), st.manifest_label, V.TAMPERED, s.kind))
    store.close()
    return queries, store_path, (tmp, identity)


def outcome(q: Query, r) -> str:
    """correct | overstated | wrong | ambiguous | no evidence (for a query that had evidence to find)."""
    named = (r.record or {}).get("manifest_label")
    c = r.conclusion
    if c == V.AMBIGUOUS:
        return "ambiguous"
    if q.expected == V.TAMPERED:
        if c != V.TAMPERED:
            return "wrong" if c in (V.SAME, V.EDITED, V.SOURCE) else "no evidence"
        return "wrong" if named not in (None, q.truth) else "correct"
    if c == V.NONE:
        return "correct" if q.expected == V.NONE else "no evidence"
    if c == V.TAMPERED:
        return "wrong"  # none of the other queries carries a manifest
    if q.truth is None or named != q.truth:
        return "wrong"
    if q.expected == V.SOURCE:
        return "correct" if c == V.SOURCE else "wrong"   # a real photo given its edit's AI credentials
    if c == V.SOURCE:
        return "wrong"                                   # an AI output called the photo it came from
    if q.expected == V.EDITED and c == V.SAME:
        return "overstated"
    return "correct"


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def benchmark(n_base: int, seed: int, watermark: str = DEFAULT_METHOD) -> dict:
    from provenance import c2pa as cc
    from provenance.store import ManifestStore
    from provenance.verify import verify_bytes

    t0 = time.perf_counter()
    queries, store_path, keep = build(n_base, seed, watermark=watermark,
                                      log=lambda m: print(json.dumps({"note": m}), flush=True))
    context = cc.reader_context()
    by_group: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    wrong_examples = []
    t1 = time.perf_counter()
    with ManifestStore(store_path, readonly=True) as store:
        methods = store.methods()
        for i, q in enumerate(queries):
            r = verify_bytes(q.data, name=f"q{i}", context=context, store=store, methods=methods)
            o = outcome(q, r)
            by_group[q.group][o] += 1
            by_kind[q.kind][o] += 1
            if o in ("wrong", "overstated") and len(wrong_examples) < 20:
                wrong_examples.append({"group": q.group, "attack": q.attack, "kind": q.kind, "outcome": o,
                                       "conclusion": r.conclusion, "reason": r.reason})
    verify_s = time.perf_counter() - t1
    for g, c in by_group.items():
        print(json.dumps({"group": g, "queries": sum(c.values()), **{k: c.get(k, 0) for k in
                          ("correct", "overstated", "wrong", "ambiguous", "no evidence")}}), flush=True)
    for k, c in sorted(by_kind.items()):
        print(json.dumps({"kind": k, "queries": sum(c.values()), **dict(c)}), flush=True)
    for ex in wrong_examples:
        print(json.dumps({"example": ex}), flush=True)
    total = Counter()
    for c in by_group.values():
        total.update(c)
    n = sum(total.values())
    lo, hi = clopper_pearson(total["wrong"], n)
    summary = {"split": "heldout", "watermark": watermark, "queries": n, "stamps": None, **{k: total.get(k, 0) for k in
               ("correct", "overstated", "wrong", "ambiguous", "no evidence")},
               "wrong_rate": total["wrong"] / n, "wrong_rate_95ci": [round(lo, 5), round(hi, 5)],
               "verify_ms_per_file": round(1000 * verify_s / n, 1), "seconds": round(time.perf_counter() - t0, 1)}
    with ManifestStore(store_path, readonly=True) as store:
        summary["stamps"] = len(store)
    print(json.dumps(summary), flush=True)
    keep[0].cleanup()
    return summary


# --- calibration ---------------------------------------------------------------------------------------

def calibrate(n: int, seed: int) -> None:
    """Distributions of stable-bit disagreement and pixel ratio, benign copies vs distinct images, on the
    calibration split; and what the constants of ``provenance.fingerprint`` let through."""
    from provenance import fingerprint as F

    samples = list(corpus.corpus(n, split="calibration", seed=seed, min_side=256, max_side=640))
    rng = np.random.default_rng(seed)
    prints = [F.fingerprint(s.rgb) for s in samples]
    deg = Counter((s.kind, p.degenerate is not None) for s, p in zip(samples, prints, strict=True))
    for kind in corpus.KINDS:
        total = deg[(kind, True)] + deg[(kind, False)]
        if total:
            print(json.dumps({"kind": kind, "images": total, "degenerate": deg[(kind, True)]}))
    benign: dict[str, list[tuple[int, float]]] = defaultdict(list)
    distinct: dict[str, list[tuple[int, float]]] = defaultdict(list)
    margins = []
    for i, (s, p) in enumerate(zip(samples, prints, strict=True)):
        if p.degenerate:
            continue
        img = Image.fromarray(s.rgb)
        for name, fn in BENIGN.items():
            q = F.fingerprint(rgb_of(fn(img)))
            flipped = (q.coeffs > 0) != (p.coeffs > 0)
            margins += list(np.abs(p.coeffs[flipped]))
            benign[name].append((F.stable_disagreement(q, p), F.pixel_ratio(q, p)))
        other = Image.fromarray(samples[(i + 1) % len(samples)].rgb)
        variants = {"shift_1pct": shift(img, 0.01), "shift_2pct": shift(img, 0.02), "shift_3pct": shift(img, 0.03),
                    "patch_1pct": patch(img, 0.01, i), "patch_5pct": patch(img, 0.05, i),
                    "blend_20": blend(img, other, 0.2), "img2img_like": img2img_like(img, other, i),
                    "brightness_1.2": ImageEnhance.Brightness(img).enhance(1.2)}
        for name, v in variants.items():
            q = F.fingerprint(rgb_of(jpeg(v, 85)))
            distinct[name].append((F.stable_disagreement(q, p), F.pixel_ratio(q, p)))
    # unrelated pairs: every pair of non-degenerate calibration images (the store's real competitors)
    good = [p for p in prints if not p.degenerate]
    pair_hits, pairs, nearest = 0, 0, []
    for a in range(len(good)):
        best = np.inf
        for b in range(len(good)):
            if a == b:
                continue
            d = F.stable_disagreement(good[a], good[b])
            if d <= F.MAX_STABLE_DISAGREEMENT:
                r = F.pixel_ratio(good[a], good[b])
                best = min(best, r)
                pair_hits += r <= F.SAME_IMAGE_RATIO
            pairs += 1
        nearest.append(best)
    print(json.dumps({"benign_flip_margin_max": round(float(max(margins) if margins else 0), 1),
                      "benign_flip_margin_p999": round(float(np.percentile(margins, 99.9)) if margins else 0, 1),
                      "STABLE_MARGIN": F.STABLE_MARGIN}))

    def stats(name: str, v: list, should_pass: bool) -> dict:
        a = np.array(v)
        passes = (a[:, 0] <= F.MAX_STABLE_DISAGREEMENT) & (a[:, 1] <= F.SAME_IMAGE_RATIO)
        return {"pair": name, "n": len(a), "should_pass": should_pass, "pass_rate": round(float(passes.mean()), 4),
                "stable_disagreement_max": int(a[:, 0].max()),
                "ratio_p01": round(float(np.percentile(a[:, 1], 1)), 3),
                "ratio_median": round(float(np.median(a[:, 1])), 3),
                "ratio_p99": round(float(np.percentile(a[:, 1], 99)), 3), "ratio_max": round(float(a[:, 1].max()), 3)}

    for name, v in benign.items():
        print(json.dumps(stats(name, v, True)))
    for name, v in distinct.items():
        print(json.dumps(stats(name, v, False)))
    finite = [x for x in nearest if np.isfinite(x)]
    print(json.dumps({"unrelated_pairs": pairs, "unrelated_pairs_passing": pair_hits,
                      "nearest_unrelated_ratio_min": round(min(finite), 3) if finite else None,
                      "SAME_IMAGE_RATIO": F.SAME_IMAGE_RATIO, "MIN_STABLE_BITS": F.MIN_STABLE_BITS,
                      "MIN_GRADIENT": F.MIN_GRADIENT, "MAX_STABLE_DISAGREEMENT": F.MAX_STABLE_DISAGREEMENT}))
    _ = rng


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small set (~250 queries)")
    ap.add_argument("--calibrate", action="store_true", help="print the calibration-split distributions")
    ap.add_argument("--base", type=int, default=None, help="corpus images to draw (default 300, quick 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--watermark", default=DEFAULT_METHOD, help="stamp with this method (default: stamp's default)")
    args = ap.parse_args(argv)
    if args.calibrate:
        calibrate(args.base or (60 if args.quick else 200), args.seed)
        return
    benchmark(args.base or (60 if args.quick else 300), args.seed, args.watermark)


if __name__ == "__main__":
    main()
