"""Reliability: one writer per index, bounded memory on decompression bombs, escaped Markdown, confined
dashboard paths, one-line errors for bad input, and no temp files left behind by killed writers."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffaudit.cli import main
from diffaudit.errors import InputError, RunLockedError
from diffaudit.runs import Run, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("DIFFAUDIT_MAX_PIXELS", None)
BOMB_SIDE = 10_000  # 100 megapixels: over the 64 MP cap, under Pillow's own refusal (2 x 89 MP)
RSS_BOUND_MB = 60  # what a refused bomb may cost; decoding this one costs 100 MB (mode 1) to 400 MB (RGB)


# -- helpers ---------------------------------------------------------------------------------------
def bomb_png(path: Path, side: int = BOMB_SIDE) -> Path:
    """A real, fully decodable black 1-bit PNG of side x side pixels that weighs about 15 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    assert path.stat().st_size < 64_000
    return path


def noise_pngs(folder: Path, n: int, seed: int, size: int = 48) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size)).save(p)
        out.append(p)
    return out


def peak_rss(setup: str, call: str) -> dict:
    """Run ``call`` in a fresh interpreter after ``setup``; how much its peak RSS grew (MB) and how it ended."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) peak and would hide growth
    code = "\n".join([
        "import json, re",
        "def peak():",
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))",
        setup,
        "before = peak()",
        "try:",
        f"    result = {call}",
        "    outcome = 'returned ' + repr(result)[:200]",
        "except Exception as e:",
        "    outcome = type(e).__name__ + ': ' + str(e)",
        "after = peak()",
        "print(json.dumps({'grew_mb': (after - before) / 1024, 'outcome': outcome}))",
    ])
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The error line a command ended with (progress bars may come before it; no traceback may)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err[-2000:]
    return errors[0]


def diffaudit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffaudit", *args]


# -- 1. one writer per index -----------------------------------------------------------------------
def test_a_second_index_build_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    """Two real processes: A is paused (SIGSTOP) right after it created the index, B then builds into the same
    folder. B must be refused naming A; A then finishes, and the index holds exactly what each build says."""
    a = noise_pngs(tmp_path / "a", 600, seed=1)  # two units (512 files each)
    b = noise_pngs(tmp_path / "b", 40, seed=2)
    out = tmp_path / "idx"
    build = ["index", "build", "--workers", "1", "--out", str(out)]
    first = subprocess.Popen(diffaudit_cmd(*build, str(tmp_path / "a")), env=ENV, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "meta.json").exists():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(diffaudit_cmd(*build, str(tmp_path / "b")), env=ENV, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        first.send_signal(signal.SIGCONT)
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2, second.stdout[-500:] + second.stderr[-2000:]
    line = one_line_error(second.stderr)
    assert f"index {out.resolve()} is locked by pid {first.pid}" in line

    check = subprocess.run(diffaudit_cmd("index", "info", str(out), "--check"), env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr
    report = json.loads(check.stdout)
    assert report["count"] == len(a) and report["check"]["ok"] and report["check"]["rehashed"] > 0
    # B again, alone: now it is appended, and every image of both builds is found under its own file.
    assert subprocess.run(diffaudit_cmd(*build, str(tmp_path / "b")), env=ENV, cwd=tmp_path,
                          capture_output=True, timeout=300).returncode == 0
    from audit.memorization.hashing import get_hasher
    from audit.memorization.index import Index

    index = Index.open(out)
    assert index.count == len(a) + len(b)
    files = [str(p.resolve()) for p in a + b]
    codes, good, _ = get_hasher("phash").hash_files(files)
    qi, ids, _ = index.search(codes, 0)
    items = index.items(ids)
    found = {files[good[q]] for q, src in zip(qi, items["source"], strict=True) if src == files[good[q]]}
    assert found == set(files)


def _two_shard_index(tmp_path: Path) -> Path:
    from audit.memorization.build import build_index

    noise_pngs(tmp_path / "a", 30, seed=3)
    noise_pngs(tmp_path / "b", 30, seed=4)
    noise_pngs(tmp_path / "c", 12, seed=5)
    out = tmp_path / "idx"
    for src in ("a", "b", "c"):
        build_index([str(tmp_path / src)], str(out), workers=1, progress=False)
    return out


def _check(index: Path, capsys) -> tuple[int, dict, str]:
    code, out, err = cli(["index", "info", str(index), "--check"], capsys)
    return code, json.loads(out)["check"], err


def test_index_check_passes_a_sound_index_and_finds_damaged_shards(tmp_path, capsys):
    import shutil
    import tarfile

    from audit.memorization.build import build_index

    out = _two_shard_index(tmp_path)
    code, report, _ = _check(out, capsys)
    assert code == 0 and report["ok"] and report["problems"] == [] and report["rehashed"] == 3 * 8
    # tar members are hashed again from their offsets; a hash parquet's own codes are taken as they are
    sound = tmp_path / "sound"
    shutil.copytree(out, sound)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for p in noise_pngs(tmp_path / "t", 5, seed=12):
            tar.add(p, arcname=f"{p.stem}.png")
    pd.DataFrame({"key": ["k"], "phash": ["0123456789abcdef"],
                  "uri": [str(tmp_path / "t" / "0000.png")]}).to_parquet(tmp_path / "h.parquet")
    build_index([str(tmp_path / "shard.tar"), str(tmp_path / "h.parquet")], str(sound), progress=False)
    code, report, _ = _check(sound, capsys)
    assert code == 0 and report["ok"] and report["shards"] == 5 and report["rehashed"] == 3 * 8 + 5, report

    def damaged(name: str, copies: dict[str, str]) -> Path:
        bad = tmp_path / name
        shutil.copytree(out, bad)
        for dst, src in copies.items():
            shutil.copy(out / src, bad / dst)
        return bad

    # items and identities of another build, codes of this one: only hashing the sources again sees it
    swapped = damaged("swapped", {"items/000000.parquet": "items/000001.parquet",
                                  "idents/000000.npy": "idents/000001.npy"})
    code, report, err = _check(swapped, capsys)
    assert code == 1 and not report["ok"]
    assert any(p.startswith("shard 000000: 8 of 8 sampled codes are not the hash") for p in report["problems"])
    assert any("indexed in more than one shard" in p for p in report["problems"])
    assert "is damaged" in one_line_error(err)
    # items of a shard with another count
    short = damaged("short", {"items/000001.parquet": "items/000002.parquet"})
    code, report, _ = _check(short, capsys)
    assert code == 1 and "shard 000001: meta.json says 30 items but it holds 30 codes, 12 items" in report["problems"]
    # identities that are not the items'
    idents = damaged("idents", {"idents/000002.npy": "idents/000000.npy"})
    code, report, _ = _check(idents, capsys)
    assert code == 1 and any(p.startswith("shard 000002: its identities are not those of its items")
                             for p in report["problems"])


def test_appending_on_top_of_an_index_another_writer_changed_is_refused(tmp_path):
    from audit.memorization.index import ITEMS, Index

    def rows(tag: str) -> pd.DataFrame:
        return pd.DataFrame([{"key": f"{tag}{i}", "uri": None, "caption": None, "source": f"/x/{tag}{i}.png",
                              "member": None, "offset": None, "size": None, "variant": "full"} for i in range(3)],
                            columns=ITEMS.names)

    Index.create(tmp_path / "idx", "phash")
    one, two = Index.open(tmp_path / "idx"), Index.open(tmp_path / "idx")
    one.append(np.arange(3, dtype=np.uint64), rows("a"), unit="u1", counts={"indexed": 3})
    with pytest.raises(InputError, match="changed by another writer"):
        two.append(np.arange(3, dtype=np.uint64) + 10, rows("b"), unit="u2", counts={"indexed": 3})
    again = Index.open(tmp_path / "idx")
    assert again.count == 3 and list(again.items(np.arange(3))["key"]) == ["a0", "a1", "a2"]


# -- 6. leftover temp files ------------------------------------------------------------------------
KILLED_WRITER = textwrap.dedent("""\
    import os, signal, sys
    from diffaudit.runs import Run, atomic_write_bytes

    kind, target = sys.argv[1], sys.argv[2]
    if kind == "index":  # killed between the first temp file's write and its rename
        from audit.memorization.build import build_index
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        build_index([sys.argv[3]], target, workers=1, progress=False)
    run = Run.open(target)
    with run.lock():
        clip, summary = run.read_table("probes/clip"), run.read_table("bias/summary")
        os.replace = lambda src, dst: None  # each rename is lost, as when a writer is killed just before it
        run.update_info({"x": 1})
        run.write_table("probes/clip", clip)
        run.write_table("bias/summary", summary)
        atomic_write_bytes(run.root / "provenance/stamped/p/1.png", b"png")
        os.kill(os.getpid(), signal.SIGKILL)
    """)


def _kill_mid_write(kind: str, target: Path, arg: str = "") -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(target), arg], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp"))


def test_temp_files_of_killed_writers_are_removed_when_the_lock_is_next_taken(tmp_path):
    from fixtures_runs import BASE_SHARES, build_run

    run = build_run(tmp_path / "full", shares=dict(list(BASE_SHARES.items())[:2]), images_per_prompt=2, size=32)
    _kill_mid_write("run", run.root)
    left = _temp_files(run.root)
    assert [Path(p).parent.as_posix() for p in left] == [".", "bias", "probes", "provenance/stamped/p"], left
    keep = [run.root / "probes" / "notes.tmp", run.root / "bias" / ".summary.parquet.tmp",
            run.root / "probes" / ".clip.parquet.toolong123.tmp"]  # not atomic_write_bytes' names: not ours
    for p in keep:
        p.write_text("user file")
    subprocess.run(diffaudit_cmd("report", str(run.root)), env=ENV, check=True, capture_output=True, timeout=300)
    assert _temp_files(run.root) == sorted(str(p.relative_to(run.root)) for p in keep if p.name.startswith("."))
    assert all(p.read_text() == "user file" for p in keep)
    assert "x" not in run.info and len(run.read_table("probes/clip"))  # the old files stand, whole

    # the index: a build killed at its first rename leaves a folder with the lock and a temp file only
    noise_pngs(tmp_path / "train", 5, seed=6)
    _kill_mid_write("index", tmp_path / "idx", str(tmp_path / "train"))
    left = _temp_files(tmp_path / "idx")
    assert len(left) == 1 and left[0].startswith(".meta.json."), left
    done = subprocess.run(diffaudit_cmd("index", "build", str(tmp_path / "train"), "--out", str(tmp_path / "idx")),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _temp_files(tmp_path / "idx") == [] and json.loads(done.stdout)["count"] == 5


def test_a_live_writers_temp_files_are_never_touched(tmp_path):
    run = Run.create(tmp_path / "r")
    hold = textwrap.dedent("""\
        import sys, time
        from diffaudit.runs import Run
        run = Run.open(sys.argv[1])
        with run.lock():
            open(run.root / ".run.json.abcd1234.tmp", "w").write("in flight")
            print("locked", flush=True)
            time.sleep(60)
        """)
    proc = subprocess.Popen([sys.executable, "-c", hold, str(run.root)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            run.update_info({"x": 1})
        assert (run.root / ".run.json.abcd1234.tmp").read_text() == "in flight"
    finally:
        proc.kill()
        proc.wait()
    run.update_info({"x": 1})  # the holder is gone: its leftover goes
    assert not (run.root / ".run.json.abcd1234.tmp").exists() and run.info["x"] == 1


# -- 2. decompression bombs ------------------------------------------------------------------------
def test_a_suite_whose_source_image_is_a_bomb_is_refused_from_its_header(tmp_path, capsys):
    bomb_png(tmp_path / "bomb.png")
    suite = tmp_path / "bomb.yaml"
    suite.write_text(textwrap.dedent("""\
        name: bomb
        description: an edit whose source claims 100 megapixels
        sources: ["test"]
        edits:
          - {id: b, mode: img2img, prompt: "a photo", source: bomb.png, strength: 0.5}
        """))
    got = peak_rss("from prompts.suites import load_suite", f"load_suite({str(suite)!r})")
    assert got["outcome"].startswith("SuiteError") and "over the cap of 64,000,000" in got["outcome"], got
    assert got["grew_mb"] < RSS_BOUND_MB, got
    code, _, err = cli(["suites", "show", str(suite)], capsys)
    assert code == 2 and "bomb.yaml:5: field 'edits.0.source'" in one_line_error(err)
    code, _, err = cli(["generate", "--suite", str(suite), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "DIFFAUDIT_MAX_PIXELS" in one_line_error(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("call", [
    "load_source(BOMB)",                              # an img2img / inpaint source (generation, provenance)
    "make_mask(BOMB, (64, 64))",                      # an inpainting mask
    "prepare(BOMB, None, (64, 64))",
])
def test_generation_sources_and_masks_refuse_bombs_in_bounded_memory(tmp_path, call):
    bomb = bomb_png(tmp_path / "bomb.png")
    got = peak_rss(f"from generate.sources import load_source, make_mask, prepare\nBOMB = {str(bomb)!r}", call)
    assert got["outcome"].startswith("ImageTooLarge") and "100,000,000 pixels" in got["outcome"], got
    assert got["grew_mb"] < RSS_BOUND_MB, got


def test_index_sources_and_report_thumbnails_skip_bombs_in_bounded_memory(tmp_path):
    noise_pngs(tmp_path / "train", 2, seed=7)
    bomb_png(tmp_path / "train" / "bomb.png")
    got = peak_rss("from audit.memorization.build import build_index",
                   f"build_index([{str(tmp_path / 'train')!r}], {str(tmp_path / 'idx')!r}, workers=1, "
                   "progress=False)['counts']")
    assert "'skipped_too_large': 1" in got["outcome"] and "'indexed': 2" in got["outcome"], got
    assert got["grew_mb"] < RSS_BOUND_MB, got
    got = peak_rss("from diffaudit.report import _thumb", f"_thumb({str(tmp_path / 'train' / 'bomb.png')!r})")
    assert got["outcome"] == "returned b''" and got["grew_mb"] < RSS_BOUND_MB, got


def test_the_pixel_cap_can_be_raised_and_lowered(tmp_path, monkeypatch):
    """DIFFAUDIT_MAX_PIXELS moves the cap both ways, above Pillow's own ~179 MP refusal too."""
    from diffaudit.imaging import ImageTooLarge, image_size, open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # raising our cap raises Pillow's
    header = tmp_path / "big.png"
    big = bomb_png(tmp_path / "full.png", 15_000).read_bytes()
    header.write_bytes(big[:33] + big[-12:])  # IHDR + IEND: the header claims 225 MP, no pixel data
    with pytest.raises(ImageTooLarge, match="DIFFAUDIT_MAX_PIXELS"):
        image_size(header)
    monkeypatch.setenv("DIFFAUDIT_MAX_PIXELS", "300_000_000")
    assert image_size(header) == (15_000, 15_000)
    small = noise_pngs(tmp_path / "s", 1, seed=8, size=64)[0]
    assert open_image(small).size == (64, 64)
    monkeypatch.setenv("DIFFAUDIT_MAX_PIXELS", "4000")
    with pytest.raises(ImageTooLarge, match="4,096 pixels is over the cap of 4,000"):
        open_image(small)


# -- 3. Markdown escaping --------------------------------------------------------------------------
EVIL = ("<script>alert(1)</script> ![t](https://evil.example/t.png) [c](javascript:alert(2)) "
        "<img src=x onerror=alert(3)> <https://evil.example/auto> \\<b>x</b>")


def test_report_md_shows_third_party_text_literally(tmp_path):
    from fixtures_runs import BASE_SHARES, build_run
    from markdown_it import MarkdownIt

    from diffaudit.report import build_report

    run = build_run(tmp_path / "r[x](javascript:alert(0))", shares=dict(list(BASE_SHARES.items())[:3]),
                    images_per_prompt=2, size=32)
    run.update_info({"generation": {"model": EVIL, "suite": EVIL, "model_revision": "`" + EVIL}})
    matches = run.read_table("memorization/matches")
    matches["train_key"] = EVIL  # index keys come from user-supplied hash parquet files
    run.write_table("memorization/matches", matches)
    clip = run.read_table("probes/clip")
    clip.loc[clip["abstained"], "abstain_reason"] = EVIL
    run.write_table("probes/clip", clip)
    md_path, html_path = build_report(run.root)
    rendered = MarkdownIt("commonmark").enable("table").render(md_path.read_text())
    tags = set(re.findall(r"</?([A-Za-z][A-Za-z0-9]*)", rendered))
    assert tags <= {"h1", "h2", "h3", "p", "table", "thead", "tbody", "tr", "th", "td", "em", "strong", "code"}, tags
    assert not re.findall(r"<[^>]*(?:src|href|on\w+)=", rendered)  # no attribute that loads or runs anything
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered  # shown, as text
    assert rendered.count("[c](javascript:alert(2))") >= 4  # model, suite, key, reason: literal, never a link
    page = html_path.read_text()
    assert "<script" not in page and "href=" not in page and "&lt;script&gt;alert(1)" in page
    assert all(src.startswith("data:image/png;base64,") for src in page.split('src="')[1:])


# -- 4. the dashboard stays inside the runs root ----------------------------------------------------
def test_dashboard_refuses_a_run_json_symlinked_out_of_its_run(tmp_path):
    from dashboard import data

    root = tmp_path / "runs"
    Run.create(root / "good")
    outside = Run.create(tmp_path / "outside", {"generation": {"model": "secret-model"}})
    (root / "linked").mkdir()
    (root / "linked" / "run.json").symlink_to(outside.root / "run.json")
    sibling = root / "sibling"  # run.json of another run in the same root: still not this run's
    sibling.mkdir()
    (sibling / "run.json").symlink_to(root / "good" / "run.json")
    assert data.run_names(root.resolve()) == ["good"]
    for name in ("linked", "sibling"):
        with pytest.raises(data.PathRefusedError, match="run.json"):
            data.open_run(name, root.resolve())
    assert "secret-model" not in data.overview(root.resolve()).to_string()
    # a runs root that is itself a run with an outside run.json shows nothing
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "run.json").symlink_to(outside.root / "run.json")
    assert data.run_names((tmp_path / "alone").resolve()) == []
    with pytest.raises(data.PathRefusedError):
        data.open_run("alone", (tmp_path / "alone").resolve())


# -- 5. one-line errors, nothing left behind ---------------------------------------------------------
def test_a_binary_suite_file_is_a_one_line_error(tmp_path, capsys):
    suite = tmp_path / "bin.yaml"
    suite.write_bytes(bytes(range(256)) * 4)
    code, _, err = cli(["suites", "show", str(suite)], capsys)
    assert code == 2 and "not a YAML text file" in one_line_error(err)
    code, _, err = cli(["generate", "--suite", str(suite), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "not a YAML text file" in one_line_error(err)
    assert not (tmp_path / "run").exists()  # the folder generate reserved is gone again


def _limit_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))  # a refused size allocates nothing near this


def test_a_huge_size_is_refused_before_anything_is_written_and_a_sane_run_follows(tmp_path, capsys):
    out = tmp_path / "run"
    # in a child under a 16 GB address-space limit: unchecked, this size asks for 40 GB of noise
    proc = subprocess.run(diffaudit_cmd("generate", "--suite", "demo", "--size", "100000x100000", "-n", "1",
                                        "--steps", "1", "--subjects", "nurse", "--edits", "", "--no-progress",
                                        "--out", str(out)),
                          env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_limit_address_space)
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2 and "--size" in line and "DIFFAUDIT_MAX_PIXELS" in line and not out.exists()
    code, out_text, err = cli(["generate", "--suite", "demo", "--size", "32", "-n", "1", "--steps", "1",
                               "--subjects", "nurse", "--edits", "", "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err[-2000:]
    assert "1 images generated" in out_text and len(Run.open(out).read_table("generations")) == 1


def test_bad_index_sources_are_one_line_errors_and_leave_no_folder(tmp_path, capsys):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file at all")
    code, _, err = cli(["index", "build", str(junk), "--out", str(tmp_path / "idx")], capsys)
    assert code == 2 and "junk.parquet is not a readable parquet file" in one_line_error(err)
    assert not (tmp_path / "idx").exists()
    good = noise_pngs(tmp_path / "imgs", 1, seed=9)[0]
    code, _, err = cli(["index", "build", str(good), "--out", str(tmp_path / "idx"), "--hash", "nope"], capsys)
    assert code == 2 and "unknown hash 'nope'" in one_line_error(err) and not (tmp_path / "idx").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"not a png")
    code, _, err = cli(["index", "build", str(empty), "--out", str(tmp_path / "idx")], capsys)
    assert code == 2 and "no usable images" in one_line_error(err) and not (tmp_path / "idx").exists()


def test_a_symlink_loop_in_an_index_source_folder_is_counted_not_a_traceback(tmp_path, capsys):
    folder = tmp_path / "imgs"
    noise_pngs(folder, 2, seed=10)
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "sub").symlink_to(".")  # a folder loop: never followed
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    code, out, err = cli(["index", "build", str(folder), "--out", str(tmp_path / "idx"), "--workers", "1"], capsys)
    assert code == 0, err[-2000:]
    counts = json.loads(out)["counts"]
    assert counts["indexed"] == 2 and counts["skipped_unreadable"] == 1 and counts["skipped_missing"] == 1
    code, _, err = cli(["index", "build", str(folder / "loop.jpg"), "--out", str(tmp_path / "i2")], capsys)
    assert code == 2 and "does not exist" in one_line_error(err)


# -- 9. smaller ----------------------------------------------------------------------------------------
PERMISSION_CHILD = textwrap.dedent("""\
    import json, os, sys
    from audit.memorization.build import hash_unit
    from audit.memorization.sources import Unit
    good, denied = sys.argv[1], sys.argv[2]
    unit = Unit("files", files=(good, denied), root=os.path.dirname(good))
    hash_unit(Unit("files", files=(good,), root=os.path.dirname(good)), "phash")  # imports done as root
    if os.geteuid() == 0:  # root reads any file: become nobody to meet a permission error
        os.setgid(65534)
        os.setuid(65534)
    print(json.dumps(hash_unit(unit, "phash")[2]))
    """)


def test_a_permission_denied_training_image_is_counted_as_such_not_as_corrupt():
    folder = Path(tempfile.mkdtemp(prefix="diffaudit-perm-"))  # not under pytest's 0700 tmp root
    try:
        folder.chmod(0o755)
        good, denied = noise_pngs(folder, 2, seed=11)
        good.chmod(0o644)
        denied.chmod(0)
        proc = subprocess.run([sys.executable, "-c", PERMISSION_CHILD, str(good), str(denied)], env=ENV, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts = json.loads(proc.stdout.strip().splitlines()[-1])
        assert counts == {"seen": 2, "indexed": 1, "skipped_permission": 1, "square_crops": 0}, counts
    finally:
        for p in folder.iterdir():
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)
            p.unlink()
        folder.rmdir()


def test_a_second_generate_is_refused_before_its_model_loads(tmp_path, capsys, monkeypatch):
    from generate import runner

    run = Run.create(tmp_path / "run")
    hold = "import sys, time\nfrom diffaudit.runs import Run\nwith Run.open(sys.argv[1]).lock():\n" \
           "    print('locked', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", hold, str(run.root)], env=ENV, stdout=subprocess.PIPE, text=True)
    loads: list[str] = []
    real = runner.load_pipelines
    monkeypatch.setattr(runner, "load_pipelines", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    try:
        assert proc.stdout.readline().strip() == "locked"
        code, _, err = cli(["generate", "--suite", "demo", "--out", str(run.root), "--no-progress"], capsys)
    finally:
        proc.kill()
        proc.wait()
    assert code == 2 and f"run {run.root} is locked by pid {proc.pid}" in one_line_error(err)
    assert loads == []  # refused before the model was loaded


def test_an_atomic_write_killed_in_a_fresh_folder_does_not_block_the_next_writer(tmp_path):
    """A folder holding only the lock and a killed writer's temp file is as good as empty."""
    folder = tmp_path / "new-run"
    folder.mkdir()
    (folder / ".lock").write_text("pid 1 since then")
    atomic_write_bytes(folder / "x", b"1")
    os.rename(folder / "x", folder / ".run.json.abcd1234.tmp")
    Run.check_can_create(folder)
    run = Run.create(folder)
    assert not (folder / ".run.json.abcd1234.tmp").exists() and run.info["format"] == "diffaudit-run"
