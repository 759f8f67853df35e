"""The Ray engine: ``hash_unit`` mapped over a Ray Dataset of units (one unit = one shard or file chunk).

Ray runs locally by default (``ray.init`` with this machine's CPUs) or joins a cluster at ``address``
(``ray://head:10001`` or ``auto``); the index is written by the driver, in unit order, so a Ray build
equals a local one. Results travel pickled (codes, item rows, counts are small next to the images).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

from audit.memorization.sources import Unit
from diffaudit.errors import ConfigError


def _task(row: dict[str, Any]) -> dict[str, Any]:
    from audit.memorization.build import hash_unit

    unit = pickle.loads(row["unit"])
    return {"i": row["i"], "result": pickle.dumps(hash_unit(unit, row["hash_name"], row["exact"], row["square"]))}


def ray_hash_units(units: list[Unit], hash_name: str, exact: bool, square: bool, *, address: str | None = None,
                   num_cpus: int | None = None) -> Iterator[tuple]:
    """Yield ``hash_unit`` results for ``units`` in their order, computed by Ray tasks."""
    if not units:
        return
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is an extra of ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data: pip install 'ray[data]' (or use --engine local)") from None

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the build shows its own progress bar
    ctx.print_on_execution_start = False
    started = False
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        started = True
    try:
        rows = [{"i": i, "unit": pickle.dumps(u), "hash_name": hash_name, "exact": exact,
             "square": square}
                for i, u in enumerate(units)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(_task)
        pending: dict[int, tuple] = {}
        want = 0
        for row in ds.iter_rows():
            pending[int(row["i"])] = pickle.loads(row["result"])
            while want in pending:
                yield pending.pop(want)
                want += 1
    finally:
        if started:
            ray.shutdown()
