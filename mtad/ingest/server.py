"""Submission listeners on the daemon's own event loop (`loop.create_server`, not aiosmtpd's threaded Controller).

A plain listener offers STARTTLS and advertises AUTH only after it; an implicit-TLS listener (465 style) is
TLS from the first byte.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from mtad.config import Settings
from mtad.ingest.handler import SubmissionHandler
from mtad.ingest.protocol import SubmissionSMTP
from mtad.policy.connection_limits import ConnectionLimits


def parse_listen_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:2525' or '[::1]:2525' -> (host, port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


class SubmissionListeners:
    def __init__(
        self,
        handler: SubmissionHandler,
        settings: Callable[[], Settings],
        tls_context: Callable[[], ssl.SSLContext],
        reuse_port: bool = False,
    ) -> None:
        """`reuse_port`: several worker processes share the listening ports (mtad.cluster.workers)."""
        self._handler = handler
        self._reuse_port = reuse_port
        self._settings = settings
        self._tls_context = tls_context
        self.sessions: set[SubmissionSMTP] = set()
        self.servers: list[asyncio.Server] = []
        submission = settings().submission
        self.limits = ConnectionLimits(submission.max_connections, submission.max_connections_per_client)

    def _factory(self, implicit_tls: bool) -> Callable[[], SubmissionSMTP]:
        def make_protocol() -> SubmissionSMTP:
            settings = self._settings()  # read per connection, so a reload applies to new connections
            self.limits.max_total = settings.submission.max_connections
            self.limits.max_per_client = settings.submission.max_connections_per_client
            return SubmissionSMTP(
                self._handler,
                registry=self.sessions,
                limits=self.limits,
                hostname=settings.hostname,
                ident="ESMTP mtad",
                data_size_limit=settings.submission.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                tls_context=None if implicit_tls else self._tls_context(),
                auth_require_tls=not implicit_tls,
                auth_required=False,  # admission answers 530 itself, so trusted networks can be allowed
                timeout=settings.submission.idle_timeout,
            )

        return make_protocol

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        submission = self._settings().submission
        for address in submission.listen:
            host, port = parse_listen_address(address)
            self.servers.append(
                await loop.create_server(
                    self._factory(False), host, port, reuse_address=True, reuse_port=self._reuse_port
                )
            )
        for address in submission.implicit_tls_listen:
            host, port = parse_listen_address(address)
            self.servers.append(
                await loop.create_server(
                    self._factory(True),
                    host,
                    port,
                    reuse_address=True,
                    reuse_port=self._reuse_port,
                    ssl=self._tls_context(),
                )
            )

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for server in self.servers for sock in server.sockets]

    def close(self) -> None:
        """Stop accepting; open sessions continue until drained."""
        for server in self.servers:
            server.close()

    async def drain(self, grace_s: float, reply: str) -> int:
        """Close idle sessions now and busy ones once their transaction ends; after grace_s close the rest.

        Returns how many sessions were still mid-transaction when the grace period ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.sessions and loop.time() < deadline:
            for session in list(self.sessions):
                if not session.in_transaction:
                    session.close_with(reply)
            await asyncio.sleep(0.05)
        cut = sum(1 for session in self.sessions if session.in_transaction)
        for session in list(self.sessions):
            session.close_with(reply)
        for server in self.servers:
            await server.wait_closed()
        return cut
