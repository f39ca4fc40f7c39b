"""Structured logs: one event per line, as text (`key=value`) or JSON (`logging.format = "json"`).

Call `log_event(logger, "submission.queued", queue_id=..., tenant=...)`. Callers pass masked client
addresses (policy.ip_privacy) and never message bodies or passwords; no field here can carry a newline,
so one event is always one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

_FIELDS = "mtad_fields"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS: fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [ts, record.levelname.lower(), record.name, _one_line(record.getMessage())]
        parts += [f"{key}={_one_line(str(value))}" for key, value in getattr(record, _FIELDS, {}).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += " exception=" + _one_line(self.formatException(record.exc_info))
        return line


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class IterationBatchingHandler(logging.StreamHandler):
    """Info lines made during one event-loop iteration reach the stream in one write, at the iteration's end.

    A write (and flush) per record was ~2.5 % of the daemon's event loop in a py-spy profile of
    benchmarks/relay.py, one `submission.queued` line per message, and sessions answered by the same group
    commit log in the same iteration. A warning or an error is written at once, with every line pending before
    it, in order; so are records from another thread or from outside a running loop. What a crash can lose is
    the info lines of the iteration it happened in; `logging.shutdown` at exit writes what is pending."""

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or not self._flush_later():
            self.flush()

    def _flush_later(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False  # no loop in this thread: write now
        if self._flush_on is not loop:  # none scheduled, or on a loop that may have closed before running it
            loop.call_soon(self.flush)
            self._flush_on = loop
        return True

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_on = None
            if self._pending and self.stream is not None:
                self.stream.write("".join(self._pending))
                self._pending.clear()
            super().flush()
        finally:
            self.release()


def configure_logging(format_name: str, level: str) -> None:
    handler = IterationBatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format_name == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO, AUTH exchanges and addresses included: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Neither format shows the process or thread: do not look them up for every record (os.getpid() and
    # friends were ~2 % of the daemon's event loop in a native py-spy profile of benchmarks/relay.py).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    # Nor the caller's file and line: finding them walks the stack for every record (the logging HOWTO's
    # "Optimization" section names this switch).
    logging._srcfile = None
