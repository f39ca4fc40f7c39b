"""Queue ids: short, time-ordered, unguessable names for stored messages ("queued as <id>").

16 characters of Crockford base32: 48 bits of milliseconds since the epoch, then 32 random bits. Time order
keeps the unique index append-mostly; the random part means a customer cannot count other customers' mail.
"""

from __future__ import annotations

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def make_queue_id(now_ms: int, random_bits: int) -> str:
    value = ((now_ms & (2**48 - 1)) << 32) | (random_bits & (2**32 - 1))
    chars = []
    for _ in range(16):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
