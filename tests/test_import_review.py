"""Defects a review of ``diffaudit import`` found with inputs the first tests did not use: deep-bit images
(16-bit grey PNG, 16-bit and float TIFF), text that is not UTF-8 encodable, sources with nothing importable,
manifest columns named twice, subject names outside ASCII. Images are purpose-made or from the corpus's
``test`` split (no threshold is tuned here)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from diffaudit import imaging
from diffaudit.corpus import corpus
from diffaudit.errors import InputError
from diffaudit.runs import Run
from generate.importer import import_run, plan_import


def cli(*args: str) -> None:
    from diffaudit.cli import main

    try:
        main([*map(str, args)])
    except SystemExit as e:
        if e.code:
            raise


def grey8() -> np.ndarray:
    """A textured 8-bit grey image (the corpus's test split), the reference the deep versions must match."""
    sample = next(corpus(1, split="test", seed=5, min_side=96, max_side=96, kinds=["texture"]))
    return np.asarray(Image.fromarray(sample.rgb).convert("L"))


def deep_files(folder) -> dict[str, np.ndarray]:
    """The same picture as a 16-bit grey PNG, a 16-bit grey TIFF and a float TIFF in [0, 1]."""
    g = grey8()
    folder.mkdir()
    Image.fromarray(g.astype(np.uint16) * 257).save(folder / "grey16.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(folder / "grey16.tif")
    Image.fromarray(g.astype(np.float32) / 255, mode="F").save(folder / "float.tif")
    for name in ("grey16.png", "grey16.tif"):
        assert Image.open(folder / name).mode.startswith("I;16")
    assert Image.open(folder / "float.tif").mode == "F"
    return {"grey16.png": g, "grey16.tif": g, "float.tif": g}


def test_deep_bit_images_decode_to_their_picture_not_to_white_or_black(tmp_path):
    for name, want in deep_files(tmp_path / "deep").items():
        got = np.asarray(imaging.open_image(tmp_path / "deep" / name, mode="RGB")).astype(int)
        assert got.shape == (*want.shape, 3)
        assert np.abs(got - want[..., None]).max() <= 1, name   # was 255 everywhere (16-bit) or 0 (float)
        assert imaging.phash(imaging.open_image(tmp_path / "deep" / name)) == imaging.phash(Image.fromarray(want))


def test_deep_bit_images_are_imported_as_8_bit_pngs_every_stage_reads_alike(tmp_path):
    want = deep_files(tmp_path / "deep")
    s = import_run(tmp_path / "run", tmp_path / "deep", progress=False)
    assert s["imported"] == 3 and s["converted"] == 3   # the 16-bit PNG too: probes decode it with Pillow
    run = Run.open(tmp_path / "run")
    for row in run.read_table("generations").itertuples():
        name = row.original_path.rsplit("/", 1)[1]
        stored = Image.open(run.path(row.path))
        assert stored.format == "PNG" and stored.mode in ("L", "RGB"), name
        assert np.abs(np.asarray(stored.convert("RGB")).astype(int) - want[name][..., None]).max() <= 1, name


def test_text_that_utf8_cannot_hold_is_a_one_line_error_naming_the_row(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(grey8()).save(img)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.png"}) + "\n" + '{"path": "a.png", "prompt": "a \\ud800 nurse"}\n')
    with pytest.raises(SystemExit) as e:
        cli("import", manifest, "--out", tmp_path / "run", "--no-progress")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: m.jsonl line 2: prompt") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_source_with_nothing_importable_is_an_error_and_leaves_no_run(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_text("not an image")
    (src / "b.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        cli("import", src, "--out", tmp_path / "run", "--no-progress")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "none of the 2 file(s)" in err and "2 not an image" in err
    assert not (tmp_path / "run").exists()
    # a rerun of a run that exists and has nothing new is no error
    Image.fromarray(grey8()).save(src / "c.png")
    cli("import", src, "--out", tmp_path / "run", "--no-progress")
    cli("import", src, "--out", tmp_path / "run", "--no-progress")
    assert len(Run.open(tmp_path / "run").read_table("generations")) == 1


@pytest.mark.parametrize("header", ["path,seed,path", "path,seed,Path", "path,Seed,seed "])
def test_a_column_named_twice_is_an_error_not_a_silent_pick(tmp_path, header):
    for name in ("a.png", "b.png"):
        Image.fromarray(grey8()).save(tmp_path / name)
    manifest = tmp_path / "m.csv"
    manifest.write_text(header + "\na.png,1,b.png\n" if header != "path,Seed,seed " else header + "\na.png,1,2\n")
    with pytest.raises(InputError, match="more than once"):
        plan_import(manifest)


def test_subjects_outside_ascii_keep_a_name(tmp_path):
    src = tmp_path / "src"
    for i, subject in enumerate(["Café owner", "看護師", "Ärztin", "cafe owner"]):
        (src / subject).mkdir(parents=True)
        buf = io.BytesIO()
        Image.fromarray(np.roll(grey8(), 7 * i, axis=1)).save(buf, format="PNG")
        (src / subject / "x.png").write_bytes(buf.getvalue())
    plan = plan_import(src)
    subjects = {item.file.parent.name: item.subject for item in plan.items}
    assert subjects["Café owner"] == subjects["cafe owner"] == "cafe_owner"   # was caf_owner
    assert subjects["Ärztin"] == "arztin"
    assert subjects["看護師"] and list(subjects.values()).count(subjects["看護師"]) == 1
    s = import_run(tmp_path / "run", src, progress=False)   # was refused: "has no letters or digits"
    assert s["imported"] == 4


def test_file_and_folder_names_that_are_not_utf8_are_imported_and_recorded(tmp_path):
    import os

    src = tmp_path / "src"
    src.mkdir()
    names = [os.fsdecode(b"\xff\xfe.png"), "ok.png", os.path.join(os.fsdecode(b"sub\xff"), "x.png"),
             os.path.join(os.fsdecode(b"sub\xfe"), "y.png")]
    for i, name in enumerate(names):
        (src / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.roll(grey8(), 11 * i, axis=0)).save(src / name, format="PNG")
    s = import_run(tmp_path / "run", src, progress=False)   # was a UnicodeEncodeError after copying files
    assert s["imported"] == 4
    g = Run.open(tmp_path / "run").read_table("generations")
    assert any(p.endswith("\\xff\\xfe.png") for p in g["original_path"])
    assert len(set(g["subject"])) == 3   # the two undecodable folders stay two subjects
    assert import_run(tmp_path / "run", src, progress=False)["skipped"] == {"already_imported": 4}


def test_long_subject_and_template_names_fit_in_a_folder_name(tmp_path):
    src = tmp_path / "src"
    for i, subject in enumerate(["a" * 250, "a" * 249 + "b"]):   # both only differ past any cut
        (src / subject).mkdir(parents=True)
        Image.fromarray(np.roll(grey8(), 5 * i, axis=1)).save(src / subject / "x.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(src / ("a" * 250) / "x.png"), "subject": "b" * 240,
                                    "template": "t" * 200}) + "\n")
    s = import_run(tmp_path / "run", src, progress=False)   # was OSError: File name too long
    assert s["imported"] == 2
    assert import_run(tmp_path / "run2", manifest, progress=False)["imported"] == 1
    subjects = set(Run.open(tmp_path / "run").read_table("generations")["subject"])
    assert len(subjects) == 2 and all(len(x) <= 64 for x in subjects)


def test_a_padded_file_and_an_oversized_source_image_are_refused_without_reading_them(tmp_path, monkeypatch):
    from test_reliability import peak_rss

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(grey8()).save(src / "ok.png")
    Image.fromarray(np.roll(grey8(), 3, axis=0)).save(src / "padded.png")
    with open(src / "padded.png", "r+b") as f:   # a valid 96x96 PNG, then 3 GB (sparse: no disk used)
        f.truncate(3 << 30)
    out = tmp_path / "run"
    result = peak_rss("from generate.importer import import_run",
                      f"import_run({str(out)!r}, {str(src)!r}, progress=False, workers=2)")
    assert result["grew_mb"] < 300, result   # was a 3 GB read (MemoryError under a memory limit)
    assert "'too_large': 1" in result["outcome"] and "'imported': 1" in result["outcome"], result
    # a source image over the cap is a planning error naming the row, before any file is copied
    Image.fromarray(grey8()).resize((200, 200)).save(tmp_path / "big_source.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(src / "ok.png"), "source_image": "big_source.png"}) + "\n")
    monkeypatch.setenv("DIFFAUDIT_MAX_PIXELS", str(150 * 150))
    with pytest.raises(InputError, match=r"m.jsonl line 1: source_image: .*over the cap"):
        plan_import(tmp_path / "m.jsonl")


def test_the_runs_page_shows_a_run_name_from_the_disk_as_text(tmp_path, monkeypatch):
    from fixtures_runs import open_app

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(grey8()).save(src / "a.png")
    root = tmp_path / "![x](https:evil.example)"   # the runs root is itself a run: its name is not filtered
    import_run(root, src, progress=False)
    at = open_app(root, [root.name], monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert [h.value for h in at.subheader] == ["\\!\\[x\\](https:evil.example)"]   # was rendered as an image


def test_a_csv_field_over_the_csv_modules_limit_is_a_one_line_error(tmp_path):
    Image.fromarray(grey8()).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text('path,prompt\na.png,ok\na.png,"' + "x" * 200_000 + '"\n')
    with pytest.raises(InputError, match=r"m.csv line 3: not a CSV row"):   # was _csv.Error: field larger than ...
        plan_import(tmp_path / "m.csv")


@pytest.mark.parametrize("line", ['{"path": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                  '{"path": "a.png", "seed": ' + "9" * 5000 + "}"], ids=["nested", "long-number"])
def test_jsonl_python_cannot_parse_is_a_one_line_error(tmp_path, line):
    Image.fromarray(grey8()).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png"}\n' + line + "\n")
    with pytest.raises(InputError, match=r"m.jsonl line 2: not JSON"):   # was RecursionError / ValueError
        plan_import(tmp_path / "m.jsonl")


def test_a_photo_whose_exif_turns_it_upright_is_imported_upright(tmp_path):
    """Phone and camera photos store pixels as the sensor read them and an EXIF orientation that viewers
    apply; the probes decode pixels as stored, so a sideways face was no face (measured: Haar found the
    astronaut upright, not in the same photo stored sideways with orientation 6)."""
    from conftest import skimage_photo
    from PIL import ImageOps

    src = tmp_path / "src"
    src.mkdir()
    upright = skimage_photo("astronaut", 128).crop((0, 0, 128, 96))
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90 clockwise to view"
    upright.transpose(Image.Transpose.ROTATE_90).save(src / "phone.jpg", quality=95, exif=exif.tobytes())
    assert ImageOps.exif_transpose(Image.open(src / "phone.jpg")).size == upright.size
    s = import_run(tmp_path / "run", src, progress=False)
    assert s["converted"] == 1
    run = Run.open(tmp_path / "run")
    row = run.read_table("generations").iloc[0]
    stored = Image.open(run.path(row["path"]))
    assert stored.size == upright.size == (row["width"], row["height"])
    diff = np.abs(np.asarray(stored.convert("RGB")).astype(int) - np.asarray(upright).astype(int))
    assert diff.mean() < 4   # the picture as viewers show it (JPEG loss aside), not turned by 90 degrees
