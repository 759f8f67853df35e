"""Memorization commands: ``index build|info|query|embed`` and ``audit memorization``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer

from diffaudit.commands import app, audit_app

index_app = typer.Typer(help="Training-set hash indexes: build one, show it, look images up.", no_args_is_help=True)
app.add_typer(index_app, name="index")


DESCRIPTOR_HELP = ("Also search image descriptors the index holds (`diffaudit index embed`): "
                   "sscd:/path/model.pt[@SIZE], onnx:/path/model.onnx or clip[:MODEL].")
MIN_SIM_HELP = ("With --descriptor: cosine similarity a neighbour needs to become a candidate (default: the value "
                "chosen for that descriptor on the calibration split when it was embedded).")


class Engine(StrEnum):
    local = "local"
    ray = "ray"


@index_app.command("build")
def index_build(
    sources: list[str] = typer.Argument(..., help="Image folders, globs, .tar shards (webdataset/img2dataset) "
                                                  "or .parquet files of precomputed hashes."),
    out: Path = typer.Option(..., "--out", help="Index folder to create or extend."),
    hash_name: str = typer.Option("phash", "--hash", help="phash, dhash or whash (`diffaudit list hashes`)."),
    engine: Engine = typer.Option(Engine.local, "--engine", help="local processes or a Ray cluster."),
    workers: int = typer.Option(0, "--workers", min=0, help="Local processes (0: all cores)."),
    ray_address: str = typer.Option(None, "--ray-address", "--address", help="Ray cluster address (default: a local Ray)."),
    exact: bool = typer.Option(False, "--exact", help="Decode JPEGs in full: bit-identical to imagehash, slower."),
    square: bool = typer.Option(True, "--square/--no-square",
                                help="Also index the centred square crop of wide/tall images."),
) -> None:
    """Hash training images into an index. Rerunning resumes; new sources are appended."""
    from audit.memorization.build import build_index

    summary = build_index(sources, str(out), hash_name=hash_name, engine=engine.value, workers=workers or None,
                          exact=exact, square=square, ray_address=ray_address)
    typer.echo(json.dumps(summary, indent=2))


@index_app.command("info")
def index_info(
    index: Path = typer.Argument(..., help="An index folder."),
    check: bool = typer.Option(False, "--check", help="Verify every shard (counts, identities, items, and codes "
                                                      "hashed again from a sample of their sources); exit 1 on damage."),
    sample: int = typer.Option(8, "--sample", min=0, help="With --check: items hashed again per shard."),
) -> None:
    """Show an index: hash, count, shards, size on disk, and what reading its sources skipped."""
    from audit.memorization.descriptors import list_descriptors
    from audit.memorization.index import Index

    idx = Index.open(index)
    info = idx.info()
    info["descriptors"] = [{k: m.get(k) for k in ("name", "spec", "dim", "count", "unreadable", "sha256")}
                           | {"faiss": m.get("faiss", {}).get("type"),
                              "recall_at_10": m.get("faiss", {}).get("recall_at_10"),
                              "min_similarity": (m.get("min_similarity") or {}).get("value")}
                           for m in list_descriptors(idx)]
    if not check:
        typer.echo(json.dumps(info, indent=2))
        return
    from audit.memorization.integrity import IndexDamaged, check_index

    report = check_index(idx, sample=sample)
    typer.echo(json.dumps({**info, "check": report}, indent=2))
    if not report["ok"]:
        n = len(report["problems"]) + report["more_problems"]
        raise IndexDamaged(f"index {idx.root} is damaged ({n} problem(s), first: {report['problems'][0]}); "
                           "rebuild it into a new folder with `diffaudit index build`")


@index_app.command("query")
def index_query(
    files: list[Path] = typer.Argument(..., help="Images to look up."),
    index: Path = typer.Option(..., "--index", help="An index folder."),
    radius: int = typer.Option(10, "--radius", min=0, max=64, help="Hamming radius (exact search)."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Also list this many nearest codes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
    engine: Engine = typer.Option(None, "--engine", help="Search here, segment by segment (local, the default), "
                                                         "or on Ray (default: $DIFFAUDIT_SEARCH_ENGINE)."),
    ray_address: str = typer.Option(None, "--ray-address", "--address", help="Ray cluster address (default: a local Ray)."),
    descriptor: str = typer.Option(None, "--descriptor", help=DESCRIPTOR_HELP),
    min_similarity: float = typer.Option(None, "--min-similarity", min=-1.0, max=1.0, help=MIN_SIM_HELP),
) -> None:
    """Find training images near any image you bring: hash match within radius (the image, its mirror and
    edited variants) and, with --descriptor, nearest neighbours by embedding; then each candidate aligned and
    confirmed in pixels."""
    from audit.memorization.check import query_files
    from audit.memorization.search import use_engine

    use_engine(engine and engine.value, ray_address)
    _needs_descriptor(descriptor, min_similarity)

    for result in query_files([str(f) for f in files], index, radius=radius, top_k=top_k, descriptor=descriptor,
                              min_similarity=min_similarity):
        if as_json:
            typer.echo(json.dumps(result))
            continue
        verdict = result["verdict"] or "no candidate"
        flat = "  (degenerate: too flat to judge)" if result["degenerate"] else ""
        typer.echo(f"{result['file']}  {result['hash']}  {len(result['matches'])} candidate(s) within {radius}: "
                   f"{verdict}{flat}")
        for m in result["matches"]:
            crop = "[square]" if m["variant"] == "square" else ""
            extra = ""
            if m.get("agreement") is not None:
                t = m["transform"] or {}
                mirrored = " mirrored" if t.get("mirrored") else ""
                extra = (f"  agreement={m['agreement']} ssim={m['ssim']} tile_l2={m['tile_l2']} "
                         f"overlap={m['overlap']}/{m['train_overlap']} {t.get('method', '-')}{mirrored} "
                         f"x{t.get('scale', 1):.2f} {t.get('rotation', 0):+.1f}deg  {m['confirm_ms']} ms")
            found = f"  [{m['source']} sim={m['descriptor_sim']}]" if m.get("descriptor_sim") is not None else ""
            typer.echo(f"  {m.get('verdict', '-'):<15} d={m['hamming']:<3} {m['key']}{crop}  {m['uri'] or ''}{extra}"
                       f"{found}")
        typer.echo("  nearest: " + ", ".join(f"{n['key']}{'[square]' if n['variant'] == 'square' else ''} "
                                         f"({n['hamming']})" for n in result["nearest"]))


def _needs_descriptor(descriptor: str | None, min_similarity: float | None) -> None:
    if min_similarity is not None and descriptor is None:
        from diffaudit.errors import InputError

        raise InputError("--min-similarity applies to descriptor search; add --descriptor SPEC")


@index_app.command("embed")
def index_embed(
    index: Path = typer.Argument(..., help="An index folder (`diffaudit index build`)."),
    descriptor: str = typer.Option(..., "--descriptor", help="sscd:/path/model.pt[@SIZE] (Meta's TorchScript "
                                                              "SSCD), onnx:/path/model.onnx, or clip[:MODEL] (the "
                                                              "bias probe's CLIP, e.g. clip:tiny)."),
    device: str = typer.Option(None, "--device", help="cuda, cpu (default: cuda when there is one)."),
    calibration_images: int = typer.Option(16, "--calibration-images", min=0,
                                           help="Images per corpus split to choose the default min similarity on "
                                                "(calibration) and report it (held out); 0: use 0.5, uncalibrated."),
    exact_below: int = typer.Option(200_000, "--exact-below", min=0,
                                    help="Exact FAISS search (IndexFlatIP) below this many images, HNSW above "
                                         "(its recall@10 against exact search is measured and recorded)."),
) -> None:
    """Compute a descriptor for every indexed training image (resumable: rerun after an interruption, or after
    the index grew), with a FAISS index for nearest-neighbour search."""
    from audit.memorization.descriptors import embed_index

    meta = embed_index(index, descriptor, device=device, calibration_images=calibration_images,
                       flat_limit=exact_below)
    typer.echo(json.dumps(meta, indent=2))


@audit_app.command("memorization")
def audit_memorization(
    run: Path = typer.Argument(..., help="A run folder."),
    index: Path = typer.Option(None, "--index", help="A training-set index (`diffaudit index build`); without "
                                                     "one, prompts are scored from generation alone."),
    radius: int = typer.Option(10, "--radius", min=0, max=64, help="Hamming radius (exact search)."),
    engine: Engine = typer.Option(None, "--engine", help="Search here, segment by segment (local, the default), "
                                                         "or on Ray (default: $DIFFAUDIT_SEARCH_ENGINE)."),
    ray_address: str = typer.Option(None, "--ray-address", "--address", help="Ray cluster address (default: a local Ray)."),
    threshold: str = typer.Option(None, "--threshold", help="Prompt-score threshold: a number or a calibration "
                                                            "file (default: the SD 1.x setting, 5.0 at step 1)."),
    statistic: str = typer.Option(None, "--statistic", help="step1 (default) or mean (over the first steps)."),
    descriptor: str = typer.Option(None, "--descriptor", help=DESCRIPTOR_HELP),
    min_similarity: float = typer.Option(None, "--min-similarity", min=-1.0, max=1.0, help=MIN_SIM_HELP),
) -> None:
    """Flag memorized prompts from the scores recorded while generating (Wen et al. 2024) and, with an index,
    check the run's images against the training set (each hash candidate aligned to the image and confirmed
    in pixels) -> memorization/prompt_scores (+ matches, rates, evidence; counts as in run.json)."""
    from audit.memorization.prompt_scores import score_run
    from diffaudit.errors import InputError

    summary = {}
    _needs_descriptor(descriptor, min_similarity)
    if descriptor is not None and index is None:
        raise InputError("--descriptor searches a training-set index; add --index IDX")
    if index is not None:
        from audit.memorization.check import check_run
        from audit.memorization.search import use_engine

        use_engine(engine and engine.value, ray_address)
        summary = check_run(run, index, radius=radius, descriptor=descriptor, min_similarity=min_similarity)
    scores = score_run(run, threshold=threshold, statistic=statistic)
    if index is None and not scores["scored_images"]:
        raise InputError(f"{scores['reason']}; regenerate the run, or check it against an index (--index IDX)")
    typer.echo(json.dumps({**summary, "prompt_scores": scores} if index is not None else scores, indent=2))


@audit_app.command("memorization-calibrate")
def audit_memorization_calibrate(
    run: Path = typer.Argument(..., help="A run of prompts known to be ordinary (e.g. --suite ordinary-sd1)."),
    fpr: float = typer.Option(0.01, "--fpr", help="Target false-positive rate."),
    statistic: str = typer.Option("step1", "--statistic", help="step1 or mean."),
    suite: str = typer.Option(None, "--suite", help="Only the prompts of this suite (name as in the run)."),
    out: Path = typer.Option(None, "--out", help="Write the calibration here, for --threshold FILE."),
) -> None:
    """Fit a prompt-score threshold on ordinary prompts; print the false-positive rate it implies (held out)."""
    from audit.memorization.prompt_scores import calibrate

    typer.echo(json.dumps(calibrate(run, fpr=fpr, statistic=statistic, suite=suite, out=out), indent=2))
