"""The bias audit stage end to end on a run of real photos with the tiny random CLIP: tables written,
resume probes only what is missing, a changed probe replaces its old rows, an interrupt keeps the work
done, and bad input gives one-line errors."""

from __future__ import annotations

import pandas as pd
import pytest

from audit.bias import audit_bias, build_probes, default_clip_model, probe_run
from audit.probes.base import ImageBatch, frame, row
from diffaudit.cli import main
from diffaudit.errors import ConfigError, InputError, NotARunError
from diffaudit.runs import Run


def cli(*args: str) -> int:
    """Run the CLI in-process; its exit code (typer exits 0 on success, 2 on a DiffauditError)."""
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def probe_tables(run: Run) -> dict[str, pd.DataFrame]:
    return {name: run.read_table(f"probes/{name}") for name in ("clip", "faces", "faces_attr", "skin_tone")}


def test_tiny_model_run_end_to_end_from_the_cli(photo_run, capsys):
    photo_run.update_info({"generation": {"model": "tiny"}})  # as if made by the tiny generator
    assert cli("audit", "bias", str(photo_run.root), "--no-progress") == 0
    out = capsys.readouterr().out
    assert "CLIP tiny" in out and "summary.parquet" in out
    ids = set(photo_run.read_table("generations")["image_id"])
    for name, table in probe_tables(photo_run).items():
        assert set(table["image_id"]) == ids, name  # every image probed, abstentions included
    faces = probe_tables(photo_run)["faces"]
    # The two photos of a person: the astronaut and the cameraman (MTCNN finds both; Haar missed his).
    assert faces.loc[faces["attribute"] == "face", "image_id"].tolist() == ["photo-astronaut-1000",
                                                                           "photo-camera-1003"]
    assert "faces found by mtcnn:" in out
    summary = photo_run.read_table("bias/summary")
    assert {"clip", "faces", "faces_attr", "skin_tone"} == set(summary["probe"])
    pooled = summary[(summary["template"] == "all") & (summary["attribute"] == "perceived_gender")]
    assert set(pooled["subject"]) == {"astronaut", "coffee", "chelsea", "camera", "rocket"}
    assert photo_run.has_table("bias/metrics")
    stage = photo_run.info["stages"]["bias"]
    assert stage["clip_model"] == "tiny" and stage["probes"] == ["clip", "faces", "faces_attr", "skin_tone"]
    assert stage["probed"] == {"clip": 5, "faces": 5, "faces_attr": 5, "skin_tone": 5}
    assert stage["face_detector"].startswith("mtcnn:")
    for table in ("agreement", "confusion", "agreement_images", "skin", "intersectional"):
        assert photo_run.has_table(f"bias/{table}"), table
    pairs = photo_run.read_table("bias/agreement")
    assert set(zip(pairs["probe_a"], pairs["probe_b"], pairs["attribute"], strict=True)) == {
        ("clip", "faces_attr", "perceived_gender"), ("clip", "faces_attr", "perceived_age")}


def test_resume_probes_only_missing_images(photo_run):
    first = audit_bias(photo_run, clip_model="tiny", progress=False)
    assert first.probed == {"clip": 5, "faces": 5, "faces_attr": 5, "skin_tone": 5}
    before = probe_tables(photo_run)
    # Simulate an audit killed before it finished: two images lost their clip rows, one its skin tone.
    clip = before["clip"]
    photo_run.write_table("probes/clip", clip[~clip["image_id"].isin(["photo-coffee-1001", "photo-rocket-1004"])])
    tones = before["skin_tone"]
    photo_run.write_table("probes/skin_tone", tones[tones["image_id"] != "photo-astronaut-1000"])
    again = audit_bias(photo_run, clip_model="tiny", progress=False)
    assert again.probed == {"clip": 2, "faces": 0, "faces_attr": 0, "skin_tone": 1}
    after = probe_tables(photo_run)
    for name in before:
        key = ["image_id", "attribute", "face_index"]
        pd.testing.assert_frame_equal(before[name].sort_values(key).reset_index(drop=True),
                                      after[name].sort_values(key).reset_index(drop=True))
    assert audit_bias(photo_run, clip_model="tiny", progress=False).probed == {
        "clip": 0, "faces": 0, "faces_attr": 0, "skin_tone": 0}


def test_changed_probe_settings_replace_old_rows(photo_run):
    audit_bias(photo_run, probes=["clip"], clip_model="tiny", progress=False)
    result = audit_bias(photo_run, probes=["clip"], clip_model="tiny", progress=False,
                        clip_options={"min_margin": 0.9})
    assert result.probed == {"clip": 5}
    versions = set(photo_run.read_table("probes/clip")["probe_version"])
    assert versions == {"1+tiny:margin=0.9:person=0.5"}
    assert len(photo_run.read_table("probes/clip")) == 5 * 3


def test_rows_of_images_no_longer_in_the_run_are_dropped(photo_run):
    audit_bias(photo_run, probes=["faces"], progress=False)
    gens = photo_run.read_table("generations")
    photo_run.write_table("generations", gens[gens["image_id"] != "photo-astronaut-1000"])
    assert audit_bias(photo_run, probes=["faces"], progress=False).probed == {"faces": 0}
    assert "photo-astronaut-1000" not in set(photo_run.read_table("probes/faces")["image_id"])
    assert "astronaut" not in set(photo_run.read_table("bias/summary")["subject"])


def test_interrupt_keeps_finished_batches(photo_run):
    class Interrupting:
        name, attributes, needs_faces, version = "faces", ("face_count",), False, "test"

        def __init__(self):
            self.batches = 0

        def score(self, batch: ImageBatch) -> pd.DataFrame:
            self.batches += 1
            if self.batches == 2:
                raise KeyboardInterrupt
            return frame([row(i, "face_count", label="one", probe="faces", version="test") for i in batch.image_ids])

    with pytest.raises(KeyboardInterrupt):
        probe_run(photo_run, [Interrupting()], batch_size=2, progress=False)
    assert len(photo_run.read_table("probes/faces")) == 2  # the first batch was saved on the way out
    assert probe_run(photo_run, [Interrupting()], batch_size=10, progress=False) == {"faces": 3}


def test_default_clip_model_follows_the_generator(tmp_path, photo_run):
    assert default_clip_model(photo_run) == "ViT-L-14:openai"
    tiny = Run.create(tmp_path / "tiny", {"generation": {"model": "tiny"}})
    assert default_clip_model(tiny) == "tiny"


def test_bad_input_raises_clear_errors(tmp_path, photo_run):
    with pytest.raises(NotARunError):
        audit_bias(tmp_path / "missing", clip_model="tiny")
    empty = Run.create(tmp_path / "empty", {"generation": {"model": "tiny"}})
    with pytest.raises(InputError, match="no images"):
        audit_bias(empty)
    with pytest.raises(ConfigError, match="unknown probe 'gender'; choose from: clip, faces, faces_attr, skin_tone"):
        build_probes(["faces", "gender"])
    assert not photo_run.has_table("probes/faces")  # nothing half-written


def test_reference_is_checked_before_any_probing(photo_run, monkeypatch):
    """Issue 12: a misspelt --reference used to fail only after every image was probed."""
    import audit.bias

    def no_models(*args, **kwargs):
        raise AssertionError("probes were built before the reference was checked")

    monkeypatch.setattr(audit.bias, "build_probes", no_models)
    with pytest.raises(ConfigError, match="unknown reference 'bls-2099'"):
        audit_bias(photo_run, clip_model="tiny", reference="bls-2099", progress=False)
    assert not any(t.startswith(("probes/", "bias/")) for t in photo_run.tables())


@pytest.mark.parametrize("args, message", [
    (["audit", "bias", "{tmp}/missing"], "no run folder"),
    (["audit", "bias", "{run}", "--probes", "faces,nope"], "unknown probe 'nope'"),
    (["audit", "bias", "{empty}"], "has no images"),
    (["audit", "bias", "{run}", "--reference", "bls-2099"], "unknown reference 'bls-2099'"),
    (["audit", "bias", "{run}", "--probes", "faces_attr", "--face-model", "fairface:{tmp}/missing.pt"], "FairFace weights not found"),
])
def test_cli_errors_are_one_line(tmp_path, photo_run, capsys, args, message):
    Run.create(tmp_path / "empty")
    args = [a.format(tmp=tmp_path, run=photo_run.root, empty=tmp_path / "empty") for a in args]
    code = cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and err.startswith("error: ")
