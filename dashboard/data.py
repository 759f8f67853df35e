"""Read-only, cached access to the run folders under one runs root: the only dashboard code that
touches the disk.

Two guarantees hold here and nowhere else needs to think about them:
- nothing is written: runs are opened with ``Run.open`` and read with ``Run.read_table`` (no lock,
  no ``run.json`` update); thumbnails and caches live in memory (``st.cache_data``);
- nothing outside the runs root is opened: every path (a run name from the URL or a widget, a
  relative path from a table row) is resolved, symlinks included, and must stay inside the runs root
  (and run.json or a table path inside its own run), or ``PathRefusedError`` is raised.

Tables are cached on (file path, mtime, size), so a stage finishing while the dashboard is open shows
up on the next rerun without a restart.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import RUNS_DIR_ENV
from diffaudit.errors import DiffauditError, InputError
from diffaudit.runs import RUN_FILE, Run

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NO_FACE_REASON = re.compile(r"no[ _-]?(?:face|person)", re.IGNORECASE)


class PathRefusedError(InputError):
    """A path would leave the runs root (``..``, an absolute path, a symlink out); it is never opened."""


# -- paths -----------------------------------------------------------------------------------------
def runs_root() -> Path:
    """The runs root the dashboard was started on (``$DIFFAUDIT_RUNS_DIR``, default ``runs``), resolved."""
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs").resolve()


def confine(root: Path, candidate: str | os.PathLike) -> Path:
    """``candidate`` (absolute or relative to ``root``) resolved, if it stays inside ``root``."""
    path = (root / candidate).resolve()
    if not path.is_relative_to(root):
        raise PathRefusedError(f"refused to open {str(candidate)!r}: it leaves {root}")
    return path


def run_names(root: Path | None = None) -> list[str]:
    """Names of the runs in the runs root (the root itself when it is one run), newest first."""
    root = root or runs_root()
    if (root / RUN_FILE).is_file():
        return [root.name] if _own_run_file(root) else []
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if _RUN_NAME.match(p.name) and (p / RUN_FILE).is_file() and p.resolve().is_relative_to(root) \
                and _own_run_file(p):
            found.append((p.joinpath(RUN_FILE).stat().st_mtime, p.name))
    return [name for _, name in sorted(found, reverse=True)]


def _own_run_file(folder: Path) -> bool:
    """True if ``folder``'s run.json is a file inside it (not a symlink to some file elsewhere)."""
    return (folder / RUN_FILE).resolve().is_relative_to(folder.resolve())


def _open_confined(folder: Path) -> Run:
    """``Run.open`` on a folder whose run.json stays inside it; a run.json that leaves it is never read."""
    confine(folder.resolve(), RUN_FILE)
    return Run.open(folder)


def open_run(name: str, root: Path | None = None) -> Run:
    """Open the run called ``name`` inside the runs root; names with separators or ``..`` are refused."""
    root = root or runs_root()
    if (root / RUN_FILE).is_file() and name == root.name:
        return _open_confined(root)
    if not _RUN_NAME.match(name) or name in {".", ".."}:
        raise PathRefusedError(f"refused run name {name!r}: a run is a folder directly inside {root}")
    return _open_confined(confine(root, name))


def run_file(run: Run, relative: str | None, root: Path | None = None) -> Path:
    """A file recorded in one of ``run``'s tables, confined to that run (and so to the runs root)."""
    root = root or runs_root()
    if not relative:
        raise PathRefusedError("no path recorded")
    confine(root, run.root)
    return confine(run.root, relative)


# -- tables ----------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=256)
def _read_table(run_root: str, table: str, mtime_ns: int, size: int) -> pd.DataFrame:
    """One validated table; the (mtime, size) arguments are the cache key that notices rewrites."""
    del mtime_ns, size
    return Run(run_root).read_table(table)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        s = path.stat()
    except FileNotFoundError:
        return (0, -1)
    return (s.st_mtime_ns, s.st_size)


def table(run: Run, name: str) -> pd.DataFrame:
    """A run table, validated against its schema and cached; missing tables are empty frames."""
    path = run.table_path(name)
    if path.exists():
        confine(run.root, path)
    return _read_table(str(run.root), name, *_stamp(path))


def table_stamp(run: Run, *names: str) -> tuple[tuple[int, int], ...]:
    """Cache key of a view derived from ``names``: their (mtime, size)."""
    return tuple(_stamp(run.table_path(n)) for n in names)


def probe_tables(run: Run) -> list[str]:
    """The probe tables present in ``run`` (``probes/<name>``); lists one folder, never the images, and
    skips a file that resolves outside the run (a symlink out)."""
    folder = run.root / "probes"
    if not folder.is_dir():
        return []
    return sorted(f"probes/{p.stem}" for p in folder.glob("*.parquet")
                  if _RUN_NAME.match(p.stem) and p.resolve().is_relative_to(run.root))


# -- views (joins and filters of what the audit wrote; no statistics are computed here) -------------
@st.cache_data(show_spinner=False, max_entries=32)
def runs_overview(root_str: str, stamps: tuple) -> pd.DataFrame:
    """One row per run: model, suite, images, stages done, created and last finished dates."""
    del stamps
    root = Path(root_str)
    rows = []
    for name in run_names(root):
        try:
            run = open_run(name, root)
            info = run.info
            n = len(table(run, "generations"))
        except DiffauditError as e:
            rows.append({"run": name, "model": "-", "suite": "-", "images": 0, "stages": f"unreadable: {e}",
                         "created": "-", "finished": "-"})
            continue
        gen = info.get("generation", {}) if isinstance(info.get("generation"), dict) else {}
        stages = info.get("stages", {}) or {}
        finished = max((str(s.get("finished", "")) for s in stages.values() if isinstance(s, dict)), default="")
        rows.append({
            "run": name,
            "model": str(gen.get("model") or gen.get("model_spec") or "-"),
            "suite": str(gen.get("suite") or "-"),
            "images": n,
            "stages": ", ".join(stages) or "-",
            "created": str(info.get("created", "-")),
            "finished": finished or "-",
        })
    return pd.DataFrame(rows, columns=["run", "model", "suite", "images", "stages", "created", "finished"])


def overview(root: Path | None = None) -> pd.DataFrame:
    """``runs_overview`` for the runs root, re-read when any run.json or generations table changes."""
    root = root or runs_root()
    stamps = []
    for name in run_names(root):
        base = root if name == root.name and (root / RUN_FILE).is_file() else root / name
        stamps.append((name, _stamp(base / RUN_FILE), _stamp(base / "generations.parquet")))
    return runs_overview(str(root), tuple(stamps))


@st.cache_data(show_spinner=False, max_entries=32)
def _image_labels(run_root: str, probe: str, attribute: str, stamps: tuple) -> pd.DataFrame:
    del stamps
    run = Run(run_root)
    gens = table(run, "generations")[["image_id", "subject", "template", "prompt", "path"]]
    rows = table(run, f"probes/{probe}")
    rows = rows[rows["attribute"] == attribute]
    answered = rows[~rows["abstained"] & rows["label"].notna()]
    labels = answered.groupby("image_id")["label"].agg(lambda s: ", ".join(sorted(set(s))))
    reasons = rows[rows["abstained"]].groupby("image_id")["abstain_reason"].agg(
        lambda s: ", ".join(sorted({str(r) for r in s if r is not None})) or "abstained")
    out = gens.copy()
    out["label"] = out["image_id"].map(labels)
    out["abstain_reason"] = out["image_id"].map(reasons)
    probed = set(rows["image_id"])
    out["status"] = [
        lab if isinstance(lab, str) else ("abstained" if iid in probed else "not probed")
        for iid, lab in zip(out["image_id"], out["label"], strict=True)
    ]
    return out.reset_index(drop=True)


def image_labels(run: Run, probe: str, attribute: str) -> pd.DataFrame:
    """Each generated image with its perceived label(s) for ``attribute`` under ``probe``, or
    ``abstained`` with the recorded reason (``not probed`` when the probe has no row for it)."""
    stamps = table_stamp(run, "generations", f"probes/{probe}")
    return _image_labels(str(run.root), probe, attribute, stamps)


@st.cache_data(show_spinner=False, max_entries=32)
def _no_face_rates(run_root: str, stamps: tuple) -> pd.DataFrame:
    del stamps
    run = Run(run_root)
    gens = table(run, "generations")[["image_id", "subject"]]
    flagged: set[str] = set()
    for name in probe_tables(run):
        rows = table(run, name)
        hit = rows["abstained"] & rows["abstain_reason"].fillna("").str.contains(NO_FACE_REASON)
        flagged.update(rows.loc[hit, "image_id"])
    gens = gens.assign(no_face=gens["image_id"].isin(flagged))
    out = gens.groupby("subject", sort=True).agg(images=("no_face", "size"), no_face=("no_face", "sum"))
    out["no_face_rate"] = out["no_face"] / out["images"]
    return out.reset_index()


def no_face_rates(run: Run) -> pd.DataFrame:
    """Per subject: images, images a probe recorded as showing no face/person, and their share.

    A count of what the probes wrote (an abstention whose reason says no face or no person), not a
    new statistic."""
    return _no_face_rates(str(run.root), table_stamp(run, "generations", *probe_tables(run)))


def beside_fair_diffusion(run: Run, shares: pd.DataFrame) -> pd.DataFrame:
    """``shares`` (perceived women per subject) beside Fair Diffusion's published SD 1.5 counts for the same
    occupations (see ``audit.reference.beside_fair_diffusion``). Built-in suites only: a suite path in
    ``run.json`` would be a file outside the runs root."""
    from audit.reference import beside_fair_diffusion as beside
    from prompts.suites import list_suites

    suite = (run.info.get("generation") or {}).get("suite")
    return beside(shares, suite) if suite in list_suites() else pd.DataFrame()


@dataclass(frozen=True)
class PromptScores:
    """What ``diffaudit audit memorization`` wrote about the prompts (``memorization/prompt_scores`` and the
    ``memorization_scores`` stage in run.json), split as the page shows it; nothing is recomputed here."""

    table: pd.DataFrame    # every prompt, in rank order as written
    scored: pd.DataFrame   # the prompts with a score
    flagged: pd.DataFrame  # the scored prompts above the threshold, in rank order
    threshold: float | None
    stage: dict

    def images(self, run: Run, prompt_id: str) -> pd.DataFrame:
        """The prompt's images (image_id, path, mem_score_step1), as the generations table recorded them."""
        gens = table(run, "generations")
        return gens.loc[gens["prompt_id"] == prompt_id, ["image_id", "path", "mem_score_step1"]].reset_index(drop=True)


def prompt_scores(run: Run) -> PromptScores:
    """The run's memorization prompt scores; empty frames (and no threshold) when it has none yet."""
    rows = table(run, "memorization/prompt_scores")
    stage = (run.info.get("stages") or {}).get("memorization_scores") or {}
    scored = rows[rows["score"].notna()]
    flagged = scored[scored["flagged"].fillna(False).astype(bool)]
    threshold = stage.get("threshold", rows["threshold"].iloc[0] if len(rows) else None)
    return PromptScores(rows, scored, flagged, None if threshold is None else float(threshold), stage)
