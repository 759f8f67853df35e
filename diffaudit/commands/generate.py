"""``diffaudit generate``: a prompt suite through a diffusion model into a run folder (resumable)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.commands import app

_FLAGS = {"images_per_prompt": "--images-per-prompt", "batch_size": "--batch-size", "width": "--size",
          "height": "--size", "guidance": "--guidance", "steps": "--steps", "seed": "--seed", "dtype": "--dtype"}


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
    safety_checker: str = typer.Option("flag", "--safety-checker", help="flag (nsfw column) or off."),
    subjects: str | None = typer.Option(None, "--subjects", help="Comma-separated subject ids (subset)."),
    templates: str | None = typer.Option(None, "--templates", help="Comma-separated template ids (subset)."),
    edits: str | None = typer.Option(None, "--edits", help="Comma-separated edit ids (subset); '' for none."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Generate a prompt suite into a run folder; rerun the same command to resume."""
    from diffaudit.errors import ConfigError

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
        compile=compile_, safety_checker=safety_checker,
        subjects=_ids(subjects),
        templates=_ids(templates), edits=_ids(edits))
    config = _config(fields)

    from diffaudit.runs import Run

    with Run.reserve(out):  # a second generate on this run is refused now, not after its model loads
        from generate.runner import generate_run

        summary = generate_run(out, config, progress=progress)
    rate = summary["images_per_second"]
    typer.echo(f"{summary['generated']} images generated, {summary['skipped']} already done, into {out} "
               f"in {summary['seconds']:.1f} s" + (f" ({rate:.2f} img/s)" if rate else ""))


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
