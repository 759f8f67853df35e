"""``diffaudit generate``: a prompt suite through a diffusion model into a run folder (resumable)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from diffaudit.commands import app

_FLAGS = {"images_per_prompt": "--images-per-prompt", "batch_size": "--batch-size", "width": "--size",
          "height": "--size", "guidance": "--guidance", "steps": "--steps", "seed": "--seed", "dtype": "--dtype"}


class Engine(StrEnum):
    local = "local"
    ray = "ray"


ENGINE_HELP = "local (this process, one device) or ray (one replica per GPU of a Ray cluster; the driver writes the run)."
ADDRESS_HELP = "Ray cluster to join (ray://HEAD:10001 or HEAD:6379; default: start a local one). Needs --engine ray."
WORKERS_HELP = "Ray workers (default: one per GPU; required on a cluster without GPUs: N CPU workers)."


def check_engine(engine: Engine, address: str | None, workers: int | None) -> None:
    """--address and --ray-workers only mean something with --engine ray."""
    from diffaudit.errors import ConfigError

    if engine != Engine.ray:
        for flag, value in (("--address", address), ("--ray-workers", workers)):
            if value is not None:
                raise ConfigError(f"{flag} needs --engine ray")
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers {workers}: give 1 or more")


@app.command("generate")
def generate(
    suite: str = typer.Option(..., "--suite", help="Built-in suite name (see `diffaudit suites list`) or a .yaml path."),
    model: str = typer.Option("tiny", "--model", help="Hub id, local diffusers folder, .safetensors file, or 'tiny'."),
    out: Path = typer.Option(..., "--out", help="Run folder to create, or to resume."),
    images_per_prompt: int = typer.Option(4, "--images-per-prompt", "-n", help="Images per prompt."),
    batch_size: str = typer.Option("auto", "--batch-size", help="'auto' or a number (halved on CUDA OOM)."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps (default: the model's)."),
    guidance: float | None = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    size: str | None = typer.Option(None, "--size", help="N or WxH, multiples of 8 (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Run seed; each image's seed derives from it."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="ddim, pndm, euler, euler_a, dpm++, unipc, ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the UNet and VAE decoder."),
    fast: bool = typer.Option(True, "--fast/--no-fast", help="Exact fast path: decode overlapped with the next "
                                                             "batch; on CUDA measured attention, CUDA graphs."),
    approximate: str | None = typer.Option(None, "--approximate", help="Opt-in, changes pixels: deepcache, fp8 "
                                                                        "(comma-separated); the report names it."),
    safety_checker: str = typer.Option("flag", "--safety-checker", help="flag (nsfw column) or off."),
    subjects: str | None = typer.Option(None, "--subjects", help="Comma-separated subject ids (subset)."),
    templates: str | None = typer.Option(None, "--templates", help="Comma-separated template ids (subset)."),
    edits: str | None = typer.Option(None, "--edits", help="Comma-separated edit ids (subset); '' for none."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    engine: Engine = typer.Option(Engine.local, "--engine", help=ENGINE_HELP),
    address: str | None = typer.Option(None, "--address", "--ray-address", help=ADDRESS_HELP),
    ray_workers: int | None = typer.Option(None, "--ray-workers", help=WORKERS_HELP),
) -> None:
    """Generate a prompt suite into a run folder; rerun the same command to resume."""
    from diffaudit.errors import ConfigError

    check_engine(engine, address, ray_workers)
    width = height = None
    if size is not None:
        parts = size.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--size {size!r}: give N or WxH, e.g. 512 or 768x512")
        width, height = int(parts[0]), int(parts[-1])
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) >= 1):
        raise ConfigError(f"--batch-size {batch_size!r}: give 'auto' or a positive number")
    fields = dict(
        suite=suite, model=model, images_per_prompt=images_per_prompt, steps=steps, guidance=guidance,
        width=width, height=height, seed=seed, scheduler=scheduler,
        batch_size=batch_size if batch_size == "auto" else int(batch_size), dtype=dtype, device=device,
        compile=compile_, fast=fast, approximate=_ids(approximate) or (), safety_checker=safety_checker,
        subjects=_ids(subjects),
        templates=_ids(templates), edits=_ids(edits))
    config = _config(fields)

    from diffaudit.runs import Run

    with Run.reserve(out):  # a second generate on this run is refused now, not after its model loads
        if engine == Engine.ray:
            from generate.distributed import generate_run_ray

            summary = generate_run_ray(out, config, address=address, workers=ray_workers, progress=progress)
        else:
            from generate.runner import generate_run

            summary = generate_run(out, config, progress=progress)
    rate = summary["images_per_second"]
    typer.echo(f"{summary['generated']} images generated, {summary['skipped']} already done, into {out} "
               f"in {summary['seconds']:.1f} s" + (f" ({rate:.2f} img/s)" if rate else "")
               + (f" on {summary['workers']} Ray workers" if "workers" in summary else "")
               + (f", {summary['workers_lost']} lost" if summary.get("workers_lost") else ""))


def _ids(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated id list; None (option not given) selects all, '' selects none."""
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _config(fields: dict):
    """Build the GenerationConfig; a validation error becomes one line naming the option."""
    from pydantic import ValidationError

    from diffaudit.config import GenerationConfig
    from diffaudit.errors import ConfigError

    try:
        return GenerationConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{flag}: {msg}" + ("" if "(got" in msg else f" (got {err.get('input')!r})")) from None
