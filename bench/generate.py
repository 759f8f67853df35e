"""Benchmark: the diffaudit runner against a naive loop of plain diffusers pipeline calls, one run, one device.

CUDA: the SD 1.5 architecture with random weights (no download; throughput does not depend on weight
values): UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8), the SD 1.5
VAE, a one-layer 768-wide CLIP text encoder (prompt encoding is a rounding error next to 25 UNet steps),
512x512, 25 steps, CFG 7.5, fp16. CPU: the tiny model (64x64, 10 steps), so the script cannot rot.

Naive: ``pipe(prompt=[...], ...)`` with default settings, PIL output saved as PNG one by one, at batch 1
and at larger batches (its best is the baseline). Runner: ``generate.runner.generate_run`` end to end (run
folder, PNGs, table), eager and with ``--compile`` (the product's CUDA path), then, while the time budget
lasts, experimental variants on top of it (batch 16, then Inductor coordinate-descent tuning). Same
prompts and seeds, so the images are compared too (max and mean absolute pixel difference, 0-255). Prints
JSON lines (also appended to ``--log``); the ``figure`` line has the ratio and model-FLOPs utilisation
against a bf16 matmul peak measured in the same run (fp32 on CPU).

    python bench/generate.py [--images-per-prompt N] [--no-compile] [--budget-s S] [--log F] [--profile F]
    python bench/generate.py --score-overhead [--repeats R]

``--score-overhead``: the runner with and without the memorization-score hook (``generate.scores``),
alternated ``R`` times on the same pipeline (the tiny model on CPU; SD 1.5 architecture on CUDA), so that
the ratio of medians is read against the spread of each variant's repeats: that spread is the noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


LOG: Path | None = None


def emit(**fields) -> None:
    line = json.dumps({"bench": "generate", **fields})
    print(line, flush=True)
    if LOG is not None:
        with LOG.open("a") as f:
            f.write(line + "\n")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_sd15(text_layers: int = 1, device: str | None = None):
    """SD 1.5's UNet and VAE from their configs, random weights; a text encoder of ``text_layers`` of SD 1.5's 12
    (1 by default: the UNet and VAE are what is timed); the SD 1.5 scheduler. ``device``: initialise the weights
    there (seconds on a GPU, not a minute of CPU init), falling back to the CPU where a library insists."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from generate.tiny import clip_tokenizer

    def modules():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=text_layers, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        return unet, vae, text

    try:
        with torch.device(device) if device else contextlib.nullcontext():
            unet, vae, text = modules()
    except (RuntimeError, TypeError, NotImplementedError):  # a library that insists on the CPU: slower, same model
        unet, vae, text = modules()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_suite(folder: Path, prompts: int | None = None) -> Path:
    """The demo's twelve occupations (or the first ``prompts``) through one template, as a suite file (no edits)."""
    from prompts.suites import load_suite

    demo = load_suite("demo")
    subjects = "\n".join(f"  - {{id: {s.id}, text: {s.text}}}" for s in demo.subjects[:prompts])
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


def naive(pipe, jobs, batch: int, settings: dict, out: Path, device: str) -> tuple[float, float, dict[str, np.ndarray]]:
    """Plain pipeline calls; PIL images saved one by one. Returns img/s, the share of the time spent saving,
    and the pixels by image_id."""
    import torch

    pixels = {}
    pipe(prompt=[jobs[0][1]] * batch, **settings)  # warm-up, not timed
    sync(device)
    saving = 0.0
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in chunk]
        images = pipe(prompt=[p for _, p, _ in chunk], generator=gens, **settings).images
        t0 = time.perf_counter()
        for (image_id, _, _), img in zip(chunk, images, strict=True):
            img.save(out / f"{image_id}.png")
            pixels[image_id] = np.asarray(img)
        saving += time.perf_counter() - t0
    sync(device)
    seconds = time.perf_counter() - start
    return len(jobs) / seconds, saving / seconds, pixels


def flops_per_image(pipe, settings: dict, device: str, dtype) -> float:
    """UNet at batch 2 (CFG) x steps + one VAE decode, counted by torch.utils.flop_counter on the eager
    modules (the compiled wrappers are bypassed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = getattr(pipe.unet, "_orig_mod", pipe.unet), pipe.vae
    f = pipe.vae_scale_factor
    lat = torch.randn(2, unet.config.in_channels, settings["height"] // f, settings["width"] // f,
                      device=device, dtype=dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            unet(lat, torch.tensor(500, device=device), encoder_hidden_states=ctx)
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            type(vae).decode(vae, lat[:1])
        vae_flops = fc.get_total_flops()
    cfg = 1 if settings["guidance_scale"] > 1 else 0.5
    pipe.scheduler.set_timesteps(settings["num_inference_steps"])
    calls = len(pipe.scheduler.timesteps)  # PNDM calls the UNet 26 times for 25 steps
    return unet_flops * cfg * calls + vae_flops


def matmul_peak(device: str, dtype=None) -> float:
    """Measured matmul FLOP/s: 8192^3 on CUDA (bf16 unless told), fp32 1024^3 on CPU."""
    import torch

    if device.startswith("cuda"):
        dtype, n, reps = dtype or torch.bfloat16, 8192, 20
    else:
        dtype, n, reps = torch.float32, 1024, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def attention_backends(batch: int) -> None:
    """SD 1.5's largest attention (64x64 latents: 4,096 tokens, 8 heads of 40) under each SDPA backend."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2 * batch, 8, 4096, 40, device="cuda", dtype=torch.float16)
    timings = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                F.scaled_dot_product_attention(q, q, q)
                sync("cuda")
                start = time.perf_counter()
                for _ in range(10):
                    F.scaled_dot_product_attention(q, q, q)
                sync("cuda")
            timings[name.lower()] = round((time.perf_counter() - start) / 10 * 1e3, 3)
        except RuntimeError as e:
            timings[name.lower()] = f"unavailable: {str(e).splitlines()[0][:80]}"
    emit(attention_ms=timings, shape=list(q.shape), dtype="float16")


def unwrap(pipe) -> None:
    """Undo the runner's compile wrappers so that the next variant compiles afresh (fusions stay)."""
    import torch

    pipe.unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    pipe.vae.__dict__.pop("decode", None)
    torch._dynamo.reset()


def compiled_graphs() -> int:
    import torch

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


VARIANTS = {
    # name: (compile, extra switch, batch size or None for auto); the first two are the product (eager, --compile)
    "runner_eager": (False, None, None),
    "runner_compiled": (True, None, None),
    "runner_compiled_batch16": (True, None, 16),
    "runner_compiled_coordinate_descent": (True, "coordinate_descent", None),
}


def run_variant(name: str, pipe, *, spec: str, settings: dict, suite: Path, ipp: int, device: str, dtype,
                tmp: Path, naive_pixels: dict[str, np.ndarray]) -> dict:
    """Warm up (compiling, if compiling) under another seed on full batches, then time a whole run."""
    import torch
    from PIL import Image

    from diffaudit.config import GenerationConfig
    from diffaudit.runs import Run
    from generate.models import wrap_pipeline
    from generate.runner import auto_batch_size, generate_run
    from prompts.suites import expand

    compile_, switch, batch_size = VARIANTS[name]
    unwrap(pipe)
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = switch == "coordinate_descent"
    pipes = wrap_pipeline(pipe, spec=spec, kind="bench", revision=None, steps=settings["num_inference_steps"],
                          guidance=settings["guidance_scale"], device=device, dtype=dtype, compile_=compile_)
    config = GenerationConfig(suite=str(suite), model=spec, images_per_prompt=ipp, seed=0,
                              steps=settings["num_inference_steps"], guidance=settings["guidance_scale"],
                              width=settings["width"], height=settings["height"], batch_size=batch_size or "auto")
    batch = batch_size or auto_batch_size(device, settings["width"], settings["height"])
    subjects = tuple(sorted({r.subject for r in expand(suite, images_per_prompt=ipp, seed=0)}))
    warm = GenerationConfig(**{**config.model_dump(), "subjects": subjects[:max(1, -(-batch // ipp))], "seed": 1})
    start = time.perf_counter()
    generate_run(tmp / f"{name}_warmup", warm, progress=False, pipelines=pipes)
    warmup_s = time.perf_counter() - start
    graphs = compiled_graphs()
    summary = generate_run(tmp / name, config, progress=False, pipelines=pipes)
    rate = summary["images"] / summary["seconds"]
    files = Run.open(tmp / name).images().set_index("image_id")["file"]
    diffs = [np.abs(np.asarray(Image.open(files[i])).astype(int) - p.astype(int)) for i, p in naive_pixels.items()]
    result = dict(variant=name, img_per_s=round(rate, 3), images=summary["images"], batch_size=summary["batch_size"],
                  warmup_seconds=round(warmup_s, 1), recompiles_in_timed_run=compiled_graphs() - graphs,
                  max_pixel_diff_vs_naive=int(max(d.max() for d in diffs)),
                  mean_pixel_diff_vs_naive=round(float(np.mean([d.mean() for d in diffs])), 4),
                  p99_pixel_diff_vs_naive=float(np.percentile(np.concatenate([d.ravel() for d in diffs]), 99)),
                  compared_images=len(diffs))
    if device.startswith("cuda"):
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if device.startswith("cuda"):  # the same pipeline calls without the runner: what the runner itself costs
        start, n = time.perf_counter(), len(files)
        with torch.inference_mode():
            for _ in range(-(-n // batch)):
                pipes.txt2img(prompt=["a photo of the face of a nurse"] * batch, output_type="pt", **settings)
        sync(device)
        result["pipeline_calls_only_img_per_s"] = round(-(-n // batch) * batch / (time.perf_counter() - start), 3)
    emit(**result)
    return result


def profile(pipe, settings: dict, batch: int, path: Path) -> None:
    """CUDA time by kernel for one pipeline call of the compiled pipeline, into ``path``."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    prompts = ["a photo of the face of a nurse"] * batch
    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe(prompt=prompts, output_type="pt", **settings)
        sync("cuda")
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))


class _NoRecorder:
    """Stands in for ``ScoreRecorder``: no hook, no scores (the runner as it was before it recorded them)."""

    def __init__(self, unet, n, valid=None, mean_steps=0):
        self.n = n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def scores(self):
        from generate.scores import Scores

        return Scores.none(self.n)


def score_overhead(repeats: int) -> None:
    """Alternate runs with and without the score hook; print per-variant medians, spreads and their ratio."""
    import statistics

    import torch

    import generate.runner as runner
    from diffaudit.config import GenerationConfig
    from generate.models import load_pipelines, wrap_pipeline
    from generate.runner import generate_run
    from generate.scores import ScoreRecorder

    cuda = torch.cuda.is_available()
    if cuda:
        pipe = build_sd15().to("cuda", torch.float16)
        pipes = wrap_pipeline(pipe, spec="sd15-random", kind="bench", revision=None, steps=25, guidance=7.5,
                              device="cuda", dtype=torch.float16)
        size, steps, ipp, batch = 512, 25, 4, 16
    else:
        torch.set_num_threads(1)
        pipes, size, steps, ipp, batch = load_pipelines("tiny"), 64, 10, 2, 8
    rates: dict[str, list[float]] = {"hook": [], "no_hook": []}
    with tempfile.TemporaryDirectory() as tmp:
        suite = write_suite(Path(tmp))
        cfg = GenerationConfig(suite=str(suite), model="bench", images_per_prompt=ipp, steps=steps, guidance=7.5,
                               width=size, height=size, batch_size=batch)
        generate_run(Path(tmp) / "warmup", cfg, progress=False, pipelines=pipes)
        for r in range(repeats):
            for variant in (("hook", "no_hook") if r % 2 == 0 else ("no_hook", "hook")):
                runner.ScoreRecorder = ScoreRecorder if variant == "hook" else _NoRecorder
                try:
                    out = generate_run(Path(tmp) / f"{variant}{r}", cfg, progress=False, pipelines=pipes)
                finally:
                    runner.ScoreRecorder = ScoreRecorder
                rates[variant].append(out["images"] / out["seconds"])
    # The hook's own work, timed apart: one subtraction and one norm on a UNet output, against one UNet call.
    unet = pipes.txt2img.unet
    f = pipes.txt2img.vae_scale_factor
    x = torch.randn(2 * batch, unet.config.in_channels, size // f, size // f, device=pipes.device, dtype=pipes.dtype)
    ctx = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, device=pipes.device, dtype=pipes.dtype)
    from generate.scores import text_noise_norm

    with torch.inference_mode():
        eps = unet(x, torch.tensor(500, device=pipes.device), encoder_hidden_states=ctx).sample
        timed = {}
        for name, fn, reps in (("unet_call", lambda: unet(x, torch.tensor(500, device=pipes.device),
                                                           encoder_hidden_states=ctx), 5),
                               ("hook_ops", lambda: text_noise_norm(*eps.chunk(2)), 200)):
            fn()
            sync(pipes.device)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(pipes.device)
            timed[name] = (time.perf_counter() - t0) / reps
    med = {k: statistics.median(v) for k, v in rates.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in rates.items()}
    ratio = med["hook"] / med["no_hook"]
    noise = max(spread.values())
    emit(figure="score_hook_overhead", device=torch.cuda.get_device_name() if cuda else "cpu",
         model="sd15-random" if cuda else "tiny", images=out["images"], repeats=repeats,
         img_per_s_hook=round(med["hook"], 3), img_per_s_no_hook=round(med["no_hook"], 3),
         ratio=round(ratio, 4), relative_spread_of_repeats=round(noise, 4),
         within_noise=bool(abs(ratio - 1) <= noise), hook_ops_ms=round(timed["hook_ops"] * 1e3, 4),
         unet_call_ms=round(timed["unet_call"] * 1e3, 3),
         hook_share_of_unet_call=round(timed["hook_ops"] / timed["unet_call"], 5), runs={k: [round(x, 3) for x in v] for k, v in rates.items()})


def main() -> None:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-prompt", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
    ap.add_argument("--no-compile", action="store_true", help="runner without torch.compile on CUDA")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start an experimental variant only if this much wall time is left for it")
    ap.add_argument("--log", type=Path, default=None, help="append the JSON lines to this file too")
    ap.add_argument("--profile", type=Path, default=None, help="CUDA: write a kernel-time table of one call here")
    ap.add_argument("--score-overhead", action="store_true", help="only: the score hook's cost, alternated runs")
    ap.add_argument("--repeats", type=int, default=6, help="with --score-overhead: runs per variant")
    args = ap.parse_args()
    LOG = args.log
    if args.score_overhead:
        score_overhead(args.repeats)
        return
    began = time.perf_counter()
    import torch

    from generate.models import load_pipelines
    from generate.runner import auto_batch_size
    from prompts.suites import expand

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        dtype = torch.float16
        pipe = build_sd15().to(device, dtype)
        settings = dict(num_inference_steps=25, guidance_scale=7.5, height=512, width=512)
        spec, ipp = "sd15-random", args.images_per_prompt or 8
        batches = {1: 8, 8: 32, 16: None, 32: 64}  # batch: images timed (None: all, kept for comparison)
        variants = ["runner_eager"] + ([] if args.no_compile else [
            "runner_compiled", "runner_compiled_batch16", "runner_compiled_coordinate_descent"])
    else:
        dtype = torch.float32
        pipe = load_pipelines("tiny").txt2img  # plain pipeline: on CPU wrap_pipeline adds nothing
        settings = dict(num_inference_steps=10, guidance_scale=7.5, height=64, width=64)
        spec, ipp = "tiny", args.images_per_prompt or 1
        batches, variants = {1: 4, 8: None}, ["runner_eager"]
    pipe.set_progress_bar_config(disable=True)
    emit(device=torch.cuda.get_device_name() if cuda else "cpu", model=spec, **settings,
         dtype=str(dtype).removeprefix("torch."), images_per_prompt=ipp, torch=torch.__version__)
    peak = matmul_peak(device)
    if cuda:
        emit(matmul_tflops={"bfloat16": round(peak / 1e12, 1),
                            "float16": round(matmul_peak(device, torch.float16) / 1e12, 1)})
        attention_backends(auto_batch_size(device, settings["width"], settings["height"]))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        suite = write_suite(tmp)
        reqs = expand(suite, images_per_prompt=ipp, seed=0)
        jobs = [(r.image_id(s), r.prompt, s) for r in reqs for s in r.seeds]
        naive_rates, naive_pixels = {}, {}
        for b, n in batches.items():
            (tmp / f"naive{b}").mkdir()
            rate, saving, pixels = naive(pipe, jobs[:n], b, settings, tmp / f"naive{b}", device)
            naive_rates[b] = rate
            if n is None:
                naive_pixels = pixels
            emit(variant=f"naive_batch{b}", img_per_s=round(rate, 3), images=len(jobs[:n]),
                 share_of_time_saving_png=round(saving, 3))
        best = max(naive_rates, key=naive_rates.get)
        flops = flops_per_image(pipe, settings, device, dtype)

        results = {}
        for name in variants:
            left = args.budget_s - (time.perf_counter() - began)
            compile_, switch, _ = VARIANTS[name]
            needs = (250 if switch else 110) if compile_ else 60
            if name not in ("runner_eager", "runner_compiled") and left < needs:
                emit(variant=name, skipped=f"{left:.0f} s of the budget left, {needs} s needed")
                continue
            try:
                results[name] = run_variant(name, pipe, spec=spec, settings=settings, suite=suite, ipp=ipp,
                                            device=device, dtype=dtype, tmp=tmp, naive_pixels=naive_pixels)
            except Exception as e:  # an experimental switch may fail on some stacks; the others still count
                emit(variant=name, failed=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            if name == "runner_compiled" and args.profile and cuda and name in results:
                profile(pipe, settings, results[name]["batch_size"], args.profile)
        product = "runner_compiled" if "runner_compiled" in results else "runner_eager"
        rate = results[product]["img_per_s"]
        emit(figure="runner_img_per_s", runner=product, value=rate, baseline="naive_best_batch_img_per_s",
             baseline_value=round(naive_rates[best], 3), baseline_batch=best, ratio=round(rate / naive_rates[best], 3),
             ratio_vs_batch1=round(rate / naive_rates[1], 3), gflop_per_image=round(flops / 1e9, 2),
             peak_tflops=round(peak / 1e12, 3), peak_dtype="bfloat16" if cuda else "float32",
             mfu=round(flops * rate / peak, 4), physical_limit_img_per_s=round(peak / flops, 2),
             max_pixel_diff=results[product]["max_pixel_diff_vs_naive"],
             mean_pixel_diff=results[product]["mean_pixel_diff_vs_naive"],
             best_variant=max(results, key=lambda k: results[k]["img_per_s"]),
             best_variant_img_per_s=max(r["img_per_s"] for r in results.values()),
             seconds=round(time.perf_counter() - began, 1))


if __name__ == "__main__":
    main()
