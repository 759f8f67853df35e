"""Importing images made elsewhere: folders and manifests become runs with their bytes and hashes, bad
rows are one-line errors naming the row, embedded C2PA credentials from another signer are judged and kept,
and every stage (bias, memorization, stamp, report, dashboard) works on the result; a reference run of
real images compares with a model run."""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes, skimage_photo
from PIL import Image

from diffaudit.errors import InputError
from diffaudit.runs import Run, sha256_file
from generate.importer import import_run

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def cli(*args: str) -> None:
    """Run the CLI in this process (``SystemExit`` on errors, as from a shell)."""
    from diffaudit.cli import main

    try:
        main([*map(str, args)])
    except SystemExit as e:
        if e.code:
            raise


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def astronaut_variant(i: int, factor: float = 1.0, size: int = 256) -> bytes:
    """A crop of scikit-image's astronaut (a face the Haar detector finds), shifted by ``i``, brightness x ``factor``."""
    img = skimage_photo("astronaut").crop((10 * i, 5 * i, 10 * i + 400, 5 * i + 400)).resize((size, size))
    arr = (np.asarray(img).astype(float) * factor).clip(0, 255).astype(np.uint8)
    return png_bytes(Image.fromarray(arr))


def sign_as_another_tool(data: bytes, identity_dir: Path) -> bytes:
    """``data`` with a C2PA manifest as another generator would embed it (its own claim generator and software
    agent), signed by a separate test identity."""
    import c2pa

    from provenance.c2pa import make_signer
    from provenance.keys import init_identity

    identity = init_identity(identity_dir, common_name="Acme Imagine signer")
    definition = {
        "claim_generator_info": [{"name": "Acme Imagine", "version": "2.1"}],
        "title": "acme.png",
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
            "action": "c2pa.created", "digitalSourceType": TRAINED,
            "softwareAgent": {"name": "acme-diffusion", "version": "3"}}]}}],
    }
    builder = c2pa.Builder(definition, context=c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    out = io.BytesIO()
    builder.sign(make_signer(identity), "image/png", io.BytesIO(data), out)
    return out.getvalue()


def with_extra_png_chunk(data: bytes) -> bytes:
    """A PNG with a tEXt chunk added before IEND: still a valid image, but not the bytes that were signed."""
    body = b"tEXt" + b"Comment\x00edited after signing"
    chunk = len(body[4:]).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


def gens_of(run_dir: Path) -> pd.DataFrame:
    g = Run.open(run_dir).read_table("generations")
    return g.assign(name=[Path(p).name for p in g["original_path"]]).set_index("name")


# -- folders ---------------------------------------------------------------------------------------

def test_flat_folder_keeps_bytes_skips_and_counts_bad_files_and_adds_only_new_ones(tmp_path, monkeypatch):
    src = tmp_path / "dalle"
    src.mkdir()
    astronaut = png_bytes(skimage_photo("astronaut", 128))
    (src / "a.png").write_bytes(astronaut)
    (src / "b.jpg").write_bytes(jpeg_bytes(skimage_photo("coffee", 128)))
    skimage_photo("chelsea", 128).save(src / "c.bmp")
    (src / "d.png").write_bytes(astronaut)                       # the same image twice
    (src / "notes.txt").write_text("the prompts I used")          # not an image
    (src / "broken.png").write_bytes(astronaut[: len(astronaut) // 2])  # truncated
    (src / "big.png").write_bytes(png_bytes(skimage_photo("camera", 400)))  # over the cap set below
    (src / ".DS_Store").write_bytes(b"\0junk")                    # hidden: not an import candidate
    monkeypatch.setenv("DIFFAUDIT_MAX_PIXELS", str(300 * 300))
    out = tmp_path / "run"

    s = import_run(out, src, model="dall-e-3", progress=False)

    assert (s["found"], s["imported"]) == (7, 3)
    assert s["skipped"] == {"corrupt": 1, "duplicate": 1, "not_image": 1, "too_large": 1}
    g = gens_of(out)
    assert sorted(g.index) == ["a.png", "b.jpg", "c.bmp"]
    run = Run.open(out)
    for name in ("a.png", "b.jpg"):  # PNG and JPEG are kept byte for byte (an embedded manifest survives)
        stored = run.path(g.loc[name, "path"])
        assert stored.read_bytes() == (src / name).read_bytes()
        assert stored.suffix == Path(name).suffix and g.loc[name, "sha256"] == g.loc[name, "original_sha256"]
    bmp = g.loc["c.bmp"]  # converted to PNG, same pixels; both hashes kept
    assert bmp["path"].endswith(".png") and bmp["original_sha256"] == sha256_file(src / "c.bmp")
    assert bmp["sha256"] == sha256_file(run.path(bmp["path"])) != bmp["original_sha256"]
    assert np.array_equal(np.asarray(Image.open(run.path(bmp["path"])).convert("RGB")),
                          np.asarray(Image.open(src / "c.bmp").convert("RGB")))
    assert set(g["subject"]) == {"unspecified"} and set(g["template"]) == {"imported"}
    assert set(g["model"]) == {"dall-e-3"} and set(g["model_source"]) == {"option"}
    for unknown in ("seed", "scheduler", "steps", "guidance", "prompt", "mode", "seconds"):
        assert g[unknown].isna().all(), unknown  # unknown, never a default
    assert (g["width"] == 128).all() and set(g["origin"]) == {"imported"}
    assert run.completed_images() == set(g["image_id"])
    assert run.info["generation"]["model"] == "dall-e-3" and run.info["stages"]["import"]["imported"] == 3

    (src / "e.png").write_bytes(png_bytes(skimage_photo("rocket", 128)))
    again = import_run(out, src, model="dall-e-3", progress=False)
    assert again["imported"] == 1 and again["skipped"]["already_imported"] == 4  # a, b, c and a's twin d
    g2 = gens_of(out)
    assert len(g2) == 4 and g2.loc["e.png", "index"] == 3
    assert (g2.drop(index="e.png")["image_id"] == g["image_id"]).all()  # ids are stable across reruns


def test_per_subject_folders_map_onto_a_suite_with_its_prompts(tmp_path):
    src = tmp_path / "midjourney"
    for folder, photos in {"Nurse": ("astronaut", "coffee"), "software developer": ("chelsea",), "CEO": ("rocket",)}.items():
        (src / folder).mkdir(parents=True)
        for p in photos:
            (src / folder / f"{p}.png").write_bytes(png_bytes(skimage_photo(p, 96)))
    out = tmp_path / "run"
    import_run(out, src, suite="occupations", template="heim_face", model="midjourney-6", progress=False)
    g = gens_of(out)
    assert g.loc["coffee.png", "subject"] == "nurse" and g.loc["chelsea.png", "subject"] == "software_developer"
    assert g.loc["rocket.png", "prompt_id"] == "heim_face-ceo"
    assert g.loc["rocket.png", "prompt"] == "a photo of the face of a ceo"  # the suite's own expansion
    assert g.loc["coffee.png", "index"] == 1 and set(g["suite"]) == {"occupations"}
    assert Run.open(out).info["generation"]["suite"] == "occupations"

    bad = tmp_path / "typo"
    (bad / "nurs").mkdir(parents=True)
    (bad / "nurs" / "x.png").write_bytes(png_bytes(skimage_photo("astronaut", 64)))
    with pytest.raises(InputError, match=r"folder 'nurs' \(x.png\): subject 'nurs' is not a subject of suite "
                                         r"'occupations' \(closest: nurse"):
        import_run(tmp_path / "never", bad, suite="occupations", progress=False)
    assert not (tmp_path / "never").exists()  # bad input writes nothing


def test_a_generated_run_and_a_source_inside_out_are_refused(tmp_path, photo_run):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(skimage_photo("astronaut", 64)))
    with pytest.raises(InputError, match="holds images diffaudit generated"):
        import_run(photo_run.root, src, progress=False)
    with pytest.raises(InputError, match="inside the source"):
        import_run(src / "run", src, progress=False)
    assert not (src / "run").exists()


def test_link_hard_links_the_originals(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(skimage_photo("astronaut", 64)))
    s = import_run(tmp_path / "run", src, link=True, progress=False)
    assert s["linked"] == 1 and s["copied"] == 0
    stored = Run.open(tmp_path / "run").path(gens_of(tmp_path / "run").loc["a.png", "path"])
    assert os.stat(stored).st_ino == os.stat(src / "a.png").st_ino


def test_an_interrupted_import_leaves_whole_images_and_resumes(tmp_path, monkeypatch):
    import generate.importer as importer

    src = tmp_path / "imgs"
    src.mkdir()
    for i, p in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        (src / f"{i}.png").write_bytes(png_bytes(skimage_photo(p, 64)))
    real, calls = importer.atomic_write_bytes, []

    def dying(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(importer, "atomic_write_bytes", dying)
    with pytest.raises(KeyboardInterrupt):
        import_run(tmp_path / "run", src, progress=False)
    run = Run.open(tmp_path / "run")
    g = run.read_table("generations")
    assert len(g) == 2 and run.completed_images() == set(g["image_id"])  # each row's file is whole
    assert len(list((run.root / "images").rglob("*.png"))) == 2
    monkeypatch.setattr(importer, "atomic_write_bytes", real)
    s = import_run(tmp_path / "run", src, progress=False)
    assert s["imported"] == 2 and s["skipped"] == {"already_imported": 2}
    assert len(run.read_table("generations")) == 4


# -- manifests -------------------------------------------------------------------------------------

def _files(folder: Path) -> None:
    (folder / "imgs").mkdir(parents=True)
    (folder / "imgs" / "a.png").write_bytes(png_bytes(skimage_photo("astronaut", 96)))
    (folder / "imgs" / "b.png").write_bytes(png_bytes(skimage_photo("coffee", 96)))
    (folder / "src.jpg").write_bytes(jpeg_bytes(skimage_photo("chelsea", 96)))


def test_csv_manifest_with_a_subject_column(tmp_path):
    _files(tmp_path)
    big_seed = 2**62 + 1  # would not survive a float64 column
    (tmp_path / "m.csv").write_text(
        "path,prompt,occupation,seed,model,Negative Prompt,mode,source image,rating\n"
        f"imgs/a.png,A photo of the face of a  nurse,Nurse,{big_seed},midjourney-6,blurry,txt2img,,5\n"
        "imgs/b.png,portrait of a CEO in an office,CEO,7,midjourney-6,,,src.jpg,4\n")
    s = import_run(tmp_path / "run", tmp_path / "m.csv", suite="occupations", subject_column="occupation",
                   progress=False)
    assert s["imported"] == 2 and s["notes"] == ["manifest columns not used: rating"]
    g = gens_of(tmp_path / "run")
    a, b = g.loc["a.png"], g.loc["b.png"]
    assert int(a["seed"]) == big_seed
    assert a["template"] == "heim_face" and a["prompt_id"] == "heim_face-nurse"  # recognised as the suite's prompt
    assert a["negative_prompt"] == "blurry" and a["mode"] == "txt2img" and a["model_source"] == "manifest"
    assert b["subject"] == "ceo" and b["template"] == "imported" and b["prompt_id"].startswith("imported-ceo-p")
    assert b["mode"] == "img2img" and b["seed"] == 7  # a source image without a mode: an edit
    run = Run.open(tmp_path / "run")
    assert b["source_image"].startswith("sources/") and run.path(b["source_image"]).read_bytes() == (
        tmp_path / "src.jpg").read_bytes()


def test_bad_csv_rows_are_one_line_errors_naming_the_row(tmp_path, capsys):
    _files(tmp_path)
    (tmp_path / "bad.csv").write_text("path,seed,subject\nimgs/a.png,abc,nurse\nmissing.png,1,nurse\nimgs/b.png,2,x\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli("import", tmp_path / "bad.csv", "--out", out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: bad.csv line 2: seed 'abc' is not a whole number (1 more bad row(s))")
    with pytest.raises(InputError, match=r"bad-3.csv line 3: no such file 'missing.png'"):
        import_run(out, _only_line(tmp_path / "bad.csv", 3), progress=False)
    with pytest.raises(InputError, match="bad-4.csv line 4: subject 'x' is not a subject of suite 'occupations'"):
        import_run(out, _only_line(tmp_path / "bad.csv", 4), suite="occupations", progress=False)
    (tmp_path / "nopath.csv").write_text("file,subject\nimgs/a.png,nurse\n")
    with pytest.raises(InputError, match="nopath.csv has no path column"):
        import_run(out, tmp_path / "nopath.csv", progress=False)
    assert not out.exists()


def _only_line(csv_file: Path, line: int) -> Path:
    """A copy of ``csv_file`` with one data row; the others become blank lines (which the csv module skips),
    so the row keeps its line number."""
    lines = csv_file.read_text().splitlines()
    text = [lines[0]] + [row if n == line else "" for n, row in enumerate(lines[1:], 2)]
    out = csv_file.with_name(f"{csv_file.stem}-{line}.csv")
    out.write_text("\n".join(text) + "\n")
    return out


def test_jsonl_manifest_and_its_bad_lines(tmp_path):
    _files(tmp_path)
    good = [{"path": "imgs/a.png", "subject": "nurse", "prompt": "a nurse at work", "seed": 12, "model": "dall-e-3"},
            {"path": str(tmp_path / "imgs" / "b.png"), "subject": "nurse", "seed": None}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    import_run(tmp_path / "run", tmp_path / "m.jsonl", progress=False)
    g = gens_of(tmp_path / "run")
    assert g.loc["a.png", "seed"] == 12 and g.loc["a.png", "prompt"] == "a nurse at work"
    assert pd.isna(g.loc["b.png", "seed"]) and pd.isna(g.loc["b.png", "model"])
    assert g.loc["a.png", "prompt_id"] != g.loc["b.png", "prompt_id"]  # another prompt, another prompt_id

    (tmp_path / "bad.jsonl").write_text(json.dumps(good[0]) + "\n{not json\n"
                                        + json.dumps({"path": "imgs/b.png", "mode": "img3img"}) + "\n[1, 2]\n")
    with pytest.raises(InputError) as e:
        import_run(tmp_path / "run2", tmp_path / "bad.jsonl", progress=False)
    assert str(e.value).startswith("bad.jsonl line 2: not JSON")
    (tmp_path / "bad2.jsonl").write_text(json.dumps({"path": "imgs/b.png", "mode": "img3img"}) + "\n")
    with pytest.raises(InputError, match="bad2.jsonl line 1: mode 'img3img' is not one of txt2img, img2img, inpaint"):
        import_run(tmp_path / "run2", tmp_path / "bad2.jsonl", progress=False)
    (tmp_path / "bad3.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps({"path": "imgs/a.png", "seed": 1.5}))
    with pytest.raises(InputError, match=r"bad3.jsonl line 2: seed 1.5 is not a whole number"):
        import_run(tmp_path / "run2", tmp_path / "bad3.jsonl", progress=False)
    assert not (tmp_path / "run2").exists()


def test_parquet_manifest(tmp_path):
    _files(tmp_path)
    pd.DataFrame({"path": ["imgs/a.png", "imgs/b.png"], "subject": ["ceo", "nurse"], "seed": [3, None],
                  "template": ["plain", "plain"]}).to_parquet(tmp_path / "m.parquet")
    import_run(tmp_path / "run", tmp_path / "m.parquet", suite="occupations", progress=False)
    g = gens_of(tmp_path / "run")
    assert g.loc["a.png", "prompt"] == "a photo of a ceo" and g.loc["a.png", "seed"] == 3
    pd.DataFrame({"path": ["imgs/a.png", "nowhere.png"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad.parquet row 2: no such file 'nowhere.png'"):
        import_run(tmp_path / "run", tmp_path / "bad.parquet", suite="occupations", progress=False)


# -- embedded credentials --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed_source(tmp_path_factory) -> tuple[Path, Path]:
    """A folder with one PNG signed by another tool's identity, one tampered after signing, one unsigned."""
    root = tmp_path_factory.mktemp("signed")
    src = root / "acme" / "nurse"
    src.mkdir(parents=True)
    signed = sign_as_another_tool(astronaut_variant(0), root / "acme-identity")
    (src / "signed.png").write_bytes(signed)
    (src / "tampered.png").write_bytes(with_extra_png_chunk(sign_as_another_tool(
        astronaut_variant(1), root / "acme-identity-2")))
    (src / "plain.png").write_bytes(astronaut_variant(2))
    return root / "acme", root / "acme-identity" / "root-ca.pem"


def test_credentials_from_another_signer_are_judged_and_kept(signed_source, tmp_path, capsys):
    from provenance.c2pa import read_credentials, reader_context

    src, root_ca = signed_source
    out = tmp_path / "run"
    cli("import", src, "--out", out, "--suite", "occupations", "--trust-anchors", root_ca, "--no-progress")
    printed = capsys.readouterr().out
    assert "embedded credentials: Invalid 1, Trusted 1, none 1" in printed
    g = gens_of(out)
    s = g.loc["signed.png"]
    assert s["c2pa_manifest"] and s["c2pa_status"] == "Trusted"
    assert s["c2pa_claim_generator"] == "Acme Imagine 2.1" and s["c2pa_source_type"] == "trainedAlgorithmicMedia"
    assert s["c2pa_software_agent"] == "acme-diffusion 3" and s["c2pa_signer"] == "Acme Imagine signer"
    assert s["model"] == "acme-diffusion" and s["model_source"] == "c2pa"  # the manifest names the model
    t = g.loc["tampered.png"]
    assert t["c2pa_manifest"] and t["c2pa_status"] == "Invalid"
    assert pd.isna(t["model"]) and pd.isna(t["model_source"])  # an invalid manifest's claim is not taken
    p = g.loc["plain.png"]
    assert not p["c2pa_manifest"] and p["c2pa_status"] == "none" and pd.isna(p["c2pa_claim_generator"])
    # the original bytes are in the run, so the manifest still verifies there (what a restamp lists as parent)
    run = Run.open(out)
    kept = run.path(s["path"]).read_bytes()
    assert kept == (src / "nurse" / "signed.png").read_bytes()
    trust = {"trust_anchors": root_ca.read_text()}
    assert read_credentials(kept, reader_context(trust)).status == "Trusted"

    cli("import", src, "--out", tmp_path / "untrusted", "--no-progress")  # no anchors: intact but untrusted
    assert gens_of(tmp_path / "untrusted").loc["signed.png", "c2pa_status"] == "Valid"


# -- every stage on an imported run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def audited(tmp_path_factory, signed_source) -> dict[str, Path]:
    """Runs root with an imported model run (bias, memorization, compare, report done) and a reference run."""
    from audit.bias import audit_bias
    from audit.memorization.build import build_index
    from audit.memorization.check import check_run
    from diffaudit.report import build_report

    root = tmp_path_factory.mktemp("imported")
    src, root_ca = signed_source
    real = root / "real" / "nurse"
    real.mkdir(parents=True)
    made = root / "made" / "nurse"
    made.mkdir(parents=True)
    for i in range(8):
        (real / f"{i}.png").write_bytes(astronaut_variant(i + 3))
        (made / f"{i}.png").write_bytes(astronaut_variant(i + 3, factor=0.55))  # darker skin read by the probe
    runs = root / "runs"
    model_run, ref_run = runs / "acme", runs / "photos"
    cli("import", src, "--out", model_run, "--suite", "occupations", "--template", "heim_face",
        "--trust-anchors", root_ca, "--no-progress")
    cli("import", made.parent, "--out", model_run, "--suite", "occupations", "--template", "heim_face",
        "--model", "acme-diffusion", "--no-progress")
    cli("import", real.parent, "--out", ref_run, "--kind", "reference", "--suite", "occupations", "--no-progress")
    for run in (model_run, ref_run):
        audit_bias(run, probes=("clip", "faces", "skin_tone"), clip_model="tiny", progress=False)
    build_index([str(src)], str(root / "idx"), workers=1, progress=False)
    check_run(model_run, root / "idx", progress=False)
    cli("compare", model_run, "--reference", ref_run)
    for run in (model_run, ref_run):
        build_report(run)
    return {"runs": runs, "model": model_run, "reference": ref_run, "source": src}


def test_bias_memorization_and_report_on_an_imported_run(audited):
    run = Run.open(audited["model"])
    summary = run.read_table("bias/summary")
    nurse = summary[(summary["subject"] == "nurse") & (summary["template"] == "all")
                    & (summary["attribute"] == "perceived_gender") & (summary["label"] == "woman")]
    assert len(nurse) == 1 and nurse["reference_share"].iloc[0] == pytest.approx(0.873, abs=0.01)  # BLS attached
    assert set(run.read_table("probes/faces")["image_id"]) == set(run.read_table("generations")["image_id"])
    matches = run.read_table("memorization/matches")
    gens = run.read_table("generations").set_index("image_id")
    found = {Path(gens.loc[i, "original_path"]).name for i in matches.loc[matches["verdict"] == "memorized", "image_id"]}
    assert {"signed.png", "tampered.png", "plain.png"} <= found  # the indexed originals themselves
    # the darkened copies 0.png and 1.png are the same photo shifted by 30-40 px of a 400 px crop: the aligned
    # confirmation calls them copies; the ones shifted further (less overlap) are not
    assert found - {"signed.png", "tampered.png", "plain.png"} <= {"0.png", "1.png"}
    report = (audited["model"] / "report.md").read_text()
    assert "| seeds | unknown for every image |" in report
    assert "| sampler / steps / guidance | unknown / unknown / unknown |" in report
    assert ("| model | acme-diffusion; unknown for 2 of 11 (named by --model for 8, valid embedded credentials "
            "for 1) |") in report  # the tampered file's claim is not taken, the unsigned one names nothing
    assert "| embedded C2PA credentials on import | Trusted 1, Invalid 1, no manifest 9 |" in report
    assert "### Against the reference run photos" in report
    ref_report = (audited["reference"] / "report.md").read_text()
    assert "real images, imported as a reference" in ref_report and "**A reference run**" in ref_report


def test_reference_run_compares_with_a_model_run(audited):
    from audit.compare import versus

    table = Run.open(audited["model"]).read_table("compare/reference")
    skin = table[(table["probe"] == "skin_tone") & (table["attribute"] == "skin_tone") & (table["template"] == "all")
                 & (table["q_value"] < 0.05)]
    assert len(skin) == 2 and set(skin["reference_run"]) == {"photos"}
    darker, lighter = skin.sort_values("label", ascending=False).itertuples(index=False)
    assert darker.delta > 0 > lighter.delta  # the darkened images read darker than the real photos
    assert darker.delta_ci_low > 0 and lighter.delta_ci_high < 0
    # the stored table is what versus() gives on the two summaries (the dashboard calls the same function)
    again = versus(Run.open(audited["model"]).read_table("bias/summary"),
                   Run.open(audited["reference"]).read_table("bias/summary"))
    row = again[(again["probe"] == "skin_tone") & (again["attribute"] == "skin_tone") & (again["label"] == darker.label)
                & (again["template"] == "all")]
    assert row["delta"].iloc[0] == pytest.approx(darker.delta)


def test_newcombe_interval_and_fisher_test_match_published_values():
    from scipy.stats import fisher_exact

    from audit.compare import versus

    def summary(k: int, n: int) -> pd.DataFrame:
        return pd.DataFrame([{"probe": "p", "attribute": "a", "subject": "s", "template": "all", "label": "x",
                              "count": k, "n": n, "share": k / n, "ci_low": 0.0, "ci_high": 1.0}])

    v = versus(summary(56, 70), summary(48, 80)).iloc[0]
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, example (a): 56/70 - 48/80, method 10
    assert v["delta"] == pytest.approx(0.2)
    assert (round(v["delta_ci_low"], 4), round(v["delta_ci_high"], 4)) == (0.0524, 0.3339)
    assert v["p_value"] == pytest.approx(fisher_exact([[56, 14], [48, 32]]).pvalue)


def test_stamp_on_an_imported_run(audited, tmp_path):
    from provenance.c2pa import read_credentials
    from provenance.keys import init_identity
    from provenance.stamp import stamp_run

    identity = init_identity(tmp_path / "id")
    summary = stamp_run(audited["model"], identity=identity, store=tmp_path / "s.sqlite")
    run = Run.open(audited["model"])
    gens = run.read_table("generations").set_index("image_id")
    assert summary["stamped"] == len(gens)
    assert set(summary["status"]) <= {"Trusted", "Valid"}
    stamps = run.read_table("provenance/stamps").set_index("image_id")
    by_name = {Path(gens.loc[i, "original_path"]).name: stamps.loc[i] for i in stamps.index}
    # imported images have no seed: each stamped copy is named after the run's own file, one per image
    assert len({s["stamped_path"] for s in by_name.values()}) == len(gens)
    signed = read_credentials(run.path(by_name["signed.png"]["stamped_path"]).read_bytes())
    plain = read_credentials(run.path(by_name["plain.png"]["stamped_path"]).read_bytes())
    # the other signer's credentials are kept as the parent ingredient; a plain file is stamped as created
    assert [a["action"] for a in signed.actions][:2] == ["c2pa.opened", "c2pa.edited"]
    assert [i["relationship"] for i in signed.ingredients] == ["parentOf"]
    assert plain.actions[0]["action"] == "c2pa.created" and not plain.ingredients
    with pytest.raises(InputError, match="reference set of real images"):
        stamp_run(audited["reference"], identity=identity, store=tmp_path / "s.sqlite")


def test_dashboard_on_imported_and_reference_runs(audited, monkeypatch):
    from fixtures_runs import open_app

    at = open_app(audited["runs"], ["acme", "photos"], monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    overview = at.dataframe[0].value.set_index("run")
    assert overview.loc["acme", "kind"] == "imported" and overview.loc["photos", "kind"] == "reference"
    captions = "\n".join(c.value for c in at.caption)
    assert "embedded C2PA credentials on import: Trusted 1, Invalid 1, no manifest 9" in captions
    assert "unknown (the source did not record it): prompt" not in captions  # the suite template gave prompts
    assert "seed for 11 of 11" in captions
    signed = at.table[0].value
    assert set(signed["c2pa_status"]) == {"Trusted", "Invalid"}
    for page in ("bias", "memorization", "provenance"):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, (page, [e.value for e in at.exception])
    at.switch_page("views/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Model vs real data" in at.info[0].value
    table = at.table[0].value
    assert "A: photos (real images)" in table.columns and "B: acme" in table.columns  # the reference is the baseline


# -- old runs ----------------------------------------------------------------------------------------

def test_generations_written_before_the_import_columns_still_read(tmp_path, photo_run):
    from diffaudit import schema

    new = set(schema.GENERATIONS.names) - {
        "image_id", "prompt_id", "suite", "template", "subject", "prompt", "negative_prompt", "mode", "source_image",
        "mask", "strength", "index", "seed", "model", "model_revision", "scheduler", "steps", "guidance", "width",
        "height", "path", "sha256", "seconds", "nsfw"}
    assert "c2pa_status" in new
    path = photo_run.table_path("generations")
    t = pq.read_table(path)
    nullable_before = {"source_image", "mask", "strength", "model_revision", "nsfw"}
    old_schema = pa.schema([pa.field(f.name, f.type, nullable=f.name in nullable_before)
                            for f in schema.GENERATIONS if f.name not in new], metadata=t.schema.metadata)
    pq.write_table(t.select(old_schema.names).cast(old_schema), path)
    assert not (set(pq.read_schema(path).names) & new)
    g = photo_run.read_table("generations")
    assert list(g.columns) == schema.GENERATIONS.names and g["c2pa_status"].isna().all()
    assert g["seed"].tolist() == [1000, 1001, 1002, 1003, 1004]
    pq.write_table(t.append_column("surprise", pa.array([1] * len(t))).replace_schema_metadata(t.schema.metadata), path)
    with pytest.raises(Exception, match="columns do not match"):
        photo_run.read_table("generations")
