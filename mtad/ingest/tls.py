"""TLS for the submission listeners: the configured certificate, or a self-signed one for development.

The generated certificate (ECDSA P-256, 10 years, CN and SAN = the configured hostname) lives under
state_dir/tls and is reused on later starts, so clients that pinned it keep working. Workers starting
together make it once (`mtad.state_files`).
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mtad.state_files import made_once, write_atomically


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    cert_path, key_path = directory / "submission.crt", directory / "submission.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    with made_once(directory, "submission"):
        if not (cert_path.exists() and key_path.exists()):
            key_bytes, cert_bytes = _self_signed_pair(hostname)
            write_atomically(key_path, key_bytes, 0o600)
            write_atomically(cert_path, cert_bytes, 0o644)
    return cert_path, key_path


def _self_signed_pair(hostname: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_bytes, cert.public_bytes(serialization.Encoding.PEM)


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context
