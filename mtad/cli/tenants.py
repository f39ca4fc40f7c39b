"""`mtad tenant add|passwd|list|demo` and `mtad tenant domain add|remove`."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from pathlib import Path

from mtad.cli.database import operator_connection
from mtad.config import Settings
from mtad.model import MessageClass
from mtad.policy.addresses import AddressError, to_ascii_domain
from mtad.tenants.passwords import hash_password
from mtad.tenants.store import TenantError, TenantStore

DEMO_TENANT = "demo"
DEMO_DOMAIN = "demo.example"  # RFC 2606 reserves .example: the demo can never send as a real domain


def add_commands(commands: argparse._SubParsersAction) -> None:
    tenant = commands.add_parser("tenant", help="manage tenants (customers) and their sending domains")
    actions = tenant.add_subparsers(dest="tenant_action", required=True)
    for name, help_text in (("add", "create a tenant"), ("passwd", "set a tenant's password")):
        cmd = actions.add_parser(name, help=help_text)
        cmd.add_argument("name")
        source = cmd.add_mutually_exclusive_group(required=True)
        source.add_argument("--password-file", type=Path, help="read the password from the first line of a file")
        source.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        cmd.set_defaults(handler=run_add if name == "add" else run_passwd)
    actions.add_parser("list", help="list tenants and domains").set_defaults(handler=run_list)
    default_class = actions.add_parser(
        "class", help="the class of a tenant's mail when it sends no X-Mtad-Class header (default marketing)"
    )
    default_class.add_argument("name")
    default_class.add_argument("message_class", choices=[c.value for c in MessageClass])
    default_class.set_defaults(handler=run_default_class)
    actions.add_parser("demo", help="create the demo tenant if missing and print its credentials").set_defaults(
        handler=run_demo
    )
    domain = actions.add_parser("domain", help="manage a tenant's sending domains")
    domain.add_argument("domain_action", choices=["add", "remove"])
    domain.add_argument("name")
    domain.add_argument("domain")
    domain.set_defaults(handler=run_domain)


def _read_password(args: argparse.Namespace) -> str:
    text = args.password_file.read_text() if args.password_file else sys.stdin.read()
    password = text.splitlines()[0] if text else ""
    if len(password) < 12:
        raise TenantError("the password must have at least 12 characters")
    return password


def _run(settings: Settings, action) -> int:
    async def go() -> int:
        async with operator_connection(settings) as conn:
            return await action(TenantStore(conn))

    try:
        return asyncio.run(go())
    except (TenantError, AddressError, OSError) as exc:
        print(f"mtad: {getattr(exc, 'reply', None) or exc}", file=sys.stderr)
        return 1


def run_add(settings: Settings, args: argparse.Namespace) -> int:
    password_hash = hash_password(_read_password(args))

    async def add(store: TenantStore) -> int:
        await store.insert_tenant(args.name, password_hash)
        print(f"tenant {args.name} created")
        return 0

    return _run(settings, add)


def run_passwd(settings: Settings, args: argparse.Namespace) -> int:
    password_hash = hash_password(_read_password(args))

    async def passwd(store: TenantStore) -> int:
        await store.set_tenant_password(args.name, password_hash)
        print(f"password of {args.name} changed")
        return 0

    return _run(settings, passwd)


def run_list(settings: Settings, args: argparse.Namespace) -> int:
    async def show(store: TenantStore) -> int:
        for row in await store.list_tenants():
            state = " (disabled)" if row["disabled"] else ""
            print(f"{row['name']}{state} [{row['default_class']}]: {', '.join(row['domains']) or '-'}")
        return 0

    return _run(settings, show)


def run_default_class(settings: Settings, args: argparse.Namespace) -> int:
    async def change(store: TenantStore) -> int:
        await store.set_default_class(args.name, MessageClass(args.message_class))
        print(f"mail of {args.name} without X-Mtad-Class is {args.message_class}")
        return 0

    return _run(settings, change)


def run_domain(settings: Settings, args: argparse.Namespace) -> int:
    domain = to_ascii_domain(args.domain)

    async def change(store: TenantStore) -> int:
        if args.domain_action == "add":
            await store.add_tenant_domain(args.name, domain)
            print(f"{domain} is now a sending domain of {args.name}")
        else:
            await store.remove_tenant_domain(args.name, domain)
            print(f"{domain} removed from {args.name}")
        return 0

    return _run(settings, change)


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    """For `make run`: a demo tenant whose password is kept (0600) under state_dir, so it can be shown again."""
    secret_file = settings.state_path / "demo-tenant.password"

    async def ensure(store: TenantStore) -> int:
        credentials = await store.credentials(DEMO_TENANT)
        password = secret_file.read_text().strip() if secret_file.exists() else None
        if credentials is None or password is None:
            password = secrets.token_urlsafe(18)
            secret_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(password + "\n")
            if credentials is None:
                await store.insert_tenant(DEMO_TENANT, hash_password(password))
            else:
                await store.set_tenant_password(DEMO_TENANT, hash_password(password))
        if credentials is None or DEMO_DOMAIN not in credentials.tenant.domains:
            await store.add_tenant_domain(DEMO_TENANT, DEMO_DOMAIN)
        listen = settings.submission.listen[0] if settings.submission.listen else "127.0.0.1:2525"
        host, _, port = listen.rpartition(":")
        print(f"demo tenant: login {DEMO_TENANT}  password {password}  sending domain {DEMO_DOMAIN}")
        print(
            f"try: swaks --server {host}:{port} --tls --auth PLAIN --auth-user {DEMO_TENANT} "
            f"--auth-password '{password}' --from hello@{DEMO_DOMAIN} --to someone@example.net"
        )
        return 0

    return _run(settings, ensure)
