"""`mtad dkim keygen DOMAIN --selector S --algo rsa|ed25519 [--bits 2048]` and `mtad dkim show DOMAIN`.

Both print the DNS TXT record to publish, in zone-file form. The key directory is the `dkim.key_dir` setting,
by default `<state_dir>/dkim`; the daemon signs with what it finds there (mtad.sign.keys).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtad.config import Settings
from mtad.policy.addresses import AddressError, to_ascii_domain
from mtad.sign.keys import (
    DEFAULT_RSA_BITS,
    KeyFileError,
    check_selector,
    generate_private_key,
    key_path,
    load_key_directory,
    write_key,
    zone_file_record,
)


def add_commands(commands: argparse._SubParsersAction) -> None:
    dkim = commands.add_parser("dkim", help="manage DKIM signing keys and print their DNS records")
    actions = dkim.add_subparsers(dest="dkim_action", required=True)
    keygen = actions.add_parser("keygen", help="create a signing key for a domain and print its DNS TXT record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", required=True, help="the s= name, published as <selector>._domainkey.<domain>")
    keygen.add_argument("--algo", choices=["rsa", "ed25519"], default="rsa", help="key type (default: rsa)")
    keygen.add_argument("--bits", type=int, default=DEFAULT_RSA_BITS, help=f"RSA size (default: {DEFAULT_RSA_BITS})")
    keygen.set_defaults(handler=run_keygen)
    show = actions.add_parser("show", help="print the DNS TXT records of a domain's signing keys")
    show.add_argument("domain")
    show.set_defaults(handler=run_show)


def key_directory(settings: Settings) -> Path:
    """`dkim.key_dir` when set, else `<state_dir>/dkim`: the directory the daemon loads (Settings.dkim_key_path)."""
    if hasattr(settings, "dkim_key_path"):
        return settings.dkim_key_path
    configured = getattr(getattr(settings, "dkim", None), "key_dir", "")
    return Path(configured).resolve() if configured else settings.state_path / "dkim"


def run_keygen(settings: Settings, args: argparse.Namespace) -> int:
    key_dir = key_directory(settings)
    try:
        domain = to_ascii_domain(args.domain)
        selector = check_selector(args.selector)
        key = write_key(key_dir, domain, selector, generate_private_key(args.algo, args.bits))
    except (KeyFileError, AddressError, ValueError, OSError) as exc:
        print(f"mtad: {getattr(exc, 'reply', None) or exc}", file=sys.stderr)
        return 1
    print(f"; {args.algo} key written to {key_path(key_dir, domain, selector, args.algo)}")
    print("; publish this TXT record, then reload mtad to sign with the key:")
    print(zone_file_record(key))
    return 0


def run_show(settings: Settings, args: argparse.Namespace) -> int:
    key_dir = key_directory(settings)
    try:
        domain = to_ascii_domain(args.domain)
        keys = load_key_directory(key_dir).get(domain, [])
    except (KeyFileError, AddressError) as exc:
        print(f"mtad: {getattr(exc, 'reply', None) or exc}", file=sys.stderr)
        return 1
    if not keys:
        print(f"mtad: no DKIM key for {domain} under {key_dir}", file=sys.stderr)
        return 1
    for key in keys:
        print(zone_file_record(key))
    return 0
