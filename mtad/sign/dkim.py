"""DKIM signatures for an outgoing message: relaxed/relaxed, rsa-sha256 and ed25519-sha256 (RFC 6376, RFC 8463).

In:  the message exactly as it will be sent (CRLF line endings only), the domain to sign for (the From
     header's domain), and `now` in unix seconds for `t=`.
Out: the header block to prepend: one `DKIM-Signature:` field per key of the signing domain (RSA first, so a
     verifier that reads only the first signature finds the one it understands), each folded to about 78
     columns and CRLF-terminated; or b"" when no key covers the domain.
Invariants: the body is canonicalised and hashed once, however many keys sign; no `l=` (the whole body is
     signed, so nothing can be appended) and no `x=`; `h=` comes from `mtad.policy.dkim_headers`.
     The private-key operation runs in OpenSSL through `cryptography`: dkimpy's pure-Python RSA is ~25 times
     slower. dkimpy serves as the reference verifier in the tests.

Relaxed canonicalisation (RFC 6376 sections 3.4.2 and 3.4.4) is written out here, a few lines each, to stay
in C-speed `bytes` operations; dkimpy's `Relaxed` class is the reference the tests compare it with.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Mapping, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mtad.policy.addresses import AddressError, to_ascii_domain
from mtad.policy.dkim_headers import select_signed_headers
from mtad.sign.keys import DomainKey

FOLD_WIDTH = 78  # RFC 5322 section 2.1.1: lines SHOULD stay within 78 characters
_TAB_WIDTH = 8  # a continuation line starts with a TAB; count it as a terminal shows it
_WSP_RUN = re.compile(rb"[ \t]+")
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


class DkimSigner:
    """Signs with the keys of `load_key_directory`; immutable, so one instance serves every task."""

    def __init__(self, keys: Mapping[str, Sequence[DomainKey]]) -> None:
        self._keys = {domain.lower().rstrip("."): tuple(found) for domain, found in keys.items() if found}

    def key_domain_for(self, from_domain: str) -> str | None:
        """The domain whose keys sign mail from `from_domain`: itself, else its nearest parent that has keys."""
        domain = from_domain.strip().rstrip(".").lower()
        if not domain.isascii():  # key directories are named by A-labels; IDNA costs ~15 us, so only when needed
            try:
                domain = to_ascii_domain(domain)
            except AddressError:
                return None
        labels = domain.split(".")
        for start in range(len(labels)):
            candidate = ".".join(labels[start:])
            if candidate in self._keys:
                return candidate
        return None

    def sign(self, message: bytes, signing_domain: str, now: int) -> bytes:
        """The DKIM-Signature fields to prepend to `message`, or b"" when no key covers `signing_domain`."""
        key_domain = self.key_domain_for(signing_domain)
        if key_domain is None:
            return b""
        if not message.count(b"\r") == message.count(b"\n") == message.count(b"\r\n"):
            raise ValueError("DKIM signing needs CRLF line endings only (normalise at ingest)")
        header_block, body = split_header_body(message)
        fields = parse_header_fields(header_block)
        signed_names = select_signed_headers(name.decode("ascii", "replace") for name, _ in fields)
        signed_headers = b"".join(select_canonical_headers(fields, signed_names))
        body_hash = base64.b64encode(hashlib.sha256(canonicalize_body(body)).digest()).decode("ascii")
        return b"".join(
            _signature_field(key, signed_headers, signed_names, body_hash, now) for key in self._keys[key_domain]
        )


def split_header_body(message: bytes) -> tuple[bytes, bytes]:
    """(header fields each ending in CRLF, body after the empty line); a message without one is all header."""
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message if message.endswith(b"\r\n") or not message else message + b"\r\n", b""
    return message[: end + 2], message[end + 4 :]


def parse_header_fields(header_block: bytes) -> list[tuple[bytes, bytes]]:
    """(name as written, raw value after the colon with its folding) per field, top to bottom."""
    fields: list[tuple[bytes, bytes]] = []
    for line in header_block.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
            continue
        match = _FIELD_NAME.match(line)
        if match:  # anything else is no header field and cannot be signed; a verifier sees the same
            fields.append((match.group(1), line[match.end() :]))
    return fields


def canonicalize_header(name: bytes, value: bytes) -> bytes:
    """Relaxed (RFC 6376 section 3.4.2): lower-case name, unfolded value, WSP runs as one SP, trimmed; CRLF."""
    if b"\r\n" in value:
        value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.lower().rstrip(b" \t") + b":" + value.strip(b" ") + b"\r\n"


def canonicalize_body(body: bytes) -> bytes:
    """Relaxed (RFC 6376 section 3.4.4): no WSP at line ends, WSP runs as one SP, no empty lines at the end."""
    # bytes.replace passes beat one re.sub by 2-3 times on HTML, whose indentation makes hundreds of runs.
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b"  " in body:
        body = body.replace(b"    ", b" ")
        while b"  " in body:
            body = body.replace(b"  ", b" ")
    body = body.replace(b" \r\n", b"\r\n")  # after squeezing, trailing WSP is exactly one SP
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    return body[:end] + b"\r\n" if end else b""  # 3.4.4: a body of only empty lines is empty, no CRLF


def select_canonical_headers(fields: list[tuple[bytes, bytes]], signed_names: Sequence[str]) -> list[bytes]:
    """Each h= name takes the next instance from the bottom up; a name with none left adds nothing (5.4.2)."""
    positions: dict[str, list[int]] = {}
    for index, (name, _) in enumerate(fields):
        positions.setdefault(name.decode("ascii", "replace").lower(), []).append(index)
    selected = []
    for name in signed_names:
        remaining = positions.get(name)
        if remaining:
            field_name, value = fields[remaining.pop()]
            selected.append(canonicalize_header(field_name, value))
    return selected


def _signature_field(
    key: DomainKey, signed_headers: bytes, signed_names: Sequence[str], body_hash: str, now: int
) -> bytes:
    unsigned = _fold_tags(
        [
            ("v=1;", " "),
            (f"a={key.algorithm};", " "),
            ("c=relaxed/relaxed;", " "),
            (f"d={key.domain};", " "),
            (f"s={key.selector};", " "),
            (f"t={int(now)};", " "),
            *((("h=" if i == 0 else ":") + name, " " if i == 0 else "") for i, name in enumerate(signed_names)),
            (";", ""),
            (f"bh={body_hash};", " "),
            ("b=", "\r\n"),  # b= on its own line: re-folding by a relay then never touches the other tags
        ]
    ).encode("ascii")
    # The signature covers its own field with b= empty, canonicalised and without the final CRLF (3.7).
    own_field = canonicalize_header(b"DKIM-Signature", unsigned[len(b"DKIM-Signature:") :])[:-2]
    data = signed_headers + own_field
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        signature = key.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:  # RFC 8463 section 3: Ed25519 signs the SHA-256 digest, not the data itself
        signature = key.private_key.sign(hashlib.sha256(data).digest())
    return unsigned + _fold_base64(base64.b64encode(signature), first_column=_TAB_WIDTH + 2) + b"\r\n"


def _fold_tags(pieces: list[tuple[str, str]]) -> str:
    """Join (text, separator) pieces after `DKIM-Signature:`, breaking lines before a piece that would pass
    FOLD_WIDTH; a separator of CRLF forces the break. FWS may stand around ';' and h='s ':' (RFC 6376 3.2, 3.5)."""
    out = ["DKIM-Signature:"]
    column = len(out[0])
    for text, separator in pieces:
        if separator == "\r\n" or (column + len(separator) + len(text) > FOLD_WIDTH and text != ";"):
            out.append("\r\n\t")
            column, separator = _TAB_WIDTH, ""
        out.append(separator + text)
        column += len(separator) + len(text)
    return "".join(out)


def _fold_base64(value: bytes, first_column: int) -> bytes:
    first = FOLD_WIDTH - first_column
    width = FOLD_WIDTH - _TAB_WIDTH
    lines = [value[:first]] + [value[start : start + width] for start in range(first, len(value), width)]
    return b"\r\n\t".join(lines)
