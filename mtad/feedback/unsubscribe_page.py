"""The one-click unsubscribe endpoint (RFC 8058) and its confirmation page.

POST /u/{token} with `List-Unsubscribe=One-Click` unsubscribes at once and answers 200: no login, no cookie.
GET /u/{token} only shows a page with a button that makes that POST: mail scanners follow links, so a GET
alone must never unsubscribe anyone. A forged, altered or unknown token gets 404 and changes nothing. The
page shows the address masked and the sender's name; nothing else about the person.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from datetime import datetime

from aiohttp import web

from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.feedback.store import FeedbackStore, TokenTarget
from mtad.model import MessageClass
from mtad.observe.logs import log_event
from mtad.observe.metrics import UNSUBSCRIBES
from mtad.policy.feedback_token import UNSUBSCRIBE, read_token
from mtad.policy.log_privacy import LogPrivacy

log = logging.getLogger("mtad.feedback.unsubscribe")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="robots" content="noindex"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;line-height:1.5}}
button{{font-size:1rem;padding:.6rem 1.2rem;margin:.3rem 0;cursor:pointer}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def mask_address(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}{'*' * max(1, len(local) - 1)}@{domain}"


class UnsubscribeEndpoint:
    def __init__(
        self,
        store: FeedbackStore,
        key: bytes,
        clock: Callable[[], datetime],
        on_unsubscribed: Callable[[str], None] = lambda payload: None,
        privacy: LogPrivacy = LogPrivacy(),
    ) -> None:
        self._privacy = privacy
        """`on_unsubscribed` gets the NOTIFY payload at once: this node's deliveries stop before the 200."""
        self._on_unsubscribed = on_unsubscribed
        self._store = store
        self._key = key
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/u/{token}", self.page), web.post("/u/{token}", self.unsubscribe)]

    async def _target(self, request: web.Request) -> TokenTarget | None:
        ids = read_token(self._key, UNSUBSCRIBE, request.match_info["token"])
        if ids is None:
            return None
        target = await self._store.target(*ids)
        return target if target and target.message_class is MessageClass.MARKETING else None

    async def page(self, request: web.Request) -> web.Response:
        try:
            target = await self._target(request)
        except DATABASE_UNAVAILABLE:
            return _unavailable()
        if target is None:
            return _not_found()
        scope = f" from the list “{html.escape(target.list_id)}”" if target.list_id else ""
        body = (
            f"<p>Stop marketing mail from <b>{html.escape(target.tenant)}</b>{scope} "
            f"to <b>{html.escape(mask_address(target.address))}</b>?</p>"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button>'
            + ('<br><button type="submit" name="scope" value="all">Unsubscribe from all their marketing mail'
               "</button>" if target.list_id else "")
            + "</form><p>Account and service messages are not affected.</p>"
        )
        return _html(200, "Unsubscribe", body)

    async def unsubscribe(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("List-Unsubscribe") != "One-Click":
            return _html(400, "Bad request", "<p>This address only accepts RFC 8058 one-click unsubscribes.</p>")
        try:
            target = await self._target(request)
            if target is None:
                return _not_found()
            source = "web" if form.get("scope") or request.headers.get("Referer") else "one_click"
            cancelled = await self._store.unsubscribe(
                target, all_lists=form.get("scope") == "all", source=source, now=self._clock()
            )
        except DATABASE_UNAVAILABLE:
            return _unavailable()
        scope = "*" if form.get("scope") == "all" or not target.list_id else target.list_id
        self._on_unsubscribed(f"{target.tenant_id} unsubscribed {scope} {target.address.lower()}")
        UNSUBSCRIBES.labels(source).inc()
        log_event(
            log, "unsubscribe", tenant=target.tenant, source=source, cancelled=cancelled,
            recipient=self._privacy.recipient(target.tenant_id, target.address),
        )
        return _html(200, "Unsubscribed", "<p>You will not receive this marketing mail any more.</p>")


def _html(status: int, title: str, body: str) -> web.Response:
    return web.Response(
        status=status,
        text=_PAGE.format(title=title, body=body),
        content_type="text/html",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"},
    )


def _not_found() -> web.Response:
    return _html(404, "Link not valid", "<p>This unsubscribe link is not valid.</p>")


def _unavailable() -> web.Response:
    response = _html(503, "Try again", "<p>We could not process this right now. Please try again in a minute.</p>")
    response.headers["Retry-After"] = "60"
    return response
