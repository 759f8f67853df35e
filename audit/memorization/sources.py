"""Training-image sources: folders/globs of images, webdataset/img2dataset tar shards, hash parquets.

A source spec is planned into *units* (a chunk of files, one tar shard, one hash parquet) that a worker
reads alone, so units run in parallel (local processes or Ray) and a build resumes unit by unit.
Tar shards are read streaming with ``tarfile`` and never extracted: member names only become keys
(sanitized), never paths. Corrupt, truncated, non-image and oversized members are skipped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow.parquet as pq
from PIL import Image

from diffaudit.errors import InputError
from diffaudit.imaging import ImageTooLarge, UnreadableImage, open_image

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_MEMBER_BYTES = 64 << 20      # tar members larger than this are skipped unread
FILES_PER_UNIT = 512
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class SkipImage(Exception):
    """An input that is not a usable image; ``reason`` becomes a ``skipped_<reason>`` count."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NoSuchImageFile(InputError):
    """A path given as an image names no file (missing, or a folder): a wrong path, not a corrupt image.

    ``reason`` is the ``skipped_<reason>`` count when an index build meets one (a file gone mid-build)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes | str | os.PathLike, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode bytes or a file into a loaded PIL image, or raise ``SkipImage`` (``NoSuchImageFile`` when a
    path names no file, so that callers say "no such file" rather than "corrupt").

    Decoding is ``diffaudit.imaging.open_image``'s (the one decode policy: the header's size against the
    pixel cap before any pixel is decoded). ``draft`` asks the JPEG decoder for a grayscale image scaled
    down by a power of two but no smaller than the given size (several times faster for hashing). Skip
    reasons: ``too_large``, ``not_image``, ``corrupt``, ``permission`` (a file this user may not read) and
    ``unreadable`` (another error opening it, e.g. a symlink loop).
    """
    if isinstance(data, bytes | bytearray | memoryview):
        return _decode(bytes(data), "<bytes>", draft)
    try:
        f = open(data, "rb")  # closed below, once the pixels are loaded
    except FileNotFoundError:
        raise NoSuchImageFile(f"no such file: {data}; check the path", "missing") from None
    except IsADirectoryError:
        raise NoSuchImageFile(f"{data} is a folder, not an image file; pass an image's path", "not_file") from None
    except PermissionError:
        raise SkipImage("permission") from None
    except OSError:
        raise SkipImage("unreadable") from None
    with f:
        return _decode(f, str(data), draft)


def _decode(src: bytes | BinaryIO, name: str, draft: tuple[int, int] | None) -> Image.Image:
    try:
        return open_image(src, name=name, draft=draft)  # type: ignore[arg-type]  (Pillow takes a file)
    except (ImageTooLarge, UnreadableImage) as e:  # a malformed $DIFFAUDIT_MAX_PIXELS is no skip: it raises
        raise SkipImage(e.reason) from None


def safe_key(name: str) -> tuple[str, bool]:
    """A webdataset key from a member name (basename up to its first dot), made safe; True if it changed.

    ``../../etc/x.jpg`` becomes ``etc/x``: '.', '..' and empty parts are dropped and characters outside
    ``[A-Za-z0-9_.-]`` become '_'. Keys are labels only; nothing is ever written at such a path.
    """
    raw = name.split("/")
    raw[-1] = raw[-1].split(".", 1)[0] or raw[-1]
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if parts:
        parts[-1] = parts[-1].split(".", 1)[0] or parts[-1]
    key = "/".join(_UNSAFE.sub("_", p) for p in parts) or "_"
    return key, key != "/".join(raw)


def file_key(name: str) -> str:
    """A key usable as one file name (evidence images): '/' and unsafe characters become '_'."""
    key = _UNSAFE.sub("_", name.replace("/", "__")).strip("._") or "_"
    if len(key) > 120:
        key = key[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return key


@dataclass(frozen=True)
class Unit:
    """One piece of work read by one worker: ``files`` (a chunk), ``tar`` (a shard) or ``hashes``."""

    kind: str
    path: str = ""                          # tar shard or hash parquet
    files: tuple[str, ...] = ()             # absolute image paths (kind "files")
    root: str = ""                          # folder the file keys are relative to
    meta: str | None = None                 # img2dataset parquet beside a shard (key, url, caption)

    @property
    def uid(self) -> str:
        """A stable identity, recorded in the index so that a rerun skips finished units."""
        if self.kind == "files":
            digest = hashlib.sha1("\n".join(self.files).encode()).hexdigest()[:16]
            return f"files:{self.root}:{len(self.files)}:{digest}"
        st = os.stat(self.path)
        return f"{self.kind}:{self.path}:{st.st_size}:{int(st.st_mtime)}"


@dataclass
class Record:
    """One training image read from a unit, before hashing."""

    key: str
    data: bytes | str                       # bytes (tar member) or a file path
    uri: str | None = None
    caption: str | None = None
    source: str = ""                        # file that holds the image (image file or tar shard)
    member: str | None = None               # tar member name (kept verbatim as metadata)
    offset: int | None = None               # byte offset of the member's data in an uncompressed tar
    size: int | None = None


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _image_files(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                found.append(os.path.join(dirpath, name))
    return found


def _tar_unit(path: Path) -> Unit:
    meta = path.with_suffix(".parquet") if path.suffix == ".tar" else None
    return Unit("tar", path=os.path.realpath(path),
                meta=os.path.realpath(meta) if meta and meta.is_file() else None)


def _file_units(files: list[str], root: Path) -> list[Unit]:
    # realpath, not Path.resolve: a symlink loop among the files must not stop the plan (it is counted
    # as skipped_unreadable when read), and for every other path the two agree
    files = [os.path.realpath(f) for f in files]
    return [Unit("files", files=tuple(files[i:i + FILES_PER_UNIT]), root=os.path.realpath(root))
            for i in range(0, len(files), FILES_PER_UNIT)]


def plan(specs: list[str]) -> list[Unit]:
    """Turn source specs into units. A folder holding ``*.tar`` is a shard folder, else an image folder;
    a ``.tar``/``.tar.gz`` file is a shard; a ``.parquet`` file holds precomputed hashes; a glob expands."""
    if not specs:
        raise InputError("no sources given; pass image folders, globs, .tar shards or hash .parquet files")
    units: list[Unit] = []
    for spec in specs:
        paths = sorted(glob.glob(spec)) if _is_glob(spec) else [spec]
        if not paths or not all(os.path.exists(p) for p in paths):
            raise InputError(f"source {spec!r} does not exist; pass an image folder, a glob, a .tar or a .parquet")
        loose: list[str] = []
        for p in map(Path, paths):
            if p.is_dir():
                shards = [s for s in sorted(p.glob("*.tar")) + sorted(p.glob("*.tar.gz")) if s.is_file()]
                units += [_tar_unit(s) for s in shards] if shards else _file_units(_image_files(p), p)
            elif p.name.endswith((".tar", ".tar.gz", ".tgz")):
                units.append(_tar_unit(p))
            elif p.suffix == ".parquet":
                read_hash_schema(p)  # a file that is no parquet fails here, before the index folder exists
                units.append(Unit("hashes", path=os.path.realpath(p)))
            elif p.suffix.lower() in IMAGE_EXTS:
                loose.append(str(p))
            else:
                raise InputError(f"source {str(p)!r} is not an image, folder, .tar shard or .parquet")
        if loose:
            units += _file_units(loose, Path(os.path.commonpath([os.path.dirname(os.path.abspath(f))
                                                                 for f in loose])))
    if not units:
        raise InputError(f"no images found in {', '.join(specs)}; check the paths and extensions")
    return units


def read_hash_schema(path: str | os.PathLike) -> list[str]:
    """The column names of a hash parquet, or ``InputError`` (one line) if it is not a readable parquet."""
    import pyarrow as pa

    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path} is not a readable parquet file of hashes ({str(e).splitlines()[0]}); "
                         "pass a parquet with a 'key' column and a hash column") from None


def _tar_metadata(meta: str | None) -> dict[str, tuple[str | None, str | None]]:
    """key -> (url, caption) from an img2dataset parquet beside a shard (missing columns are None)."""
    if not meta:
        return {}
    try:
        table = pq.read_table(meta)
    except Exception:  # noqa: BLE001 - a broken sidecar only loses metadata
        return {}
    cols = table.column_names
    if "key" not in cols:
        return {}
    keys = [str(k) for k in table.column("key").to_pylist()]
    urls = table.column("url").to_pylist() if "url" in cols else [None] * len(keys)
    caps = table.column("caption").to_pylist() if "caption" in cols else [None] * len(keys)
    return {k: (u, c) for k, u, c in zip(keys, urls, caps, strict=True)}


def iter_tar(path: str, meta: str | None, counts: Counter) -> Iterator[Record]:
    """Stream a webdataset/img2dataset shard: one record per image member, grouped with its .txt/.json."""
    import json

    side = _tar_metadata(meta)
    plain = path.endswith(".tar")
    pending: Record | None = None
    texts: dict[str, dict[str, str]] = {}

    def finish(rec: Record) -> Record:
        extra = texts.pop(rec.key, {})
        url, cap = side.get(rec.key, (None, None))
        if "json" in extra:
            try:
                info = json.loads(extra["json"])
                url = url or info.get("url")
                cap = cap or info.get("caption")
            except (ValueError, AttributeError):
                pass
        rec.uri = url or rec.uri
        rec.caption = cap if cap is not None else extra.get("txt")
        return rec

    try:
        with tarfile.open(path, mode="r|" if plain else "r|*") as tar:
            for m in tar:
                if not m.isfile():
                    counts["skipped_not_file"] += 1
                    continue
                key, changed = safe_key(m.name)
                ext = os.path.splitext(m.name)[1].lower()
                if pending is not None and pending.key != key:
                    yield finish(pending)
                    pending = None
                if ext in (".txt", ".json"):
                    f = tar.extractfile(m)
                    if f is not None and m.size < (1 << 20):
                        texts.setdefault(key, {})[ext[1:]] = f.read().decode("utf-8", errors="replace")
                    continue
                if ext not in IMAGE_EXTS:
                    counts["skipped_not_image"] += 1
                    continue
                counts["seen"] += 1
                if changed:
                    counts["unsafe_names"] += 1
                if m.size > MAX_MEMBER_BYTES:
                    counts["skipped_too_large"] += 1
                    continue
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                if pending is not None:  # a second image under the same key
                    yield finish(pending)
                pending = Record(key=key, data=data, uri=f"{path}#{m.name}", source=path, member=m.name,
                                 offset=m.offset_data if plain else None, size=m.size)
    except (tarfile.TarError, OSError, EOFError):
        counts["corrupt_shards"] += 1
    if pending is not None:
        yield finish(pending)


def iter_files(unit: Unit, counts: Counter) -> Iterator[Record]:
    for f in unit.files:
        counts["seen"] += 1
        rel = os.path.relpath(f, unit.root) if unit.root else os.path.basename(f)
        yield Record(key=Path(rel).as_posix(), data=f, uri=f, source=f)


def load_train_image(source: str, member: str | None, offset: int | None, size: int | None) -> Image.Image:
    """Read one indexed training image back (for confirmation and evidence), or raise ``SkipImage``."""
    if not source or not os.path.exists(source):
        raise SkipImage("missing")
    if member is None:
        return decode_image(source)
    if offset is not None and size is not None and source.endswith(".tar"):
        with open(source, "rb") as f:
            f.seek(offset)
            return decode_image(f.read(size))
    with tarfile.open(source, mode="r|*") as tar:
        for m in tar:
            if m.isfile() and m.name == member:
                f = tar.extractfile(m)
                return decode_image(f.read() if f else b"")
    raise SkipImage("missing")
