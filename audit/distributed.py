"""Bias probes on Ray: probe replicas per GPU (or ``workers`` CPU replicas), the driver alone writes the tables.

Each worker (a Ray actor) builds the probes as a local audit does (``bias.build_probes``) and scores the
batches it is handed with ``bias.score_batch``; the driver reads the run, works out what is pending (stale
rows dropped as locally), sends each batch's image files as bytes (the run folder need not be shared) and
writes ``probes/<name>.parquet`` as the batches come back, in order, so a Ray audit writes the rows a local
one writes and resumes the same way. Every worker must build the same probes (same versions and face
detector); a probe's weights given as a path must be at that path on every node (relative paths are taken
from the driver's working folder).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit import ray_cluster
from diffaudit.errors import ConfigError, DiffauditError, InputError

DEPTH = 2  # batches in flight per worker


@dataclass(frozen=True)
class Named:
    name: str


@dataclass(frozen=True)
class RemoteProbe:
    """What the driver knows of a probe that runs on the workers: enough to find pending images and record."""

    name: str
    version: str
    detector: Named | None = None


class ProbeWorker:
    """A Ray actor: the probes, built once; ``score`` decodes a batch of image files and scores it."""

    def __init__(self, names: list[str], options: dict[str, Any], cwd: str, threads: int):
        import socket

        import torch

        from audit.bias import build_probes

        if os.path.isdir(cwd):
            os.chdir(cwd)
        torch.set_num_threads(max(1, threads))
        try:
            self.probes = build_probes(names, **options)
        except DiffauditError as e:  # raised by describe: Ray keeps only the text of a constructor's error
            self.error = e
            return
        self.error = None
        self.where = {"host": socket.gethostname(), "pid": os.getpid(), "device": options.get("device")}

    def describe(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        probes = [(p.name, p.version, getattr(getattr(p, "detector", None), "name", None)) for p in self.probes]
        return {"probes": probes, **self.where}

    def score(self, items: list[tuple[str, str, bytes, tuple[str, ...]]]) -> dict[str, tuple[int, Any]]:
        from audit.bias import score_batch
        from audit.probes.base import ImageBatch, ImageRecord
        from diffaudit.imaging import open_image

        batch = ImageBatch([ImageRecord(i, np.asarray(open_image(data, name=f"cannot read image {i} at {path}",
                                                                  mode="RGB"))) for i, path, data, _ in items])
        pending = {p.name: {i for i, _, _, names in items if p.name in names} for p in self.probes}
        return score_batch(self.probes, batch, pending)


class RayProbes:
    """The probe engine on the driver: ``probes`` (stand-ins with name, version, detector) and ``results``."""

    def __init__(self, actors: list, infos: list[dict[str, Any]], options: dict[str, float]):
        self.actors, self.infos, self.options = actors, infos, options
        self.probes = [RemoteProbe(n, v, Named(d) if d else None) for n, v, d in infos[0]["probes"]]
        self.dispatch = ray_cluster.Dispatch(actors, "score", depth=DEPTH)

    @classmethod
    @contextlib.contextmanager
    def start(cls, names: Sequence[str], options: dict[str, Any], *, address: str | None = None,
              workers: int | None = None) -> Iterator[RayProbes]:
        """Workers with the probes loaded, for a block; stopped after it (and Ray, if this started it)."""
        from audit.bias import check_probe_names

        ray_cluster.check_workers(workers)
        names = check_probe_names(names)  # before Ray starts
        with ray_cluster.connect(address, num_cpus=ray_cluster.local_cpus(workers)):
            n, resources = ray_cluster.worker_resources(options.get("device") or "auto", workers, "probe")
            remote_options = {**options, "device": ray_cluster.actor_device(resources)}
            actors = ray_cluster.start_actors(ProbeWorker, n, resources, names, remote_options, os.getcwd(),
                                              int(resources.get("num_cpus", 1)))
            try:
                infos = ray_cluster.ready(actors, "the probes", "every node needs diffaudit and the probes' weights "
                                                                "at the same path")
                for info in infos[1:]:
                    if info["probes"] != infos[0]["probes"]:
                        raise ConfigError(f"Ray workers on {infos[0]['host']} and {info['host']} built different "
                                          f"probes ({infos[0]['probes']} vs {info['probes']}); give every node the "
                                          "same packages and weights")
                yield cls(actors, infos, resources)
            finally:
                ray_cluster.stop(actors)

    def results(self, chunks: list[list[tuple[str, str]]],
                pending: dict[str, set[str]]) -> Iterator[tuple[int, dict[str, tuple[int, Any]]]]:
        def batches():
            for chunk in chunks:
                yield [(i, f, _read(i, f), tuple(n for n, ids in pending.items() if i in ids)) for i, f in chunk]

        for batch, scored in self.dispatch.map(batches()):
            yield len(batch), scored

    def record(self) -> dict[str, Any]:
        workers = [{"host": i["host"], "pid": i["pid"], "device": i["device"], "batches": n,
                    "lost": k in self.dispatch.lost}
                   for k, (i, n) in enumerate(zip(self.infos, self.dispatch.done, strict=True))]
        return {"name": "ray", "workers": workers, "workers_lost": len(self.dispatch.lost),
                "resources_per_worker": self.options}


def _read(image_id: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read image {image_id} at {path}: {e.strerror or e}") from None
