"""Provenance benchmarks; each prints JSON lines.

Default: stamped images/s of ``provenance.stamp.Stamper`` (vectorised watermark, one decode and one
encode per image, in-memory signing with a reused signer and no thumbnail, plus a read-back check, a
pHash and a store entry) against a naive loop over the same images in the same run: per file, read the
PNG with OpenCV, embed with imwatermark's ``WatermarkEncoder`` (dwtDctSvd, same 64 bits), write a PNG,
then sign that file with c2pa-python's defaults (embedded thumbnail on, a new signer per file).

``--false-positives N``: the watermark detector's false-positive rate on N clean images
(``provenance.attacks.clean_corpus``), per method, with the highest clean confidence seen.

    python bench/provenance.py --images 24 --size 512
    python bench/provenance.py --false-positives 1200
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _photos(n: int, size: int) -> list[bytes]:
    from provenance.attacks import clean_corpus

    out = []
    for rgb in clean_corpus(n, seed=1, min_side=size, max_side=size):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def naive(files: list[Path], out_dir: Path, identity) -> float:
    """The loop a first script would write; returns seconds."""
    import c2pa
    import cv2
    from imwatermark import WatermarkEncoder

    t0 = time.perf_counter()
    for i, f in enumerate(files):
        bgr = cv2.imread(str(f))
        enc = WatermarkEncoder()
        enc.set_watermark("bytes", os.urandom(8))
        marked = enc.encode(bgr, "dwtDctSvd")
        tmp = out_dir / f"wm-{i}.png"
        cv2.imwrite(str(tmp), marked)
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", identity.chain_pem, identity.key_pem, None))
        manifest = {"claim_generator_info": [{"name": "naive", "version": "0"}], "title": tmp.name,
                    "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
                        "action": "c2pa.created",
                        "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"}]}}]}
        with c2pa.Builder(manifest) as builder:
            builder.sign_file(str(tmp), str(out_dir / f"signed-{i}.png"), signer)
    return time.perf_counter() - t0


def ours(files: list[Path], out_dir: Path, identity, store_path: Path) -> float:
    from provenance.stamp import Stamper
    from provenance.store import ManifestStore

    t0 = time.perf_counter()
    with ManifestStore(store_path) as store:
        stamper = Stamper(identity, watermark="dwtDctSvd", store=store)
        for i, f in enumerate(files):
            stamp = stamper.stamp(f.read_bytes(), {"model": "bench", "seed": i}, title=f.name)
            (out_dir / f"stamped-{i}.png").write_bytes(stamp.data)
    return time.perf_counter() - t0


def throughput(n: int, size: int) -> None:
    from provenance.keys import init_identity

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        identity = init_identity(root / "identity")
        files = []
        for i, data in enumerate(_photos(n, size)):
            files.append(root / f"in-{i}.png")
            files[-1].write_bytes(data)
        (root / "naive").mkdir()
        (root / "ours").mkdir()
        ours(files[:2], root / "ours", identity, root / "warm.sqlite")  # warm imports on both sides
        naive(files[:2], root / "naive", identity)
        t_ours = ours(files, root / "ours", identity, root / "store.sqlite")
        t_naive = naive(files, root / "naive", identity)
        size_ours = np.mean([(root / "ours" / f"stamped-{i}.png").stat().st_size for i in range(n)])
        size_naive = np.mean([(root / "naive" / f"signed-{i}.png").stat().st_size for i in range(n)])
    print(json.dumps({"bench": "provenance.stamp", "device": "cpu", "images": n, "size": size,
                      "images_per_s": round(n / t_ours, 2), "baseline_images_per_s": round(n / t_naive, 2),
                      "ratio": round(t_naive / t_ours, 2), "target_ratio": 3.0,
                      "mean_bytes": int(size_ours), "baseline_mean_bytes": int(size_naive)}))


def false_positives(n: int, methods: list[str], riva_n: int) -> None:
    from provenance.attacks import clean_corpus
    from provenance.watermark import get

    for method in methods:
        wm = get(method)
        count = riva_n if method == "rivaGan" else n
        side = (256, 256) if method == "rivaGan" else (256, 768)
        detected, check_passed, conf = 0, 0, []
        t0 = time.perf_counter()
        for rgb in clean_corpus(count, seed=7, min_side=side[0], max_side=side[1]):
            det = wm.detect(rgb)
            detected += det.detected
            check_passed += det.check_ok
            conf.append(det.confidence)
        print(json.dumps({"bench": "provenance.watermark_false_positives", "method": method, "images": count,
                          "detected": detected, "rate": detected / count,
                          "rate_95_upper": (3.0 / count) if detected == 0 else None,
                          "check_passed": check_passed, "threshold": wm.threshold,
                          "max_confidence": round(float(np.max(conf)), 3),
                          "p99_confidence": round(float(np.quantile(conf, 0.99)), 3),
                          "seconds": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--false-positives", type=int, default=0, metavar="N")
    ap.add_argument("--methods", default="dwtDctSvd,dwtDct")
    ap.add_argument("--riva-images", type=int, default=200)
    args = ap.parse_args()
    if args.false_positives:
        false_positives(args.false_positives, args.methods.split(","), args.riva_images)
    else:
        throughput(args.images, args.size)


if __name__ == "__main__":
    main()
