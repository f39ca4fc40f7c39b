"""Which temporary replies mean "you are sending too fast" rather than "this recipient, later".

421 always does (RFC 5321: the service is closing the channel). Other 4xx replies are matched against the
configured patterns (shaping.toml `[throttle] patterns`, regular expressions over "code enhanced text",
case-insensitive), such as "4.7.0 .*rate limit" or Gmail's "4.7.28".
"""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=32)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


def is_throttling_reply(code: int, enhanced: str | None, text: str, patterns: tuple[str, ...]) -> bool:
    if code == 421:
        return True
    if not 400 <= code < 500:
        return False
    matcher = _compiled(patterns)
    return bool(matcher and matcher.search(f"{code} {enhanced or ''} {text}"))
