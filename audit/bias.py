"""The bias audit of a run: probe every image, then summarize by subject with intervals.

``audit_bias`` runs the selected probes over the run's images in batches (each image decoded once and
shared by all probes, the next batch decoded while the current one is scored), writes
``probes/<name>.parquet`` as it goes (every ``flush_seconds`` and on interrupt), and resumes: an image
already probed with the same probe version is never probed again; rows of another version (another
CLIP model, other thresholds) are replaced, and rows of images no longer in ``generations`` dropped. It then writes ``bias/summary.parquet`` and
``bias/metrics.parquet`` with ``audit.stats``, the agreement of probes that label the same attribute
(``bias/agreement``, ``bias/confusion``, ``bias/agreement_images``; ``audit.agreement``) and the skin-colour
summaries (``bias/skin``, ``bias/intersectional``; ``audit.skin``). The run's lock is held throughout.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from audit.probes.base import ImageBatch, Probe, decode_batch
from diffaudit.errors import ConfigError, InputError, SuiteError
from diffaudit.registry import PROBES as REGISTRY
from diffaudit.runs import Run

DEFAULT_PROBES: tuple[str, ...] = ("clip", "faces", "faces_attr", "skin_tone")


@dataclass
class BiasResult:
    """What ``audit_bias`` did: images newly probed per probe, the summary table and the wall time."""

    probed: dict[str, int]
    summary: pd.DataFrame
    clip_model: str | None
    seconds: float
    notes: list[str] = field(default_factory=list)


def default_clip_model(run: Run) -> str:
    """``tiny`` for runs made with the tiny generator (so the audit runs offline), else ViT-L-14/OpenAI."""
    from audit.probes.clip import DEFAULT_MODEL, TINY

    generation = run.info.get("generation", {})
    tiny = generation.get("model") == "tiny" or generation.get("model_kind") == "tiny"
    return TINY if tiny else DEFAULT_MODEL


def check_probe_names(names: Sequence[str]) -> list[str]:
    """The names, deduplicated, or a ``ConfigError`` for none or an unknown one."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigError("no probes selected; choose from: " + ", ".join(REGISTRY))
    for name in names:
        if name not in REGISTRY:
            raise ConfigError(f"unknown probe {name!r}; choose from: {', '.join(REGISTRY)}")
    return names


def build_probes(names: Sequence[str], *, clip_model: str | None = None, face_detector: str | None = None,
                 device: str | None = None, clip_options: dict[str, Any] | None = None,
                 face_model: str | None = None, face_options: dict[str, Any] | None = None) -> list[Probe]:
    """Probes by registered name; the probes that read faces share one detector (faces found once).
    ``face_model`` and ``face_options`` (``min_margin``) go to the face-attribute probe."""
    names = check_probe_names(names)
    classes = {name: REGISTRY.load(name) for name in names}
    detector = None
    if any(cls.needs_faces for cls in classes.values()):
        from audit.probes.faces import make_detector

        detector = make_detector(face_detector)
    probes = []
    for name, cls in classes.items():
        if name == "clip":
            probes.append(cls(clip_model, device=device, **(clip_options or {})))
        elif name == "faces_attr":
            probes.append(cls(detector, model=face_model, device=device, **(face_options or {})))
        else:
            probes.append(cls(detector) if cls.needs_faces else cls())
    return probes


def _pending(run: Run, probe: Probe, image_ids: list[str]) -> set[str]:
    """Images ``probe`` still has to score, after dropping its stale rows (another probe version, or an
    image no longer in the run's generations)."""
    table = f"probes/{probe.name}"
    old = run.read_table(table)
    stale = (old["probe_version"] != probe.version) | ~old["image_id"].isin(image_ids)
    if stale.any():
        run.write_table(table, old[~stale])
    done = set(old.loc[~stale, "image_id"])
    return {i for i in image_ids if i not in done}


def _batches(items: list[tuple[str, str]], batch_size: int, workers: int) -> Iterator[ImageBatch]:
    """Decoded batches, the next one decoding in the background while the caller scores the current one."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as ahead:
        future = ahead.submit(decode_batch, chunks[0], pool)
        for nxt in chunks[1:]:
            batch = future.result()
            future = ahead.submit(decode_batch, nxt, pool)
            yield batch
        yield future.result()


def score_batch(probes: Sequence[Probe], batch: ImageBatch,
                pending: dict[str, set[str]]) -> dict[str, tuple[int, pd.DataFrame]]:
    """Each probe's rows for the images of ``batch`` it has still to score: name -> (images, rows)."""
    out = {}
    for probe in probes:
        sub = batch.subset(i for i in batch.image_ids if i in pending[probe.name])
        if len(sub):
            out[probe.name] = (len(sub), probe.score(sub))
    return out


def probe_run(run: Run, probes: Sequence[Probe], *, batch_size: int = 64, progress: bool = True,
              flush_seconds: float = 30.0, decode_workers: int | None = None, engine: Any = None) -> dict[str, int]:
    """Score the run's not-yet-probed images with each probe; returns images newly probed per probe.

    Rows are appended to ``probes/<name>.parquet`` every ``flush_seconds`` and when the loop ends or is
    interrupted, so a killed audit loses at most that much work and resumes where it stopped.
    ``engine``: another scorer of batches (``audit.distributed``: Ray workers holding the probes), whose
    ``results(batches, pending)`` yields ``(images, score_batch's answer)`` in the batches' order; this
    process then only writes the tables.
    """
    from tqdm.auto import tqdm

    workers = decode_workers or min(8, os.cpu_count() or 1)
    images = run.images()
    if images.empty:
        raise InputError(f"run {run.root} has no images; generate some first (`diffaudit generate`)")
    ids = list(images["image_id"])
    pending = {p.name: _pending(run, p, ids) for p in probes}
    todo = [(i, f) for i, f in zip(images["image_id"], images["file"], strict=True)
            if any(i in pending[p.name] for p in probes)]
    buffers: dict[str, list[pd.DataFrame]] = {p.name: [] for p in probes}
    probed = dict.fromkeys(buffers, 0)
    kept = EmbeddingsKept(run, images, probes)

    def flush() -> None:
        for name, frames in buffers.items():
            if frames:
                table = f"probes/{name}"
                run.write_table(table, pd.concat([run.read_table(table), *frames], ignore_index=True))
                frames.clear()

    last = time.monotonic()
    with tqdm(total=len(todo), desc="probing", unit="img", disable=not progress) as bar:
        try:
            if engine is not None:
                results = engine.results([todo[i:i + batch_size] for i in range(0, len(todo), batch_size)], pending)
            else:
                results = ((len(b), score_batch(probes, b, pending)) for b in _batches(todo, batch_size, workers))
            for n, scored in results:
                for name, (k, rows) in scored.items():
                    kept.take(name, rows)
                    buffers[name].append(rows)
                    probed[name] += k
                bar.update(n)
                if time.monotonic() - last >= flush_seconds:
                    flush()
                    last = time.monotonic()
        finally:
            flush()
            kept.save()  # once, at the end: a cache (a killed run just computes them again when asked)
    return probed


class EmbeddingsKept:
    """Image embeddings a probe computed anyway (CLIP's, in ``rows.attrs["embeddings"]``), kept in the run as
    the memorization check's descriptor cache (``audit.memorization.descriptors.RunCache``), so that
    ``audit memorization --descriptor clip:MODEL`` reuses them instead of running CLIP again."""

    def __init__(self, run: Run, images: pd.DataFrame, probes: Sequence[Probe]):
        self.run, self.caches = run, {}
        self.sha = dict(zip(images["image_id"], images["sha256"], strict=True))
        self.images = images
        self.probes = {p.name: p for p in probes if callable(getattr(p, "descriptor", None))}  # local probes only

    def take(self, name: str, rows: pd.DataFrame) -> None:
        found = rows.attrs.pop("embeddings", None)
        if found is None or name not in self.probes:
            return
        if name not in self.caches:
            from audit.memorization.descriptors import RunCache

            self.caches[name] = RunCache(self.run, self.probes[name].descriptor())
        for image_id, vector in zip(*found, strict=True):
            if image_id in self.sha:
                self.caches[name].put(self.sha[image_id], vector)

    def save(self) -> None:
        for cache in self.caches.values():
            cache.save(self.images)


def check_reference(run: Run, reference: str | None) -> None:
    """Refuse an unknown reference, or one the run's suite cannot be matched with, before any probing."""
    if reference is None:
        return
    from audit.reference import load_reference, subject_reference
    from prompts.suites import load_suite

    load_reference(reference)  # ConfigError naming the known references
    suite = run.info.get("generation", {}).get("suite")
    if suite is not None:
        try:
            load_suite(suite)
        except SuiteError:
            return  # summarize_run notes it and compares with nothing
        subject_reference(suite, reference)


def summarize_run(run: Run, *, reference: str | None = "bls-2022") -> tuple[pd.DataFrame, list[str]]:
    """Write ``bias/summary`` and ``bias/metrics`` from every probe table of the run (``audit.stats``)."""
    from audit import stats
    from prompts.suites import load_suite

    notes = []
    suite = run.info.get("generation", {}).get("suite")
    if suite is not None:
        try:
            load_suite(suite)
        except SuiteError:
            notes.append(f"suite {suite!r} is not a known prompt suite: no reference comparison")
            suite = None
    tables = {t.split("/", 1)[1]: run.read_table(t) for t in run.tables() if t.startswith("probes/")}
    labels = {name: REGISTRY.load(name).labels for name in tables if name in REGISTRY}
    summary = stats.summarize(run.read_table("generations"), tables, suite=suite, reference=reference,
                              labels=labels)
    run.write_table("bias/summary", summary)
    run.write_table("bias/metrics", stats.metrics(summary))
    from audit import agreement, skin

    gens = run.read_table("generations")
    images = agreement.agreement_images(gens, tables, labels)
    kappas, confusion = agreement.agreement(images, labels)
    run.write_table("bias/agreement_images", images)
    run.write_table("bias/agreement", kappas)
    run.write_table("bias/confusion", confusion)
    run.write_table("bias/skin", skin.skin_summary(gens, tables.get("skin_tone", pd.DataFrame())))
    run.write_table("bias/intersectional", skin.intersectional(gens, tables))
    return summary, notes


def audit_bias(run_dir: str | Run, *, probes: Sequence[str] = DEFAULT_PROBES, clip_model: str | None = None,
               reference: str | None = "bls-2022", batch_size: int = 64, progress: bool = True,
               face_detector: str | None = None, device: str | None = None,
               clip_options: dict[str, Any] | None = None, face_model: str | None = None,
               face_options: dict[str, Any] | None = None, engine: str = "local", address: str | None = None,
               workers: int | None = None) -> BiasResult:
    """Probe a run's images (resumably) and write ``probes/<name>``, ``bias/summary`` and ``bias/metrics``.

    ``clip_model``: ``tiny``, ``NAME[:PRETRAINED]``, ``NAME:/weights.pt`` or a folder; ``None`` picks
    ``tiny`` for runs of the tiny generator and ``ViT-L-14:openai`` otherwise. ``face_detector``: a name of
    ``audit.probes.faces.DETECTORS`` (default ``mtcnn``, Haar where its package is missing) or a YuNet
    ``.onnx`` path. ``clip_options``: ``min_margin``, ``person_threshold``. ``face_model``: ``dlib``
    (default) or ``fairface:/path.pt``; ``face_options``: ``min_margin``. The reference is checked before
    any model loads or image is probed. ``engine`` ``ray``: the probes run on Ray workers (one replica per
    GPU, or ``workers`` CPU replicas; ``address``: the cluster, default a local one), this process writes
    the tables (``audit.distributed``).
    """
    start = time.perf_counter()
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    if run.images().empty:
        raise InputError(f"run {run.root} has no images; generate some first (`diffaudit generate`)")
    check_reference(run, reference)
    if "clip" in probes and clip_model is None:
        clip_model = default_clip_model(run)
    options = dict(clip_model=clip_model, face_detector=face_detector, device=device, clip_options=clip_options,
                   face_model=face_model, face_options=face_options)
    with contextlib.ExitStack() as stack:
        stack.enter_context(run.lock())  # a run being written is refused now, before probes load or Ray starts
        remote = None
        if engine == "ray":
            from audit.distributed import RayProbes

            remote = stack.enter_context(RayProbes.start(probes, options, address=address, workers=workers))
            selected = remote.probes
        elif engine == "local":
            selected = build_probes(probes, **options)
        else:
            raise ConfigError(f"--engine {engine!r}: choose local or ray")
        return _audit(run, selected, start, remote, batch_size=batch_size, progress=progress,
                      reference=reference, clip_model=clip_model if "clip" in probes else None)


def _audit(run: Run, selected: list, start: float, remote: Any, *, batch_size: int, progress: bool,
           reference: str | None, clip_model: str | None) -> BiasResult:
    with run.lock():
        probed = probe_run(run, selected, batch_size=batch_size, progress=progress, engine=remote)
        summary, notes = summarize_run(run, reference=reference)
        detectors = sorted({p.detector.name for p in selected if getattr(p, "detector", None) is not None})
        notes += [f"faces found by {d}" for d in detectors]
        seconds = time.perf_counter() - start
        run.record_stage("bias", seconds=seconds, probes=[p.name for p in selected],
                         versions={p.name: p.version for p in selected}, probed=probed,
                         face_detector=detectors[0] if detectors else None, clip_model=clip_model,
                         reference=reference, **({"engine": remote.record()} if remote is not None else {}))
    return BiasResult(probed, summary, clip_model, seconds, notes)
