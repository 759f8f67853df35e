"""Ray for the stages that scale out (index building and search, generation, probes): join a cluster or
start a local one, size the workers, and hand items to actors in order.

``start``/``connect`` join the cluster at ``address`` (``ray://head:10001`` through Ray Client, or ``auto`` /
``host:6379`` on a node of the cluster) or start a local one (this machine's CPUs, or ``num_cpus``); only
what they started is shut down. ``Dispatch`` keeps ``depth`` calls in flight on every actor, yields the
results in the items' order (so a driver writes what a local run writes, in the same order) and hands the
items of an actor that died to the others; with none left it raises ``WorkersLost``.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from diffaudit.errors import ConfigError, DiffauditError


class WorkersLost(DiffauditError):
    """Every Ray worker of a run died; what they finished is recorded, and the same command resumes."""


def ray_module(data: bool = False):
    """``ray`` (and ``ray.data`` when asked), or a one-line ``ConfigError`` saying how to install it."""
    try:
        import ray

        if data:
            import ray.data  # noqa: F401 - the Data library is an extra of ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'ray[data]' (or use --engine local)") from None
    return ray


def start(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray unless it is already; True if this call did (and so should shut it down).
    Without ``address`` it is ``RAY_ADDRESS`` (set by ``ray job submit``) where set, as Ray reads it; else a
    local cluster starts with ``num_cpus`` CPUs (default: this machine's)."""
    ray = ray_module()
    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray would join it and refuse num_cpus
    if address is not None:  # checked even where this process is connected already: a bad address is an error
        check_reachable(address)
        if address.startswith("ray://"):
            try:
                import grpc  # noqa: F401 - what Ray Client adds to ray
            except ImportError:
                raise ConfigError(f"--address {address}: ray:// addresses need Ray Client: pip install 'ray[client]' "
                                  "(or, on a node of the cluster, pass HEAD:6379)") from None
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        if address is None:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot join the Ray cluster at {address} ({first}); a cluster with token authentication "
                          "(Ray's default) needs RAY_AUTH_MODE=token here and its token (~/.ray/auth_token or "
                          "RAY_AUTH_TOKEN)") from None
    return True


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` or ``ray://host:port`` address that accepts no connection is refused at once (Ray itself
    retries for minutes); ``auto`` and addresses without a port are left to Ray."""
    import socket

    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not rest or (sep and not (host and port.isdigit())):  # Ray would wait for a client timeout, or misparse
        raise ConfigError(f"--address {address!r}: give ray://HEAD:10001, HEAD:6379 or auto")
    if not sep:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__}); start it "
                          "with `ray start --head` and pass its address (ray://HEAD:10001 or HEAD:6379)") from None


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """``start`` for a block: yields ``ray``; shuts Ray down after the block if this block started it."""
    started = start(address, num_cpus)
    ray = ray_module()
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def local_cpus(workers: int | None) -> int:
    """CPUs for a local cluster: this machine's, and at least one per requested worker (so that they fit)."""
    return max(os.cpu_count() or 1, workers or 0)


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers {workers}: give 1 or more")


def worker_resources(device: str, workers: int | None, what: str) -> tuple[int, dict[str, float]]:
    """How many actors to start and what each asks Ray for: one GPU each (as many actors as the cluster has
    GPUs, or ``workers``), or CPU actors (``device`` ``cpu``, or a cluster without GPUs) that share the
    cluster's CPUs. Refuses a request that could never be placed."""
    ray = ray_module()
    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
    check_workers(workers)
    if device != "cpu" and gpus:
        n = workers or gpus
        if n > gpus:
            raise ConfigError(f"--ray-workers {n}: the Ray cluster has {gpus} GPU(s); one {what} replica runs per GPU")
        return n, {"num_gpus": 1, "num_cpus": 1}
    if device.startswith("cuda"):
        raise ConfigError(f"--device {device}: the Ray cluster has no GPU (use --device cpu with --ray-workers N)")
    if workers is None:
        raise ConfigError("the Ray cluster has no GPU: pass --ray-workers N to run N CPU workers")
    if workers > cpus:
        raise ConfigError(f"--ray-workers {workers}: the Ray cluster has {cpus} CPU(s); give at most {cpus}")
    return workers, {"num_cpus": max(1, cpus // workers)}


def actor_device(options: dict[str, float]) -> str:
    """The device a worker loads onto: its one GPU (Ray makes it ``cuda``) or the CPU."""
    return "cuda" if options.get("num_gpus") else "cpu"


def remote_error(error: Exception) -> Exception:
    """A worker's own ``DiffauditError`` as itself (one line for the CLI), anything else unchanged."""
    ray = ray_module()
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, DiffauditError):
        return error.cause
    return error


def start_actors(cls: type, n: int, options: dict[str, float], *args: Any, concurrency: int = 1) -> list:
    """``n`` actors of ``cls`` with Ray resource ``options``; constructors run in parallel."""
    ray = ray_module()
    remote = ray.remote(max_concurrency=concurrency, **options)(cls)
    return [remote.remote(*args) for _ in range(n)]


def ready(actors: list, what: str, hint: str) -> list:
    """Wait for the actors' ``describe`` (their constructors have run); a failure stops them all and becomes
    one line (the worker's own error where it raised a ``DiffauditError``)."""
    ray = ray_module()
    try:
        return ray.get([a.describe.remote() for a in actors])
    except ray.exceptions.RayError as e:
        stop(actors)
        cause = remote_error(e)
        if isinstance(cause, DiffauditError):
            raise cause from None
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise ConfigError(f"Ray workers could not start {what} ({last}); {hint}") from None


def stop(actors: list) -> None:
    """Kill the actors (their resources go back to the cluster); already dead ones are fine."""
    ray = ray_module()
    for a in actors:
        with contextlib.suppress(Exception):
            ray.kill(a)


class Dispatch:
    """Items handed to actors (``method`` called with one item), ``depth`` calls in flight on each actor,
    results yielded in the items' order. ``done[i]``: items actor ``i`` finished; ``lost``: actors that died
    (their unfinished items went to the others)."""

    def __init__(self, actors: list, method: str, *, depth: int = 2):
        self.actors = list(actors)
        self.method, self.depth = method, depth
        self.done = [0] * len(self.actors)
        self.lost: list[int] = []

    def map(self, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        ray = ray_module()
        source = iter(items)
        live = list(range(len(self.actors)))
        busy = dict.fromkeys(live, 0)
        flight: dict[Any, tuple[int, int]] = {}  # ref -> (sequence number, actor)
        pending: dict[int, Any] = {}  # sequence number -> item, until yielded
        results: dict[int, Any] = {}
        retry: deque[int] = deque()
        count, want, exhausted = 0, 0, False
        window = 2 * self.depth * len(live)  # in flight + finished but not yet yielded: bounds the memory held

        def take() -> int | None:
            nonlocal count, exhausted
            if retry:
                return retry.popleft()
            if exhausted:
                return None
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                return None
            pending[count] = item
            count += 1
            return count - 1

        while True:
            for a in live:
                while busy[a] < self.depth and (retry or len(flight) + len(results) < window):
                    seq = take()
                    if seq is None:
                        break
                    flight[getattr(self.actors[a], self.method).remote(pending[seq])] = (seq, a)
                    busy[a] += 1
            if not flight:
                break
            (ref,), _ = ray.wait(list(flight), num_returns=1)
            seq, a = flight.pop(ref)
            busy[a] -= 1
            try:
                results[seq] = ray.get(ref)
                self.done[a] += 1
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                retry.append(seq)
                if a in live:
                    live.remove(a)
                    self.lost.append(a)
                if not live:
                    raise WorkersLost(f"all {len(self.actors)} Ray workers were lost; what they finished is "
                                      "recorded: rerun the same command to resume") from None
                window = 2 * self.depth * len(live)
                retry = deque(sorted(retry))
            except ray.exceptions.RayTaskError as e:
                raise remote_error(e) from None
            while want in results:
                yield pending.pop(want), results.pop(want)
                want += 1
