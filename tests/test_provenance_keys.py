"""Key hygiene: what ``keys init`` leaves where, with which modes, atomically (issue 12 items 5, 8, 9; issue 13)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from diffaudit.errors import InputError
from provenance.keys import describe, hygiene, init_identity, load_identity

ROOT = Path(__file__).resolve().parents[1]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_signing_folder_holds_no_ca_key_and_modes_hold_under_umask_000(tmp_path, open_umask):
    ident = init_identity(tmp_path / "id", ca_keys=tmp_path / "offline")
    assert sorted(p.name for p in (tmp_path / "id").iterdir()) == ["intermediate.pem", "root-ca.pem", "signer.key",
                                                                  "signer.pem"]
    assert mode(tmp_path / "id") == 0o700 and mode(tmp_path / "id" / "signer.key") == 0o600
    for cert in ("root-ca.pem", "intermediate.pem", "signer.pem"):
        assert mode(tmp_path / "id" / cert) == 0o644
    assert sorted(p.name for p in (tmp_path / "offline").iterdir()) == ["intermediate.key", "root-ca.key",
                                                                       "root-ca.pem"]
    assert mode(tmp_path / "offline") == 0o700
    assert {mode(tmp_path / "offline" / k) for k in ("root-ca.key", "intermediate.key")} == {0o600}
    assert ident.signer_name == "diffaudit signer" and hygiene(ident.folder) == []
    without = init_identity(tmp_path / "id2")                      # default: the CA keys are not kept at all
    assert not any(p.suffix == ".key" and p.name != "signer.key" for p in without.folder.iterdir())
    assert not list(tmp_path.glob(".*partial*"))


def test_an_existing_open_folder_becomes_0700(tmp_path):
    folder = tmp_path / "id"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    init_identity(folder)
    assert mode(folder) == 0o700


def test_refusals_are_one_line_errors(tmp_path, capsys):
    from diffaudit.cli import main

    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit) as done:
        main(["keys", "init", "--dir", str(tmp_path / "a-file")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "is a file" in err
    assert (tmp_path / "a-file").read_text() == "not a folder"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds other files"):
        init_identity(tmp_path / "busy", force=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    init_identity(tmp_path / "id")
    with pytest.raises(InputError, match="already holds a signing identity"):
        init_identity(tmp_path / "id")
    with pytest.raises(InputError, match="another folder"):
        init_identity(tmp_path / "id", force=True, ca_keys=tmp_path / "id")


_KILLED_INIT = """
import os, sys
sys.path.insert(0, {root!r})
import provenance.keys as k
n = {{"calls": 0}}
real = k._write_private
def dies(path, data):
    n["calls"] += 1
    if n["calls"] == 2:      # the intermediate key is written: die before the identity is whole
        os._exit(9)
    return real(path, data)
k._write_private = dies
k.init_identity({folder!r}, ca_keys={ca!r})
"""


def test_a_killed_keys_init_leaves_no_half_identity(tmp_path):
    folder, ca = tmp_path / "id", tmp_path / "ca"
    code = _KILLED_INIT.format(root=str(ROOT), folder=str(folder), ca=str(ca))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 9, out.stderr[-2000:]
    assert not folder.exists() and not ca.exists()                # nothing half-written in place
    with pytest.raises(InputError, match="no signing identity"):
        load_identity(folder)
    ident = init_identity(folder, ca_keys=ca)                      # no --force needed: there is nothing there
    assert load_identity(folder).signer_name == ident.signer_name
    assert not list(tmp_path.glob(".*partial*"))                  # the dead run's temp folder is cleaned up


def test_a_legacy_folder_with_ca_keys_is_flagged(tmp_path, capsys):
    ident = init_identity(tmp_path / "id")
    (ident.folder / "root-ca.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    warnings = hygiene(ident.folder)
    assert len(warnings) == 1 and "root-ca.key" in warnings[0] and "move them offline" in warnings[0]
    from diffaudit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["keys", "show", "--dir", str(ident.folder)])
    out = capsys.readouterr()
    assert done.value.code in (0, None) and "warning: root-ca.key" in out.err
    assert [r["role"] for r in describe(ident.folder)] == ["signer", "intermediate", "root"]
