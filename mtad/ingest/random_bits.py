"""Random numbers for queue ids from the operating system's CSPRNG, read 4 KiB at a time.

`secrets.randbits(32)` reads 4 bytes with one getrandom() system call per message (~2 % of the event loop in
a py-spy profile of benchmarks/relay.py); the bytes are the same kind here, only fetched in bulk. A forked
child drops the parent's unread bytes, so two processes never hand out the same numbers.
"""

from __future__ import annotations

import os

_CHUNK = 4096


class RandomBits:
    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._forget)

    def next32(self) -> int:
        if self._offset + 4 > len(self._buffer):
            self._buffer, self._offset = os.urandom(_CHUNK), 0
        start, self._offset = self._offset, self._offset + 4
        return int.from_bytes(self._buffer[start : self._offset], "big")

    def _forget(self) -> None:
        self._buffer, self._offset = b"", 0
