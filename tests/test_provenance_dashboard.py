"""The dashboard's verify box looks in the store the picked run was stamped with (read-only, only inside the
runs folder), says which, and shows the same conclusion as ``diffaudit verify``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import make_photo_run
from fixtures_runs import open_app
from PIL import Image

from provenance.keys import init_identity
from provenance.stamp import stamp_run


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFAUDIT_HOME", str(tmp_path / "diffaudit-home"))


def texts(at) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [w.value for w in at.warning]
                     + [s.value for s in at.success] + [i.value for i in at.info] + [e.value for e in at.error])


def _stripped(run, image_id: str) -> bytes:
    table = run.read_table("provenance/stamps").set_index("image_id")
    buf = io.BytesIO()
    Image.open(run.path(table.loc[image_id, "stamped_path"])).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_verify_upload_uses_the_runs_own_store_read_only(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = make_photo_run(runs / "photos", ("astronaut", "chelsea"), size=256)
    identity = init_identity(tmp_path / "identity")
    store = runs / "photos-store.sqlite"
    stamp_run(run.root, identity=identity, store=store)
    label = run.read_table("provenance/stamps").set_index("image_id").loc["photo-chelsea-1001", "manifest_label"]
    before = store.stat().st_mtime_ns
    at = open_app(runs.resolve(), ["photos"], monkeypatch)
    at.switch_page("views/provenance.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "manifest store (photos-store.sqlite), read-only" in texts(at)
    assert "Trusted (development root)" in at.dataframe[0].value["status"].iloc[0]
    at.file_uploader(key="verify_upload").set_value(("shot.jpg", _stripped(run, "photo-chelsea-1001"),
                                                     "image/jpeg")).run()
    assert not at.exception, [e.value for e in at.exception]
    page = texts(at)
    assert "Conclusion: **same image, credentials stripped**" in page
    assert label in page and "as recorded at stamp time" in page
    assert store.stat().st_mtime_ns == before                       # read, never written


def test_a_store_outside_the_runs_folder_is_not_opened(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = make_photo_run(runs / "photos", ("astronaut",), size=256)
    outside = tmp_path / "elsewhere" / "store.sqlite"
    stamp_run(run.root, identity=init_identity(tmp_path / "identity"), store=outside)
    at = open_app(runs.resolve(), ["photos"], monkeypatch)
    at.switch_page("views/provenance.py").run()
    assert "lies outside the runs folder: the dashboard does not open it" in texts(at)
    at.file_uploader(key="verify_upload").set_value(("shot.jpg", _stripped(run, "photo-astronaut-1000"),
                                                     "image/jpeg")).run()
    assert not at.exception and "Conclusion: **no evidence**" in texts(at)
    assert Path(outside).is_file()
