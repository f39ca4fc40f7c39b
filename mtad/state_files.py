"""Files mtad makes for itself (the feedback key, the development TLS certificate, the embedded cluster's
settings and password): made by exactly one process, and seen by every other whole or not at all.

Worker processes (`mtad run --workers N`) start together. Each checking "missing?" and then writing its own
left one worker crashing on a half-written key file, or holding another's TLS key with a mismatching
certificate. `made_once` serialises the check and the making under an exclusive lock beside the files (released
when the file closes, also if the process dies); `write_atomically` writes beside the target and renames.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def made_once(directory: Path, name: str) -> Iterator[None]:
    """Hold the lock for making `name` in `directory`; check again inside, then make it if still missing."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_atomically(path: Path, data: bytes | str, mode: int) -> None:
    """Written beside `path` and renamed over it: a reader sees the whole file or none. Created with `mode`
    (never briefly wider), and exactly `mode` whatever the umask."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)
        os.fchmod(file.fileno(), mode)
    os.replace(temporary, path)
