"""Probe-stage benchmark; prints JSON lines.

Images/s of the CLIP probe stage (``audit.bias.probe_run`` with ``ClipProbe``: batched decode in
threads with the next batch decoded ahead, batched preprocessing on the device, batched encoding with
fp16 autocast on CUDA, table written) against the naive loop a first script would write, on the same
run, same model, same device: per file, ``Image.open`` -> open_clip's PIL transform -> ``encode_image``
on one image -> softmax against the same class embeddings. A third line times the whole default probe
set (clip + faces + skin_tone). Throughput does not depend on weight values, so ``--random-weights``
times any open_clip architecture offline.

    python bench/probes.py                                   # tiny CLIP on CPU
    python bench/probes.py --model ViT-B-32 --random-weights --images 64
    python bench/probes.py --model ViT-L-14:openai --images 2048 --batch-size 256   # on a GPU
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | NAME[:PRETRAINED] | path (as --clip-model)")
    ap.add_argument("--random-weights", action="store_true", help="same architecture, random weights")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's peak TFLOP/s for model-FLOPs utilisation (e.g. 989 for H100 fp16 dense)")
    ap.add_argument("--skip-all", action="store_true", help="skip timing the full probe set")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from audit.bias import build_probes
    from audit.probes.clip import ClipProbe

    clip = load(args.model, args.random_weights, args.device)
    probe = ClipProbe(clip, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "run", args.images, args.size)
        files = list(run.images()["file"])
        naive(files[:4], probe)  # warm-up: lazy init, kernels, caches
        stage(run, [probe], args.batch_size, clip.device)
        t_naive = naive(files, probe)
        t_stage = stage(run, [probe], args.batch_size, clip.device)
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
        if not args.skip_all:
            probes = [probe, *build_probes(["faces", "skin_tone"])]
            t_all = stage(run, probes, args.batch_size, clip.device)
            print(json.dumps({**base, "what": "clip+faces+skin_tone stage",
                              "stage_img_s": round(args.images / t_all, 2)}), flush=True)


if __name__ == "__main__":
    main()
