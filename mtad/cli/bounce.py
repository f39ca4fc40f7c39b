"""`mtad bounce parse FILE [--json]`: what mtad concludes from one inbound message (a .eml file, or - for stdin).

Prints the kind (bounce, complaint, auto_reply, unknown) and why; for a bounce one line per recipient
(address, action, status, category, hard or soft, the remote's words); for a complaint the complained
recipient. `--json` prints the whole verdict. The rules are `feedback.bounce_rules_file` when set, else
config/bounce_rules.toml of this installation. Exit 0 for any verdict, 1 when the file cannot be read,
2 when the rules file is broken.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mtad.feedback.parse import MAX_MESSAGE_BYTES, FeedbackVerdict, load_bounce_rules, parse_feedback


def add_commands(commands: argparse._SubParsersAction) -> None:
    bounce = commands.add_parser("bounce", help="inspect bounces, complaints and auto-replies")
    actions = bounce.add_subparsers(dest="bounce_action", required=True)
    parse = actions.add_parser("parse", help="show how mtad reads one message (DSN, ARF report, auto-reply)")
    parse.add_argument("file", help="the message as received (.eml), or - for standard input")
    parse.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parse.set_defaults(handler=run_parse)


def rules_path(settings) -> Path | None:
    """`feedback.bounce_rules_file` when configured, else None (the installation's config/bounce_rules.toml)."""
    configured = getattr(getattr(settings, "feedback", None), "bounce_rules_file", "")
    return Path(configured).resolve() if configured else None


def run_parse(settings, args: argparse.Namespace) -> int:
    try:
        rules = load_bounce_rules(rules_path(settings))
    except (OSError, ValueError) as exc:
        print(f"mtad: bounce rules: {exc}", file=sys.stderr)
        return 2
    try:
        message = _read(args.file)
    except OSError as exc:
        print(f"mtad: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    verdict = parse_feedback(message, rules)
    print(json.dumps(dataclasses.asdict(verdict), indent=2) if args.json else describe(verdict))
    return 0


def _read(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read(MAX_MESSAGE_BYTES)
    with open(name, "rb") as file:
        return file.read(MAX_MESSAGE_BYTES)


def describe(verdict: FeedbackVerdict) -> str:
    lines = [f"kind: {verdict.kind} ({verdict.reason})"]
    for report in verdict.recipients:
        lines.append(
            f"recipient: {report.recipient}  action={report.action}  status={report.status or '-'}"
            f"  category={report.category}  {'hard' if report.hard else 'soft'}"
            f"  diagnostic={report.diagnostic or '-'}"
        )
    if verdict.kind == "complaint":
        lines.append(f"complained: {verdict.complained_recipient or '-'}  feedback-type={verdict.feedback_type or '-'}")
    original = [("message-id", verdict.original_message_id), ("envelope-from", verdict.original_envelope_from)]
    original += [(name, value) for name, value in verdict.original_headers.items() if name.startswith("x-mtad-")]
    if any(value for _, value in original):
        lines.append("original: " + "  ".join(f"{name}={value}" for name, value in original if value))
    return "\n".join(lines)
