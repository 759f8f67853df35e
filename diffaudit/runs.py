"""The run folder: the only contract between stages (see DESIGN.md).

A run is a folder with ``run.json`` (the config snapshot and a record of the stages done), images
under ``images/<prompt_id>/<seed>.png`` and parquet tables. Every write is atomic (temp file in the
same folder, fsync, ``os.replace``): a crash leaves either the old file or the new one, never half.
Writers hold the run's lock (``fcntl.flock``, which the OS drops when a process dies, so a killed
writer's lock is taken over without ceremony).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from diffaudit import schema as _schema
from diffaudit.errors import NotARunError, RunLockedError, SchemaError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
FORMAT = "diffaudit-run"
FORMAT_VERSION = 1
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UMASK = os.umask(0)
os.umask(_UMASK)


def now() -> str:
    """UTC timestamp in ISO 8601, seconds precision."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file beside it, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run is shared like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_name(value: str, what: str) -> str:
    """Reject names that are unsafe as one path component (prompt ids, table parts)."""
    if not _SAFE.match(value) or value in {".", ".."}:
        raise SchemaError(f"{what} {value!r} is not a safe name (letters, digits, '_', '.', '-')")
    return value


# A temp file of ``atomic_write_bytes``: ``.<name>.<8 random characters>.tmp`` (``tempfile.mkstemp``).
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed writers of ``atomic_write_bytes`` left anywhere under ``folder``
    (symlinked folders are not followed, nor folders below it with their own lock file: a run or index
    nested inside is another writer's). Call it only while holding the folder's lock: a live writer's
    temp file would be pulled from under it. Returns the files removed."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not os.path.lexists(os.path.join(dirpath, d, LOCK_FILE))]
        for name in filenames:
            if _TEMP_FILE.match(name):
                path = Path(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


class _Lock:
    """A per-process view of one folder's ``flock``: reentrant within the thread that holds it; another thread
    of the same process is refused as another process would be (``flock`` alone would let it in).

    Whoever takes the lock after another holder (a process killed mid-write included) first removes the temp
    files that holder may have left (``remove_temp_files``): only the lock's holder writes in the folder, so
    none of them is in use. The last holder is known by what it wrote into the lock file."""

    _held: dict[Path, tuple[int, int, int]] = {}  # path -> (fd, depth, owning thread id)
    _wrote: dict[Path, bytes] = {}  # path -> what this process last wrote into the lock file
    _mutex = threading.Lock()

    @classmethod
    @contextlib.contextmanager
    def hold(cls, path: Path, what: str = "run") -> Iterator[None]:
        me = threading.get_ident()
        with cls._mutex:
            if path in cls._held:
                fd, depth, owner = cls._held[path]
                if owner != me:
                    raise RunLockedError(f"{what} {path.parent} is locked by another thread of this process "
                                         f"(pid {os.getpid()}); wait for it to finish")
                cls._held[path] = (fd, depth + 1, owner)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise RunLockedError(
                        f"{what} {path.parent} is locked by {holder}; wait for it to finish or stop it"
                    ) from None
                previous = os.pread(fd, 200, 0)
                stamp = f"pid {os.getpid()} since {now()}".encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, stamp, 0)
                try:
                    if previous and previous != cls._wrote.get(path):  # another holder since our last turn
                        remove_temp_files(path.parent)
                except BaseException:
                    os.close(fd)
                    raise
                cls._wrote[path] = stamp
                cls._held[path] = (fd, 1, me)
        try:
            yield
        finally:
            with cls._mutex:
                fd, depth, owner = cls._held[path]
                if depth > 1:
                    cls._held[path] = (fd, depth - 1, owner)
                else:
                    del cls._held[path]
                    os.close(fd)  # closing the descriptor releases the flock


def make_folder(folder: str | os.PathLike, what: str = "run") -> None:
    """``mkdir -p``, with a one-line error (not an ``OSError`` traceback) where the folder cannot be made."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NotARunError(f"cannot create the {what} folder {folder}: {e.strerror or e}; choose another --out") \
            from None


def folder_lock(folder: str | os.PathLike, what: str) -> contextlib.AbstractContextManager[None]:
    """The write lock of a folder that is not a run (an index): the run lock's mechanism, a ``.lock`` file
    inside it. ``what`` names the folder's kind in the one-line error that a second writer gets."""
    return _Lock.hold(Path(folder).resolve() / LOCK_FILE, what)


@contextlib.contextmanager
def reserve(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``folder``'s lock before slow work (loading a model, planning a build), making the folder if
    needed. If this call made it and it holds nothing but the lock file at the end (bad input, a refusal),
    it is removed again: a failed command leaves no empty folder behind. Yields the resolved folder."""
    folder = Path(folder)
    made = not folder.exists()
    make_folder(folder, what)
    root = folder.resolve()
    with _Lock.hold(root / LOCK_FILE, what):
        try:
            yield root
        finally:
            if made and only_lock(root):  # still under the lock: nobody else writes in it
                with contextlib.suppress(OSError):
                    (root / LOCK_FILE).unlink()
                    root.rmdir()


def only_lock(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds nothing but a lock file and leftover temp files (a writer's folder that
    was never written, or a killed one's): as good as empty."""
    try:
        return all(p.name == LOCK_FILE or _TEMP_FILE.match(p.name) for p in Path(folder).iterdir())
    except OSError:
        return False


class Run:
    """A run folder. ``Run.create`` makes one, ``Run.open`` opens an existing one."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    # -- life cycle ------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, config: dict[str, Any] | None = None) -> Run:
        """Create a run (or reopen it if it exists); ``config`` is merged into ``run.json``."""
        root = Path(root)
        cls.check_can_create(root)
        make_folder(root)
        run = cls(root)
        with run.lock():
            if not (run.root / RUN_FILE).exists():
                info = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": run.root.name,
                        "created": now(), "schema_version": _schema.SCHEMA_VERSION, "stages": {}}
                atomic_write_text(run.root / RUN_FILE, json.dumps(info, indent=2) + "\n")
            if config:
                run.update_info(config)
        return run

    @classmethod
    def open(cls, root: str | os.PathLike) -> Run:
        """Open an existing run or raise ``NotARunError``."""
        run = cls(root)
        if not run.root.is_dir():
            raise NotARunError(f"no run folder at {root}")
        if not (run.root / RUN_FILE).is_file():
            raise NotARunError(f"{root} is not a diffaudit run (no {RUN_FILE})")
        run.info  # noqa: B018 - validates run.json
        return run

    @staticmethod
    def check_can_create(root: str | os.PathLike) -> None:
        """Raise ``NotARunError`` if ``root`` cannot become (or be reopened as) a run; writes nothing."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise NotARunError(f"{root} exists and is not a folder")
        if root.is_dir() and not only_lock(root) and not (root / RUN_FILE).exists():
            raise NotARunError(f"{root} is a non-empty folder that is not a diffaudit run; choose a new --out")

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        return (Path(path) / RUN_FILE).is_file()

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the run's write lock (reentrant in the thread that holds it; raises ``RunLockedError``)."""
        return _Lock.hold(self.root / LOCK_FILE)

    @staticmethod
    def reserve(root: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
        """Hold the lock of the run at ``root`` (made if missing) before anything slow, so that a second
        writer is refused at once rather than after a model load; a folder this made and that nothing else
        was written into is removed at the end. ``NotARunError`` for a folder that cannot become a run."""
        Run.check_can_create(root)
        return reserve(root, "run")

    # -- run.json --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.name

    @property
    def is_reference(self) -> bool:
        """A reference set of real images (``import --kind reference``, the demo's photos): never model output,
        so never stamped as AI-generated and always the baseline of a comparison."""
        gen = self.info.get("generation") or {}
        return gen.get("kind") == "reference" or bool(gen.get("reference_set"))

    @property
    def info(self) -> dict[str, Any]:
        try:
            info = json.loads((self.root / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise NotARunError(f"{self.root / RUN_FILE} is unreadable: {e}") from e
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise NotARunError(f"{self.root / RUN_FILE} is not a diffaudit run file")
        return info

    def update_info(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Merge ``fields`` into run.json (nested dicts merge one level deep) atomically."""
        with self.lock():
            info = self.info
            for key, value in fields.items():
                if isinstance(value, dict) and isinstance(info.get(key), dict):
                    info[key] = {**info[key], **value}
                else:
                    info[key] = value
            atomic_write_text(self.root / RUN_FILE, json.dumps(info, indent=2, default=str) + "\n")
            return info

    def record_stage(self, stage: str, *, seconds: float, **details: Any) -> None:
        """Record that a stage finished, with its wall time (shown by ``runs show``, read by ``audit run``)."""
        entry = {"finished": now(), "seconds": round(float(seconds), 3), **details}
        self.update_info({"stages": {stage: entry}})

    def stage_done(self, stage: str) -> bool:
        return stage in self.info.get("stages", {})

    # -- paths -----------------------------------------------------------------------------------
    def path(self, relative: str | os.PathLike) -> Path:
        """Resolve a path recorded in a table, refusing anything that leaves the run folder."""
        p = (self.root / relative).resolve()
        if not p.is_relative_to(self.root):
            raise SchemaError(f"path {relative!r} leaves the run folder {self.root}")
        return p

    def image_relpath(self, prompt_id: str, seed: int) -> str:
        return f"images/{check_name(prompt_id, 'prompt_id')}/{int(seed)}.png"

    def image_path(self, prompt_id: str, seed: int) -> Path:
        return self.root / self.image_relpath(prompt_id, seed)

    def table_path(self, table: str) -> Path:
        parts = table.split("/")
        for part in parts:
            check_name(part, "table name part")
        _schema.schema_for(table)
        return self.root.joinpath(*parts[:-1], parts[-1] + ".parquet")

    # -- tables ----------------------------------------------------------------------------------
    def has_table(self, table: str) -> bool:
        return self.table_path(table).is_file()

    def tables(self) -> list[str]:
        """Names of the known tables present in this run (other parquet files are not ours to read)."""
        found = []
        for p in sorted(self.root.rglob("*.parquet")):
            rel = p.relative_to(self.root).with_suffix("").as_posix()
            try:
                _schema.schema_for(rel)
            except SchemaError:
                continue
            found.append(rel)
        return found

    def write_table(self, table: str, df: pd.DataFrame) -> Path:
        """Validate and write a table atomically (under the run lock)."""
        arrow = _schema.to_arrow(table, df)
        path = self.table_path(table)
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink)
        with self.lock():
            atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return path

    def read_table(self, table: str) -> pd.DataFrame:
        """Read and check a table; a missing table is an empty frame with the schema's columns."""
        path = self.table_path(table)
        if not path.is_file():
            return _schema.schema_for(table).empty_table().to_pandas()
        try:
            # One open handle: by path, pyarrow takes the size and the bytes in two steps, and a writer's
            # atomic replace in between gives it a torn read (47% of reads under a busy writer, measured).
            with open(path, "rb") as f:
                arrow = pq.read_table(f)
        except (OSError, pa.ArrowException) as e:
            raise SchemaError(f"{path} is not a readable parquet table: {e}") from e
        # Integer columns with nulls stay exact (Python ints and None), not float64: a 63-bit seed survives.
        return _schema.check_arrow(table, arrow, str(path)).to_pandas(integer_object_nulls=True)

    def append_rows(self, table: str, df: pd.DataFrame, *, key: str | None = None) -> pd.DataFrame:
        """Append rows to a table atomically; with ``key``, a new row replaces an old one with the same key."""
        with self.lock():
            old = self.read_table(table)
            frames = [f for f in (old, df) if len(f)]
            merged = pd.concat(frames, ignore_index=True) if frames else df
            if key is not None:
                merged = merged.drop_duplicates(subset=[key], keep="last").reset_index(drop=True)
            self.write_table(table, merged)
            return merged

    # -- resume ----------------------------------------------------------------------------------
    def completed_images(self) -> set[str]:
        """image_ids recorded in ``generations`` whose file exists with the recorded sha256."""
        done = set()
        gens = self.read_table("generations")
        for image_id, rel, digest in zip(gens["image_id"], gens["path"], gens["sha256"], strict=True):
            p = self.path(rel)
            if p.is_file() and sha256_file(p) == digest:
                done.add(image_id)
        return done

    def images(self) -> pd.DataFrame:
        """The generations table with an absolute ``file`` column, for stages that read images."""
        gens = self.read_table("generations")
        gens["file"] = [str(self.path(p)) for p in gens["path"]]
        return gens


def list_runs(runs_dir: str | os.PathLike) -> list[Run]:
    """Runs directly inside ``runs_dir`` (or ``runs_dir`` itself if it is a run)."""
    runs_dir = Path(runs_dir)
    if Run.is_run(runs_dir):
        return [Run(runs_dir)]
    if not runs_dir.is_dir():
        return []
    return [Run(p) for p in sorted(runs_dir.iterdir()) if p.is_dir() and Run.is_run(p)]
