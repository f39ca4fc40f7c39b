"""The HMAC key behind unsubscribe links and VERP addresses: from `feedback.secret_file`, or generated once
under state_dir (0600). Several nodes must share one key, or a link made by one would fail on another."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_or_create_key(configured: str, state_dir: Path) -> bytes:
    path = Path(configured) if configured else state_dir / "feedback.key"
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) < 32:
            raise ValueError(f"{path}: the feedback key must be at least 32 bytes (64 hex digits)")
        return key
    if configured:
        raise FileNotFoundError(f"feedback.secret_file: no such file {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key.hex() + "\n")
    return key
