"""Provenance: C2PA content credentials, invisible watermarks and a manifest store for durable credentials.

The API the CLI and the end-to-end command call::

    init_identity(dir) -> Identity                       # provenance.keys
    stamp_run(run_dir, *, identity=None, watermark="ssTile", store=None) -> dict
    verify_paths(paths, *, trust_anchors=None, allowed_list=None, trust_config=None, store=None)
        -> list[VerifyResult]                             # provenance.verify: evidence + one conclusion
    robustness(images, *, methods=("ssTile", "dwtDctSvd"), identity=None, c2pa=True) -> DataFrame

Reads generation records through the run folder only; never imports torch (``diffaudit verify`` stays
fast). Submodules are imported lazily by these wrappers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provenance.keys import Identity
    from provenance.verify import VerifyResult

__all__ = ["init_identity", "load_identity", "stamp_run", "stamp_files", "verify_paths", "robustness"]


def init_identity(folder=None, **kwargs: Any) -> Identity:
    from provenance.keys import init_identity as _init

    return _init(folder, **kwargs)


def load_identity(folder=None) -> Identity:
    from provenance.keys import load_identity as _load

    return _load(folder)


def stamp_run(run_dir, **kwargs: Any) -> dict[str, Any]:
    from provenance.stamp import stamp_run as _stamp_run

    return _stamp_run(run_dir, **kwargs)


def stamp_files(paths, out_dir, **kwargs: Any) -> list[dict[str, Any]]:
    from provenance.stamp import stamp_files as _stamp_files

    return _stamp_files(paths, out_dir, **kwargs)


def verify_paths(paths, **kwargs: Any) -> list[VerifyResult]:
    from provenance.verify import verify_paths as _verify_paths

    return _verify_paths(paths, **kwargs)


def robustness(images, **kwargs: Any):
    from provenance.attacks import robustness as _robustness

    return _robustness(images, **kwargs)
