"""GET /metrics (Prometheus text format), /healthz (the process answers), /readyz (it can do its job).

Ready means: the SMTP listeners are up and PostgreSQL answered a trivial query within a second. A load
balancer or systemd-aware orchestrator sends traffic only to a ready node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.observe.metrics import DB_UP, READY


class HealthEndpoints:
    def __init__(self, pool: asyncpg.Pool, listeners_up: Callable[[], bool]) -> None:
        self._pool = pool
        self._listeners_up = listeners_up

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ]

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        problems = []
        if not self._listeners_up():
            problems.append("listeners are not up")
        try:
            await asyncio.wait_for(self._pool.fetchval("SELECT 1"), 1.0)
            DB_UP.set(1)
        except (*DATABASE_UNAVAILABLE, asyncio.TimeoutError):
            DB_UP.set(0)
            problems.append("database unreachable")
        READY.set(0 if problems else 1)
        if problems:
            return web.Response(status=503, text="not ready: " + ", ".join(problems) + "\n")
        return web.Response(text="ready\n")
