"""Memorization checks: index training images by perceptual hash, search a run's images exactly within a
Hamming radius, confirm candidates in pixels (tiled L2 of Carlini et al. 2023, SSIM), write the tables.

Entry points: ``build_index(sources, out, ...)`` and ``check_run(run_dir, index_dir, ...)``.
"""

from audit.memorization.build import build_index
from audit.memorization.check import check_run, query_files
from audit.memorization.index import Index

__all__ = ["Index", "build_index", "check_run", "query_files"]
