"""What the volunteer gateway trusts: its TLS certificates and the volunteers' tokens.

Everything lives under ``<run_dir>/gateway/`` (mode 0700):

- ``ca.pem``: a self-signed CA made for this run (EC P-256). Volunteers get
  this file and verify the gateway against it, so a run needs no public CA.
  ``ca.key`` (0600) stays beside it so that a server certificate for a new
  host name can be issued under the same CA volunteers already hold.
- ``server.pem`` / ``server.key`` (0600): the gateway's certificate, signed
  by that CA, with subject alternative names for 127.0.0.1, localhost, this
  machine's host name and any names the caller adds. Certificates from an
  operator's own CA are used instead when their paths are given.
- ``tokens.json`` (0600): one entry per volunteer token: its name, when it
  was created and revoked, a random salt and SHA-256(salt + token). The token
  itself is returned once by ``create_token`` and never stored. (A token is
  32 random bytes, so a fast hash is enough: there is nothing to brute-force.)

``check_token`` compares against every entry with ``hmac.compare_digest`` and
re-reads the file whenever it changed (inode, size, mtime: writers replace it
atomically), so a ``revoke_token`` from another process takes effect for the
next connection, and for live ones at the gateway's next check (it re-checks
each volunteer's token on every heartbeat).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN_PREFIX = "shoal-vt-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_TOKEN_CHARS = 256


def gateway_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "gateway"


def _ensure_dir(run_dir: str | os.PathLike) -> Path:
    d = gateway_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` (never world-readable)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class GatewayCredentials:
    """PEM bytes the gateway serves with, and where the CA volunteers need lies."""

    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    ca_path: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # ordered, unique
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _default_names(extra: Sequence[str]) -> list[str]:
    return ["127.0.0.1", "localhost", socket.gethostname(), *extra]


def _make_ca(valid_days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal run CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    valid_days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal gateway")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(
        san.get_values_for_type(x509.DNSName)
    )


def ensure_run_certificates(
    run_dir: str | os.PathLike, *, hostnames: Sequence[str] = (), valid_days: int = 365
) -> GatewayCredentials:
    """The run's CA and gateway certificate, made on first use and reused after.

    The server certificate names 127.0.0.1, localhost, this host and
    ``hostnames``; if an existing one lacks a requested name (or expired), a
    new one is issued under the same CA, so volunteers' ``ca.pem`` stays valid.
    """
    d = _ensure_dir(run_dir)
    ca_pem_path, ca_key_path = d / "ca.pem", d / "ca.key"
    cert_path, key_path = d / "server.pem", d / "server.key"
    names = _default_names(hostnames)
    with _locked(d / "certs.lock"):
        if ca_pem_path.exists() and ca_key_path.exists():
            ca_cert = x509.load_pem_x509_certificate(ca_pem_path.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{ca_key_path} is not an EC private key")
        else:
            ca_key, ca_cert = _make_ca(valid_days)
            _write_private(ca_key_path, _pem_key(ca_key))
            _write_private(ca_pem_path, _pem_cert(ca_cert), 0o644)
            for stale in (cert_path, key_path):  # signed by a CA that is gone
                stale.unlink(missing_ok=True)
        current = None
        if cert_path.exists() and key_path.exists():
            current = x509.load_pem_x509_certificate(cert_path.read_bytes())
            fresh = current.not_valid_after_utc > _now() + dt.timedelta(days=1)
            if not (set(names) <= _san_names(current) and fresh):
                current = None
        if current is None:
            key, cert = _make_server_cert(ca_key, ca_cert, names, valid_days)
            _write_private(key_path, _pem_key(key))
            _write_private(cert_path, _pem_cert(cert), 0o644)
    return GatewayCredentials(
        ca_pem=ca_pem_path.read_bytes(),
        server_cert_pem=cert_path.read_bytes(),
        server_key_pem=key_path.read_bytes(),
        ca_path=ca_pem_path,
    )


def load_credentials(
    cert_path: str | os.PathLike, key_path: str | os.PathLike, ca_path: str | os.PathLike
) -> GatewayCredentials:
    """Certificates from an operator's own CA (PEM files); checked to parse and to match."""
    cert_pem, key_pem, ca_pem = (Path(p).read_bytes() for p in (cert_path, key_path, ca_path))
    cert = x509.load_pem_x509_certificate(cert_pem)
    x509.load_pem_x509_certificate(ca_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise ValueError(f"{key_path} is not the private key of the certificate {cert_path}")
    return GatewayCredentials(ca_pem, cert_pem, key_pem, Path(ca_path))


def gateway_credentials(
    run_dir: str | os.PathLike,
    *,
    cert_path: str | os.PathLike | None = None,
    key_path: str | os.PathLike | None = None,
    ca_path: str | os.PathLike | None = None,
    hostnames: Sequence[str] = (),
) -> GatewayCredentials:
    """Given certificates if all three paths are set, else the run's own (made on first use)."""
    given = [p is not None for p in (cert_path, key_path, ca_path)]
    if any(given) and not all(given):
        raise ValueError("gateway certificates: give cert_path, key_path and ca_path, or none")
    if all(given):
        return load_credentials(cert_path, key_path, ca_path)  # type: ignore[arg-type]
    return ensure_run_certificates(run_dir, hostnames=hostnames)


# ---------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenInfo:
    """One token's record, without its hash."""

    name: str
    created: str  # ISO 8601, UTC
    revoked: str | None  # when, or None while it is valid


def _tokens_path(run_dir: str | os.PathLike) -> Path:
    return gateway_dir(run_dir) / "tokens.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (e.g. two ``token create`` at once)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_entries(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise ValueError(f"{path}: not a token file (expected {{'tokens': [...]}})")
    return data["tokens"]


def _write_entries(path: Path, entries: list[dict]) -> None:
    _write_private(path, (json.dumps({"version": 1, "tokens": entries}, indent=1) + "\n").encode())


def _digest(salt_hex: str, token: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt_hex) + token.encode()).hexdigest()


def create_token(run_dir: str | os.PathLike, name: str) -> str:
    """A new random token for volunteer ``name``; returned once, only its salted hash is kept.

    ``name`` is the volunteer's identity at the gateway (credit, bans): 1..64
    characters of letters, digits, ``_.-``. A name with a valid token cannot
    get a second one (revoke it first).
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"token name {name!r}: use 1..64 of letters, digits, '_', '.', '-'")
    d = _ensure_dir(run_dir)
    path = _tokens_path(run_dir)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    with _locked(d / "tokens.lock"):
        entries = _read_entries(path)
        if any(e["name"] == name and e.get("revoked") is None for e in entries):
            raise ValueError(f"a valid token named {name!r} exists; revoke it first")
        entries.append(
            {
                "name": name,
                "created": _now().isoformat(timespec="seconds"),
                "revoked": None,
                "salt": salt,
                "sha256": _digest(salt, token),
            }
        )
        _write_entries(path, entries)
    return token


def revoke_token(run_dir: str | os.PathLike, name: str) -> None:
    """Revoke ``name``'s valid token; KeyError if it has none."""
    d = _ensure_dir(run_dir)
    path = _tokens_path(run_dir)
    with _locked(d / "tokens.lock"):
        entries = _read_entries(path)
        live = [e for e in entries if e["name"] == name and e.get("revoked") is None]
        if not live:
            raise KeyError(f"no valid token named {name!r} in {path}")
        for e in live:
            e["revoked"] = _now().isoformat(timespec="seconds")
        _write_entries(path, entries)


def list_tokens(run_dir: str | os.PathLike) -> list[TokenInfo]:
    """Every token ever created for the run, revoked ones included, oldest first."""
    return [
        TokenInfo(e["name"], e["created"], e.get("revoked"))
        for e in _read_entries(_tokens_path(run_dir))
    ]


class _TokenCache:
    """The parsed token file per path, re-read when the file changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int, int], list[dict]]] = {}

    def entries(self, path: Path) -> list[dict]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and hit[0] == key:
                return hit[1]
        entries = _read_entries(path)
        with self._lock:
            self._cache[path] = (key, entries)
        return entries


_CACHE = _TokenCache()


def lookup_token(run_dir: str | os.PathLike, token: str) -> TokenInfo | None:
    """The record of ``token`` (valid or revoked), or None if it is no token of this run.

    Every entry is compared, in constant time each, whichever matches.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        return None
    found: TokenInfo | None = None
    for e in _CACHE.entries(_tokens_path(run_dir)):
        if hmac.compare_digest(_digest(e["salt"], token), e["sha256"]):
            found = TokenInfo(e["name"], e["created"], e.get("revoked"))
    return found


def check_token(run_dir: str | os.PathLike, token: str) -> str | None:
    """The volunteer name of a valid ``token``; None for an unknown or revoked one."""
    info = lookup_token(run_dir, token)
    return info.name if info is not None and info.revoked is None else None
