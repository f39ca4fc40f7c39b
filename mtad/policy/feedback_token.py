"""Signed tokens that name one recipient row: in unsubscribe links and in VERP return paths.

token = base32(tenant_id: 4 bytes | recipient_id: 8 bytes | HMAC-SHA256(key, purpose | ids)[:12]), lower case,
39 characters. 96 bits of MAC make it unguessable; the purpose ("unsubscribe" or "bounce") is inside the MAC,
so a bounce address cannot be replayed as an unsubscribe link or the other way round; base32 survives MTAs
that change the case of local parts. A token says nothing readable about the person it belongs to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

UNSUBSCRIBE = b"unsubscribe"
BOUNCE = b"bounce"
_IDS = struct.Struct(">IQ")
_MAC_BYTES = 12


def make_token(key: bytes, purpose: bytes, tenant_id: int, recipient_id: int) -> str:
    ids = _IDS.pack(tenant_id, recipient_id)
    mac = hmac.new(key, purpose + b"|" + ids, hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.b32encode(ids + mac).decode("ascii").rstrip("=").lower()


def read_token(key: bytes, purpose: bytes, token: str) -> tuple[int, int] | None:
    """(tenant_id, recipient_id), or None for anything forged, altered, truncated or of another purpose."""
    if not token or len(token) > 64:
        return None
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except (ValueError, base64.binascii.Error):
        return None
    if len(raw) != _IDS.size + _MAC_BYTES:
        return None
    ids, mac = raw[: _IDS.size], raw[_IDS.size :]
    expected = hmac.new(key, purpose + b"|" + ids, hashlib.sha256).digest()[:_MAC_BYTES]
    if not hmac.compare_digest(mac, expected):
        return None
    return _IDS.unpack(ids)


def verp_address(key: bytes, tenant_id: int, recipient_id: int, bounce_domain: str) -> str:
    return f"b-{make_token(key, BOUNCE, tenant_id, recipient_id)}@{bounce_domain}"


_PREFIX_PURPOSE = {"b": BOUNCE, "u": UNSUBSCRIBE}


def read_feedback_address(key: bytes, address: str, bounce_domain: str) -> tuple[bytes, int, int] | None:
    """(purpose, tenant_id, recipient_id) of `b-TOKEN@bounce_domain` (VERP) or `u-TOKEN@…` (mailto unsubscribe),
    or None for any other or forged address."""
    local, _, domain = address.rpartition("@")
    if not bounce_domain or domain.lower() != bounce_domain.lower():
        return None
    prefix, _, token = local.lower().partition("-")
    purpose = _PREFIX_PURPOSE.get(prefix)
    ids = read_token(key, purpose, token) if purpose else None
    return (purpose, *ids) if ids else None
