"""A real DNS server on loopback that plays "the internet's DNS" for delivery tests.

`FakeDNS` answers over UDP and TCP on 127.0.0.1 (one free port for both, like a real nameserver on 53) from a
zone table the test edits while the daemon runs. It is authoritative for every name it knows and says
NXDOMAIN for every other name, so no query ever leaves the machine.

What it simulates:
- MX, A and AAAA records (and any other type through `add_record`), with additional A/AAAA records for MX
  exchanges it knows, like a real recursive answer;
- RFC 7505 null MX (`MX 0 .`);
- negative answers that can be cached: NXDOMAIN and NODATA both carry an SOA in the authority section, whose
  MINIMUM is `negative_ttl` (RFC 2308);
- broken DNS: SERVFAIL, or a server that never answers (the client's timeout fires), for a whole name or for
  one record type only (AAAA queries timing out while A works is a classic);
- UDP truncation: an answer larger than the client's UDP limit (512 bytes without EDNS) is sent with the TC
  bit and no records, so the client must retry over TCP; `truncate_udp = True` forces that for every answer.

Faults are a layer over the records: `servfail`/`timeout`/`nxdomain` hide a name's records until
`clear_fault`, and `remove` forgets both. Every query is logged in `queries` as (name, type), e.g.
("gmail.example", "MX"), so tests can see what a cache saved.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

HOST = "127.0.0.1"
PORT_ATTEMPTS = 20  # a free UDP port is usually free on TCP too; a few retries cover the rare clash
TCP_QUERIES_PER_CONNECTION = 100
TCP_IDLE_TIMEOUT_S = 10.0
FAULTS = ("nxdomain", "servfail", "timeout")


def _absolute(name: str) -> dns.name.Name:
    """'Gmail.Example' and 'gmail.example.' are the same name (dns.name compares case-insensitively)."""
    return dns.name.from_text(name.rstrip(".") + ".") if name not in ("", ".") else dns.name.root


def _log_name(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower() or "."


def _rdtype(rdtype: str | int) -> dns.rdatatype.RdataType:
    return dns.rdatatype.RdataType.make(rdtype)


@dataclass
class _RRSet:
    ttl: int
    rdatas: list[dns.rdata.Rdata] = field(default_factory=list)


@dataclass
class _Node:
    """One owner name: its record sets by type, and faults by type (None = every type)."""

    rrsets: dict[dns.rdatatype.RdataType, _RRSet] = field(default_factory=dict)
    faults: dict[dns.rdatatype.RdataType | None, str] = field(default_factory=dict)

    def fault_for(self, rdtype: dns.rdatatype.RdataType) -> str | None:
        return self.faults.get(rdtype) or self.faults.get(None)


class _UDPServer(asyncio.DatagramProtocol):
    def __init__(self, fake: FakeDNS) -> None:
        self._fake = fake
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self._fake._answer_wire(data, transport="udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class FakeDNS:
    def __init__(self, host: str = HOST, *, negative_ttl: int = 60) -> None:
        self.host = host
        self.port = 0
        self.negative_ttl = negative_ttl
        self.truncate_udp = False
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries: list[tuple[str, str]] = []
        self._nodes: dict[dns.name.Name, _Node] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_sessions: dict[asyncio.StreamWriter, asyncio.Task] = {}

    # ---- life cycle -------------------------------------------------------------------------------------

    async def start(self) -> FakeDNS:
        loop = asyncio.get_running_loop()
        for _ in range(PORT_ATTEMPTS):
            udp, _protocol = await loop.create_datagram_endpoint(lambda: _UDPServer(self), local_addr=(self.host, 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                udp.close()  # someone holds this port on TCP; take another
                continue
            self._udp, self.port = udp, port
            return self
        raise RuntimeError(f"no port free on both UDP and TCP at {self.host} after {PORT_ATTEMPTS} attempts")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_sessions):  # "timeout" names leave TCP clients waiting; free them
                writer.close()
            if self._tcp_sessions:
                await asyncio.wait(list(self._tcp_sessions.values()), timeout=5)
            await asyncio.wait_for(self._tcp.wait_closed(), 5)
            self._tcp = None

    async def __aenter__(self) -> FakeDNS:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- zone table -------------------------------------------------------------------------------------

    def add_record(self, name: str, rdtype: str, value: str, ttl: int = 300) -> None:
        """Add one record (presentation format, names in it taken as absolute). The set takes the latest TTL."""
        kind = _rdtype(rdtype)
        rdata = dns.rdata.from_text(dns.rdataclass.IN, kind, value, origin=dns.name.root, relativize=False)
        rrset = self._node(name).rrsets.setdefault(kind, _RRSet(ttl))
        rrset.ttl = ttl
        if rdata not in rrset.rdatas:  # several domains may share one MX host; keep its A set a set
            rrset.rdatas.append(rdata)

    def add_mx(self, domain: str, exchanges: list[tuple[int, str]], ttl: int = 300) -> None:
        for preference, host in exchanges:
            self.add_record(domain, "MX", f"{preference} {_absolute(host)}", ttl)

    def add_a(self, host: str, address: str, ttl: int = 300) -> None:
        self.add_record(host, "A", address, ttl)

    def add_aaaa(self, host: str, address: str, ttl: int = 300) -> None:
        self.add_record(host, "AAAA", address, ttl)

    def null_mx(self, domain: str, ttl: int = 300) -> None:
        """RFC 7505: the domain accepts no mail. Replaces any MX the domain had."""
        self._node(domain).rrsets.pop(dns.rdatatype.MX, None)
        self.add_record(domain, "MX", "0 .", ttl)

    def nxdomain(self, domain: str, rdtype: str | None = None) -> None:
        """Say the name does not exist, even if it has records (unknown names already get NXDOMAIN)."""
        self._set_fault(domain, "nxdomain", rdtype)

    def servfail(self, domain: str, rdtype: str | None = None) -> None:
        self._set_fault(domain, "servfail", rdtype)

    def timeout(self, domain: str, rdtype: str | None = None) -> None:
        """Never answer queries for this name (or only for this type), over UDP or TCP."""
        self._set_fault(domain, "timeout", rdtype)

    def clear_fault(self, domain: str, rdtype: str | None = None) -> None:
        name = _absolute(domain)
        node = self._nodes.get(name)
        if node is not None:
            node.faults.pop(_rdtype(rdtype) if rdtype else None, None)
            if not node.faults and not node.rrsets:  # a fault on an unknown name: back to NXDOMAIN
                del self._nodes[name]

    def remove(self, domain: str) -> None:
        """Forget the name entirely (records and faults): it becomes NXDOMAIN."""
        self._nodes.pop(_absolute(domain), None)

    def count(self, name: str, rdtype: str | None = None) -> int:
        """How many queries arrived for the name (of this type, if given), over either transport."""
        wanted = _log_name(_absolute(name))
        return sum(1 for qname, qtype in self.queries if qname == wanted and (rdtype is None or qtype == rdtype))

    def _node(self, name: str) -> _Node:
        return self._nodes.setdefault(_absolute(name), _Node())

    def _set_fault(self, name: str, fault: str, rdtype: str | None) -> None:
        assert fault in FAULTS
        self._node(name).faults[_rdtype(rdtype) if rdtype else None] = fault

    # ---- answering --------------------------------------------------------------------------------------

    def _answer_wire(self, wire: bytes, *, transport: str) -> bytes | None:
        """Wire query in, wire answer out; None means stay silent (unparseable query or a "timeout" name)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not worth a FORMERR: no test sends garbage to its own fake
        if not query.question:
            return None
        question = query.question[0]
        logged = (_log_name(question.name), dns.rdatatype.to_text(question.rdtype))
        self.queries.append(logged)
        if transport == "tcp":
            self.tcp_queries.append(logged)
        response = self._response_to(query, question.name, question.rdtype)
        if response is None:
            return None
        if transport == "tcp":
            return response.to_wire()
        return self._fit_into_udp(query, response)

    def _response_to(
        self, query: dns.message.Message, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.message.Message | None:
        response = dns.message.make_response(query, recursion_available=True)
        response.flags |= dns.flags.AA
        node = self._nodes.get(qname)
        fault = node.fault_for(rdtype) if node is not None else None
        if fault == "timeout":
            return None
        if fault == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if node is None or fault == "nxdomain":
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._negative_soa(qname))
            return response
        rrset = node.rrsets.get(rdtype)
        if rrset is None:  # NODATA: the name exists, the type does not
            response.authority.append(self._negative_soa(qname))
            return response
        response.answer.append(dns.rrset.from_rdata_list(qname, rrset.ttl, rrset.rdatas))
        if rdtype == dns.rdatatype.MX:
            response.additional.extend(self._exchange_addresses(rrset))
        return response

    def _exchange_addresses(self, mx: _RRSet) -> list[dns.rrset.RRset]:
        """A and AAAA of the exchanges we know, as a recursive resolver would hand them along."""
        glue = []
        for rdata in mx.rdatas:
            exchange = rdata.exchange  # type: ignore[attr-defined]
            node = self._nodes.get(exchange)
            if node is None:
                continue
            for kind in (dns.rdatatype.A, dns.rdatatype.AAAA):
                if kind in node.rrsets and node.fault_for(kind) is None:
                    rrset = node.rrsets[kind]
                    glue.append(dns.rrset.from_rdata_list(exchange, rrset.ttl, rrset.rdatas))
        return glue

    def _negative_soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        """An SOA owned by the parent name (a superdomain, as RFC 2308 caching requires), MINIMUM = negative_ttl."""
        owner = qname.parent() if qname != dns.name.root else qname
        soa = f"ns.fake-dns.test. hostmaster.fake-dns.test. 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text(owner, self.negative_ttl, "IN", "SOA", soa)

    def _fit_into_udp(self, query: dns.message.Message, response: dns.message.Message) -> bytes:
        limit = max(query.payload, 512) if query.edns >= 0 else 512
        if not self.truncate_udp:
            try:
                return response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                pass
        truncated = dns.message.make_response(query, recursion_available=True)
        truncated.flags |= dns.flags.AA | dns.flags.TC
        truncated.set_rcode(response.rcode())
        return truncated.to_wire()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """RFC 1035 4.2.2: each message is prefixed by its 2-byte length; a connection may carry several."""
        self._tcp_sessions[writer] = asyncio.current_task()  # type: ignore[assignment]
        try:
            for _ in range(TCP_QUERIES_PER_CONNECTION):
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT_S)
                (length,) = struct.unpack("!H", header)
                wire = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT_S)
                reply = self._answer_wire(wire, transport="tcp")
                if reply is None:
                    continue  # a "timeout" name: the client waits until it gives up
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass  # the client hung up or went quiet
        finally:
            self._tcp_sessions.pop(writer, None)
            writer.close()
