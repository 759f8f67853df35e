"""Decompression bombs (issue 12 item 2): a ~50 KB PNG whose header claims 20000x20000 pixels is refused by
``stamp`` (files and runs), ``verify`` and the dashboard's verify upload from its header, in bounded memory.
Each check runs in a fresh process that first does the same work on a small image (so imports and caches
are paid), then on the bomb, and reports how much its peak RSS grew: decoding the bomb would need >= 400 MB
(one byte per pixel), 1.2 GB as RGB."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIDE = 20_000
#: Allowed growth of the peak RSS (MB) between the small image and the bomb.
BOUND_MB = 150


def bomb_png(path: Path, side: int = SIDE) -> None:
    """A valid 1-bit grayscale PNG of ``side`` x ``side`` zero pixels, compressed row by row (~50 KB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


_CLI_SIDE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from diffaudit.errors import InputError
from provenance.keys import init_identity
from provenance.stamp import stamp_files, stamp_run
from provenance.verify import verify_paths
from conftest import make_photo_run
tmp = Path({tmp!r})
ident = init_identity(tmp / "id")
small, bomb = tmp / "small.png", tmp / "bomb.png"
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def work(img, tag):
    out = {{}}
    try:
        stamp_files([img], tmp / f"out-{{tag}}", identity=ident, store=tmp / "s.sqlite")
        out["stamp_files"] = "stamped"
    except InputError as e:
        out["stamp_files"] = str(e)
    r = verify_paths([img], store=tmp / "s.sqlite", default_store=False)[0]
    out["verify"] = r.problem or r.conclusion
    run = make_photo_run(tmp / f"run-{{tag}}", ("astronaut",), size=256)
    run.path(run.read_table("generations")["path"][0]).write_bytes(img.read_bytes())
    try:
        stamp_run(run.root, identity=ident, store=tmp / "s.sqlite")
        out["stamp_run"] = "stamped"
    except InputError as e:
        out["stamp_run"] = str(e)
    return out
work(small, "small")
before = peak()
t0 = time.perf_counter()
out = work(bomb, "bomb")
print(json.dumps({{"before_mb": before, "after_mb": peak(), "seconds": time.perf_counter() - t0, **out}}))
"""

_DASHBOARD_SIDE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import os
from pathlib import Path
os.environ["DIFFAUDIT_RUNS_DIR"] = {runs!r}
from streamlit.testing.v1 import AppTest
tmp = Path({tmp!r})
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
at = AppTest.from_file({app!r}, default_timeout=120)
at.run()
at.switch_page("views/provenance.py").run()
at.file_uploader(key="verify_upload").set_value(("small.png", (tmp / "small.png").read_bytes(), "image/png")).run()
assert not at.exception, [e.value for e in at.exception]
before = peak()
t0 = time.perf_counter()
at.file_uploader(key="verify_upload").set_value(("bomb.png", (tmp / "bomb.png").read_bytes(), "image/png")).run()
texts = [w.value for w in at.warning] + [e.value for e in at.error] + [i.value for i in at.info]
print(json.dumps({{"before_mb": before, "after_mb": peak(), "seconds": time.perf_counter() - t0,
                  "exceptions": [e.value for e in at.exception], "texts": texts}}))
"""


@pytest.fixture
def files(tmp_path):
    from conftest import png_bytes, skimage_photo

    bomb_png(tmp_path / "bomb.png")
    (tmp_path / "small.png").write_bytes(png_bytes(skimage_photo("coffee", 256)))
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    return tmp_path


def _run(code: str, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "DIFFAUDIT_HOME": str(tmp / "home"),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stamp_and_verify_refuse_a_bomb_in_bounded_memory(files):
    res = _run(_CLI_SIDE.format(root=str(ROOT), tmp=str(files)), files)
    cap = "DIFFAUDIT_MAX_PIXELS"  # the one-line cap message of diffaudit.imaging (it says how to raise the cap)
    assert cap in res["verify"]
    assert cap in res["stamp_files"] and "bomb.png" in res["stamp_files"]
    assert cap in res["stamp_run"] and "images" in res["stamp_run"]          # names the run's file
    assert res["after_mb"] - res["before_mb"] < BOUND_MB, res
    assert not (files / "out-bomb").exists()                                  # refused before writing anything


def test_dashboard_upload_refuses_a_bomb_in_bounded_memory(files, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    app = str(ROOT / "dashboard" / "app.py")
    res = _run(_DASHBOARD_SIDE.format(root=str(ROOT), tmp=str(files), runs=str(runs), app=app), files)
    assert res["exceptions"] == []
    assert any("DIFFAUDIT_MAX_PIXELS" in t for t in res["texts"]), res["texts"]
    assert res["after_mb"] - res["before_mb"] < BOUND_MB, res
