"""Defects a review of the reliability work found: an index whose meta.json or shard files were damaged by
hand must give one-line errors (never a traceback, never a file read outside the index) from every command
that reads it, and ``index info --check`` must see items without keys; the dashboard shows an unknown suite
as unknown, not as the text "None"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_reliability import _two_shard_index, cli, one_line_error


@pytest.fixture(scope="module")
def sound_index(tmp_path_factory) -> Path:
    return _two_shard_index(tmp_path_factory.mktemp("idx"))


def damaged_copy(sound: Path, tmp_path: Path, damage) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(sound, bad)
    damage(bad)
    return bad


def edit_meta(edit):
    def damage(root: Path) -> None:
        meta = json.loads((root / "meta.json").read_text())
        edit(meta)
        (root / "meta.json").write_text(json.dumps(meta))
    return damage


def _shard(i: int, **fields):
    return lambda meta: meta["shards"][i].update(fields)


@pytest.mark.parametrize("damage", [
    edit_meta(_shard(1, count="x")),
    edit_meta(_shard(1, count=-3)),
    edit_meta(_shard(1, count=True)),
    edit_meta(_shard(1, name="../../../outside")),
    edit_meta(_shard(1, name=7)),
    edit_meta(_shard(1, unit=None)),
    edit_meta(lambda meta: meta.update(count="many")),
], ids=["count-text", "count-negative", "count-bool", "name-traversal", "name-number", "unit-null", "total-text"])
def test_a_meta_json_with_bad_shard_fields_is_a_one_line_error_everywhere(sound_index, tmp_path, capsys, damage):
    bad = damaged_copy(sound_index, tmp_path, damage)
    outside = tmp_path / "outside.npy"  # what a traversing shard name would make the index load
    np.save(outside, np.zeros(30, np.uint64))
    query = sorted((sound_index.parent / "a").glob("*.png"))[0]
    for args in (["index", "info", str(bad)], ["index", "info", str(bad), "--check"],
                 ["index", "query", "--index", str(bad), str(query)]):
        code, _, err = cli(args, capsys)
        assert code == 2, (args, err[-1500:])
        assert "meta.json" in one_line_error(err)


@pytest.mark.parametrize("damage", [
    lambda root: (root / "codes" / "000001.npy").unlink(),
    lambda root: np.save(root / "codes" / "000001.npy", np.array([{"a": 1}] * 30, dtype=object), allow_pickle=True),
    lambda root: (root / "codes" / "000001.npy").write_bytes(b"\x93NUMPY garbage"),
], ids=["codes-deleted", "codes-pickled", "codes-garbage"])
def test_damaged_shard_files_are_a_one_line_error_from_query(sound_index, tmp_path, capsys, damage):
    bad = damaged_copy(sound_index, tmp_path, damage)
    query = sorted((sound_index.parent / "a").glob("*.png"))[0]
    code, _, err = cli(["index", "query", "--index", str(bad), str(query)], capsys)
    assert code == 2, err[-1500:]
    line = one_line_error(err)
    assert "000001" in line and "index info --check" in line


def test_index_check_finds_items_without_keys(sound_index, tmp_path, capsys):
    def null_keys(root: Path) -> None:
        path = root / "items" / "000001.parquet"
        t = pq.read_table(path)
        i = t.column_names.index("key")
        pq.write_table(t.set_column(i, pa.field("key", pa.string()), pa.nulls(t.num_rows, pa.string())), path)

    bad = damaged_copy(sound_index, tmp_path, null_keys)
    code, out, _ = cli(["index", "info", str(bad), "--check"], capsys)
    report = json.loads(out)["check"]
    assert code == 1 and any(p.startswith("shard 000001: 30 item(s) have no key") for p in report["problems"])


def test_the_dashboard_shows_an_unknown_suite_as_unknown(tmp_path):
    from PIL import Image

    from dashboard import data
    from generate.importer import import_run

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / "a.png")
    import_run(tmp_path / "runs" / "imp", src, progress=False)
    row = data.runs_overview(str(tmp_path / "runs"), ()).iloc[0]
    assert (row["suite"], row["model"]) == ("-", "-")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a folder nobody can create files in (/proc)")
@pytest.mark.parametrize("command", [["import", "{src}"], ["index", "build", "{src}"],
                                     ["generate", "--suite", "demo", "--model", "tiny"]])
def test_an_out_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys, command):
    from test_reliability import noise_pngs

    noise_pngs(tmp_path / "src", 2, seed=1)
    args = [a.format(src=tmp_path / "src") for a in command] + ["--out", "/proc/diffaudit-review/run"]
    code, _, err = cli(args, capsys)
    assert code == 2 and "cannot create" in one_line_error(err), err[-1500:]


def test_taking_a_runs_lock_leaves_a_nested_writers_temp_files_alone(tmp_path):
    """An index built inside a run folder (``--out runs/r/idx``) is another writer's folder: the run's
    cleanup of killed writers' temp files must not pull the index builder's file from under it."""
    import subprocess
    import sys
    import textwrap

    from test_reliability import ENV

    from diffaudit.runs import Run

    run = Run.create(tmp_path / "r")
    (run.root / "probes").mkdir()
    (run.root / "probes" / ".clip.parquet.abcd1234.tmp").write_text("a killed writer's")
    nested = run.root / "idx"
    hold = textwrap.dedent("""\
        import sys, time
        from pathlib import Path
        from diffaudit.runs import folder_lock
        with folder_lock(sys.argv[1], "index"):
            (Path(sys.argv[1]) / ".meta.json.abcd1234.tmp").write_text("in flight")
            print("locked", flush=True)
            time.sleep(60)
        """)
    nested.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", hold, str(nested)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        (run.root / ".lock").write_text("pid 1 since then")  # the run's last holder was another process
        run.update_info({"x": 1})
        assert not (run.root / "probes" / ".clip.parquet.abcd1234.tmp").exists()
        assert (nested / ".meta.json.abcd1234.tmp").read_text() == "in flight"
    finally:
        proc.kill()
        proc.wait()


def test_hash_parquet_rows_without_a_key_are_skipped_and_counted(tmp_path):
    from audit.memorization.build import build_index
    from audit.memorization.index import Index

    pq.write_table(pa.table({"key": ["a", None, " ", "d"], "phash": ["0123456789abcdef", "fedcba9876543210",
                                                                   "00ff00ff00ff00ff", "0f0f0f0f0f0f0f0f"]}),
                   tmp_path / "h.parquet")
    build_index([str(tmp_path / "h.parquet")], str(tmp_path / "idx"), progress=False)
    index = Index.open(tmp_path / "idx")
    assert index.items(np.arange(index.count))["key"].tolist() == ["a", "d"]   # was also the key "None"
    assert index.meta["counts"]["skipped_no_key"] == 2
