"""Benchmark: generation with ``--engine ray`` against the local runner, in one run, on the same suite and seeds.

CPU (default where there is no GPU): the tiny model, the demo suite's txt2img prompts. Four runs, each into a
fresh run folder: local with 1 torch thread, Ray with 1 CPU worker (the engine's overhead on the same
resources), local with N threads, Ray with N CPU workers (one process with N cores vs N replicas). GPU (a
machine with CUDA): local on one GPU vs Ray with one replica per GPU (the issue's bound: overhead under 5%
with one GPU). Throughput is the runner's own (images / seconds of the generation loop: the model is loaded
and, on Ray, the workers are up before it starts); the Ray start (cluster and workers ready) is printed
apart. Every Ray run's images are checked against the first local run's (sha256). Prints JSON lines; the
``figure`` line has the ratios.

    nice -n 10 python bench/ray_generate.py [--workers N] [--images-per-prompt K] [--size S] [--steps T]
        [--batch-size B] [--model tiny] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def digests(run_dir: Path) -> dict[str, str]:
    from diffaudit.runs import Run

    gens = Run.open(run_dir).read_table("generations")
    return dict(zip(gens["image_id"], gens["sha256"], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="CPU workers for the Ray run (CPU mode)")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from diffaudit import ray_cluster
    from diffaudit.config import GenerationConfig
    from generate.distributed import generate_run_ray
    from generate.runner import generate_run

    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    cfg = GenerationConfig(suite="demo", model=args.model, images_per_prompt=args.images_per_prompt, edits=(),
                           steps=args.steps, width=args.size, height=args.size, seed=0,
                           batch_size=args.batch_size, device="cuda" if gpu else "cpu")
    n_gpus = torch.cuda.device_count() if gpu else 0
    emit(phase="setup", mode="gpu" if gpu else "cpu", gpus=n_gpus, cpus=os.cpu_count(), workers=args.workers,
         model=args.model, size=args.size, steps=args.steps, batch_size=args.batch_size,
         images=12 * args.images_per_prompt, loadavg=os.getloadavg()[0], torch_threads_default=torch.get_num_threads())

    runs = [("local", 1), ("ray", 1), ("local", args.workers), ("ray", args.workers)]
    if gpu:
        runs = [("local", 1), ("ray", n_gpus)]
    rates: dict[str, float] = {}
    first: dict[str, str] | None = None
    with tempfile.TemporaryDirectory(prefix="ray-gen-bench-") as tmp:
        for k, (engine, n) in enumerate(runs):
            out = Path(tmp) / f"run{k}"
            t = time.perf_counter()
            if engine == "local":
                if not gpu:
                    torch.set_num_threads(n)
                summary = generate_run(out, cfg, progress=False)
                start_s = None
            else:
                # a fresh local cluster per Ray run: N CPUs for N one-thread CPU workers; on GPUs, Ray's defaults
                started = ray_cluster.start(None, num_cpus=None if gpu else n)
                t_ready = time.perf_counter()
                try:
                    summary = generate_run_ray(out, cfg, workers=None if gpu else n, progress=False)
                finally:
                    if started:
                        import ray

                        ray.shutdown()
                start_s = round(time.perf_counter() - t - summary["seconds"], 1)
                emit(phase="ray_start", ray_init_s=round(t_ready - t, 1), cluster_and_workers_ready_s=start_s)
            wall = time.perf_counter() - t
            got = digests(out)
            first = first or got
            name = f"{engine}_{n}" + ("gpu" if gpu else ("worker" if engine == "ray" else "thread")) + ("s" if n > 1 else "")
            rates[name] = summary["images_per_second"]
            emit(phase="run", name=name, engine=engine, n=n, images=summary["generated"],
                 loop_s=summary["seconds"], img_per_s=summary["images_per_second"], wall_s=round(wall, 1),
                 start_s=start_s, same_images_as_first=got == first, loadavg=os.getloadavg()[0])
    names = list(rates)
    if gpu:
        figure = {"ray_over_local": round(rates[names[1]] / rates[names[0]], 3)}
    else:
        figure = {f"{names[1]}_over_{names[0]}": round(rates[names[1]] / rates[names[0]], 3),
                  f"{names[3]}_over_{names[2]}": round(rates[names[3]] / rates[names[2]], 3),
                  f"{names[3]}_over_{names[0]}": round(rates[names[3]] / rates[names[0]], 3)}
    emit(phase="figure", img_per_s=rates, **figure,
         note="ratios of the generation loop's img/s, measured in this run; Ray start is printed apart")


if __name__ == "__main__":
    main()
