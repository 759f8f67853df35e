"""Signing identities for C2PA: a development CA chain made in one command, a user's PEM chain + key,
or a callback signer (KMS/HSM).

``init_identity(dir)`` writes, under ``dir`` (a folder of its own, mode 0700)::

    root-ca.pem          development root CA certificate (the trust anchor to hand to verifiers)
    intermediate.pem     intermediate CA certificate, signed by the root
    signer.pem           ES256 leaf + intermediate: the chain c2pa embeds (leaf first, root left out)
    signer.key           leaf private key, PKCS#8 (0600)

The root and intermediate *private keys* are not kept beside the signing key (whoever can read that
folder could otherwise mint signers the root vouches for): they are dropped after use, or, with
``ca_keys=DIR``, written once to ``DIR`` for the user to move offline. The identity is built in a
temporary sibling folder and renamed into place, so a killed ``keys init`` leaves either no identity or a
whole one. Private keys are created 0600 with ``O_EXCL`` and certificates 0644 whatever the umask (the
mode is set on the open file), and keys are never logged.

The leaf carries what C2PA validators accept: digitalSignature (critical), EKU emailProtection +
documentSigning, CA:false, SKI/AKI.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from diffaudit.errors import InputError

ROOT_CERT, ROOT_KEY = "root-ca.pem", "root-ca.key"
INTERMEDIATE_CERT, INTERMEDIATE_KEY = "intermediate.pem", "intermediate.key"
SIGNER_CERT, SIGNER_KEY = "signer.pem", "signer.key"
# id-kp-documentSigning (RFC 9336); C2PA's list of accepted EKUs includes it next to emailProtection.
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")


def default_identity_dir() -> Path:
    """``$DIFFAUDIT_HOME/identity`` if set, else ``~/.config/diffaudit/identity``."""
    home = os.environ.get("DIFFAUDIT_HOME")
    base = Path(home) if home else Path.home() / ".config" / "diffaudit"
    return base / "identity"


@dataclass
class Identity:
    """What signing needs: the PEM chain (leaf first), an algorithm, and either a PEM key or a callback.

    ``sign_callback`` receives the bytes to sign and returns the signature (for ES256 a DER or raw r||s
    ECDSA signature, as c2pa-python's callback signer expects); use it for keys kept in a KMS/HSM.
    ``trust_anchors`` is the PEM of the root that verifies this chain, when known (dev identities).
    """

    chain_pem: bytes
    key_pem: bytes | None = field(default=None, repr=False)
    alg: str = "es256"
    sign_callback: Callable[[bytes], bytes] | None = field(default=None, repr=False)
    trust_anchors: bytes | None = None
    folder: Path | None = None

    def __post_init__(self) -> None:
        if self.key_pem is None and self.sign_callback is None:
            raise InputError("an identity needs a private key (PEM) or a sign callback")

    @property
    def leaf(self) -> x509.Certificate:
        return load_chain(self.chain_pem)[0]

    @property
    def signer_name(self) -> str:
        """The leaf subject's common name (what verifiers show as the signer)."""
        cns = self.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cns[0].value) if cns else self.leaf.subject.rfc4514_string()


def _write_private(path: Path, data: bytes) -> None:
    """Create a private file 0600 from the first byte (O_EXCL: never overwrite an existing key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # the umask can only take bits away; this pins exactly 0600
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    """Create a certificate file 0644 whatever the umask (a umask of 000 would otherwise give 0666)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diffaudit development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, path_len: int | None, days: int,
          ) -> x509.CertificateBuilder:
    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now)
         .not_valid_after(now + _dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                        critical=False))
    if ca:
        return b.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    return (b.add_extension(x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
        critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION, DOCUMENT_SIGNING]),
                       critical=False))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


IDENTITY_FILES = (ROOT_CERT, INTERMEDIATE_CERT, SIGNER_CERT, SIGNER_KEY)
#: Files an older diffaudit left in identity folders (CA keys beside the signing key).
LEGACY_FILES = (ROOT_KEY, INTERMEDIATE_KEY)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_partials(folder: Path) -> None:
    """Remove temporary folders that a killed ``keys init`` left beside ``folder`` (their process is gone)."""
    import shutil

    for p in folder.parent.glob(f".{folder.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _check_target(folder: Path, names: tuple[str, ...], force: bool, what: str) -> list[str]:
    """What an existing ``folder`` holds of ``names``; refuses a file, a folder holding other files, and an
    existing identity unless ``force``."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder; give --dir a folder to hold the {what}")
    if not folder.is_dir():
        return []
    entries = [p.name for p in folder.iterdir()]
    others = sorted(set(entries) - set(names))
    if others:
        raise InputError(f"{folder} holds other files ({', '.join(others[:3])}); give --dir an empty or new "
                         f"folder for the {what}")
    if entries and not force:
        if SIGNER_CERT in entries and SIGNER_KEY in entries or what != "signing identity":
            raise InputError(f"{folder} already holds a {what} ({', '.join(sorted(entries))}); "
                             "use it as is, or pass --force to replace it")
        raise InputError(f"{folder} holds an incomplete signing identity ({', '.join(sorted(entries))}), left by "
                         "an interrupted `keys init`; pass --force to replace it")
    return entries


def _build(folder: Path, files: dict[str, tuple[bytes, bool]], mode: int = 0o700) -> None:
    """Write ``files`` (name -> (bytes, private)) into a temp sibling of ``folder``, then rename it into place
    (replacing an existing folder, which ``_check_target`` allowed)."""
    import secrets
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=mode)
    os.chmod(tmp, mode)
    try:
        for name, (data, private) in files.items():
            (_write_private if private else _write_public)(tmp / name, data)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(folder, old)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def init_identity(folder: str | os.PathLike | None = None, *, common_name: str = "diffaudit signer",
                  days: int = 825, force: bool = False, ca_keys: str | os.PathLike | None = None) -> Identity:
    """Create a development root CA, an intermediate and an ES256 leaf in ``folder``; return the identity.

    Refuses to overwrite an existing identity unless ``force``, and refuses a path that is a file or a
    folder holding other files. The CA private keys go to ``ca_keys`` when given (a new folder, 0700;
    move it offline), else nowhere.
    """
    folder = Path(folder) if folder is not None else default_identity_dir()
    _clean_partials(folder)
    _check_target(folder, IDENTITY_FILES + LEGACY_FILES, force, "signing identity")
    ca_folder = Path(ca_keys) if ca_keys is not None else None
    if ca_folder is not None:
        _clean_partials(ca_folder)
        if ca_folder.resolve() == folder.resolve():
            raise InputError("--ca-keys must be another folder than the identity: keep the CA keys apart "
                             "from the signing key (and offline)")
        _check_target(ca_folder, (ROOT_KEY, INTERMEDIATE_KEY, ROOT_CERT), force, "CA keys")
    root_key, int_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root_name, int_name, leaf_name = (_name("diffaudit dev root CA"), _name("diffaudit dev intermediate CA"),
                                      _name(common_name))
    root = _cert(root_name, root_key, root_name, root_key, ca=True, path_len=1, days=days * 4).sign(
        root_key, hashes.SHA256())
    inter = _cert(int_name, int_key, root_name, root_key, ca=True, path_len=0, days=days * 2).sign(
        root_key, hashes.SHA256())
    leaf = _cert(leaf_name, leaf_key, int_name, int_key, ca=False, path_len=None, days=days).sign(
        int_key, hashes.SHA256())
    if ca_folder is not None:
        _build(ca_folder, {ROOT_KEY: (_key_pem(root_key), True), INTERMEDIATE_KEY: (_key_pem(int_key), True),
                           ROOT_CERT: (_pem(root), False)})
    _build(folder, {SIGNER_KEY: (_key_pem(leaf_key), True), ROOT_CERT: (_pem(root), False),
                    INTERMEDIATE_CERT: (_pem(inter), False), SIGNER_CERT: (_pem(leaf) + _pem(inter), False)})
    return load_identity(folder)


def hygiene(folder: str | os.PathLike | None = None) -> list[str]:
    """Warnings about an identity folder: CA keys beside the signing key, modes readable by others."""
    folder = Path(folder) if folder is not None else default_identity_dir()
    out = []
    legacy = [n for n in LEGACY_FILES if (folder / n).exists()]
    if legacy:
        out.append(f"{', '.join(legacy)} sit beside the signing key in {folder}: whoever reads this folder can "
                   "mint signers your root vouches for; move them offline (or make a new identity with "
                   "`diffaudit keys init --force`)")
    if folder.is_dir() and stat.S_IMODE(folder.stat().st_mode) & 0o077:
        out.append(f"{folder} is readable by others (mode {stat.S_IMODE(folder.stat().st_mode):o}); "
                   f"run `chmod 700 {folder}`")
    key = folder / SIGNER_KEY
    if key.is_file() and stat.S_IMODE(key.stat().st_mode) & 0o077:
        out.append(f"{key} is readable by others; run `chmod 600 {key}`")
    return out


def load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise InputError(f"not a PEM certificate chain: {e}") from e
    if not certs:
        raise InputError("the PEM certificate chain is empty")
    return certs


def _alg_for(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in algs:
            return algs[key.curve.name]
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        return "ps256"
    raise InputError(f"unsupported signing key type {type(key).__name__}; use ES256/384/512, PS256 or Ed25519")


def load_identity(folder: str | os.PathLike | None = None) -> Identity:
    """Load an identity made by ``init_identity`` (or any folder with signer.pem + signer.key)."""
    folder = Path(folder) if folder is not None else default_identity_dir()
    cert, key = folder / SIGNER_CERT, folder / SIGNER_KEY
    if not cert.is_file() or not key.is_file():
        raise InputError(f"no signing identity in {folder}; run `diffaudit keys init --dir {folder}` "
                         "or pass --identity DIR")
    root = folder / ROOT_CERT
    ident = from_pem(cert, key)
    ident.trust_anchors = root.read_bytes() if root.is_file() else None
    ident.folder = folder
    return ident


def from_pem(chain: str | os.PathLike, key: str | os.PathLike) -> Identity:
    """An identity from a user's PEM chain (leaf first) and PEM private key."""
    try:
        chain_pem, key_pem = Path(chain).read_bytes(), Path(key).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {e.filename}: {e.strerror}; pass an existing PEM chain (--cert) "
                         "and private key (--key)") from e
    certs = load_chain(chain_pem)
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise InputError(f"{key} is not an unencrypted PEM private key") from e
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.PEM, pub)
            != certs[0].public_key().public_bytes(serialization.Encoding.PEM, pub)):
        raise InputError(f"the key {key} does not match the first certificate in {chain}")
    return Identity(chain_pem=chain_pem, key_pem=key_pem, alg=_alg_for(certs[0]))


def from_callback(chain_pem: bytes, sign: Callable[[bytes], bytes], alg: str = "es256") -> Identity:
    """An identity whose signatures come from ``sign(data) -> signature`` (a KMS or HSM)."""
    load_chain(chain_pem)
    return Identity(chain_pem=chain_pem, sign_callback=sign, alg=alg)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated upper-case hex (as browsers and openssl print it)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def describe(folder: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Subject, issuer, validity and SHA-256 fingerprint of every certificate in an identity folder."""
    folder = Path(folder) if folder is not None else default_identity_dir()
    rows = []
    for role, name in (("signer", SIGNER_CERT), ("root", ROOT_CERT)):
        path = folder / name
        if not path.is_file():
            if role == "signer":
                raise InputError(f"no signing identity in {folder}; run `diffaudit keys init`")
            continue
        for i, cert in enumerate(load_chain(path.read_bytes())):
            rows.append({
                "role": role if i == 0 else "intermediate",
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "sha256": fingerprint(cert),
                "file": str(path),
            })
    return rows
