"""Issue 20's GPU measurement in one prepared script: the runner's default fast path against plain diffusers.

One run, one device, every baseline measured beside what it is compared with, JSON lines out:

1. ``env``: device, memory, library versions; ``matmul``: the measured bf16 and fp16 matmul peaks.
2. ``model``: the SD 1.5 architecture built from its configs with random weights (no download; throughput
   does not depend on weight values): UNet2DConditionModel (320-640-1280-1280, cross-attention 768, 8
   heads), the SD 1.5 VAE, the full 12-layer 768-wide CLIP text encoder, PNDM as SD 1.5 ships it; fp16.
3. ``attention``: SD 1.5's largest self-attention (4,096 tokens at 512x512, CFG's doubled batch) under each
   SDPA backend (cuDNN, Flash, memory-efficient, math) with its difference from the math kernel, one UNet
   call under each, and the backend that the runner's own start-up measurement (``generate.fast``) picks.
4. ``naive``: plain ``StableDiffusionPipeline`` calls (default attention, PIL output, PNGs saved one by one)
   at several batch sizes; then the best batch over all ``N`` images (N = 12 prompts x 8 = 96): the baseline.
5. ``runner``: ``generate.runner.generate_run`` end to end with its defaults (the exact fast path: measured
   attention backend, CUDA graphs at bucketed batch shapes, VAE decode and PNG work overlapped with the next
   batch, pinned buffers; run folder, PNGs and table written), twice (each run pays its own start-up, as
   every ``diffaudit generate`` does), then with ``--no-fast``. Same prompts and seeds as the baseline, so
   every image is compared: max, mean and 99th-percentile absolute pixel difference (0-255) over N images.
6. ``probe``: the CLIP probe stage (``audit.bias.probe_run`` with ``ClipProbe``) on the runner's images with
   the ViT-L-14 architecture (random weights): images/s and its share of the audit's wall time
   (probe / (generate + probe) per image).
7. ``figure``: runner img/s over the baseline's, against issue 20's targets (>= 2.5x, >= 60% of the bf16
   matmul peak, pixels within 1/255); ``targets_met`` only on a GPU, never claimed from the smoke run.

    python bench/h200.py [--out F] [--budget-s 420]     # on the GPU (default out: $OUT/h200.jsonl if $OUT)
    python bench/h200.py --cpu-smoke [--out F]          # same code path, CPU, tiny models, under 2 minutes
    python bench/h200.py --check                        # one line: the modules it needs, and which are missing

On the lent H200 the image's python3 has torch 2.11 but not diffusers, open_clip or pydantic: carry them as
wheels (see /work/.library/device/README.md; versions as this project's venv pins them), e.g.
``diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 pydantic==2.14.4 pydantic_core==2.50.5
annotated_types==0.8.0 typing_inspection==0.4.5 importlib_metadata``, then run
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD;
PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 bench/h200.py --check && python3 bench/h200.py``. Each stage prints
its line when it ends, so a run stopped at the limit still leaves what it measured; ``--budget-s`` skips the
optional stages (larger sweep batches, the repeat and ``--no-fast`` runs) once the time is short. Measured
on an H100 in 5 minutes by ``bench/generate.py``'s equivalent stages; expected here: about 4-5 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULES = ("torch", "diffusers", "transformers", "open_clip", "ftfy", "regex", "safetensors", "pydantic", "yaml",
           "pyarrow", "pandas", "PIL", "scipy", "tqdm")
PROMPTS = 12  # the demo's twelve occupations, one template
TARGET_RATIO, TARGET_MFU, TARGET_MAX_DIFF = 2.5, 0.60, 1


@dataclass(frozen=True)
class Setting:
    """What one mode measures: the GPU bench or its CPU smoke (the same stages, smaller)."""

    device: str
    model: str
    size: int
    steps: int
    images_per_prompt: int
    sweep: dict[int, int]  # naive batch -> images timed at it
    probe_model: str
    probe_batch: int

    @property
    def images(self) -> int:
        return PROMPTS * self.images_per_prompt


GPU = Setting("cuda", "sd15-random", 512, 25, 8, {1: 4, 8: 16, 16: 32, 32: 64, 48: 96}, "ViT-L-14", 64)
SMOKE = Setting("cpu", "tiny", 32, 3, 1, {1: 2, 4: 8}, "tiny", 16)


@dataclass
class Bench:
    out: Path | None
    budget_s: float
    began: float = field(default_factory=time.perf_counter)
    lines: list[dict] = field(default_factory=list)

    def emit(self, stage: str, **fields) -> dict:
        line = {"bench": "h200", "stage": stage, **fields, "at_s": round(self.elapsed, 1)}
        self.lines.append(line)
        text = json.dumps(line, default=_plain)
        print(text, flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(text + "\n")
        return line

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def left(self) -> float:
        return self.budget_s - self.elapsed

    def guarded(self, stage: str, fn, *args, **kwargs):
        """Run one stage; a failure is a line (the stages after it still run), not a lost run."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a backend or stack that cannot run one stage must not cost the others
            self.emit(stage, failed=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            return None


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def missing_modules() -> list[str]:
    return [m for m in MODULES if importlib.util.find_spec(m) is None]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- model ---------------------------------------------------------------------------------------------------

def build(setting: Setting, dtype):
    if setting.model == "tiny":
        from generate.models import load_pipelines

        return load_pipelines("tiny", device="cpu").txt2img  # the plain diffusers pipeline inside
    from bench.generate import build_sd15

    return build_sd15(text_layers=12, device=setting.device).to(setting.device, dtype)


# --- stages --------------------------------------------------------------------------------------------------

def env_stage(b: Bench, setting: Setting) -> None:
    import diffusers
    import torch

    fields: dict[str, Any] = {"mode": "gpu" if setting.device == "cuda" else "cpu-smoke", "torch": torch.__version__,
                              "diffusers": diffusers.__version__, "python": sys.version.split()[0]}
    if setting.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        fields.update(device=props.name, capability=f"{props.major}.{props.minor}",
                      memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                      cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        fields.update(device="cpu", threads=torch.get_num_threads())
    b.emit("env", **fields, model=setting.model, size=setting.size, steps=setting.steps, guidance=7.5,
           images=setting.images)


def matmul_stage(b: Bench, setting: Setting) -> dict[str, float]:
    from bench.generate import matmul_peak

    if setting.device == "cuda":
        import torch

        peaks = {"bfloat16": matmul_peak("cuda", torch.bfloat16), "float16": matmul_peak("cuda", torch.float16)}
    else:
        peaks = {"float32": matmul_peak("cpu")}
    b.emit("matmul", tflops={k: round(v / 1e12, 3) for k, v in peaks.items()})
    return peaks


def attention_stage(b: Bench, setting: Setting, pipe, batch: int, dtype) -> None:
    """Each SDPA backend on the UNet's largest self-attention, and one UNet call under each."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from generate import fast

    device = setting.device
    heads, dim = fast._first_attention_shape(pipe.unet)
    f = pipe.vae_scale_factor
    tokens = (setting.size // f) ** 2
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(2 * batch, heads, tokens, dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q, k, v).float()
    lat = torch.randn(2 * batch, pipe.unet.config.in_channels, setting.size // f, setting.size // f,
                      device=device, dtype=dtype, generator=gen)
    ctx = torch.randn(2 * batch, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype, generator=gen)
    t = torch.tensor(500, device=device)
    kernels: dict[str, Any] = {}
    unet_ms: dict[str, Any] = {}
    reps = 10 if device == "cuda" else 2
    for name in (*fast.BACKENDS, "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]), torch.inference_mode():
                out = F.scaled_dot_product_attention(q, k, v)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    F.scaled_dot_product_attention(q, k, v)
                sync(device)
                ms = (time.perf_counter() - t0) / reps * 1e3
                kernels[name.lower()] = {"ms": round(ms, 4),
                                         "max_diff_vs_math": round(float((out.float() - ref).abs().max()), 6)}
                pipe.unet(lat, t, encoder_hidden_states=ctx)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(max(1, reps // 3)):
                    pipe.unet(lat, t, encoder_hidden_states=ctx)
                sync(device)
                unet_ms[name.lower()] = round((time.perf_counter() - t0) / max(1, reps // 3) * 1e3, 3)
        except (RuntimeError, ValueError) as e:  # the backend does not run here (or not for this shape/dtype)
            kernels[name.lower()] = f"unavailable: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
    picked = None
    if device == "cuda":  # the runner's own start-up measurement, as FastPath.setup calls it
        choice = fast.measure_attention(pipe.unet, batch, setting.size, setting.size, f, device, dtype)
        picked = {"backend": choice.backend,
                  "timings_ms": {k: round(v * 1e3, 4) if isinstance(v, float) else v for k, v in choice.timings.items()}}
    b.emit("attention", shape=list(q.shape), dtype=str(dtype).removeprefix("torch."), kernels=kernels,
           unet_call_ms=unet_ms, unet_batch=2 * batch, runner_pick=picked)
    del q, k, v, ref, lat, ctx
    if device == "cuda":
        torch.cuda.empty_cache()  # the math kernel's attention matrices are tens of GiB: not kept for later stages


def jobs_of(suite: Path, setting: Setting) -> list[tuple[str, str, int]]:
    from prompts.suites import expand

    reqs = expand(suite, images_per_prompt=setting.images_per_prompt, seed=0)
    return [(r.image_id(s), r.prompt, s) for r in reqs for s in r.seeds]


def naive(pipe, jobs, batch: int, settings: dict, out: Path | None, device: str) -> tuple[float, dict[str, np.ndarray]]:
    """Plain pipeline calls, one warm-up call first (not timed); PIL images saved one by one. Returns img/s
    and, when ``out`` is given, the pixels by image_id."""
    import torch

    pipe(prompt=[jobs[0][1]] * batch, **settings)
    sync(device)
    pixels: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in chunk]
        images = pipe(prompt=[p for _, p, _ in chunk], generator=gens, **settings).images
        for (image_id, _, _), img in zip(chunk, images, strict=True):
            if out is not None:
                img.save(out / f"{image_id}.png")
                pixels[image_id] = np.asarray(img)
    sync(device)
    return len(jobs) / (time.perf_counter() - start), pixels


def naive_stage(b: Bench, setting: Setting, pipe, jobs, settings: dict, tmp: Path) -> tuple[int, float, dict]:
    rates: dict[int, float] = {}
    for batch, n in setting.sweep.items():
        if rates and b.left() < 150:
            b.emit("naive", batch=batch, skipped=f"{b.left():.0f} s of the budget left")
            continue
        folder = tmp / f"sweep{batch}"
        folder.mkdir()
        rate, _ = naive(pipe, jobs[:n], batch, settings, folder, setting.device)
        rates[batch] = rate
        b.emit("naive", batch=batch, images=len(jobs[:n]), img_per_s=round(rate, 3), sweep=True)
    best = max(rates, key=rates.get)
    folder = tmp / "naive"
    folder.mkdir()
    rate, pixels = naive(pipe, jobs, best, settings, folder, setting.device)
    b.emit("naive", batch=best, images=len(jobs), img_per_s=round(rate, 3), baseline=True,
           batch1_img_per_s=round(rates[min(rates)], 3), best_is_largest_tried=best == max(setting.sweep))
    return best, rate, pixels


def pixel_diff(run_dir: Path, reference: dict[str, np.ndarray]) -> dict[str, Any]:
    from PIL import Image

    from diffaudit.runs import Run

    files = Run.open(run_dir).images().set_index("image_id")["file"]
    diffs = [np.abs(np.asarray(Image.open(files[i]).convert("RGB")).astype(np.int16) - p.astype(np.int16))
             for i, p in reference.items()]
    flat = np.concatenate([d.ravel() for d in diffs])
    return {"compared_images": len(diffs), "max_pixel_diff": int(flat.max()),
            "mean_pixel_diff": round(float(flat.mean()), 5), "p99_pixel_diff": float(np.percentile(flat, 99)),
            "share_of_pixels_differing": round(float((flat > 0).mean()), 6)}


def runner_stage(b: Bench, setting: Setting, pipes, suite: Path, name: str, reference: dict, tmp: Path, *,
                 fast_path: bool = True) -> dict[str, Any]:
    """One whole ``generate_run`` with the product's defaults (or ``--no-fast``), compared image by image."""
    import torch

    from diffaudit.config import GenerationConfig
    from diffaudit.runs import Run
    from generate.runner import generate_run

    config = GenerationConfig(suite=str(suite), model=setting.model, images_per_prompt=setting.images_per_prompt,
                              seed=0, steps=setting.steps, guidance=7.5, width=setting.size, height=setting.size,
                              fast=fast_path)
    if setting.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = generate_run(tmp / name, config, progress=False, pipelines=pipes)
    wall = time.perf_counter() - t0  # also the plan and the fast path's start-up (attention measured per run)
    mode = Run.open(tmp / name).info["stages"]["generate"]
    record = mode.get("generation_mode", {})
    fields = dict(variant=name, images=summary["images"], seconds=summary["seconds"],
                  img_per_s=round(summary["images"] / summary["seconds"], 3), wall_s=round(wall, 3),
                  wall_img_per_s=round(summary["images"] / wall, 3), batch_size=summary["batch_size"],
                  mode=record.get("mode"), attention_backend=record.get("attention_backend"),
                  cuda_graphs=record.get("cuda_graphs"), cuda_graphs_failed=record.get("cuda_graphs_failed"),
                  decode_overlapped=record.get("decode_overlapped"), **pixel_diff(tmp / name, reference))
    if setting.device == "cuda":
        fields["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return b.emit("runner", **fields)


def probe_stage(b: Bench, setting: Setting, run_dir: Path, gen_s_per_image: float) -> dict[str, Any]:
    """The CLIP probe stage on the runner's images, twice (the first pays lazy initialisation); the second
    is the figure."""
    from bench.probes import load, stage
    from diffaudit.runs import Run

    t0 = time.perf_counter()
    clip = load(setting.probe_model, setting.probe_model != "tiny", setting.device)
    from audit.probes.clip import ClipProbe

    probe = ClipProbe(clip, batch_size=setting.probe_batch)
    build_s = time.perf_counter() - t0
    run = Run.open(run_dir)
    n = len(run.read_table("generations"))
    first = stage(run, [probe], setting.probe_batch, clip.device)
    second = stage(run, [probe], setting.probe_batch, clip.device)
    per_image = second / n
    return b.emit("probe", model=clip.spec, images=n, batch_size=setting.probe_batch, build_s=round(build_s, 2),
                  first_img_per_s=round(n / first, 2), img_per_s=round(n / second, 2),
                  share_of_audit_wall_time=round(per_image / (per_image + gen_s_per_image), 4),
                  target_share=0.05, rows=len(run.read_table(f"probes/{probe.name}")))


def flops_stage(pipe, settings: dict, device: str, dtype) -> float:
    from bench.generate import flops_per_image

    return flops_per_image(pipe, settings, device, dtype)


# --- main ----------------------------------------------------------------------------------------------------

def run(setting: Setting, b: Bench) -> dict[str, Any]:
    import torch

    from generate.models import wrap_pipeline
    from generate.runner import auto_batch_size

    if setting.device == "cpu":
        torch.set_num_threads(1)
    dtype = torch.float16 if setting.device == "cuda" else torch.float32
    env_stage(b, setting)
    peaks = b.guarded("matmul", matmul_stage, b, setting) or {}
    t0 = time.perf_counter()
    pipe = build(setting, dtype)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    b.emit("model", model=setting.model, build_s=round(time.perf_counter() - t0, 2), parameters=params,
           unet=type(pipe.unet).__name__, scheduler=type(pipe.scheduler).__name__)
    batch = auto_batch_size(setting.device, setting.size, setting.size)
    b.guarded("attention", attention_stage, b, setting, pipe, batch, dtype)
    settings = dict(num_inference_steps=setting.steps, guidance_scale=7.5, height=setting.size, width=setting.size)
    results: dict[str, Any] = {}
    from bench.generate import write_suite

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        suite = write_suite(tmp, PROMPTS)
        jobs = jobs_of(suite, setting)
        best, baseline, reference = naive_stage(b, setting, pipe, jobs, settings, tmp)
        flops = b.guarded("flops", flops_stage, pipe, settings, setting.device, dtype)
        pipes = wrap_pipeline(pipe, spec=setting.model, kind="bench", revision=None, steps=setting.steps,
                              guidance=7.5, device=setting.device, dtype=dtype)
        results["runner_fast"] = b.guarded("runner", runner_stage, b, setting, pipes, suite, "runner_fast",
                                           reference, tmp)
        probe = None
        if results["runner_fast"]:
            per_image = results["runner_fast"]["seconds"] / results["runner_fast"]["images"]
            probe = b.guarded("probe", probe_stage, b, setting, tmp / "runner_fast", per_image)
        for name, fast_path, needs in (("runner_fast_repeat", True, 60), ("runner_no_fast", False, 60)):
            if b.left() < needs:
                b.emit("runner", variant=name, skipped=f"{b.left():.0f} s of the budget left, {needs} s needed")
                continue
            results[name] = b.guarded("runner", runner_stage, b, setting, pipes, suite, name, reference, tmp,
                                      fast_path=fast_path)
    product = results.get("runner_fast_repeat") or results.get("runner_fast")
    if not product:
        return b.emit("figure", failed="the runner did not finish; see the runner line")
    rate = product["img_per_s"]
    peak = peaks.get("bfloat16") or peaks.get("float32")
    mfu = flops * rate / peak if flops and peak else None
    gpu = setting.device == "cuda"
    figure = dict(
        runner=product["variant"], runner_img_per_s=rate, baseline="naive diffusers at its best batch",
        baseline_batch=best, baseline_img_per_s=round(baseline, 3), ratio=round(rate / baseline, 3),
        runner_first_run_img_per_s=(results.get("runner_fast") or {}).get("img_per_s"),
        runner_no_fast_img_per_s=(results.get("runner_no_fast") or {}).get("img_per_s"),
        gflop_per_image=None if not flops else round(flops / 1e9, 2),
        peak_tflops=None if not peak else round(peak / 1e12, 3), peak_dtype="bfloat16" if gpu else "float32",
        mfu=None if mfu is None else round(mfu, 4), max_pixel_diff=product["max_pixel_diff"],
        mean_pixel_diff=product["mean_pixel_diff"], compared_images=product["compared_images"],
        probe_img_per_s=None if not probe else probe["img_per_s"],
        probe_share_of_audit_wall_time=None if not probe else probe["share_of_audit_wall_time"],
        targets={"ratio": TARGET_RATIO, "mfu": TARGET_MFU, "max_pixel_diff": TARGET_MAX_DIFF, "probe_share": 0.05},
        seconds=round(b.elapsed, 1))
    if gpu:
        figure["targets_met"] = {
            "ratio": rate / baseline >= TARGET_RATIO, "mfu": mfu is not None and mfu >= TARGET_MFU,
            "pixels": product["max_pixel_diff"] <= TARGET_MAX_DIFF and product["compared_images"] >= 96,
            "probe_share": bool(probe) and probe["share_of_audit_wall_time"] <= 0.05}
    else:
        figure["targets_met"] = None
        figure["note"] = "CPU smoke run with the tiny models: proves the code path, measures nothing of issue 20"
    return b.emit("figure", **figure)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="the same stages on the CPU with the tiny models")
    ap.add_argument("--check", action="store_true", help="only: say which needed modules are missing")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines here (default: $OUT/h200.jsonl "
                                                           "if $OUT is set, else stdout only)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="optional stages are skipped once less than they need is left of this")
    args = ap.parse_args(argv)
    missing = missing_modules()
    if args.check or missing:
        print(json.dumps({"bench": "h200", "stage": "check", "missing_modules": missing, "needed": list(MODULES)}),
              flush=True)
        return 2 if missing else 0
    out = args.out or (Path(os.environ["OUT"]) / "h200.jsonl" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        setting = SMOKE
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench/h200.py: no CUDA device here; use --cpu-smoke for the CPU check of the code path",
                  file=sys.stderr)
            return 2
        setting = GPU
    run(setting, Bench(out, args.budget_s if not args.cpu_smoke else float("inf")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
