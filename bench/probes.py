"""Probe-stage benchmark; prints JSON lines, each with its baseline measured in the same run.

1. The CLIP probe stage (``audit.bias.probe_run`` with ``ClipProbe``: batched decode in threads with the
   next batch decoded ahead, batched preprocessing on the device, batched encoding with fp16 autocast on
   CUDA, table written) against the naive loop a first script would write, same run, model and device: per
   file, ``Image.open`` -> open_clip's PIL transform -> ``encode_image`` on one image -> softmax against the
   same class embeddings. By default the ViT-L-14 architecture with random weights (the default probe's
   FLOPs, ~81 GFLOP per image; throughput does not depend on weight values), so it runs offline.
2. The face probes (``faces``, ``faces_attr``, ``skin_tone`` sharing one MTCNN pass per image) against a
   per-image loop that decodes and detects again for each probe, as chaining three tools would.
3. All default probes together, with each probe's and the face detector's share of the stage's wall time.

    python bench/probes.py --quick                           # ViT-L-14 (random weights), 8 images, CPU
    python bench/probes.py --model tiny                      # the tiny CLIP (measures I/O, not a model)
    python bench/probes.py --model ViT-L-14:openai --pretrained --images 2048 --batch-size 256   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")


def make_run(root: Path, n: int, size: int):
    """A run of ``n`` PNG photos from scikit-image (cycled, each slightly shifted so none is a copy)."""
    import skimage.data

    from diffaudit.runs import Run, sha256_bytes

    run = Run.create(root, {"generation": {"suite": "bench", "model": "photos"}})
    base = {p: Image.fromarray(np.asarray(getattr(skimage.data, p)())).convert("RGB").resize((size + 16, size + 16))
            for p in PHOTOS}
    rows = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        shift = (i // len(PHOTOS)) % 16
        img = base[name].crop((shift, shift, shift + size, shift + size))
        path = run.image_path(f"p-{name}", i)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "PNG")
        rows.append(dict(image_id=f"p-{name}-{i}", prompt_id=f"p-{name}", suite="bench", template="photo",
                         subject=name, prompt=name, negative_prompt="", mode="txt2img", index=i, seed=i,
                         model="photos", scheduler="none", steps=0, guidance=0.0, width=size, height=size,
                         path=run.image_relpath(f"p-{name}", i), sha256=sha256_bytes(path.read_bytes()),
                         seconds=0.0))
    run.write_table("generations", pd.DataFrame(rows))
    return run


def load(spec: str, random_weights: bool, device: str):
    """A ``LoadedClip`` from a spec, or the same architecture with random weights (for timing only)."""
    import open_clip
    import torch

    from audit.probes.clip import LoadedClip, load_clip, pick_device

    if not random_weights or spec == "tiny":
        return load_clip(spec, device=device)
    name = spec.partition(":")[0]
    dev = pick_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None, device=dev).eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], tuple) else (cfg["size"], cfg["size"])
    return LoadedClip(f"{name}:random", model, open_clip.get_tokenizer(name), size, tuple(cfg["mean"]),
                      tuple(cfg["std"]), dev)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def naive(files: list[str], probe) -> float:
    """Per image: open, PIL transform, encode one image, classify; returns seconds."""
    import open_clip
    import torch

    clip = probe.clip
    transform = open_clip.image_transform(clip.image_size, is_train=False, mean=clip.mean, std=clip.std)
    sync(clip.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for f in files:
            x = transform(Image.open(f).convert("RGB")).unsqueeze(0).to(clip.device)
            with probe._autocast():
                feats = clip.model.encode_image(x).float()
            probe.probabilities(torch.nn.functional.normalize(feats, dim=-1))
    sync(clip.device)
    return time.perf_counter() - t0


def stage(run, probes, batch_size: int, device) -> float:
    """The probe stage on a fresh copy of the run's probe tables; returns seconds."""
    from audit.bias import probe_run

    for p in probes:
        if run.has_table(f"probes/{p.name}"):
            run.table_path(f"probes/{p.name}").unlink()
    sync(device)
    t0 = time.perf_counter()
    probe_run(run, probes, batch_size=batch_size, progress=False)
    sync(device)
    return time.perf_counter() - t0


def image_flops(probe) -> float:
    """FLOPs of one image through the image tower (torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, 3, *probe.clip.image_size), device=probe.clip.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        probe.clip.model.encode_image(x)
    return float(counter.get_total_flops())


class Timed:
    """A probe or detector whose calls are timed (``seconds``), everything else delegated."""

    def __init__(self, inner, method: str):
        self._inner, self._method, self.seconds = inner, method, 0.0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call_timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return getattr(self._inner, self._method)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def score(self, batch):
        return self.__call_timed(batch)

    def detect(self, images):
        return self.__call_timed(images)


def naive_faces(files: list[str], names: list[str]) -> float:
    """Per image and per face probe, as a first script would chain three tools: open the file, detect the
    faces, score that probe on that image alone; returns seconds (probes built beforehand, not timed)."""
    from audit.bias import build_probes
    from audit.probes.base import ImageBatch, decode

    probes = build_probes(names)
    t0 = time.perf_counter()
    for f in files:
        for probe in probes:
            probe.score(ImageBatch([decode(Path(f).stem, f)]))  # a fresh batch: no shared decode or faces
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-L-14", help="tiny | NAME[:PRETRAINED] | path (as --clip-model)")
    ap.add_argument("--pretrained", action="store_true",
                    help="load the model's weights (default: the same architecture with random weights)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="8 images")
    ap.add_argument("--repeat", type=int, default=2, help="timings alternated this many times; best kept")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's peak TFLOP/s for model-FLOPs utilisation (e.g. 989 for H100 fp16 dense)")
    ap.add_argument("--skip-all", action="store_true", help="skip the face probes and the full probe set")
    args = ap.parse_args()
    if args.quick:
        args.images = 8

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from audit.bias import build_probes
    from audit.probes.clip import ClipProbe

    clip = load(args.model, not args.pretrained, args.device)
    probe = ClipProbe(clip, batch_size=args.batch_size)
    faces = ["faces", "faces_attr", "skin_tone"]
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "run", args.images, args.size)
        files = list(run.images()["file"])
        naive(files[:2], probe)  # warm-up: lazy init, kernels, caches
        stage(run, [probe], args.batch_size, clip.device)
        # Alternate and keep each one's best of --repeat: a shared CPU's load moves single timings by 30%.
        t_naive = t_stage = float("inf")
        for _ in range(args.repeat):
            t_naive = min(t_naive, naive(files, probe))
            t_stage = min(t_stage, stage(run, [probe], args.batch_size, clip.device))
        flops = image_flops(probe)
        base = {"bench": "probes", "device": str(clip.device), "threads": torch.get_num_threads(),
                "model": clip.spec, "images": args.images, "size": args.size, "batch_size": args.batch_size}
        line = {**base, "what": "clip stage vs naive per-image loop",
                "stage_img_s": round(args.images / t_stage, 2), "naive_img_s": round(args.images / t_naive, 2),
                "ratio": round(t_naive / t_stage, 2), "gflop_per_image": round(flops / 1e9, 3),
                "stage_tflop_s": round(flops * args.images / t_stage / 1e12, 4)}
        if args.peak_tflops:
            line["mfu"] = round(line["stage_tflop_s"] / args.peak_tflops, 4)
        print(json.dumps(line), flush=True)
        if args.skip_all:
            return
        naive_faces(files[:2], faces)  # warm-up
        face_probes = build_probes(faces)
        t_naive = t_stage = float("inf")
        for _ in range(args.repeat):
            t_naive = min(t_naive, naive_faces(files, faces))
            t_stage = min(t_stage, stage(run, face_probes, args.batch_size, clip.device))
        print(json.dumps({**base, "what": "face probes (faces, faces_attr, skin_tone; MTCNN found once) vs a "
                          "per-image loop detecting for each probe",
                          "detector": face_probes[0].detector.name.split(":")[0],
                          "stage_img_s": round(args.images / t_stage, 2),
                          "naive_img_s": round(args.images / t_naive, 2), "ratio": round(t_naive / t_stage, 2)}),
              flush=True)
        # The whole default probe set, each probe's (and the detector's) share of the stage's wall time.
        others = build_probes(faces)
        detector = Timed(others[0].detector, "detect")
        for p in others:
            p.detector = detector
        timed = [Timed(probe, "score"), *(Timed(p, "score") for p in others)]
        t_all = stage(run, timed, args.batch_size, clip.device)
        shares = {"face detection": detector.seconds}
        for t in timed:
            shares[t.name] = t.seconds - (detector.seconds if t.name == "faces" else 0.0)
        shares["decode, tables, rest"] = t_all - sum(shares.values())
        print(json.dumps({**base, "what": "all default probes: share of the bias stage's wall time",
                          "stage_img_s": round(args.images / t_all, 2), "seconds": round(t_all, 2),
                          "share": {k: round(v / t_all, 3) for k, v in shares.items()}}), flush=True)


if __name__ == "__main__":
    main()
