"""Benchmark: the diffaudit runner against a naive loop of plain diffusers pipeline calls, one run, one device.

CUDA: the SD 1.5 architecture with random weights (no download; throughput does not depend on weight
values): UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8), the SD 1.5
VAE, a one-layer 768-wide CLIP text encoder (prompt encoding is a rounding error next to 25 UNet steps),
512x512, 25 steps, CFG 7.5, fp16. CPU: the tiny model (64x64, 10 steps), so the script cannot rot.

Naive: ``pipe(prompt=[...], ...)`` with default settings, PIL output saved as PNG one by one, at batch 1
and at its best batch. Runner: ``generate.runner.generate_run`` end to end (run folder, PNGs, table),
with ``--compile`` on CUDA. Same prompts and seeds, so the images are compared too (max and mean
absolute pixel difference, 0-255). Prints JSON lines; the last one has the ratio and model-FLOPs
utilisation against a matmul peak measured in the same run (bf16 on CUDA, fp32 on CPU).

    python bench/generate.py [--images-per-prompt N] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def emit(**fields) -> None:
    print(json.dumps({"bench": "generate", **fields}), flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_sd15():
    """SD 1.5's UNet and VAE from their configs, random weights; a small text encoder; the SD 1.5 scheduler."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from generate.tiny import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_suite(folder: Path) -> Path:
    """The demo's twelve occupations through one template, as a suite file (no edits)."""
    from prompts.suites import load_suite

    demo = load_suite("demo")
    subjects = "\n".join(f"  - {{id: {s.id}, text: {s.text}}}" for s in demo.subjects)
    path = folder / "bench.yaml"
    path.write_text(textwrap.dedent("""\
        name: bench
        description: demo occupations, txt2img only
        sources: ["bench"]
        templates:
          - {id: heim_face, text: "a photo of the face of {a} {subject}"}
        subjects:
        """) + subjects + "\n")
    return path


def naive(pipe, jobs, batch: int, settings: dict, out: Path, device: str) -> tuple[float, dict[str, np.ndarray]]:
    """Plain pipeline calls; PIL images saved one by one. Returns img/s and the pixels by image_id."""
    import torch

    pixels = {}
    pipe(prompt=[jobs[0][1]] * batch, **settings)  # warm-up, not timed
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in chunk]
        images = pipe(prompt=[p for _, p, _ in chunk], generator=gens, **settings).images
        for (image_id, _, _), img in zip(chunk, images, strict=True):
            img.save(out / f"{image_id}.png")
            pixels[image_id] = np.asarray(img)
    sync(device)
    return len(jobs) / (time.perf_counter() - start), pixels


def flops_per_image(pipe, settings: dict, device: str, dtype) -> float:
    """UNet at batch 2 (CFG) x steps + one VAE decode, counted by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    f = pipe.vae_scale_factor
    lat = torch.randn(2, unet.config.in_channels, settings["height"] // f, settings["width"] // f,
                      device=device, dtype=dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            unet(lat, torch.tensor(500, device=device), encoder_hidden_states=ctx)
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.decode(lat[:1])
        vae_flops = fc.get_total_flops()
    cfg = 1 if settings["guidance_scale"] > 1 else 0.5
    return unet_flops * cfg * settings["num_inference_steps"] + vae_flops


def matmul_peak(device: str) -> tuple[float, str]:
    """Measured matmul FLOP/s: bf16 8192^3 on CUDA, fp32 1024^3 on CPU."""
    import torch

    dtype, n, reps = (torch.bfloat16, 8192, 20) if device.startswith("cuda") else (torch.float32, 1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start), str(dtype).removeprefix("torch.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-prompt", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
    ap.add_argument("--no-compile", action="store_true", help="runner without torch.compile on CUDA")
    args = ap.parse_args()
    import torch

    from diffaudit.config import GenerationConfig
    from generate.models import load_pipelines, wrap_pipeline
    from generate.runner import auto_batch_size, generate_run
    from prompts.suites import expand

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        dtype = torch.float16
        pipe = build_sd15().to(device, dtype)
        settings = dict(num_inference_steps=25, guidance_scale=7.5, height=512, width=512)
        spec, batches, ipp, compile_ = "sd15-random", (1, 4, 8, 16), args.images_per_prompt or 8, not args.no_compile
    else:
        dtype = torch.float32
        pipe = load_pipelines("tiny").txt2img  # plain pipeline: on CPU wrap_pipeline adds nothing
        settings = dict(num_inference_steps=10, guidance_scale=7.5, height=64, width=64)
        spec, batches, ipp, compile_ = "tiny", (1, 8), args.images_per_prompt or 1, False
    pipe.set_progress_bar_config(disable=True)
    emit(device=torch.cuda.get_device_name() if cuda else "cpu", model=spec, **settings,
         dtype=str(dtype).removeprefix("torch."), images_per_prompt=ipp, torch=torch.__version__)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        suite = write_suite(tmp)
        reqs = expand(suite, images_per_prompt=ipp, seed=0)
        jobs = [(r.image_id(s), r.prompt, s) for r in reqs for s in r.seeds]
        naive_rates, naive_pixels = {}, {}
        for b in batches:
            sub = jobs if b == batches[-1] else jobs[:max(2 * b, 8 if cuda else 4)]
            (tmp / f"naive{b}").mkdir()
            rate, pixels = naive(pipe, sub, b, settings, tmp / f"naive{b}", device)
            naive_rates[b] = rate
            if len(pixels) == len(jobs):  # the full set, to compare the runner's images with
                naive_pixels = pixels
            emit(variant=f"naive_batch{b}", img_per_s=round(rate, 3), images=len(sub))
        best = max(naive_rates, key=naive_rates.get)

        pipes = wrap_pipeline(pipe, spec=spec, kind="bench", revision=None, steps=settings["num_inference_steps"],
                              guidance=settings["guidance_scale"], device=device, dtype=dtype, compile_=compile_)
        config = GenerationConfig(suite=str(suite), model=spec, images_per_prompt=ipp, seed=0,
                                  steps=settings["num_inference_steps"], guidance=settings["guidance_scale"],
                                  width=settings["width"], height=settings["height"])
        # Warm-up (and compile) on full batches of the same shape as the timed run, under another seed.
        batch = auto_batch_size(device, settings["width"], settings["height"])
        subjects = tuple(sorted({r.subject for r in reqs}))[:max(1, -(-batch // ipp))]
        warm = GenerationConfig(**{**config.model_dump(), "subjects": subjects, "seed": 1})
        start = time.perf_counter()
        generate_run(tmp / "warmup", warm, progress=False, pipelines=pipes)  # compiles, if compiling
        warmup_s = time.perf_counter() - start
        summary = generate_run(tmp / "run", config, progress=False, pipelines=pipes)
        rate = summary["images"] / summary["seconds"]
        emit(variant="runner" + ("_compiled" if compile_ else ""), img_per_s=round(rate, 3),
             images=summary["images"], batch_size=summary["batch_size"], warmup_seconds=round(warmup_s, 1))

        from PIL import Image

        from diffaudit.runs import Run

        runner_images = Run.open(tmp / "run").images().set_index("image_id")["file"]
        diffs = [np.abs(np.asarray(Image.open(runner_images[i])).astype(int) - p.astype(int))
                 for i, p in naive_pixels.items()]
        flops = flops_per_image(pipes.txt2img, settings, device, dtype)
        peak, peak_dtype = matmul_peak(device)
        emit(figure="runner_img_per_s", value=round(rate, 3), baseline="naive_best_batch_img_per_s",
             baseline_value=round(naive_rates[best], 3), baseline_batch=best, ratio=round(rate / naive_rates[best], 3),
             ratio_vs_batch1=round(rate / naive_rates[batches[0]], 3), gflop_per_image=round(flops / 1e9, 2),
             peak_tflops=round(peak / 1e12, 3), peak_dtype=peak_dtype, mfu=round(flops * rate / peak, 4),
             physical_limit_img_per_s=round(peak / flops, 2),
             max_pixel_diff=int(max(d.max() for d in diffs)), mean_pixel_diff=float(np.mean([d.mean() for d in diffs])),
             compared_images=len(diffs))


if __name__ == "__main__":
    main()
