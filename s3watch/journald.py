"""Log output to journald's native protocol, with each structlog field as a journal field.

Under systemd, standard output already reaches the journal, but only as text. Sent through the
native protocol (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/), each event keeps its fields, so
`journalctl S3WATCH_EVENT=upload_failed` or `journalctl S3WATCH_IMAGE_ID=42` selects events
without parsing lines. The protocol is a datagram of `KEY=value` fields to an AF_UNIX socket;
this module speaks it with the standard library only.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

JOURNAL_SOCKET_PATH = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "s3watch"
FIELD_PREFIX = "S3WATCH_"

# Syslog priorities of structlog's levels. The aliases are structlog method names, used when
# no add_log_level processor has set the event's "level".
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2, "fatal": 2}
DEFAULT_PRIORITY = 6

# journald skips a field whose name is longer than 64 characters, starts with "_" (those are
# the fields journald adds itself) or a digit, or has a character outside A-Z, 0-9 and "_"
# (journal_field_valid() in systemd's journal-file.c).
FIELD_NAME_MAX = 64
FIELD_NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")

# Keys of the event dict that become MESSAGE, PRIORITY and S3WATCH_EVENT, or that journald
# records itself (the time of the entry), so they get no S3WATCH_ field of their own.
RESERVED_KEYS = frozenset({"event", "level", "timestamp"})

# libsystemd requests an 8 MiB send buffer on its journal socket (SNDBUF_SIZE in journal-send.c),
# so that big entries fit in a datagram. The kernel caps the request at net.core.wmem_max.
SEND_BUFFER_SIZE = 8 * 1024 * 1024

# Byte limits tried in turn for each value when an entry fits neither a datagram nor a memfd.
TRUNCATION_LIMITS = (64 * 1024, 8 * 1024, 1024)

Renderer = Callable[[WrappedLogger, str, EventDict], Any]


# Cached because every event converts the names of its fields again, and an agent logs few names.
@functools.lru_cache(maxsize=256)
def journal_field_name(name: str, prefix: str = FIELD_PREFIX) -> str | None:
    """Return `prefix` + `name` as a valid journal field name.

    The name is upper-cased, each character other than A-Z, 0-9 and "_" becomes "_", leading
    "_" and digits are removed and the result is cut to 64 characters. Returns None when
    nothing remains. Two names may map to the same field ("image-id" and "image_id").
    """
    candidate = (prefix + name).upper()
    sanitized = "".join(character if character in FIELD_NAME_CHARACTERS else "_" for character in candidate)
    sanitized = sanitized.lstrip("_0123456789")[:FIELD_NAME_MAX]
    return sanitized or None


def encode_field(name: str, value: bytes) -> bytes:
    """Serialize one field: `NAME=value\\n`, or the binary form when the value contains a newline.

    The binary form is the name, a newline, the value's length as a 64-bit little-endian
    integer, the value and a newline. `name` must already be a valid field name.
    """
    key = name.encode("ascii")
    if b"\n" in value:
        return key + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
    return key + b"=" + value + b"\n"


def encode_entry(fields: Iterable[tuple[str, bytes]]) -> bytes:
    """Serialize a journal entry, its fields in the given order."""
    return b"".join(encode_field(name, value) for name, value in fields)


def field_value(value: Any) -> bytes:
    """Convert a structlog field's value to journal field bytes: bytes as they are, anything else as str() in UTF-8.

    Characters that UTF-8 cannot encode (lone surrogates from undecodable file names) become "?".
    """
    if isinstance(value, bytes):
        return value
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", errors="replace")


def journal_stream_connected(fd: int = 1, environ: Mapping[str, str] | None = None) -> bool:
    """Tell whether `fd` (standard output by default) is the journal stream systemd connected.

    systemd sets $JOURNAL_STREAM to the device and inode numbers ("DEV:INO", in decimal) of the
    stream it gave the service. A match with fstat(fd) shows that no redirection took place since.
    Returns False when the variable is unset or malformed, or when `fd` is closed.
    """
    environ = os.environ if environ is None else environ
    device, separator, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not separator:
        return False
    try:
        expected = (int(device), int(inode))
        status = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (status.st_dev, status.st_ino) == expected


def _truncate(value: bytes, limit: int) -> bytes:
    if len(value) <= limit:
        return value
    # Cut before a UTF-8 continuation byte (10xxxxxx), so that no character is split in two.
    cut = limit
    while cut > 0 and value[cut] & 0xC0 == 0x80:
        cut -= 1
    return value[:cut] + f"... [truncated from {len(value)} bytes]".encode()


class JournalSocket:
    """A client of journald's native protocol socket that sends one entry per datagram.

    An entry too large for a datagram goes in a sealed memfd passed with SCM_RIGHTS, as the
    protocol allows. When that fails too, its values are truncated until it fits. Sends never
    block, and a failed send returns False instead of raising. The methods may be called from
    any thread.
    """

    def __init__(self, path: str = JOURNAL_SOCKET_PATH, send_buffer_size: int = SEND_BUFFER_SIZE) -> None:
        """Create a client for the socket at `path`; the socket is opened at the first send.

        `send_buffer_size` is the SO_SNDBUF requested, which bounds the size of a datagram.
        """
        self.path = path
        self.send_buffer_size = send_buffer_size
        self.failures = 0  # entries that send() returned False for
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    def send(self, fields: Sequence[tuple[str, bytes]]) -> bool:
        """Send one entry. Returns True when journald's socket took it, in any of the three forms.

        Returns False when the socket is missing or refuses the entry, or when its queue is
        full (journald is not reading). journald then never gets the entry.
        """
        with self._lock:
            sent = self._send_entry(fields)
            if not sent:
                self.failures += 1
            return sent

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send_entry(self, fields: Sequence[tuple[str, bytes]]) -> bool:
        payload = encode_entry(fields)
        error = self._send_datagram(payload)
        if error is None:
            return True

        # libsystemd (sd_journal_sendv) turns to a memfd on these three errors, because a
        # datagram with nothing but a file descriptor needs almost no buffer space.
        if error not in (errno.EMSGSIZE, errno.ENOBUFS, errno.EAGAIN):
            return False
        if self._send_memfd(payload):
            return True
        if error != errno.EMSGSIZE:
            return False
        return self._send_truncated(fields)

    def _open(self) -> socket.socket | None:
        if self._socket is None:
            try:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError:
                return None
            client.setblocking(False)
            try:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_size)
            except OSError:
                pass  # the default buffer works too; entries that do not fit go through a memfd
            self._socket = client
        return self._socket

    def _send_datagram(self, payload: bytes, ancillary: list[tuple[int, int, bytes]] | None = None) -> int | None:
        """Send one datagram to journald. Returns None when sent, else the errno of the failure."""
        client = self._open()
        if client is None:
            return errno.EBADF
        buffers = [payload] if payload else []
        try:
            client.sendmsg(buffers, ancillary or [], socket.MSG_NOSIGNAL, self.path)
        except OSError as error:
            return error.errno or errno.EIO
        return None

    def _send_memfd(self, payload: bytes) -> bool:
        """Send `payload` in a sealed memfd, as an empty datagram that carries the descriptor."""
        try:
            fd = os.memfd_create("s3watch-journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError):
            return False  # AttributeError: not Linux, so no memfd_create
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            # journald reads only a memfd that can no longer change (memfd_get_sealed() in
            # systemd's memfd-util.c), so that a client cannot alter an entry being read.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            descriptors = array.array("i", [fd]).tobytes()
            return self._send_datagram(b"", [(socket.SOL_SOCKET, socket.SCM_RIGHTS, descriptors)]) is None
        except OSError:
            return False
        finally:
            os.close(fd)

    def _send_truncated(self, fields: Sequence[tuple[str, bytes]]) -> bool:
        """Send the entry with every value cut to a limit, trying smaller limits while it is too large."""
        for limit in TRUNCATION_LIMITS:
            payload = encode_entry((name, _truncate(value, limit)) for name, value in fields)
            error = self._send_datagram(payload)
            if error is None:
                return True
            if error != errno.EMSGSIZE:
                return False
        return False


class JournaldRenderer:
    """A structlog renderer that sends each event to journald, and prints it only when that fails.

    It must be the last processor. Each event becomes one journal entry with MESSAGE (the
    console line: the event name, then the fields as logfmt), PRIORITY (the syslog priority of
    its level), SYSLOG_IDENTIFIER, S3WATCH_EVENT (the event name) and one S3WATCH_<NAME> field
    per structlog field whose value is not None. After a successful send the renderer raises
    structlog.DropEvent, so the event is not printed a second time, unless `echo` is set. When
    journald did not take the event, the renderer returns the `console` line instead, so the
    event goes to standard output and is not lost.
    """

    def __init__(
        self,
        socket_path: str = JOURNAL_SOCKET_PATH,
        *,
        console: Renderer | None = None,
        echo: bool = False,
        identifier: str = SYSLOG_IDENTIFIER,
        send_buffer_size: int = SEND_BUFFER_SIZE,
    ) -> None:
        """Create a renderer that sends to journald's native socket at `socket_path`.

        `console` renders what the logger prints after a failed send, or after every send with
        `echo`. By default it prints the MESSAGE text, after the event's timestamp if it has one.
        `identifier` is the SYSLOG_IDENTIFIER, which `journalctl -t` selects on.
        `send_buffer_size` is the SO_SNDBUF requested.
        """
        # Imported here and not at the top: logs.configure_logging creates this renderer, and
        # imports at the top of both modules would be circular.
        from .logs import EventLineRenderer

        self._message_renderer = EventLineRenderer(priority_prefix=False, show_level=False)
        self.console = console if console is not None else self._message_renderer
        self.echo = echo
        self.identifier = identifier
        self.journal = JournalSocket(socket_path, send_buffer_size)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
        """Send the event to journald. Returns the console line, or raises structlog.DropEvent once journald has the event."""
        sent = self.journal.send(self.entry_fields(method_name, event_dict))
        if sent and not self.echo:
            raise structlog.DropEvent
        return self.console(logger, method_name, dict(event_dict))

    def entry_fields(self, method_name: str, event_dict: EventDict) -> list[tuple[str, bytes]]:
        """Return the journal fields of an event, in the order they are sent. `event_dict` is not changed."""
        level = str(event_dict.get("level", method_name)).lower()
        event = str(event_dict.get("event", ""))

        # The console renderer pops the keys it prints, so it gets a copy. Without a timestamp,
        # because journald stamps every entry itself.
        message_dict = {key: value for key, value in event_dict.items() if key != "timestamp"}
        message = self._message_renderer(None, method_name, message_dict)

        fields = [
            ("MESSAGE", field_value(message)),
            ("PRIORITY", str(PRIORITIES.get(level, DEFAULT_PRIORITY)).encode()),
            ("SYSLOG_IDENTIFIER", field_value(self.identifier)),
            (f"{FIELD_PREFIX}EVENT", field_value(event)),
        ]
        for key, value in event_dict.items():
            if key in RESERVED_KEYS or value is None:
                continue
            name = journal_field_name(str(key))
            if name is not None:
                fields.append((name, field_value(value)))
        return fields

    @property
    def failures(self) -> int:
        """The number of events journald did not take, which `console` rendered instead."""
        return self.journal.failures

    def close(self) -> None:
        """Close the socket to journald; a later event opens a new one."""
        self.journal.close()
