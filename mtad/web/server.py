"""One aiohttp server on the daemon's loop, on every `http.listen` address, serving the routes it is given."""

from __future__ import annotations

from aiohttp import web

from mtad.ingest.server import parse_listen_address

MAX_REQUEST_BYTES = 16 * 1024  # forms here are one field or two; anything big is not for us


class HttpServer:
    def __init__(self, listen: tuple[str, ...], routes: list[web.RouteDef]) -> None:
        self._listen = listen
        self._app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        self._app.add_routes(routes)
        # No access log: it would hold unsubscribe tokens and client IPs. A short shutdown: pages are tiny.
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=5.0)
        self.bound: list[tuple[str, int]] = []

    async def start(self) -> None:
        await self._runner.setup()
        for address in self._listen:
            host, port = parse_listen_address(address)
            site = web.TCPSite(self._runner, host, port, reuse_address=True)
            await site.start()
            self.bound += [sock.getsockname()[:2] for sock in site._server.sockets]  # port 0 in tests

    async def stop(self) -> None:
        await self._runner.cleanup()
