"""policy/ holds decisions only: no asyncio, sockets, database, metrics or clock reads (ARCHITECTURE.md)."""

import ast
from pathlib import Path

import mtad.policy

FORBIDDEN_MODULES = {"asyncio", "socket", "asyncpg", "aiosmtpd", "aiosmtplib", "prometheus_client", "time", "ssl"}
FORBIDDEN_CALLS = {("datetime", "now"), ("datetime", "utcnow"), ("date", "today"), ("time", "time")}


def _policy_files():
    return sorted(Path(mtad.policy.__file__).parent.glob("*.py"))


def test_policy_modules_import_no_io_or_clock():
    for path in _policy_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not set(names) & FORBIDDEN_MODULES, f"{path.name} imports {names}"


def test_policy_modules_read_no_clock():
    for path in _policy_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = node.func.value
                if isinstance(target, ast.Name):
                    assert (target.id, node.func.attr) not in FORBIDDEN_CALLS, f"{path.name} reads the clock"
