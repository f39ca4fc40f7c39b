"""Which header fields a DKIM signature covers: the `h=` list (RFC 6376 section 5.4).

In:  the names of the message's header fields, top to bottom, in any letter case.
Out: the lower-case names for `h=`: every signable field once per occurrence, in message order, then the
     over-signed names once more each (RFC 6376 section 8.15). A verifier takes the instances of a name
     from the bottom up and a name listed more often than it occurs hashes as nothing, so the extra listing
     makes any instance added after signing (a second From, a forged Reply-To) break the signature.
Invariants: `from` is always listed (RFC 6376 section 5.4 requires it). The list is an allow-list: trace and
     transport fields (Received, Return-Path, DKIM-Signature, X-*) are never signed, because relays add,
     rewrite or reorder them.

Over-signing includes names the message does not carry (as OpenDKIM's OversignHeaders does): a Reply-To,
Cc or List-Unsubscribe header added to a replayed message must also fail verification.
"""

from __future__ import annotations

from typing import Iterable

SIGNED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "feedback-id",
        "in-reply-to",
        "references",
        "sender",
    }
)

OVERSIGNED_HEADERS = (
    "from",
    "subject",
    "date",
    "to",
    "cc",
    "reply-to",
    "message-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "content-type",
    "mime-version",
)


def select_signed_headers(header_names: Iterable[str]) -> tuple[str, ...]:
    """The `h=` names for a message whose header field names are `header_names`, top to bottom."""
    present = [name.strip().lower() for name in header_names]
    signed = [name for name in present if name in SIGNED_HEADERS]
    return (*signed, *OVERSIGNED_HEADERS)
