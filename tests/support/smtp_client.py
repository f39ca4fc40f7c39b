"""A raw SMTP client for tests that must control every byte (smuggling, pipelining, half-sent DATA)."""

from __future__ import annotations

import asyncio
import base64
import ssl


def insecure_client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test daemon's certificate is self-signed
    return context


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, *, implicit_tls: bool = False, host: str = "127.0.0.1") -> tuple[RawSMTP, str]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=insecure_client_context() if implicit_tls else None), 15
        )
        client = cls(reader, writer)
        code, text = await client.reply()
        assert code == 220, text
        return client, text

    async def reply(self, timeout_s: float = 15) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout_s)
            if not line:
                return 0, "\n".join(lines) or "<connection closed>"
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def command(self, line: str | bytes) -> tuple[int, str]:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def starttls(self) -> None:
        code, text = await self.command("STARTTLS")
        assert code == 220, text
        await asyncio.wait_for(self.writer.start_tls(insecure_client_context()), 15)

    async def login(self, user: str, password: str) -> tuple[int, str]:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return await self.command(f"AUTH PLAIN {token}")

    async def authenticated(self, user: str, password: str) -> None:
        await self.command("EHLO client.test")
        await self.starttls()
        await self.command("EHLO client.test")
        code, text = await self.login(user, password)
        assert code == 235, text

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def submit_one(port: int, rcpt: str, user: str = "acme", password: str | None = None) -> None:
    """One marketing message from news@acme.example to `rcpt` over STARTTLS + AUTH; asserts the 250."""
    from support.daemon import PASSWORD  # the test tenants' password

    client, _ = await RawSMTP.open(port)
    await client.authenticated(user, password or PASSWORD)
    await client.command("MAIL FROM:<news@acme.example>")
    await client.command(f"RCPT TO:<{rcpt}>")
    await client.command("DATA")
    code, text = await client.command(b"From: news@acme.example\r\nSubject: offers\r\n\r\nbody\r\n.")
    await client.close()
    assert code == 250, text
