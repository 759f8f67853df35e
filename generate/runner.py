"""Generate a prompt suite into a run folder: batched, seeded per image, resumable, I/O overlapped.

Every image's noise comes from its own CPU ``torch.Generator`` seeded with the image's seed (derived
from run seed, prompt_id and index by ``prompts.suites``), so batch size and order never change an
image. Everything is validated (suite, sizes, sources, masks, model) before the run folder is touched.
Images are PNG-encoded and written by a thread pool while the next batch runs on the device; rows are
appended to ``generations`` as batches land. A killed run resumes: an image recorded with a matching
sha256 and the same request (prompt, mode, source, ...) is never generated again; one whose suite entry
was edited is made again and its row replaced. On CUDA out-of-memory the batch is halved and generation
goes on. A compiled model pads a short last batch to the full batch size (the padding is discarded), so
it never meets a new shape and recompiles.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from diffaudit.config import GenerationConfig
from diffaudit.errors import ConfigError, InputError
from diffaudit.runs import Run, atomic_write_bytes, sha256_bytes
from generate import fast
from generate.models import Pipelines, check_scheduler, load_pipelines
from generate.scores import MEAN_STEPS, ScoreRecorder, Scores
from generate.sources import prepare
from prompts.suites import Request, expand, suite_path

# Settings that change an image's pixels: a run resumes only if they match what it was started with.
# The suite is compared by its resolved file (``demo``, ``./s.yaml`` and ``s.yaml`` may name the same one).
CONTENT_KEYS = ("suite_file", "model", "model_revision", "scheduler", "steps", "guidance", "width", "height",
                "seed", "dtype", "approximate")
# A recorded image is done only if these request fields still match (the suite file may have been edited).
REQUEST_KEYS = ("prompt", "negative_prompt", "mode", "source_image", "mask", "strength")
ROW_FLUSH_SECONDS = 2.0


@dataclass(frozen=True)
class Job:
    """One image to make."""

    request: Request
    index: int
    seed: int

    @property
    def image_id(self) -> str:
        return self.request.image_id(self.seed)

    @property
    def group(self) -> tuple:
        """Jobs that can share one pipeline call (same mode, source, mask and strength)."""
        r = self.request
        return (r.mode, r.source_image, r.mask, r.strength)


@dataclass
class Plan:
    """A validated generation: requests, jobs, loaded model, resolved settings, prepared sources."""

    config: GenerationConfig
    jobs: list[Job]
    pipes: Pipelines
    settings: dict[str, Any]
    sources: dict[tuple[str, str | None], tuple[Image.Image, Image.Image | None]] = field(default_factory=dict)
    fresh: bool = True  # the run holds no image yet (new, or every earlier attempt stopped before one)

    @property
    def size(self) -> tuple[int, int]:
        return self.settings["width"], self.settings["height"]


def plan_run(run_dir: str | os.PathLike | None, config: GenerationConfig, *,
             pipelines: Pipelines | None = None, progress: bool = True) -> Plan:
    """Validate everything and load the model, writing nothing. Raises a ``DiffauditError`` on bad input
    (an ``--out`` that is not a run is refused by ``Run.create``, which also writes nothing then).
    ``run_dir`` None: a plan for a worker of another engine, whose driver checks the run folder."""
    if run_dir is not None:
        Run.check_can_create(run_dir)  # before the model loads: a bad --out fails in a second
    check_scheduler(config.scheduler)
    requests = expand(config.suite, images_per_prompt=config.images_per_prompt, seed=config.seed,
                      templates=config.templates, subjects=config.subjects, edits=config.edits)
    jobs = [Job(r, i, s) for r in requests for i, s in enumerate(r.seeds)]
    pipes = pipelines or load_pipelines(config.model, scheduler=config.scheduler, device=config.device,
                                        dtype=config.dtype, safety_checker=config.safety_checker,
                                        compile_=config.compile, progress=progress)
    width = config.width or pipes.default_size[0]
    height = config.height or pipes.default_size[1]
    if width % 8 or height % 8:
        raise ConfigError(f"size {width}x{height}: width and height must be multiples of 8")
    steps = config.steps or pipes.default_steps
    guidance = pipes.default_guidance if config.guidance is None else config.guidance
    plan = Plan(config=config, jobs=jobs, pipes=pipes, settings={})
    for mode in sorted({r.mode for r in requests}):
        pipes.for_mode(mode)  # ModelError now rather than half-way through
    for r in requests:
        if r.mode == "txt2img":
            continue
        if r.strength is not None and int(steps * r.strength) < 1:
            raise InputError(f"{r.prompt_id}: strength {r.strength} with {steps} steps leaves no denoising step; "
                             f"use --steps {math.ceil(1 / r.strength)} or more")
        key = (r.source_image, r.mask)
        if key not in plan.sources:
            plan.sources[key] = prepare(r.source_image, r.mask, (width, height))
    plan.settings = {
        "suite": config.suite, "suite_file": str(suite_path(config.suite).resolve()),
        "images_per_prompt": config.images_per_prompt, "seed": config.seed,
        "templates": config.templates, "subjects": config.subjects, "edits": config.edits, "steps": steps,
        "guidance": guidance, "width": width, "height": height, "batch_size": config.batch_size, **pipes.info(),
        "noise": "per image: torch.Generator('cpu').manual_seed(seed), drawn in the model's dtype as diffusers "
                 "draws it; independent of batch size and order",
        "requests": len(requests), "images": len(jobs),
        "approximate": list(fast.check_approximations(getattr(config, "approximate", ()))),
        "memorization_score": {
            "definition": "Wen et al. (ICLR 2024): per image, || eps(x_t, prompt) - eps(x_t, empty) ||_2 over the "
                          "latent, from the CFG batch's two halves (no extra UNet call); null without CFG or with "
                          "a negative prompt",
            "mean_steps": MEAN_STEPS,
            "latent_shape": [pipes.txt2img.unet.config.out_channels, height // pipes.txt2img.vae_scale_factor,
                             width // pipes.txt2img.vae_scale_factor]},
    }
    if run_dir is not None:  # None: a Ray worker's plan, which never writes a run
        plan.fresh = _check_resume(Path(run_dir), plan.settings)
    return plan


def generate_run(run_dir: str | os.PathLike, config: GenerationConfig, *, progress: bool = True,
                 pipelines: Pipelines | None = None) -> dict[str, Any]:
    """Generate ``config``'s suite into the run at ``run_dir`` (created or resumed); return a summary."""
    plan = plan_run(run_dir, config, pipelines=pipelines, progress=progress)
    run = Run.create(run_dir)
    with run.lock():
        record_settings(run, plan)
        return _Generator(run, plan, progress).execute()


def record_settings(run: Run, plan: Plan) -> None:
    """The plan's settings into run.json (under the run's lock), for the local and the Ray engine alike."""
    if plan.fresh:  # no image yet: the settings are replaced whole, not merged with an earlier attempt's
        run.update_info({"generation": None})
    run.update_info({"generation": plan.settings})


def initial_noise(generators: Sequence, shape: tuple[int, ...], dtype):
    """One (1, *shape) draw per image from its own CPU generator, stacked: the same whatever the batch. Drawn
    in the model's dtype, as diffusers' ``randn_tensor`` draws it (a float16 draw is not a rounded float32
    one), so a seed gives the image that a plain diffusers call with ``torch.Generator('cpu')`` gives."""
    import torch

    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators])


def auto_batch_size(device: str, width: int, height: int) -> int:
    """A starting batch on CUDA: 32 images at 512x512 on cards of 40 GiB or more, 16 below, scaled by area (out
    of memory halves it); 8 elsewhere. On an H100, SD 1.5 compiled ran 7.86 img/s at 32 and 7.58 at 16 (peak
    memory 21 GiB at 32), and plain diffusers was fastest at 32 too (bench/generate.py)."""
    if device.startswith("cuda"):
        import torch

        gib = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
        per_512 = 32 if gib >= 40 else 16
        return max(1, min(64, per_512 * 512 * 512 // (width * height)))
    return 8


class _Generator:
    """One generation pass over the jobs that are not done yet.

    ``engine``: another maker of batches (``generate.distributed``: Ray workers, each with its own plan and a
    ``_Generator`` of its own without a run), with ``batch_size``, ``results(batches)`` yielding
    ``(batch, BatchResult)`` in the batches' order, and ``record()``; this process then only writes the run."""

    def __init__(self, run: Run | None, plan: Plan, progress: bool, engine: Any = None):
        self.run, self.plan, self.progress, self.engine = run, plan, progress, engine
        self.rows: list[dict[str, Any]] = []
        self.last_flush = time.perf_counter()
        if engine is not None:
            self.batch_size, self.speed = engine.batch_size, None
            return
        pipes, (w, h) = plan.pipes, plan.size
        bs = plan.config.batch_size
        self.batch_size = auto_batch_size(pipes.device, w, h) if bs == "auto" else int(bs)
        self.speed = FastPath.setup(plan, self.batch_size)

    def execute(self) -> dict[str, Any]:
        start = time.perf_counter()
        _remove_stale_temp_files(self.run.root)
        done = self._done()
        todo = [j for j in self.plan.jobs if j.image_id not in done]
        groups: dict[tuple, deque[Job]] = {}
        for job in todo:
            groups.setdefault(job.group, deque()).append(job)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="generate", disable=not self.progress, smoothing=0.1)
        writes: deque[tuple[list[Future], list[dict[str, Any]], BatchResult]] = deque()
        workers = max(1, min(4, (os.cpu_count() or 2) - 1))
        last = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png") as pool, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as decoder:
                if self.speed is not None:
                    self.speed.decoder = decoder if self.speed.overlap else None
                try:
                    for batch, out in self._results(groups):
                        now = time.perf_counter()  # batch to batch: device work is partly asynchronous
                        seconds, last = (now - last) / len(batch), now
                        futures = [pool.submit(_write_png, self.run.image_path(j.request.prompt_id, j.seed),
                                               out.pixels, k) for k, j in enumerate(batch)]
                        rows = [self._row(j, seconds, None) for j in batch]
                        writes.append((futures, rows, out))
                        while len(writes) > 1:  # keep one batch of writes in flight behind the device
                            self._collect(*writes.popleft(), bar=bar)
                finally:
                    while writes:  # also on Ctrl-C / errors: record what reached the disk
                        self._collect(*writes.popleft(), bar=bar)
                    self._flush_rows(force=True)
        finally:
            bar.close()
            if self.speed is not None:  # the Ray engine's workers hold their own fast paths
                self.speed.release()
        seconds = time.perf_counter() - start
        n = len(todo)
        record = self.engine.record() if self.engine is not None else self.speed.record()
        self.run.record_stage("generate", seconds=seconds, images=len(self.plan.jobs), generated=n,
                              skipped=len(self.plan.jobs) - n, batch_size=self.batch_size, **record)
        return {"run": str(self.run.root), "images": len(self.plan.jobs), "generated": n,
                "skipped": len(self.plan.jobs) - n, "seconds": round(seconds, 3),
                "images_per_second": round(n / seconds, 3) if seconds > 0 else None,
                "batch_size": self.batch_size}

    def _results(self, groups: dict[tuple, deque[Job]]):
        """(batch, BatchResult) per batch of each group, made here or by the engine."""
        def batches():
            for queue in groups.values():
                while queue:  # the batch size is read per batch: out of memory halves it
                    yield [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]

        if self.engine is not None:
            yield from self.engine.results(batches())
            return
        for batch in batches():
            yield batch, self._generate(batch)

    def _done(self) -> set[str]:
        """Images on disk as recorded whose row still matches its job's request (else: made again, row replaced)."""
        intact = self.run.completed_images()
        gens = self.run.read_table("generations")
        recorded = {row["image_id"]: tuple(_plain(row[k]) for k in REQUEST_KEYS)
                    for row in gens.to_dict("records") if row["image_id"] in intact}
        return {j.image_id for j in self.plan.jobs
                if recorded.get(j.image_id) == tuple(_plain(getattr(j.request, k)) for k in REQUEST_KEYS)}

    def _collect(self, futures: list[Future], rows: list[dict[str, Any]], out: BatchResult, bar) -> None:
        # here, behind the device, not before the next batch (an engine's workers flag their own)
        if out.nsfw is None and self.plan.pipes is not None and self.plan.pipes.flags_nsfw:
            out.nsfw = self.plan.pipes.flag_nsfw(out.pixels.wait())
        for k, (fut, row, cells) in enumerate(zip(futures, rows, out.scores.rows(len(rows)), strict=True)):
            row["sha256"] = fut.result()
            row.update(cells, nsfw=None if out.nsfw is None else out.nsfw[k])
            self.rows.append(row)
            bar.update(1)
        out.pixels.release()
        self._flush_rows()

    def _flush_rows(self, force: bool = False) -> None:
        if self.rows and (force or time.perf_counter() - self.last_flush >= ROW_FLUSH_SECONDS):
            self.run.append_rows("generations", pd.DataFrame(self.rows), key="image_id")
            self.rows = []
            self.last_flush = time.perf_counter()

    def _generate(self, batch: list[Job]) -> BatchResult:
        """One batch's pixels, NSFW flags and scores; on CUDA OOM, halve the batch and go on."""
        import torch

        n = len(batch)
        padded = batch
        if self.plan.pipes.compiled and n < self.batch_size:  # same shape as full batches: no recompile
            padded = batch + [batch[-1]] * (self.batch_size - n)
        elif self.speed.graphs and n < self.batch_size:  # one of a few shapes: a captured CUDA graph replays
            padded = batch + [batch[-1]] * (fast.bucket_for(n, fast.batch_buckets(self.batch_size)) - n)
        try:
            out = self._call(padded)[:n]
        except torch.cuda.OutOfMemoryError:
            if len(padded) == 1:
                raise
            out = None  # retry below, outside the handler: its traceback pins the failed call's tensors
        if out is not None:
            return out
        torch.cuda.empty_cache()
        self.batch_size = max(1, len(padded) // 2)
        print(f"CUDA out of memory at batch {len(padded)}; going on with batch {self.batch_size}")
        parts = [self._generate(batch[i:i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
        return BatchResult.concat(parts)

    def _call(self, batch: list[Job]) -> BatchResult:
        return generate_batch(self.plan, batch, speed=self.speed)

    def _row(self, job: Job, seconds: float, nsfw: bool | None) -> dict[str, Any]:
        r, s = job.request, self.plan.settings
        return dict(
            image_id=job.image_id, prompt_id=r.prompt_id, suite=r.suite, template=r.template, subject=r.subject,
            prompt=r.prompt, negative_prompt=r.negative_prompt, mode=r.mode, source_image=r.source_image,
            mask=r.mask, strength=r.strength, index=job.index, seed=job.seed, model=s["model"],
            model_revision=s["model_revision"], scheduler=s["scheduler"], steps=s["steps"],
            guidance=float(s["guidance"]), width=s["width"], height=s["height"],
            path=self.run.image_relpath(r.prompt_id, job.seed), sha256="", seconds=float(seconds), nsfw=nsfw)


@dataclass
class BatchResult:
    """What one pipeline call made: pixels (perhaps still arriving from the GPU), scores, NSFW flags."""

    pixels: HostPixels
    scores: Scores
    nsfw: list[bool] | None = None

    def __getitem__(self, index: slice) -> BatchResult:
        return BatchResult(self.pixels[index], self.scores[index], None if self.nsfw is None else self.nsfw[index])

    @staticmethod
    def concat(parts: list[BatchResult]) -> BatchResult:
        flags = None if parts[0].nsfw is None else [f for p in parts for f in p.nsfw]
        return BatchResult(HostPixels(np.concatenate([p.pixels.wait() for p in parts])),
                           Scores.concat([p.scores for p in parts]), flags)


def generate_batch(plan: Plan, batch: Sequence[Job], *, speed: FastPath | None = None) -> BatchResult:
    """One pipeline call for jobs of one group (same mode, source, mask, strength): the per-batch step of a
    run, free of run-folder I/O, so that another engine (a Ray worker holding its own ``Plan``) can call it.
    Returns uint8 pixels and the memorization scores recorded from the CFG halves (no extra UNet call).

    With ``speed`` (the runner's ``FastPath``): the chosen attention backend and CUDA graphs are in force,
    an approximation (``--approximate``) is applied, and where the pipeline allows it the VAE decode is handed
    to the decode thread, so that it overlaps the next batch's denoising; ``pixels`` then arrive later."""
    import torch

    speed = speed or FastPath()
    pipes = plan.pipes
    req = batch[0].request
    pipe = pipes.for_mode(req.mode)
    speed.prepare(pipe)
    w, h = plan.size
    gens = [torch.Generator("cpu").manual_seed(j.seed) for j in batch]
    later = speed.decoder is not None and can_decode_apart(pipe)
    kwargs: dict[str, Any] = dict(
        prompt=[j.request.prompt for j in batch], negative_prompt=[j.request.negative_prompt for j in batch],
        num_inference_steps=plan.settings["steps"], guidance_scale=plan.settings["guidance"],
        generator=gens, output_type="latent" if later else "pt")
    if req.mode == "txt2img":
        shape = (pipe.unet.config.in_channels, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)
        latents = initial_noise(gens, shape, pipes.dtype).to(pipes.device)
        kwargs.update(height=h, width=w, latents=latents)
    else:
        source, mask = plan.sources[(req.source_image, req.mask)]
        kwargs.update(image=[source] * len(batch), strength=req.strength)
        if req.mode == "inpaint":
            kwargs.update(mask_image=[mask] * len(batch), height=h, width=w)
    empty_negative = [not j.request.negative_prompt for j in batch]  # Wen et al.'s score needs the empty prompt
    with torch.inference_mode(), ScoreRecorder(pipe.unet, len(batch), empty_negative) as recorder, \
            speed.during(pipe):
        images = pipe(**kwargs).images
        if later:
            return BatchResult(speed.decode_later(pipe, images), recorder.scores())
        pixels = HostPixels.from_device(to_uint8(images), speed.pool)
    return BatchResult(pixels, recorder.scores())


def to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> uint8, as the runner has always rounded."""
    import torch

    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def can_decode_apart(pipe) -> bool:
    """Pipelines whose own decode ``decode_latents`` repeats exactly (others decode inside their call)."""
    return type(pipe).__name__ in SD_PIPELINES + SDXL_PIPELINES and type(pipe.vae).__name__ == "AutoencoderKL"


def decode_latents(pipe, latents):
    """What the pipeline does after its denoising loop with ``output_type='pt'``: unscale, VAE decode, [0, 1].
    SDXL: the fp16 VAE is upcast to fp32 when its config says it overflows, and latents are de-normalised
    with ``latents_mean`` / ``latents_std`` where the VAE has them (diffusers 0.42's code path)."""
    import torch

    vae = pipe.vae
    cfg = vae.config
    upcast = type(pipe).__name__ in SDXL_PIPELINES and vae.dtype == torch.float16 and cfg.force_upcast
    if upcast:
        vae.to(torch.float32)
        latents = latents.to(torch.float32)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if type(pipe).__name__ in SDXL_PIPELINES and mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
    try:
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return (image / 2 + 0.5).clamp(0, 1)


@dataclass
class FastPath:
    """What the runner does beyond plain pipeline calls, and what it records about it (``run.json``).

    Exact (images within rounding of plain diffusers): decode overlapped with the next batch (any device),
    and on CUDA a measured attention backend, CUDA graphs of the UNet at bucketed batch shapes and pinned host
    buffers reused across batches. Approximate, only when asked: DeepCache feature reuse and FP8 linear layers
    (``generate.fast``)."""

    overlap: bool = False
    graphs: bool = False
    attention: fast.BackendChoice | None = None
    approximate: tuple[str, ...] = ()
    deepcache_interval: int = 3
    pool: fast.PinnedPool | None = None
    decoder: Any = None
    notes: list[str] = field(default_factory=list)
    _graphed: dict[int, fast.GraphedUNet] = field(default_factory=dict)
    _prepared: set[int] = field(default_factory=set)
    _side: Any = None

    @staticmethod
    def setup(plan: Plan, batch_size: int) -> FastPath:
        cfg, pipes = plan.config, plan.pipes
        on = getattr(cfg, "fast", True)
        approx = fast.check_approximations(getattr(cfg, "approximate", ()))
        cuda = pipes.device.startswith("cuda")
        speed = FastPath(overlap=on, approximate=approx)
        if not (on and cuda):
            return speed
        import torch

        speed.pool = fast.PinnedPool()
        speed._side = torch.cuda.Stream(torch.device(pipes.device))
        w, h = plan.size
        pipe = pipes.txt2img
        speed.attention = fast.measure_attention(getattr(pipe.unet, "_orig_mod", pipe.unet), batch_size, h, w,
                                                 pipe.vae_scale_factor, pipes.device, pipes.dtype)
        speed.graphs = not pipes.compiled and "deepcache" not in approx  # compiled kernels and cached steps differ
        return speed

    def prepare(self, pipe) -> None:
        """Once per UNet: FP8 layers, the CUDA-graph wrapper."""
        unet = pipe.unet
        if id(unet) in self._prepared:
            return
        self._prepared.add(id(unet))
        device = str(unet.device)
        if "fp8" in self.approximate:
            self.notes.append(fast.apply_fp8(unet, device))
        if self.graphs:
            self._graphed[id(unet)] = fast.GraphedUNet(unet).install()

    def release(self) -> None:
        """At the end of a run: the UNets get their own forward back, so that a later run on the same pipelines
        (a benchmark's warm-up then timed run, tests) wraps the plain UNet again instead of this run's graph
        wrapper (which would nest one wrapper in another). The record keeps what the graphs did."""
        for graphed in self._graphed.values():
            if graphed._eager is not None:
                forward = graphed._eager
                graphed.uninstall()
                if getattr(forward, "__func__", None) is type(graphed.unet).forward:
                    del graphed.unet.forward  # the class's own method again, not an instance attribute
        self._prepared.clear()

    @contextlib.contextmanager
    def during(self, pipe):
        """The per-call contexts: the attention backend, DeepCache."""
        with contextlib.ExitStack() as stack:
            if self.attention is not None:
                stack.enter_context(self.attention.context())
            if "deepcache" in self.approximate:
                stack.enter_context(fast.DeepCache(pipe.unet, self.deepcache_interval))
            yield

    def decode_later(self, pipe, latents) -> LaterPixels:
        """Queue the VAE decode of ``latents`` on the decode thread (on CUDA: its own stream, after the
        denoising that made them) and return at once."""
        import torch

        ready = None
        if latents.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
            latents.record_stream(self._side)  # the allocator must not reuse them before the decode ran
        return LaterPixels(self.decoder.submit(self._decode, pipe, latents, ready))

    def _decode(self, pipe, latents, ready) -> HostPixels:
        import torch

        stream = contextlib.nullcontext()
        if ready is not None:
            self._side.wait_event(ready)
            stream = torch.cuda.stream(self._side)
        with torch.inference_mode(), stream, (self.attention.context() if self.attention else contextlib.nullcontext()):
            return HostPixels.from_device(self._decode_all(pipe, latents), self.pool)

    def _decode_all(self, pipe, latents):
        import torch

        try:
            return to_uint8(decode_latents(pipe, latents))
        except torch.cuda.OutOfMemoryError:
            if len(latents) == 1:
                raise
        torch.cuda.empty_cache()
        half = len(latents) // 2
        return torch.cat([self._decode_all(pipe, latents[:half]), self._decode_all(pipe, latents[half:])])

    def record(self) -> dict[str, Any]:
        """The mode, for run.json and the report: an audit must say what it audited."""
        failed = {str(k): v for g in self._graphed.values() for k, v in g.failed.items()}
        captured = sum(len(g.graphs) for g in self._graphed.values())
        exact = not self.approximate
        return {"generation_mode": {
            "mode": ("approximate: " + ", ".join(self.approximate)) if self.approximate else
                    ("exact fast path" if self.graphs or self.attention or self.overlap else "plain"),
            "pixels": "equal to plain diffusers within rounding" if exact else "changed by the approximation",
            "decode_overlapped": self.overlap,
            "attention_backend": None if self.attention is None else self.attention.backend,
            "attention_timings": None if self.attention is None else self.attention.timings,
            "cuda_graphs": captured, "cuda_graphs_failed": failed or None,
            "deepcache_interval": self.deepcache_interval if "deepcache" in self.approximate else None,
            "notes": self.notes or None}}


@dataclass(frozen=True)
class LaterPixels:
    """Pixels that the decode thread is still making: ``wait`` blocks until they are on the host."""

    future: Future
    slices: tuple[slice, ...] = ()

    def wait(self) -> np.ndarray:
        array = self.future.result().wait()
        for index in self.slices:
            array = array[index]
        return array

    def __getitem__(self, index: slice) -> LaterPixels:
        return LaterPixels(self.future, (*self.slices, index))

    def release(self) -> None:
        if self.future.done() and not self.future.exception():
            self.future.result().release()


def _plain(value: Any) -> Any:
    """A table cell or request field as a comparable Python value (missing values all become None)."""
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


@dataclass(frozen=True)
class HostPixels:
    """uint8 (B, H, W, 3) images in host memory, perhaps still arriving from the GPU: the copy is queued
    behind the decode, and the runner goes on to the next batch while the PNG writers wait for it."""

    array: np.ndarray
    ready: Any = None  # a torch.cuda.Event recorded after the copy, or None once on the host
    buffer: Any = None  # the pinned tensor behind ``array``, returned to its pool by ``release``
    pool: Any = None

    @staticmethod
    def from_device(images, pool: Any = None) -> HostPixels:
        """From (B, 3, H, W) uint8 on any device; from CUDA without blocking, into pinned memory (a buffer
        of ``pool``, a ``generate.fast.PinnedPool``, when given)."""
        import torch

        hwc = images.permute(0, 2, 3, 1).contiguous()
        if not hwc.is_cuda:
            return HostPixels(hwc.numpy())
        host = pool.acquire(tuple(hwc.shape)) if pool is not None else torch.empty(hwc.shape, dtype=torch.uint8,
                                                                                    pin_memory=True)
        host.copy_(hwc, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(hwc.device))
        return HostPixels(host.numpy(), ready, host, pool)  # the array keeps the pinned tensor alive

    def release(self) -> None:
        """Hand the pinned buffer back once every writer is done with it (the runner calls this)."""
        if self.pool is not None and self.buffer is not None:
            self.wait()
            self.pool.release(self.buffer)

    def wait(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()  # releases the GIL
        return self.array

    def __getitem__(self, index: slice) -> HostPixels:
        return HostPixels(self.array[index], self.ready, self.buffer, self.pool)


@dataclass(frozen=True)
class EncodedPixels:
    """Images already PNG-encoded elsewhere (by a Ray worker): the driver only writes them."""

    pngs: list[bytes]

    def png(self, index: int) -> bytes:
        return self.pngs[index]

    def __getitem__(self, index: slice) -> EncodedPixels:
        return EncodedPixels(self.pngs[index])

    def release(self) -> None:
        pass


def png_bytes(pixels: np.ndarray) -> bytes:
    """One uint8 (H, W, 3) image as the PNG file a run stores."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write_png(path: Path, pixels: HostPixels | LaterPixels | EncodedPixels, index: int) -> str:
    """Encode and write one image atomically; return its sha256 (runs in the writer pool)."""
    data = pixels.png(index) if isinstance(pixels, EncodedPixels) else png_bytes(pixels.wait()[index])
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _remove_stale_temp_files(root: Path) -> None:
    """Temp files that a killed writer left behind (we hold the lock, so none is in use)."""
    for tmp in [*root.glob("images/*/.*.tmp"), *root.glob(".generations.parquet.*.tmp")]:
        tmp.unlink(missing_ok=True)


def _check_resume(root: Path, settings: dict[str, Any]) -> bool:
    """A run resumes only with the settings that made its images. A run that holds no image yet (its run.json
    written, then killed during the model load or the first batch, or stopped by an out-of-memory error at
    batch 1) has nothing to keep consistent: it takes new settings. Returns whether the run is fresh."""
    if not Run.is_run(root):
        return True
    run = Run.open(root)
    if run.read_table("generations").empty:
        return True
    old = run.info.get("generation", {})
    diff = [f"{k}: {old[k]!r} -> {settings[k]!r}" for k in CONTENT_KEYS if k in old and old[k] != settings[k]]
    if diff:
        raise ConfigError(f"run {root} was generated with other settings ({'; '.join(diff)}); "
                          "use the same settings to resume or a new --out")
    return False
