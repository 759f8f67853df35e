"""The run folder contract: atomic tables, schema checks, the lock, resume detection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from diffaudit import runs as runs_mod
from diffaudit.errors import NotARunError, RunLockedError, SchemaError
from diffaudit.runs import Run, list_runs, sha256_file


def _probe_rows(n: int, label: str = "woman") -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": [f"img-{i}" for i in range(n)], "face_index": [-1] * n, "attribute": ["perceived_gender"] * n,
        "label": [label] * n, "score": [0.9] * n, "margin": [0.5] * n, "abstained": [False] * n,
        "probe": ["clip"] * n, "probe_version": ["1"] * n,
    })


def test_create_open_and_info(tmp_path):
    run = Run.create(tmp_path / "r", {"generation": {"model": "tiny"}})
    assert Run.open(tmp_path / "r").info["generation"] == {"model": "tiny"}
    run.update_info({"generation": {"steps": 2}})
    assert run.info["generation"] == {"model": "tiny", "steps": 2}  # nested dicts merge
    run.record_stage("generate", seconds=1.23456, images=3)
    assert run.stage_done("generate") and run.info["stages"]["generate"]["seconds"] == 1.235
    assert [r.name for r in list_runs(tmp_path)] == ["r"]


def test_open_refuses_non_runs(tmp_path):
    with pytest.raises(NotARunError):
        Run.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotARunError, match="not a diffaudit run"):
        Run.open(tmp_path / "plain")
    (tmp_path / "plain" / "run.json").write_text("{broken")
    with pytest.raises(NotARunError, match="unreadable"):
        Run.open(tmp_path / "plain")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(NotARunError, match="non-empty folder"):
        Run.create(tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]  # nothing written


def test_table_roundtrip_fills_optional_columns(tmp_path):
    run = Run.create(tmp_path / "r")
    run.write_table("probes/clip", _probe_rows(3))
    back = run.read_table("probes/clip")
    assert list(back["label"]) == ["woman"] * 3
    assert back["abstain_reason"].isna().all() and back["bbox"].isna().all()
    assert run.tables() == ["probes/clip"]
    assert len(run.read_table("probes/faces")) == 0  # missing table reads as empty with the columns
    assert "abstained" in run.read_table("probes/faces").columns


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.drop(columns=["label", "attribute"]), "missing required column"),
    (lambda df: df.assign(extra=1), "unknown column"),
    (lambda df: df.assign(face_index=["x", "y", "z"]), "probes/clip"),
    (lambda df: df.assign(image_id=[None, "a", "b"]), "non-nullable"),
])
def test_schema_violations_leave_old_table(tmp_path, mutate, message):
    run = Run.create(tmp_path / "r")
    run.write_table("probes/clip", _probe_rows(3))
    before = run.table_path("probes/clip").read_bytes()
    with pytest.raises(SchemaError, match=message):
        run.write_table("probes/clip", mutate(_probe_rows(3, "man")))
    assert run.table_path("probes/clip").read_bytes() == before


def test_unknown_table_and_unsafe_names(tmp_path):
    run = Run.create(tmp_path / "r")
    with pytest.raises(SchemaError, match="unknown table"):
        run.write_table("whatever", _probe_rows(1))
    with pytest.raises(SchemaError, match="safe name"):
        run.table_path("probes/../../x")
    with pytest.raises(SchemaError, match="leaves the run"):
        run.path("../outside.png")
    with pytest.raises(SchemaError, match="safe name"):
        run.image_path("../evil", 1)


def test_crash_between_temp_and_replace_keeps_old_table(tmp_path, monkeypatch):
    run = Run.create(tmp_path / "r")
    run.write_table("probes/clip", _probe_rows(2))
    before = run.table_path("probes/clip").read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before replace")

    monkeypatch.setattr(runs_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        run.write_table("probes/clip", _probe_rows(5, "man"))
    monkeypatch.undo()
    assert run.table_path("probes/clip").read_bytes() == before
    assert len(run.read_table("probes/clip")) == 2
    leftovers = [p.name for p in run.table_path("probes/clip").parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_schema_version_mismatch_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = Run.create(tmp_path / "r")
    path = run.write_table("probes/clip", _probe_rows(1))
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"diffaudit.schema_version": b"999"}), path)
    with pytest.raises(SchemaError, match="schema version 999"):
        run.read_table("probes/clip")
    pq.write_table(pa.table({"a": [1]}), path)
    with pytest.raises(SchemaError, match="schema version missing"):
        run.read_table("probes/clip")


def test_append_rows_replaces_by_key(tmp_path):
    run = Run.create(tmp_path / "r")
    run.append_rows("probes/clip", _probe_rows(2), key="image_id")
    merged = run.append_rows("probes/clip", _probe_rows(3, "man"), key="image_id")
    assert len(merged) == 3 and set(merged["label"]) == {"man"}


HOLD_LOCK = """
import sys, time
from diffaudit.runs import Run
run = Run.open(sys.argv[1])
with run.lock():
    print("locked", flush=True)
    time.sleep(60)
"""


def _hold_lock_in_subprocess(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_blocks_second_writer_and_stale_lock_is_taken_over(tmp_path):
    run = Run.create(tmp_path / "r")
    run.write_table("probes/clip", _probe_rows(1))
    proc = _hold_lock_in_subprocess(run.root)
    try:
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            run.write_table("probes/clip", _probe_rows(4))
        assert len(run.read_table("probes/clip")) == 1  # nothing half-written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killed holder's lock is gone: the OS released its flock
    run.write_table("probes/clip", _probe_rows(4))
    assert len(run.read_table("probes/clip")) == 4


def test_lock_is_reentrant_in_one_process(tmp_path):
    run = Run.create(tmp_path / "r")
    with run.lock(), run.lock():
        run.write_table("probes/clip", _probe_rows(1))
    with run.lock():  # released after the outer block
        pass


def test_lock_refuses_another_thread_of_the_same_process(tmp_path):
    """flock is per open file, so a second thread would slip in: it is refused like a second process."""
    import threading

    run = Run.create(tmp_path / "r")
    errors: list[Exception] = []

    def write():
        try:
            run.write_table("probes/clip", _probe_rows(4))
        except RunLockedError as e:
            errors.append(e)

    with run.lock():
        t = threading.Thread(target=write)
        t.start()
        t.join()
        run.write_table("probes/clip", _probe_rows(1))  # the holder still writes, reentrantly
    assert len(errors) == 1 and "another thread of this process" in str(errors[0])
    assert len(run.read_table("probes/clip")) == 1
    t = threading.Thread(target=write)  # released: another thread may now take it
    t.start()
    t.join()
    assert len(errors) == 1 and len(run.read_table("probes/clip")) == 4


def test_completed_images_checks_files_and_hashes(photo_run):
    gens = photo_run.read_table("generations")
    assert photo_run.completed_images() == set(gens["image_id"])
    first, second = (photo_run.path(p) for p in gens["path"][:2])
    first.unlink()  # missing file
    second.write_bytes(second.read_bytes() + b"x")  # changed content
    done = photo_run.completed_images()
    assert done == set(gens["image_id"][2:])
    assert sha256_file(photo_run.path(gens["path"][2])) == gens["sha256"][2]


def test_run_json_is_valid_json_after_many_updates(tmp_path):
    run = Run.create(tmp_path / "r")
    for i in range(20):
        run.update_info({"counter": i, "stages": {f"s{i}": {"seconds": i}}})
    info = json.loads((run.root / "run.json").read_text())
    assert info["counter"] == 19 and len(info["stages"]) == 20
    assert not [p for p in os.listdir(run.root) if p.endswith(".tmp")]


def test_tables_are_readable_by_others_and_stray_parquet_is_ignored(tmp_path):
    import stat

    run = Run.create(tmp_path / "r")
    path = run.write_table("probes/clip", _probe_rows(1))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((run.root / "run.json").stat().st_mode) == 0o666 & ~umask
    (run.root / "notes.parquet").write_bytes(b"not ours")
    (run.root / "images").mkdir(exist_ok=True)
    assert run.tables() == ["probes/clip"]


def test_reads_never_tear_while_a_writer_replaces_the_table(tmp_path):
    """The dashboard and a resuming test read tables while a stage rewrites them; an atomic replace must
    never show a reader a torn file (by path, pyarrow failed on about half of such reads)."""
    import threading

    run = Run.create(tmp_path / "r")
    run.write_table("probes/clip", _probe_rows(1))
    stop = threading.Event()

    def writer():
        n = 1
        while not stop.is_set():
            n = n % 40 + 1
            run.write_table("probes/clip", _probe_rows(n))

    t = threading.Thread(target=writer)
    t.start()
    reader = Run.open(run.root)  # no lock taken: readers never lock
    try:
        deadline = time.monotonic() + 3
        reads = 0
        while time.monotonic() < deadline:
            seen = reader.read_table("probes/clip")
            assert 1 <= len(seen) <= 40
            # one whole version of the table, never a mix: _probe_rows(n) exactly, for some n
            assert seen["image_id"].tolist() == [f"img-{i}" for i in range(len(seen))]
            reads += 1
    finally:
        stop.set()
        t.join()
    assert reads > 20
