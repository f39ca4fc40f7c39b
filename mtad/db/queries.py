"""Named SQL: the blocks of queries.sql as a read-only mapping from name to statement.

A block starts with a line `-- name --`; the comment lines that follow say why; the rest is the statement.
After procrastinate's `sql/queries.sql`: SQL stays SQL, reviewable and EXPLAIN-able on its own.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Mapping

_BLOCK_START = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    parts = _BLOCK_START.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in queries:
            raise ValueError(f"query {name} is defined twice")
        statement = "\n".join(line for line in body.strip().splitlines() if not line.startswith("--"))
        queries[name] = statement.strip().rstrip(";")
    return queries


QUERY_FILES = ("queries.sql", "cluster.sql")


@cache
def queries() -> Mapping[str, str]:
    text = "\n".join((resources.files("mtad.db") / name).read_text() for name in QUERY_FILES)
    return MappingProxyType(parse_queries(text))
