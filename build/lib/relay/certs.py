"""Self-signed certificates for development and first starts (`relay certs generate`)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.errors import RelayError

VALID_DAYS = 825  # the longest validity Apple's TLS clients accept for a server certificate


def generate(
    directory: Path, hostname: str = "localhost", *, force: bool = False
) -> tuple[Path, Path]:
    """Write `relay.crt` and `relay.key` (mode 0600) for `hostname`, localhost and 127.0.0.1.

    Refuses to replace an existing certificate or key unless `force`. The key is
    never readable by others, not even for a moment: it is written to a new file
    created 0600 and renamed into place.
    """
    crt, key_path = directory / "relay.crt", directory / "relay.key"
    if not force:
        for path in (crt, key_path):
            if path.exists():
                raise RelayError(f"{path} exists already; use --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    for extra in ("localhost",):
        if extra != hostname:
            alt_names.append(x509.DNSName(extra))
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_path, key_bytes, 0o600)
    _write_new(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return crt, key_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a fresh file of `mode` (less the umask), then rename it over `path`.

    A file that exists keeps its mode when rewritten in place; a new one does not.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
