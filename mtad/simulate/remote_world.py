"""The remote world in one object: a FakeDNS plus named SMTP sinks, wired like the internet mtad delivers to.

Each sink gets its own address (127.0.0.2, 127.0.0.3, ... in the order given) and all share one port, as all
real MX servers share 25; the daemon under test is configured with `world.dns.port` as its nameserver port and
`world.smtp_port` as its delivery port. `add_domain` publishes MX -> A -> sink IP, so "delivering to
bob@gmail.example" lands in `world.sinks["mx-google"]`.

    async with RemoteWorld({"mx-google": None, "mx-slow": SinkBehaviour(stall_greeting_s=0.5)}) as world:
        world.add_domain("gmail.example", sink="mx-google", mx_host="alt1.gmail-smtp-in.l.google.example")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mtad.simulate.dns_server import FakeDNS
from mtad.simulate.smtp_sink import ReceivedMessage, SinkBehaviour, SmtpSink, free_port_on

START_ATTEMPTS = 10  # the shared port can be taken between probing and binding; pick another


class RemoteWorld:
    def __init__(
        self,
        sinks: Mapping[str, SinkBehaviour | None] | Iterable[str] = ("mx",),
        *,
        hostnames: Mapping[str, str] | None = None,
        first_ip: int = 2,
    ) -> None:
        """`hostnames` overrides a sink's greeting/certificate name (default "<name>.sinks.example")."""
        behaviours = dict(sinks) if isinstance(sinks, Mapping) else dict.fromkeys(sinks)
        if not behaviours:
            raise ValueError("a remote world needs at least one sink")
        if first_ip + len(behaviours) > 255:
            raise ValueError("too many sinks for 127.0.0.x")
        hostnames = hostnames or {}
        self.dns = FakeDNS()
        self.smtp_port = 0
        self.sinks: dict[str, SmtpSink] = {
            name: SmtpSink(
                f"127.0.0.{first_ip + index}",
                0,
                behaviour,
                hostname=hostnames.get(name, f"{name}.sinks.example"),
            )
            for index, (name, behaviour) in enumerate(behaviours.items())
        }

    async def start(self) -> RemoteWorld:
        await self.dns.start()
        for _ in range(START_ATTEMPTS):
            port = free_port_on([sink.host for sink in self.sinks.values()])
            if await self._start_sinks_on(port):
                self.smtp_port = port
                return self
        await self.dns.stop()
        raise RuntimeError(f"could not bind all sinks on one port in {START_ATTEMPTS} attempts")

    async def stop(self) -> None:
        for sink in self.sinks.values():
            await sink.stop()
        await self.dns.stop()

    async def __aenter__(self) -> RemoteWorld:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def add_domain(
        self, domain: str, sink: str, mx_host: str | None = None, *, preference: int = 10, ttl: int = 300
    ) -> str:
        """Publish `domain MX preference mx_host` and `mx_host A <sink ip>`; returns mx_host.

        Call again with another sink to give the domain a second MX."""
        target = self.sinks[sink]
        mx_host = mx_host or target.hostname
        self.dns.add_mx(domain, [(preference, mx_host)], ttl=ttl)
        self.dns.add_a(mx_host, target.host, ttl=ttl)
        return mx_host

    def ip_of(self, sink: str) -> str:
        return self.sinks[sink].host

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every message any sink accepted, in arrival order."""
        return sorted((m for sink in self.sinks.values() for m in sink.messages), key=lambda m: m.received_at)

    async def _start_sinks_on(self, port: int) -> bool:
        started: list[SmtpSink] = []
        for sink in self.sinks.values():
            sink.port = port
            try:
                await sink.start()
            except OSError:
                for running in started:
                    await running.stop()
                return False
            started.append(sink)
        return True
