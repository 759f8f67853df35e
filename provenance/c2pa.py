"""C2PA content credentials with c2pa-python: build and sign manifests, read and judge them.

A diffaudit manifest carries the claim generator (diffaudit + version), a ``c2pa.actions`` assertion
(``c2pa.created`` with digitalSourceType trainedAlgorithmicMedia and the model as softwareAgent; for
inpainting ``c2pa.opened`` + ``c2pa.edited`` with compositeWithTrainedAlgorithmicMedia; for a file that
already had credentials ``c2pa.opened`` of it as the ``parentOf`` ingredient + ``c2pa.edited``), and,
when an invisible watermark was embedded, a ``c2pa.watermarked`` action and a ``c2pa.soft-binding``
assertion naming the watermark algorithm (``org.diffaudit.watermark.<method>.1``, see ``SOFT_BINDING_ALG``)
and its value, so any C2PA tool can see which watermark points back to this manifest. The
``org.diffaudit.generation`` assertion holds prompt, seed, model, scheduler, steps, guidance, size and run.
Ingredients (img2img sources: ``inputTo``; inpainting sources and credentialed inputs: ``parentOf``)
carry the SHA-256 of the source file in their metadata (``org.diffaudit.sha256``). No embedded thumbnail
by default: it costs ~100 ms and ~300 KB per image. With a time-stamp authority (``tsa_url``) the
signature gets an RFC 3161 timestamp, so it stays valid after the signing certificate expires.

Verification is offline (no OCSP, no remote manifests) and reports, per manifest, the C2PA state
``Trusted`` (valid, and the signer chains to the trust settings of this call), ``Valid`` (intact, signer
not trusted), ``Invalid`` (something does not match) or ``none``, with its failure codes deduplicated
and kept apart: the active manifest's are the file's own; an ingredient's belong to that ingredient
(``failures``: what c2pa finds now; ``recorded_failures``: what the ingredient's validation said when it
was added, which is where an ingredient signer's ``signingCredential.untrusted`` shows).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import struct
import tomllib
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import c2pa as _c2pa

import diffaudit
from diffaudit.errors import InputError
from provenance.keys import Identity

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
GENERATION_LABEL = "org.diffaudit.generation"
SOFT_BINDING_LABEL = "c2pa.soft-binding"
#: Our soft-binding algorithm identifiers. The C2PA soft binding algorithm list (c2pa-org/
#: softbinding-algorithm-list) registers vendors' algorithms; invisible-watermark's DWT-DCT(-SVD) and
#: RivaGAN codecs, with our checked payload, are not on it, so we use a reverse-DNS name in our own
#: namespace (as every entry on the list does) rather than borrow a registered one.
SOFT_BINDING_ALG = "org.diffaudit.watermark.{method}.1"
INGREDIENT_SHA = "org.diffaudit.sha256"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
UNREADABLE = "diffaudit.manifest.unreadable"  # our code: a manifest is present but c2pa cannot parse it
STATES = ("Trusted", "Valid", "Invalid", "none")
DEV_ROOT_URI = "urn:diffaudit:development-root"
#: Codes about the asset's bytes, which a stored manifest (without its image) cannot satisfy.
_ASSET_CODES = ("assertion.dataHash", "assertion.boxesHash", "assertion.bmffHash", "assertion.collectionHash")


def sniff(data: bytes) -> str | None:
    """The format of an image we can sign and watermark, from its first bytes: png, jpeg, webp or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def supported_mime_types() -> list[str]:
    """The MIME types the installed c2pa-python reads (``Reader.get_supported_mime_types``), sorted."""
    return sorted({m for m in _c2pa.Reader.get_supported_mime_types() if "/" in m})


_BRANDS = {b"avif": "image/avif", b"avis": "image/avif", b"heic": "image/heic", b"heix": "image/heic",
           b"mif1": "image/heif", b"msf1": "image/heif", b"qt  ": "video/quicktime", b"M4A ": "audio/mp4",
           b"M4V ": "video/x-m4v"}


def sniff_mime(data: bytes, name: str | None = None) -> str | None:
    """The MIME type of any file c2pa-python reads: from the first bytes, else from the extension for
    container formats whose bytes do not say (zip-based office files, SVG). None: not a type it reads."""
    if fmt := sniff(data):
        return MIME[fmt]
    head = data[:64]
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/x-adobe-dng" if name and name.lower().endswith(".dng") else "image/tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:5] == b"%PDF-":
        return "application/pdf"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/avi"
    if head[:4] == b"fLaC":
        return "audio/flac"
    if head[:3] == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "image/jxl"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return _BRANDS.get(head[8:12], "video/mp4")
    if name:
        import mimetypes

        guess = mimetypes.guess_type(name)[0]
        if guess and guess in supported_mime_types() and not guess.startswith(("image/png", "image/jpeg")):
            return guess
    return None


def _clean(message: str, name: str | None = None) -> str:
    """A c2pa error message without Python object reprs (``<_io.BytesIO object at 0x...>``)."""
    return re.sub(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>", name or "the file", str(message)).strip()


def without_bad_png_chunks(data: bytes) -> tuple[bytes, list[str]]:
    """A PNG with ancillary chunks whose CRC is wrong left out (decoders refuse the whole file for one),
    and the names of the chunks left out. Other bytes are returned as they are."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data, []
    out, dropped, pos = [data[:8]], [], 8
    while pos + 12 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        chunk = data[pos:pos + 12 + n]
        if len(chunk) < 12 + n:
            break
        crc_ok = struct.unpack(">I", chunk[-4:])[0] == zlib.crc32(kind + body)
        ancillary = bool(kind[:1]) and kind[0] & 0x20
        if not crc_ok and ancillary:
            dropped.append(kind.decode("latin-1"))
        else:
            out.append(chunk)
        pos += 12 + n
    out.append(data[pos:])
    return (b"".join(out), dropped) if dropped else (data, [])


# --- trust -------------------------------------------------------------------------------------

@dataclass
class TrustSettings:
    """What a verification trusts: trust-anchor lists (PEM roots), allowed end-entity certificates and
    extra EKUs, each list named by a URI so a verdict can say which list vouched for the signer."""

    anchors: list[dict[str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.anchors)

    def extend(self, other: TrustSettings) -> TrustSettings:
        return TrustSettings(self.anchors + other.anchors, self.sources + other.sources)

    def settings(self) -> dict[str, Any]:
        return {"anchors": self.anchors} if self.anchors else {}

    def label(self, trust_list_uri: str | None) -> str:
        """Plain words for the list that vouched for a signer."""
        uri = trust_list_uri or ""
        if not uri:  # c2pa names no list when an allowed end-entity certificate vouched
            allowed = [a["trust_uri"] for a in self.anchors if a.get("allowed_list")]
            uri = allowed[0] if len(allowed) == 1 else uri
        if uri.startswith(DEV_ROOT_URI):
            return "development root"
        if uri.startswith("allowed-list:"):
            return f"allowed list {uri.removeprefix('allowed-list:')}"
        if uri.startswith("file://"):
            return f"your trust anchors {uri.removeprefix('file://')}"
        return f"trust list {uri}" if uri else "your trust settings"


def _is_dev_root(cert) -> bool:
    from cryptography.x509.oid import NameOID

    org = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return "diffaudit development" in org and cert.issuer == cert.subject


def _pem_certs(data: bytes, where: str) -> list:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise InputError(f"{where}: not a PEM certificate bundle ({e})") from e
    if not certs:
        raise InputError(f"{where}: no certificates found")
    return certs


def _pem(certs: list) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)


def anchors_from_pem(data: bytes, where: str) -> TrustSettings:
    """Trust anchors from PEM bytes; diffaudit development roots go in a list of their own, so a verdict
    says ``Trusted (development root)`` rather than crediting the user's anchors."""
    certs = _pem_certs(data, where)
    dev, other = [c for c in certs if _is_dev_root(c)], [c for c in certs if not _is_dev_root(c)]
    t = TrustSettings(sources=[f"trust anchors {where} ({len(certs)} certificate(s)"
                               + (f", {len(dev)} diffaudit development root(s))" if dev else ")")])
    if other:
        t.anchors.append({"trust_kind": "manifest", "trust_uri": f"file://{where}", "trust_anchors": _pem(other)})
    if dev:
        t.anchors.append({"trust_kind": "manifest", "trust_uri": f"{DEV_ROOT_URI}:{where}", "trust_anchors": _pem(dev)})
    return t


def load_trust(path: str | os.PathLike) -> TrustSettings:
    """Trust anchors from a PEM bundle, a trust-list file (the C2PA trust list is a PEM bundle) or a
    folder of .pem/.crt files. Raises ``InputError`` when nothing usable is found."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in {".pem", ".crt", ".cer"}) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"trust anchors {path}: no such PEM file or folder of .pem/.crt files")
    t = TrustSettings()
    for f in files:
        t = t.extend(anchors_from_pem(f.read_bytes(), str(f)))
    return t


def load_allowed_list(path: str | os.PathLike) -> TrustSettings:
    """End-entity certificates to trust as they are: a PEM bundle, or lines of base64 SHA-256 hashes of
    certificates' DER (c2pa-rs's allowed-list format)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"allowed list {path}: no such file")
    text = p.read_bytes().decode("utf-8", "replace")
    if "-----BEGIN CERTIFICATE-----" in text:
        n = len(_pem_certs(text.encode(), str(p)))
    else:
        lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]
        try:
            ok = lines and all(len(base64.b64decode(x, validate=True)) == 32 for x in lines)
        except ValueError:
            ok = False
        if not ok:
            raise InputError(f"allowed list {path}: neither PEM certificates nor lines of base64 SHA-256 "
                             "certificate hashes")
        n = len(lines)
    return TrustSettings([{"trust_kind": "manifest", "trust_uri": f"allowed-list:{p}", "trust_anchors": "",
                           "allowed_list": text}], [f"allowed list {p} ({n} certificate(s))"])


def load_trust_config(path: str | os.PathLike) -> TrustSettings:
    """A c2pa-rs style trust configuration: a settings file (JSON or TOML) whose ``trust`` table holds
    ``trust_anchors`` / ``user_anchors`` (PEM), ``allowed_list`` and ``trust_config`` (extra EKU OIDs, one
    per line), or a plain ``store.cfg`` EKU list (OIDs in dot notation; ``//`` and ``#`` start comments)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"trust config {path}: no such file")
    text = p.read_bytes().decode("utf-8", "replace")
    table: dict[str, Any] | None = None
    for parse in (json.loads, tomllib.loads):
        try:
            doc = parse(text)
        except (ValueError, tomllib.TOMLDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("trust"), dict):
            table = doc["trust"]
            break
    if table is None:
        oids = [re.split(r"//|#", x)[0].strip() for x in text.splitlines()]
        oids = [x for x in oids if x]
        if not oids or not all(re.fullmatch(r"[0-2](\.\d+)+", x) for x in oids):
            raise InputError(f"trust config {path}: neither a c2pa settings file with a [trust] table nor a list "
                             "of EKU OIDs in dot notation")
        return TrustSettings([{"trust_kind": "manifest", "trust_uri": f"trust-config:{p}", "trust_anchors": "",
                               "trust_config": "\n".join(oids)}], [f"extra EKUs from {p}: {', '.join(oids)}"])
    t = TrustSettings()
    pems = "".join(str(table.get(k) or "") for k in ("trust_anchors", "user_anchors"))
    if pems.strip():
        t = t.extend(anchors_from_pem(pems.encode(), str(p)))
    if table.get("allowed_list"):
        t.anchors.append({"trust_kind": "manifest", "trust_uri": f"allowed-list:{p}", "trust_anchors": "",
                          "allowed_list": str(table["allowed_list"])})
        t.sources.append(f"allowed list in {p}")
    if table.get("trust_config"):
        for a in t.anchors or [{"trust_kind": "manifest", "trust_uri": f"trust-config:{p}", "trust_anchors": ""}]:
            a["trust_config"] = str(table["trust_config"])
            if a not in t.anchors:
                t.anchors.append(a)
        t.sources.append(f"extra EKUs in {p}")
    if not t:
        raise InputError(f"trust config {path}: its [trust] table names no anchors, allowed list or EKUs")
    return t


def reader_context(trust: TrustSettings | dict[str, Any] | None = None) -> _c2pa.Context:
    """An offline verification context: trust checked against ``trust`` only, no network fetches."""
    settings: dict[str, Any] = {"verify": {"verify_trust": True, "ocsp_fetch": False,
                                           "remote_manifest_fetch": False}}
    trust_table = trust.settings() if isinstance(trust, TrustSettings) else (trust or {})
    if trust_table:
        settings["trust"] = trust_table
    try:
        return _c2pa.Context.from_dict(settings)
    except _c2pa.C2paError as e:
        raise InputError(f"trust settings refused by c2pa: {_clean(e)}") from e


def dev_root_trust(identity: Identity) -> TrustSettings | None:
    """The trust a stamp's self-check uses: the identity's own development root, labelled as such."""
    if not identity.trust_anchors:
        return None
    t = anchors_from_pem(identity.trust_anchors, "identity")
    for a in t.anchors:  # whatever the root is, trusting it here is self-certification
        a["trust_uri"] = f"{DEV_ROOT_URI}:identity" if a["trust_uri"].startswith(DEV_ROOT_URI) else \
            "urn:diffaudit:identity-root"
    return t


# --- building ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ingredient:
    """An input image: its bytes, a title (e.g. ``skimage:astronaut``) and how it relates to the output."""

    title: str
    data: bytes
    relationship: str  # "inputTo" | "parentOf"

    @property
    def mime(self) -> str:
        mime = sniff_mime(self.data, self.title)
        if mime is None:
            raise InputError(f"ingredient {self.title!r} is not a file type C2PA can describe")
        return mime

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Watermarked:
    """The watermark a stamp embedded: method, payload (hex) and the embedded bits."""

    method: str
    payload: str
    bits: bytes

    @property
    def alg(self) -> str:
        return SOFT_BINDING_ALG.format(method=self.method)


def manifest_definition(generation: dict[str, Any], *, title: str, ingredients: Iterable[Ingredient] = (),
                        watermark: Watermarked | None = None, parent: Ingredient | None = None) -> dict[str, Any]:
    """The manifest JSON for one image (label chosen here, so it is known before signing). ``parent``: the
    input file already had credentials; it becomes the ``parentOf`` ingredient, opened then edited."""
    agent = {"name": str(generation.get("model") or "unknown model")}
    if generation.get("model_revision"):
        agent["version"] = str(generation["model_revision"])
    tool = {"name": "diffaudit", "version": diffaudit.__version__}
    ingredients = ([parent] if parent is not None else []) + list(ingredients)
    ids = [f"ingredient-{i}" for i in range(len(ingredients))]
    if parent is not None:
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": ids[:1]}},
                   {"action": "c2pa.edited", "softwareAgent": tool,
                    "description": "restamped by diffaudit" + (" (invisible watermark embedded)" if watermark else "")}]
    elif generation.get("mode") == "inpaint" and ingredients:
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": ids[:1]}},
                   {"action": "c2pa.edited", "digitalSourceType": COMPOSITE, "softwareAgent": agent,
                    "description": "region regenerated by a diffusion model (inpainting)"}]
    else:
        created: dict[str, Any] = {"action": "c2pa.created", "digitalSourceType": TRAINED, "softwareAgent": agent}
        if ids:
            created["parameters"] = {"ingredientIds": ids}
        actions = [created]
    assertions: list[dict[str, Any]] = [
        {"label": "c2pa.actions", "data": {"actions": actions}},
        {"label": GENERATION_LABEL, "data": {k: v for k, v in generation.items() if v is not None}},
    ]
    if watermark is not None:
        actions.append({"action": "c2pa.watermarked", "softwareAgent": tool,
                        "description": f"invisible watermark {watermark.method}, payload {watermark.payload}"})
        assertions.append({"label": SOFT_BINDING_LABEL, "data": {
            "alg": watermark.alg, "name": f"invisible watermark {watermark.method} (id + CRC)",
            "blocks": [{"scope": {}, "value": base64.b64encode(watermark.bits).decode()}]}})
    return {"label": f"urn:c2pa:{uuid.uuid4()}",
            "claim_generator_info": [{"name": "diffaudit", "version": diffaudit.__version__}],
            "title": title, "assertions": assertions}


def make_signer(identity: Identity, tsa_url: str | None = None) -> _c2pa.Signer:
    """A c2pa signer from a PEM key, or from the identity's callback (KMS/HSM); ``tsa_url`` adds an
    RFC 3161 timestamp from that time-stamp authority to every signature."""
    if identity.sign_callback is not None:
        alg = getattr(_c2pa.C2paSigningAlg, identity.alg.upper())
        return _c2pa.Signer.from_callback(identity.sign_callback, alg, identity.chain_pem.decode(), tsa_url)
    return _c2pa.Signer.from_info(_c2pa.C2paSignerInfo(identity.alg.encode(), identity.chain_pem,
                                                       identity.key_pem, tsa_url.encode() if tsa_url else None))


class ManifestSigner:
    """Signs many images with one signer and one context (reused: creating them per image costs time)."""

    def __init__(self, identity: Identity, *, thumbnail: bool = False, tsa_url: str | None = None):
        self.identity = identity
        self.tsa_url = tsa_url
        self.signer = make_signer(identity, tsa_url)
        self.context = _c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": thumbnail}}})

    def sign(self, data: bytes, generation: dict[str, Any], *, title: str, ingredients: Iterable[Ingredient] = (),
             watermark: Watermarked | None = None, parent: Ingredient | None = None) -> tuple[bytes, str, bytes]:
        """Embed a signed manifest in ``data``; return (signed bytes, manifest label, manifest store bytes)."""
        fmt = sniff(data)
        if fmt is None:
            raise InputError(f"{title}: only PNG, JPEG and WebP images can be signed")
        ingredients = ([parent] if parent is not None else []) + list(ingredients)
        definition = manifest_definition(generation, title=title, ingredients=ingredients[1:] if parent else
                                         ingredients, watermark=watermark, parent=parent)
        builder = _c2pa.Builder(definition, context=self.context)
        for i, ing in enumerate(ingredients):
            builder.add_ingredient({"title": ing.title, "relationship": ing.relationship, "label": f"ingredient-{i}",
                                    "metadata": {INGREDIENT_SHA: ing.sha256}}, ing.mime, io.BytesIO(ing.data))
        out = io.BytesIO()
        try:
            manifest = builder.sign(self.signer, MIME[fmt], io.BytesIO(data), out)
        except _c2pa.C2paError as e:
            where = f" (time-stamp authority {self.tsa_url})" if self.tsa_url else ""
            raise InputError(f"{title}: signing failed{where}: {_clean(e, title)}") from e
        return out.getvalue(), definition["label"], manifest


# --- reading -----------------------------------------------------------------------------------

@dataclass
class Credentials:
    """What the embedded manifest says and how it validated (the active manifest's codes are the file's)."""

    status: str                       # Trusted | Valid | Invalid | none
    failure_codes: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    manifest_label: str | None = None
    signer: dict[str, Any] | None = None
    trust: str | None = None          # which list vouched for a Trusted signer, in words
    claim_generator: str | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)
    generation: dict[str, Any] | None = None
    assertions: list[str] = field(default_factory=list)
    soft_binding: dict[str, Any] | None = None
    ingredients: list[dict[str, Any]] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)  # per manifest: label, role, codes
    format: str | None = None         # the MIME type read
    remote_manifest: str | None = None
    problem: str | None = None        # why no manifest could be read, when that is the case

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def status_words(self) -> str:
        """``Trusted (development root)``, ``Valid (signer not trusted)``... as a verdict prints it."""
        if self.status == "Trusted":
            return f"Trusted ({self.trust})" if self.trust else "Trusted"
        if self.status == "Valid":
            return "Valid (intact; signer not in your trust settings)"
        return self.status


def _dedup(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Status entries once per code (first explanation kept, with how often the code appeared)."""
    out: dict[str, dict[str, Any]] = {}
    for s in entries:
        code = s.get("code", "")
        if code in out:
            out[code]["count"] += 1
        else:
            out[code] = {"code": code, "explanation": s.get("explanation", ""), "url": s.get("url", ""), "count": 1}
    return list(out.values())


def _label_of(url: str) -> str | None:
    m = re.search(r"/c2pa/([^/]+)", url or "")
    return m.group(1) if m else None


def read_credentials(data: bytes, context: _c2pa.Context | None = None, *, name: str | None = None,
                     mime: str | None = None, trust: TrustSettings | None = None) -> Credentials:
    """Read and validate the manifest in a file's bytes; never raises on bad input. ``trust`` names the
    lists of the context (to say which one vouched for a Trusted signer)."""
    if not data:
        return Credentials("none", problem="empty file")
    mime = mime or sniff_mime(data, name)
    if mime is None:
        return Credentials("none", problem="unsupported file type: not one of the formats c2pa-python reads "
                                           "(see `diffaudit verify --help`)")
    try:
        reader = _c2pa.Reader(mime, io.BytesIO(data), context=context)
    except _c2pa.C2paError.ManifestNotFound:
        return Credentials("none", format=mime)
    except _c2pa.C2paError as e:
        msg = _clean(e, name)
        remote = re.search(r"remote manifests? from url (\S+)", msg)
        if remote or isinstance(e, getattr(_c2pa.C2paError, "RemoteManifest", ())):
            url = remote.group(1) if remote else None
            return Credentials("none", format=mime, remote_manifest=url,
                               problem=f"remote manifest, not fetched (offline): {url or 'no URL given'}")
        if isinstance(e, getattr(_c2pa.C2paError, "NotSupported", ())):
            return Credentials("none", format=mime, problem=f"unsupported file type {mime}: {msg}")
        if b"c2pa" in data and (b"jumb" in data or b"caBX" in data):
            return Credentials("Invalid", failure_codes=[UNREADABLE], format=mime,
                               failures=[{"code": UNREADABLE, "explanation": msg, "count": 1}],
                               problem=f"manifest present but unreadable: {msg}")
        return Credentials("none", format=mime, problem=f"damaged {mime} file: {msg}")
    with reader:
        store = json.loads(reader.json())
        state = reader.get_validation_state() or "Invalid"
        remote_url = None
        try:
            if not reader.is_embedded():
                remote_url = reader.get_remote_url()
        except _c2pa.C2paError:
            pass
    creds = _credentials(store, state, trust)
    creds.format, creds.remote_manifest = mime, remote_url
    return creds


def _credentials(store: dict[str, Any], state: str, trust: TrustSettings | None = None) -> Credentials:
    label = store.get("active_manifest")
    manifests_json = store.get("manifests", {}) or {}
    manifest = manifests_json.get(label, {}) if label else {}
    results = store.get("validation_results") or {}
    active = results.get("activeManifest") or {}
    failures = _dedup(active.get("failure", []) if active else store.get("validation_status", []) or [])
    status = {"Trusted": "Trusted", "Valid": "Valid"}.get(state, "Invalid")
    assertions = manifest.get("assertions", [])
    actions = next((a.get("data", {}).get("actions", []) for a in assertions
                    if a.get("label", "").startswith("c2pa.actions")), [])
    generation = next((a.get("data") for a in assertions if a.get("label") == GENERATION_LABEL), None)
    soft = next((a.get("data") for a in assertions if a.get("label", "").startswith(SOFT_BINDING_LABEL)), None)
    gen_info = (manifest.get("claim_generator_info") or [{}])[0]
    trusted_by = None
    if any(s.get("code") == "signingCredential.trusted" for s in active.get("success", []) or []):
        trusted_by = (trust or TrustSettings()).label(results.get("trustListUri"))
    ingredients, per_manifest = [], [{"label": label, "role": "active", "title": manifest.get("title"),
                                      "status": status, "failures": failures}]
    by_assertion = {}
    for ing in manifest.get("ingredients", []):
        ing_label = ing.get("active_manifest") or (ing.get("manifest_data") or {}).get("identifier")
        recorded = ((ing.get("validation_results") or {}).get("activeManifest") or {}).get("failure", [])
        entry = {"title": ing.get("title"), "relationship": ing.get("relationship"), "format": ing.get("format"),
                 "sha256": (ing.get("metadata") or {}).get(INGREDIENT_SHA), "manifest": ing_label,
                 "recorded_failures": _dedup(recorded or ing.get("validation_status") or [])}
        ingredients.append(entry)
        by_assertion[ing.get("label")] = entry
    for delta in results.get("ingredientDeltas", []) or []:
        uri = delta.get("ingredientAssertionURI", "")
        entry = by_assertion.get(uri.rsplit("/", 1)[-1], {})
        fails = _dedup((delta.get("validationDeltas") or {}).get("failure", []))
        per_manifest.append({"label": entry.get("manifest") or _label_of(next(
            (f["url"] for f in fails), "")), "role": "ingredient", "title": entry.get("title"),
            "relationship": entry.get("relationship"), "failures": fails,
            "recorded_failures": entry.get("recorded_failures", [])})
    for entry in ingredients:
        if entry["manifest"] and not any(m["label"] == entry["manifest"] for m in per_manifest):
            per_manifest.append({"label": entry["manifest"], "role": "ingredient", "title": entry["title"],
                                 "relationship": entry["relationship"], "failures": [],
                                 "recorded_failures": entry["recorded_failures"]})
    return Credentials(
        status=status,
        failure_codes=[f["code"] for f in failures],
        failures=failures,
        manifest_label=label,
        signer=manifest.get("signature_info"),
        trust=trusted_by,
        claim_generator=f"{gen_info.get('name', '?')} {gen_info.get('version', '')}".strip() if gen_info else None,
        actions=actions,
        generation=generation,
        assertions=[a.get("label", "") for a in assertions],
        soft_binding=soft,
        ingredients=ingredients,
        manifests=per_manifest,
    )


def recheck_manifest(manifest: bytes | None, context: _c2pa.Context,
                     trust: TrustSettings | None = None) -> dict[str, Any] | None:
    """Validate a stored manifest (without its image) against this call's trust settings: signature,
    certificate and trust, leaving out the codes about the asset's bytes, which need the image itself."""
    if not manifest:
        return None
    creds = read_credentials(manifest, context, mime="application/c2pa", trust=trust)
    own = [f for f in creds.failures if not f["code"].startswith(_ASSET_CODES)]
    if creds.status == "none":
        return {"status": "unreadable", "failure_codes": [], "problem": creds.problem}
    status = creds.status
    if status == "Invalid" and not [f for f in own if f["code"] != "signingCredential.untrusted"]:
        status = "Trusted" if creds.trust else "Valid"
    return {"status": status, "trust": creds.trust if status == "Trusted" else None,
            "failure_codes": [f["code"] for f in own],
            "words": Credentials(status, trust=creds.trust if status == "Trusted" else None).status_words}
