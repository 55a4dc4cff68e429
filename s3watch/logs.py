"""Log output: structlog set up for one event per line, readable by people and by journalctl."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

# sd-daemon(3) priority prefixes: systemd reads "<N>" at the start of a line as the line's
# syslog priority, so `journalctl -p warning` shows only problems.
SYSLOG_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# A value with one of these (space, quote, equals sign, backslash, control characters) is quoted.
_NEEDS_QUOTES = re.compile(r'[ "=\\\x00-\x1f]')


def _render_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (int, float, bool)):
        text = str(value)
    else:
        text = repr(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        return f'"{escaped}"'
    return text


class EventLineRenderer:
    """Render `uploaded path=... key=...`: the event name, then the fields as logfmt.

    Under systemd (stdout connected to the journal) each line starts with its syslog priority.
    """

    def __init__(self, priority_prefix: bool, show_level: bool) -> None:
        self.priority_prefix = priority_prefix
        self.show_level = show_level

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> str:
        level = event_dict.pop("level", "info")
        event = event_dict.pop("event", "")
        timestamp = event_dict.pop("timestamp", None)
        fields = " ".join(f"{name}={_render_value(value)}" for name, value in event_dict.items() if value is not None)
        line = f"{event} {fields}".rstrip()
        if self.priority_prefix:
            return f"<{SYSLOG_PRIORITIES.get(level, 6)}>{line}"
        prefix = f"{timestamp} " if timestamp else ""
        if self.show_level and level != "info":
            prefix += f"{level.upper()} "
        return prefix + line


class BufferedLineLogger:
    """A structlog logger that collects the agent loop's lines until `flush_logs`, which the loop calls once a turn.

    Printing each line is a system call, after which the loop waits for the interpreter lock
    that the upload workers hold. On a batch of small files that was about a third of the
    loop's busy time. A line from another thread (a worker's retry, the store check at start)
    is written at once, after the lines collected before it: the loop may be waiting several
    seconds for its next turn.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._loop_thread = threading.get_ident()  # the agent sets up logging in the thread that runs its loop

    def msg(self, message: str) -> None:
        with self._lock:
            self._lines.append(message)
            if threading.get_ident() != self._loop_thread:
                self._write_collected()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        """Write the collected lines in one go."""
        with self._lock:
            self._write_collected()

    def _write_collected(self) -> None:
        # Called with the lock held, so that lines from two threads keep their order.
        lines, self._lines = self._lines, []
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # nowhere left to report it: the output was closed


_buffered: BufferedLineLogger | None = None


def print_problem(kind: str, message: str) -> None:
    """Print a command's "error" or "warning" line to standard error, as `s3watch: error: ...`.

    Under systemd, where standard error goes to the journal, the line starts with its syslog
    priority (<3> error, <4> warning), so that `journalctl -p warning` shows why a start failed.
    """
    from .journald import journal_stream_connected

    try:
        under_journal = journal_stream_connected(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):
        under_journal = False  # a standard error without a file descriptor, such as a test's capture
    priority = {"error": "<3>", "warning": "<4>"}[kind] if under_journal else ""
    print(f"{priority}s3watch: {kind}: {message}", file=sys.stderr)


def flush_logs() -> None:
    """Write the log lines collected since the last call (the agent's loop calls this once a turn)."""
    if _buffered is not None:
        _buffered.flush()


def configure_logging(format: str = "console", level: str = "info", stream: TextIO | None = None, buffered: bool = False) -> None:
    """Set up structlog for the agent's output.

    When standard output is connected to the journal, each event goes to journald's native
    socket with its fields as journal fields (falling back to a line with its syslog priority
    prefix). Otherwise events are printed as console lines or JSON, at `level` and above.
    """
    from .journald import JOURNAL_SOCKET_PATH, JournaldRenderer, journal_stream_connected

    output = stream or sys.stdout
    under_journal = stream is None and journal_stream_connected()
    processors: list[Any] = [structlog.processors.add_log_level]
    if under_journal:
        console = EventLineRenderer(priority_prefix=True, show_level=False)
        # S3WATCH_JOURNAL_SOCKET lets tests point the agent at a socket of their own.
        socket_path = os.environ.get("S3WATCH_JOURNAL_SOCKET", JOURNAL_SOCKET_PATH)
        processors.append(JournaldRenderer(socket_path, console=console))
    elif format == "json":
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.processors.TimeStamper(fmt="%Y-%m-%dT%H:%M:%S", utc=True))
        processors.append(EventLineRenderer(priority_prefix=False, show_level=True))
    global _buffered
    flush_logs()
    _buffered = BufferedLineLogger(output) if buffered and not under_journal else None
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=(lambda *_args: _buffered) if _buffered is not None else structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
