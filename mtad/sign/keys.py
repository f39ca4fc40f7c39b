"""DKIM private keys on disk, and the DNS TXT record that publishes each one.

Layout: `<key_dir>/<domain>/<selector>.<algo>.pem`, `algo` being `rsa` or `ed25519`; PKCS#8 PEM, unencrypted,
     mode 0600 in directories created 0700. The file name is the whole configuration: dropping a key file in
     (and reloading) starts signing with it, and removing it stops.
In:  the key directory. Out: `DomainKey`s grouped by lower-case domain, RSA before Ed25519 so the widely
     understood signature comes first; `KeyFileError` naming the file when one cannot be used.
DNS: `<selector>._domainkey.<domain>` TXT `v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo DER>` (RFC 6376
     section 3.6.1), or `k=ed25519; p=<base64 of the raw 32-byte public key>` (RFC 8463 section 4). A DNS
     string holds at most 255 bytes, so zone-file text splits the value into several quoted strings, which
     resolvers hand back concatenated.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

PrivateKey = Union[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]
Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

ALGORITHM_OF = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}  # file-name suffix -> DKIM a= value
MIN_RSA_BITS = 1024  # RFC 8301 section 3.2: verifiers MUST NOT accept less
DEFAULT_RSA_BITS = 2048
_KEY_FILE = re.compile(r"^(?P<selector>[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?)\.(?P<algo>rsa|ed25519)\.pem$")
_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*$")
_DNS_STRING_MAX = 255


class KeyFileError(ValueError):
    """A key file that cannot be written or used; the message names the file."""


@dataclass(frozen=True)
class DomainKey:
    domain: str  # lower case, A-labels: the d= value
    selector: str  # the s= value
    algorithm: Algorithm  # the a= value
    private_key: PrivateKey


def key_path(key_dir: Path, domain: str, selector: str, algo: str) -> Path:
    return Path(key_dir) / domain / f"{selector}.{algo}.pem"


def check_selector(selector: str) -> str:
    """A selector is one or more DNS labels (RFC 6376 section 3.1); raises ValueError otherwise."""
    if not _SELECTOR.match(selector) or len(selector) > 63 * 4:
        raise ValueError(f"not a valid DKIM selector: {selector!r} (letters, digits, '-', '_', dots between labels)")
    return selector


def generate_private_key(algo: str, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    if algo == "rsa":
        if bits < MIN_RSA_BITS:
            raise ValueError(f"an RSA key needs at least {MIN_RSA_BITS} bits (RFC 8301), got {bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if algo == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key algorithm {algo!r}: expected rsa or ed25519")


def write_key(key_dir: Path, domain: str, selector: str, private_key: PrivateKey) -> DomainKey:
    """Write a new key file (0600); refuses to replace an existing one, since DNS may still publish it."""
    algo = _algo_of(private_key)
    path = key_path(key_dir, domain, selector, algo)
    if path.exists():
        raise KeyFileError(f"{path}: a key exists already; remove it first or choose another selector")
    _make_private_dirs(Path(key_dir), path.parent)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".new-", suffix=".pem")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, path)  # atomic, and fails when a concurrent keygen won the race
    except FileExistsError:
        raise KeyFileError(f"{path}: a key exists already; remove it first or choose another selector") from None
    finally:
        os.unlink(temporary)
    return DomainKey(domain, selector, ALGORITHM_OF[algo], private_key)


def load_key_file(path: Path, domain: str) -> DomainKey:
    """One key file; its name gives the selector and the algorithm, which must match the key inside."""
    match = _KEY_FILE.match(path.name)
    if not match:
        raise KeyFileError(f"{path}: a key file is named <selector>.rsa.pem or <selector>.ed25519.pem")
    try:
        private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    algo = match.group("algo")
    if not isinstance(private_key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)) or _algo_of(private_key) != algo:
        raise KeyFileError(f"{path}: the file name says {algo} but the file holds a {type(private_key).__name__}")
    if isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size < MIN_RSA_BITS:
        raise KeyFileError(f"{path}: a {private_key.key_size}-bit RSA key is refused by verifiers (RFC 8301)")
    return DomainKey(domain.lower(), match.group("selector"), ALGORITHM_OF[algo], private_key)


def load_key_directory(key_dir: Path) -> dict[str, list[DomainKey]]:
    """Every key under `key_dir`, by domain; a missing directory means no DKIM keys (signing is off)."""
    key_dir = Path(key_dir)
    if not key_dir.exists():
        return {}
    keys: dict[str, list[DomainKey]] = {}
    try:
        domain_dirs = sorted(entry for entry in key_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        for domain_dir in domain_dirs:
            if not domain_dir.name.isascii():
                raise KeyFileError(f"{domain_dir}: name the directory by the domain's A-label (xn--...)")
            files = sorted(p for p in domain_dir.iterdir() if p.suffix == ".pem" and not p.name.startswith("."))
            loaded = [load_key_file(path, domain_dir.name) for path in files]
            if loaded:
                keys.setdefault(domain_dir.name.lower(), []).extend(loaded)
    except OSError as exc:
        raise KeyFileError(f"{exc.filename or key_dir}: cannot read the key directory: {exc.strerror or exc}") from None
    for domain_keys in keys.values():
        domain_keys.sort(key=lambda key: (key.algorithm != "rsa-sha256", key.selector))
    return keys


def dns_record_name(key: DomainKey) -> str:
    return f"{key.selector}._domainkey.{key.domain}"


def dns_record_value(key: DomainKey) -> str:
    """The TXT value as a resolver returns it (one string, before any splitting for a zone file)."""
    public_key = key.private_key.public_key()
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def zone_file_record(key: DomainKey) -> str:
    """One zone-file line: `name. IN TXT ( "..." "..." )`, each quoted string at most 255 characters."""
    value = dns_record_value(key)
    chunks = [value[start : start + _DNS_STRING_MAX] for start in range(0, len(value), _DNS_STRING_MAX)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    if len(chunks) > 1:
        quoted = f"( {quoted} )"
    return f"{dns_record_name(key)}. IN TXT {quoted}"


def _algo_of(private_key: PrivateKey) -> str:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise KeyFileError(f"unsupported key type {type(private_key).__name__}")


def _make_private_dirs(*directories: Path) -> None:
    """Create each missing directory 0700 (its parents as usual); existing ones keep the operator's mode."""
    for directory in directories:
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
