"""The log lines of ``martinet serve`` and ``martinet work`` on stderr: text for people, JSON for log shippers."""

from __future__ import annotations

import datetime
import json
import logging
import sys

#: ``--log-format`` choices.
FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601 UTC), ``level``, ``logger``, ``message``, ``pid``, and
    ``exception`` (the traceback) when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        # ensure_ascii: a line stays one line, and any byte a handler logged stays readable.
        return json.dumps(line, ensure_ascii=True)


def setup(level: str, fmt: str = "text") -> None:
    """Log records of ``level`` and above to stderr, as text (time, level, logger, message) or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # peewee logs every SQL statement at DEBUG: far too much for a server's debug log.
    logging.getLogger("peewee").setLevel(max(logging.INFO, logging.getLogger().level))
