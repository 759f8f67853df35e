"""Every format c2pa-python reads, remote and unsupported files, ``--fail-on`` exit codes and skipped counts,
trust from an allowed list and a c2pa-rs style trust config, and a time-stamp authority round trip against a
local RFC 3161 responder built on ``openssl ts``."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import c2pa
import numpy as np
import pytest
from conftest import png_bytes, skimage_photo

from diffaudit import verdicts as V
from diffaudit.errors import InputError
from provenance import c2pa as cc
from provenance.keys import init_identity
from provenance.stamp import stamp_files
from provenance.verify import verify_paths


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFAUDIT_HOME", str(tmp_path / "diffaudit-home"))


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return init_identity(tmp_path_factory.mktemp("ident") / "id")


def _encoded(fmt: str) -> bytes:
    img = skimage_photo("chelsea", 320)
    if fmt == "MP4":
        import cv2

        path = Path(tempfile.mkdtemp()) / "v.mp4"
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 64))
        for i in range(5):
            w.write(np.full((64, 64, 3), 40 * i, np.uint8))
        w.release()
        return path.read_bytes()
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


FORMATS = [("TIFF", "image/tiff", "tif"), ("GIF", "image/gif", "gif"), ("AVIF", "image/avif", "avif"),
           ("PDF", "application/pdf", "pdf"), ("MP4", "video/mp4", "mp4"), ("WEBP", "image/webp", "webp")]


@pytest.mark.parametrize("fmt,mime,ext", FORMATS)
def test_every_format_c2pa_reads_is_verified(tmp_path, identity, fmt, mime, ext):
    if fmt == "AVIF":
        from PIL import features

        if not features.check("avif"):
            pytest.skip("this Pillow writes no AVIF")
    plain = _encoded(fmt)
    signer = cc.ManifestSigner(identity)
    builder = c2pa.Builder(cc.manifest_definition({"model": "m"}, title=f"x.{ext}"), context=signer.context)
    out = io.BytesIO()
    builder.sign(signer.signer, mime, io.BytesIO(plain), out)
    (tmp_path / f"signed.{ext}").write_bytes(out.getvalue())
    (tmp_path / f"plain.{ext}").write_bytes(plain)
    results = {Path(r.path).name: r for r in verify_paths([tmp_path], trust_anchors=identity.folder / "root-ca.pem",
                                                          default_store=False)}
    signed, bare = results[f"signed.{ext}"], results[f"plain.{ext}"]
    assert (signed.status, signed.format, signed.conclusion) == ("Trusted", mime, V.INTACT)
    assert signed.credentials["trust"] == "development root"
    assert (bare.status, bare.format, bare.conclusion) == ("none", mime, V.NONE)
    if mime.startswith("image/"):
        assert bare.watermark is not None and bare.fingerprint is not None   # pixels were checked too
    else:
        assert "no pixels checked" in bare.problem


def test_unsupported_types_say_so_in_one_line_and_folders_count_them(tmp_path, capsys, identity):
    from diffaudit.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(skimage_photo("rocket", 64)))
    stamp_files([tmp_path / "in" / "a.png"], tmp_path / "d", identity=identity, store=tmp_path / "s.sqlite")
    (tmp_path / "d" / "plain.png").write_bytes(png_bytes(skimage_photo("coffee", 64)))
    (tmp_path / "d" / "notes.txt").write_text("hello")
    (tmp_path / "d" / "data.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "odd.xyz").write_bytes(b"not a media file")
    r = verify_paths([tmp_path / "odd.xyz"], default_store=False)[0]
    assert r.status == "none" and r.problem.startswith("unsupported file type") and "\n" not in r.problem

    def cli(*args):
        with pytest.raises(SystemExit) as done:
            main(list(args))
        out = capsys.readouterr()
        return done.value.code or 0, out.out, out.err

    code, out, _ = cli("verify", str(tmp_path / "d"), "--store", str(tmp_path / "s.sqlite"))
    assert code == 0 and "skipped 2 file(s) of a type C2PA does not read" in out.splitlines()[-1]
    assert cli("verify", str(tmp_path / "d"), "--fail-on", "invalid")[0] == 0
    assert cli("verify", str(tmp_path / "d"), "--fail-on", "untrusted")[0] == 1     # Valid without anchors
    anchors = str(identity.folder / "root-ca.pem")
    assert cli("verify", str(tmp_path / "d" / "a.png"), "--fail-on", "untrusted,none", "--trust-anchors", anchors)[0] == 0
    code, out, _ = cli("verify", str(tmp_path / "d"), "--fail-on", "none", "--trust-anchors", anchors)
    assert code == 1 and "1 file(s) meet --fail-on none" in out
    code, _, err = cli("verify", str(tmp_path / "d"), "--fail-on", "everything")
    assert code == 2 and err.count("\n") == 1 and "choose among invalid, untrusted, none" in err


def test_verify_help_lists_what_c2pa_reads(capsys):
    from diffaudit.cli import main
    from diffaudit.commands.provenance import READ_MIME_TYPES

    assert sorted(READ_MIME_TYPES) == cc.supported_mime_types()   # the installed c2pa-python's own list
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for mime in ("image/avif", "image/heic", "image/tiff", "video/mp4", "application/pdf", "image/gif"):
        assert mime in text
    assert "Exit codes" in text and "--fail-on" in text


def test_allowed_list_and_trust_config_give_trust(tmp_path, identity):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(skimage_photo("rocket", 64)))
    stamp_files([tmp_path / "in" / "a.png"], tmp_path / "out", identity=identity, store=tmp_path / "s.sqlite")
    target = tmp_path / "out" / "a.png"
    leaf = x509.load_pem_x509_certificates(identity.chain_pem)[0]
    (tmp_path / "allowed.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
    digest = base64.b64encode(hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest()).decode()
    (tmp_path / "allowed.hashes").write_text(digest + "\n")
    (tmp_path / "settings.toml").write_text(
        "[trust]\nuser_anchors = '''\n" + identity.trust_anchors.decode() + "'''\n")
    (tmp_path / "store.cfg").write_text("// extra EKUs\n1.3.6.1.5.5.7.3.36\n")
    assert verify_paths([target], default_store=False)[0].status == "Valid"
    for kw, words in ((dict(allowed_list=tmp_path / "allowed.pem"), "allowed list"),
                      (dict(allowed_list=tmp_path / "allowed.hashes"), "allowed list"),
                      (dict(trust_config=tmp_path / "settings.toml"), "development root")):
        r = verify_paths([target], default_store=False, **kw)[0]
        assert r.status == "Trusted" and r.credentials["trust"].startswith(words), (kw, r.credentials["trust"])
    assert verify_paths([target], default_store=False, trust_config=tmp_path / "store.cfg")[0].status == "Valid"
    (tmp_path / "junk.cfg").write_text("not an oid\n")
    with pytest.raises(InputError, match="trust config"):
        verify_paths([target], trust_config=tmp_path / "junk.cfg")
    with pytest.raises(InputError, match="allowed list"):
        verify_paths([target], allowed_list=tmp_path / "junk.cfg")


# --- a local RFC 3161 time-stamp authority --------------------------------------------------------------

_TSA_CNF = """
[ tsa ]
default_tsa = tsa_config1
[ tsa_config1 ]
serial = {dir}/serial
crypto_device = builtin
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = no
ess_cert_id_chain = no
ess_cert_id_alg = sha256
[ v3_tsa ]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = critical,timeStamping
subjectKeyIdentifier = hash
"""


@pytest.fixture
def tsa(tmp_path):
    """An RFC 3161 responder on 127.0.0.1: ``openssl ts -reply`` behind a tiny HTTP server."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path / "tsa"
    d.mkdir()
    (d / "tsa.cnf").write_text(_TSA_CNF.format(dir=d))
    (d / "serial").write_text("01\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", "30", "-subj", "/CN=test TSA root", "-addext", "basicConstraints=critical,CA:true",
        "-addext", "keyUsage=critical,keyCertSign")
    ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "tsa.key", "-out",
        "tsa.csr", "-subj", "/CN=test TSA")
    ssl("x509", "-req", "-in", "tsa.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "tsa.pem",
        "-days", "30", "-extfile", "tsa.cnf", "-extensions", "v3_tsa")
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            requests.append(self.headers.get("Content-Type", ""))
            with tempfile.TemporaryDirectory() as t:
                Path(t, "q").write_bytes(body)
                subprocess.run(["openssl", "ts", "-reply", "-config", "tsa.cnf", "-queryfile", f"{t}/q", "-signer",
                                "tsa.pem", "-inkey", "tsa.key", "-chain", "ca.pem", "-out", f"{t}/r"],
                               cwd=d, check=True, capture_output=True)
                reply = Path(t, "r").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/tsa", requests, d / "ca.pem"
    finally:
        server.shutdown()
        server.server_close()


def test_tsa_round_trip(tmp_path, identity, tsa):
    url, requests, tsa_root = tsa
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(skimage_photo("coffee", 300)))
    rows = stamp_files([tmp_path / "in" / "a.png"], tmp_path / "out", identity=identity, store=tmp_path / "s.sqlite",
                       tsa_url=url)
    assert rows[0]["status"] == "Trusted" and requests == ["application/timestamp-query"]
    bundle = tmp_path / "anchors.pem"
    bundle.write_bytes(identity.trust_anchors + tsa_root.read_bytes())
    r = verify_paths([tmp_path / "out" / "a.png"], trust_anchors=bundle, default_store=False)[0]
    assert r.status == "Trusted" and r.credentials["signer"]["time"]           # a trusted time from the TSA
    plain = stamp_files([tmp_path / "in" / "a.png"], tmp_path / "plain", identity=identity,
                        store=tmp_path / "s.sqlite")
    assert plain[0]["status"] == "Trusted" and len(requests) == 1               # no TSA asked without --tsa-url
    r0 = verify_paths([tmp_path / "plain" / "a.png"], trust_anchors=bundle, default_store=False)[0]
    assert not (r0.credentials["signer"] or {}).get("time")
    with pytest.raises(InputError, match="time-stamp authority http://127.0.0.1:9/"):
        stamp_files([tmp_path / "in" / "a.png"], tmp_path / "down", identity=identity, store=tmp_path / "s.sqlite",
                    tsa_url="http://127.0.0.1:9/")
    assert json.dumps(r.to_dict())
