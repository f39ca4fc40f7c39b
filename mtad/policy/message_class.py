"""Marketing or transactional, and which list: read from the tenant's control headers, then removed.

In:  the header fields of a submitted message and the tenant's default class.
Out: `ClassDecision(message_class, list_id)` or a `Refusal` for a control header with a wrong value.
- `X-Mtad-Class: marketing | transactional` picks the class; without it the tenant's default applies
  (marketing unless the tenant's credential says otherwise). Transactional mail (welcome, password reset,
  maintenance notices) gets no List-Unsubscribe and is exempt from unsubscribes, never from hard bounces.
- `X-Mtad-List: NAME`, else the `List-Id` header (RFC 2919, the part in angle brackets), names the list an
  unsubscribe applies to; without one an unsubscribe covers all of the tenant's marketing mail.
`X-Mtad-*` fields are mtad's own, and so is List-Unsubscribe (mtad adds a working one to marketing mail and
transactional mail must not carry one): `strip_owned_headers` removes them before the message is stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mtad.model import MessageClass
from mtad.policy.admission import Refusal
from mtad.policy.message_text import without_fields

_LIST_ID_SAFE = re.compile(r"[^A-Za-z0-9._@+-]")
_CONTROL_FIELD = re.compile(rb"^x-mtad-[!-9;-~]*[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class ClassDecision:
    message_class: MessageClass
    list_id: str


def classify_message(fields: list[tuple[str, str]], default_class: MessageClass) -> ClassDecision | Refusal:
    values = {name: value for name, value in fields}
    requested = values.get("x-mtad-class", "").strip().lower()
    if requested and requested not in (MessageClass.MARKETING, MessageClass.TRANSACTIONAL):
        return Refusal("550 5.6.0 X-Mtad-Class must be marketing or transactional")
    message_class = MessageClass(requested) if requested else default_class
    return ClassDecision(message_class, list_identity(values.get("x-mtad-list"), values.get("list-id")))


def list_identity(mtad_list: str | None, list_id_header: str | None) -> str:
    """'Offers <offers.acme.example>' -> 'offers.acme.example'; only safe characters, at most 200."""
    raw = (mtad_list or "").strip()
    if not raw and list_id_header:
        inside = re.search(r"<([^>]*)>", list_id_header)
        raw = (inside.group(1) if inside else list_id_header).strip()
    return _LIST_ID_SAFE.sub("", raw)[:200].lower()


OWNED_FIELDS = ("list-unsubscribe", "list-unsubscribe-post")


def strip_owned_headers(header_block: bytes) -> bytes:
    """Remove X-Mtad-* and List-Unsubscribe(-Post) fields (continuation lines included)."""
    lowered = header_block.lower()
    if b"x-mtad-" not in lowered and b"list-unsubscribe" not in lowered:
        return header_block
    return without_fields(header_block, OWNED_FIELDS, matcher=_CONTROL_FIELD)
