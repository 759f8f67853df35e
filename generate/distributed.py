"""Generation on Ray: one pipeline replica per GPU (or ``workers`` CPU replicas), the driver alone writes the run.

Each worker (a Ray actor) loads the model and makes its own ``Plan`` (``plan_run`` without a run folder) and
a run-less ``runner._Generator``, so a batch is made exactly as the local runner makes it (per-image seeds,
padding, CUDA graphs, out-of-memory halving, overlapped decode); it returns PNG bytes, memorization scores
and NSFW flags. The driver expands the suite, checks the run folder, takes the settings from the workers
(all must agree: same model, dtype, versions), hands out batches (``diffaudit.ray_cluster.Dispatch``: two in
flight per worker, results in batch order) and writes images, rows and the lock as a local run does. So a
Ray run equals a local one image for image, and resumes the same way: after a killed driver (rerun the same
command) or a lost worker (its batches go to the others).

What every node needs: diffaudit and the model (a hub id cached, or a folder at the same path), and the
suite file and its source images at the same path (built-in suites ship with the package); relative paths
are taken from the driver's working folder. The run folder lives on the driver only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from diffaudit import ray_cluster
from diffaudit.config import GenerationConfig
from diffaudit.errors import ConfigError, DiffauditError
from diffaudit.runs import Run
from generate import runner
from generate.models import check_scheduler
from generate.scores import Scores
from prompts.suites import expand

DEPTH = 2  # batches in flight per worker: one denoising, one decoding / encoding / on its way back


class GenerationWorker:
    """A Ray actor: one pipeline replica and its plan; ``make`` turns a batch of jobs into PNG bytes, score
    rows and NSFW flags. Two calls may run at once: one denoises (under the lock) while the other waits for
    its decode and encodes its PNGs, as the local runner overlaps them."""

    def __init__(self, config_json: str, cwd: str, threads: int):
        import socket

        import torch

        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative suite, source and model paths mean what they mean on the driver
        torch.set_num_threads(max(1, threads))
        self.config = GenerationConfig.model_validate_json(config_json)
        try:
            self.plan = runner.plan_run(None, self.config, progress=False)
        except DiffauditError as e:  # raised by describe: Ray keeps only the text of a constructor's error
            self.error = e
            return
        self.error = None
        self.gen = runner._Generator(None, self.plan, progress=False)
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        if self.gen.speed.overlap:
            self.gen.speed.decoder = self.decoder
        self.lock = threading.Lock()
        self.where = {"host": socket.gethostname(), "pid": os.getpid(), "device": self.plan.pipes.device}

    def describe(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"settings": self.plan.settings, "batch_size": self.gen.batch_size, **self.where}

    def make(self, jobs: list[runner.Job]) -> dict[str, Any]:
        with self.lock:
            out = self.gen._generate(jobs)
        pixels = out.pixels.wait()
        nsfw = out.nsfw
        if nsfw is None and self.plan.pipes.flags_nsfw:
            nsfw = self.plan.pipes.flag_nsfw(pixels)
        pngs = [runner.png_bytes(pixels[k]) for k in range(len(jobs))]
        norms, valid = out.scores.selected()
        out.pixels.release()
        return {"pngs": pngs, "norms": norms, "valid": valid, "nsfw": nsfw}

    def record(self) -> dict[str, Any]:
        return self.gen.speed.record()


class RayBatches:
    """The ``_Generator`` engine on the driver: batches to the workers, ``BatchResult`` back in order."""

    def __init__(self, actors: list, infos: list[dict[str, Any]], options: dict[str, float]):
        self.actors, self.infos, self.options = actors, infos, options
        self.batch_size = min(i["batch_size"] for i in infos)
        self.dispatch = ray_cluster.Dispatch(actors, "make", depth=DEPTH)

    def results(self, batches: Iterable[list[runner.Job]]) -> Iterator[tuple[list[runner.Job], runner.BatchResult]]:
        for batch, res in self.dispatch.map(batches):
            yield batch, runner.BatchResult(runner.EncodedPixels(res["pngs"]), Scores(res["norms"], res["valid"]),
                                            res["nsfw"])

    def record(self) -> dict[str, Any]:
        ray = ray_cluster.ray_module()
        mode = {}
        live = [a for i, a in enumerate(self.actors) if i not in self.dispatch.lost]
        if live:
            try:
                mode = ray.get(live[0].record.remote())
            except ray.exceptions.RayError:
                mode = {}
        workers = [{"host": i["host"], "pid": i["pid"], "device": i["device"], "batches": n,
                    "lost": k in self.dispatch.lost} for k, (i, n) in enumerate(zip(self.infos, self.dispatch.done,
                                                                                     strict=True))]
        return {**mode, "engine": {"name": "ray", "workers": workers, "workers_lost": len(self.dispatch.lost),
                                   "resources_per_worker": self.options}}


def generate_run_ray(run_dir: str | os.PathLike, config: GenerationConfig, *, address: str | None = None,
                     workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """``runner.generate_run`` on Ray: ``workers`` replicas (default: one per GPU of the cluster; on a
    cluster without GPUs, required: CPU replicas). Same summary, plus the workers."""
    run_dir = Path(run_dir)
    Run.check_can_create(run_dir)  # bad input fails before Ray starts, writing nothing
    check_scheduler(config.scheduler)
    requests = expand(config.suite, images_per_prompt=config.images_per_prompt, seed=config.seed,
                      templates=config.templates, subjects=config.subjects, edits=config.edits)
    jobs = [runner.Job(r, i, s) for r in requests for i, s in enumerate(r.seeds)]
    ray_cluster.check_workers(workers)
    with ray_cluster.connect(address, num_cpus=ray_cluster.local_cpus(workers)):
        n, options = ray_cluster.worker_resources(config.device, workers, "pipeline")
        device = ray_cluster.actor_device(options)
        worker_config = config.model_copy(update={"device": device})
        threads = int(options.get("num_cpus", 1))
        actors = ray_cluster.start_actors(GenerationWorker, n, options, worker_config.model_dump_json(),
                                          os.getcwd(), threads, concurrency=DEPTH)
        try:
            infos = ray_cluster.ready(actors, f"the model {config.model}",
                                      "every node needs diffaudit, the model, and the suite at the same path")
            settings = infos[0]["settings"]
            for info in infos[1:]:
                diff = sorted(k for k in settings.keys() | info["settings"].keys()
                              if settings.get(k) != info["settings"].get(k))
                if diff:
                    raise ConfigError(f"Ray workers on {infos[0]['host']} and {info['host']} would make different "
                                      f"images ({', '.join(diff)} differ); give every node the same model and "
                                      "packages")
            plan = runner.Plan(config=config, jobs=jobs, pipes=None, settings=settings)
            plan.fresh = runner._check_resume(run_dir, settings)
            run = Run.create(run_dir)
            with run.lock():
                runner.record_settings(run, plan)
                engine = RayBatches(actors, infos, options)
                summary = runner._Generator(run, plan, progress, engine=engine).execute()
        finally:
            ray_cluster.stop(actors)
    return {**summary, "engine": "ray", "workers": n, "workers_lost": len(engine.dispatch.lost)}

