"""The HMAC key behind unsubscribe links and VERP addresses: from `feedback.secret_file`, or generated once
under state_dir (0600). Several nodes must share one key, or a link made by one would fail on another; workers
starting together make it once (`mtad.state_files`: each checking and writing on its own crashed one of them)."""

from __future__ import annotations

import secrets
from pathlib import Path

from mtad.state_files import made_once, write_atomically


def load_or_create_key(configured: str, state_dir: Path) -> bytes:
    path = Path(configured) if configured else state_dir / "feedback.key"
    if not path.exists():
        if configured:
            raise FileNotFoundError(f"feedback.secret_file: no such file {path}")
        with made_once(path.parent, path.name):
            if not path.exists():
                write_atomically(path, (secrets.token_bytes(32).hex() + "\n").encode("ascii"), 0o600)
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 32:
        raise ValueError(f"{path}: the feedback key must be at least 32 bytes (64 hex digits)")
    return key
