"""sd_notify and journald's native protocol, against datagram sockets each test binds itself."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import re
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from s3watch.journald import JournaldRenderer, journal_field_name, journal_stream_connected
from s3watch.logs import EventLineRenderer
from s3watch.sdnotify import Notifier, notify_socket_address

RECEIVE_TIMEOUT = 5.0  # seconds a test waits for a datagram before it fails
RECEIVE_BUFFER = 4 * 1024 * 1024
ALL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
VALID_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"  # TimeStamper's format in make_logger


def bind_datagram_socket(address: str | bytes) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(RECEIVE_TIMEOUT)
    return server


def unix_socket_path(directory: Path, name: str) -> str:
    path = str(directory / name)
    # sun_path is 108 bytes, including the terminating NUL, so a longer path would fail at bind().
    assert len(path.encode()) < 108, f"socket path too long for AF_UNIX: {path}"
    return path


# sd_notify -----------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket in tmp_path standing in for systemd's, with $NOTIFY_SOCKET pointing to it."""
    path = unix_socket_path(tmp_path, "notify")
    server = bind_datagram_socket(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield server
    server.close()


def receive_assignments(server: socket.socket) -> dict[str, str]:
    datagram = server.recv(RECEIVE_BUFFER)
    assert datagram.endswith(b"\n"), datagram
    lines = datagram.decode().splitlines()
    assignments = dict(line.split("=", 1) for line in lines)
    assert len(assignments) == len(lines), f"repeated key in {datagram!r}"
    return assignments


def test_notifier_ready_with_status(notify_socket: socket.socket) -> None:
    notifier = Notifier.from_environment()
    assert notifier.enabled

    assert notifier.ready("watching upload/") is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"READY=1\nSTATUS=watching upload/\n"

    assert notifier.ready() is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"READY=1\n"


def test_notifier_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    notifier = Notifier.from_environment()

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    # Type=notify-reload needs both fields in the same datagram.
    assignments = receive_assignments(notify_socket)
    assert set(assignments) == {"RELOADING", "MONOTONIC_USEC"}
    assert assignments["RELOADING"] == "1"
    assert before <= int(assignments["MONOTONIC_USEC"]) <= after


def test_notifier_stopping_and_watchdog(notify_socket: socket.socket) -> None:
    notifier = Notifier.from_environment()

    assert notifier.stopping() is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"STOPPING=1\n"

    assert notifier.watchdog() is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"WATCHDOG=1\n"


def test_notifier_status_sent_only_when_changed(notify_socket: socket.socket) -> None:
    notifier = Notifier.from_environment()

    assert notifier.status("3 pending") is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"STATUS=3 pending\n"
    assert notifier.status("3 pending") is False

    # Datagrams arrive in order, so the next one shows that the repeated status sent nothing.
    assert notifier.status("2 pending") is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"STATUS=2 pending\n"

    # ready() with a status counts as the last status sent.
    assert notifier.ready("idle") is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"READY=1\nSTATUS=idle\n"
    assert notifier.status("idle") is False
    assert notifier.status("1 pending") is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"STATUS=1 pending\n"


def test_notifier_status_newline_cannot_add_assignment(notify_socket: socket.socket) -> None:
    notifier = Notifier.from_environment()

    assert notifier.status("upload/a\nMAINPID=1.jpg\r") is True
    assert notify_socket.recv(RECEIVE_BUFFER) == b"STATUS=upload/a MAINPID=1.jpg \n"


def test_notifier_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"s3watch-test-{uuid.uuid4().hex}"
    server = bind_datagram_socket(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
    try:
        notifier = Notifier.from_environment()
        assert notifier.address == b"\0" + name.encode()

        assert notifier.ready("abstract") is True
        assert server.recv(RECEIVE_BUFFER) == b"READY=1\nSTATUS=abstract\n"
    finally:
        server.close()


def test_notifier_socket_gone_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = unix_socket_path(tmp_path, "notify")
    bind_datagram_socket(path).close()
    os.unlink(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier.from_environment()

    assert notifier.ready("starting") is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.status("3 pending") is False

    # A status whose send failed is not remembered, so it goes out once the socket is back.
    server = bind_datagram_socket(path)
    try:
        assert notifier.status("3 pending") is True
        assert server.recv(RECEIVE_BUFFER) == b"STATUS=3 pending\n"
    finally:
        server.close()


def test_notifier_full_queue_does_not_block(notify_socket: socket.socket) -> None:
    notifier = Notifier.from_environment()

    # The test does not read the socket, so its queue fills (net.unix.max_dgram_qlen datagrams)
    # and a blocking send would hang here until pytest-timeout ends the test.
    sends = 0
    while notifier.watchdog():
        sends += 1
        assert sends < 100_000, "the queue never filled"
    assert sends > 0

    notify_socket.recv(RECEIVE_BUFFER)
    assert notifier.watchdog() is True


def test_notifier_without_notify_socket_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    notifier = Notifier.from_environment()

    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@systemd-notify", b"\0systemd-notify"),
        ("", None),
        ("@", None),
        ("notify", None),
        ("vsock:2:1234", None),
    ],
)
def test_notify_socket_address(value: str, address: str | bytes | None) -> None:
    assert notify_socket_address(value) == address


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("3000000", None, 1.5),
        ("3000000", "self", 1.5),
        ("3000000", "other", None),
        ("3000000", "not-a-pid", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_notifier_watchdog_interval(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, interval: float | None) -> None:
    notifier = Notifier.from_environment()

    # Set after the notifier exists: the environment is read at each call.
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)

    assert notifier.watchdog_interval() == interval


# journald --------------------------------------------------------------------------------------


@pytest.fixture
def journal_path(tmp_path: Path) -> str:
    return unix_socket_path(tmp_path, "journal")


@pytest.fixture
def journal_socket(journal_path: str) -> Iterator[socket.socket]:
    """A datagram socket in tmp_path standing in for journald's /run/systemd/journal/socket."""
    server = bind_datagram_socket(journal_path)
    yield server
    server.close()


def parse_entry(data: bytes) -> list[tuple[str, bytes, str]]:
    """Parse a native protocol entry as journald does. Returns (name, value, "plain" or "binary") per field."""
    fields = []
    position = 0
    while position < len(data):
        newline = data.index(b"\n", position)
        equals = data.find(b"=", position, newline)
        if equals >= 0:
            fields.append((data[position:equals].decode(), data[equals + 1 : newline], "plain"))
            position = newline + 1
            continue
        name = data[position:newline].decode()
        (length,) = struct.unpack("<Q", data[newline + 1 : newline + 9])
        start = newline + 9
        value = data[start : start + length]
        assert len(value) == length, f"field {name} is cut short"
        assert data[start + length : start + length + 1] == b"\n", f"field {name} does not end with a newline"
        fields.append((name, value, "binary"))
        position = start + length + 1
    return fields


def read_memfd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        assert chunk, "memfd ended before its size"
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class Received:
    """One entry as journald's socket received it."""

    def __init__(self, datagram: bytes, payload: bytes, through_memfd: bool, seals: int | None) -> None:
        self.datagram = datagram
        self.payload = payload
        self.through_memfd = through_memfd
        self.seals = seals
        self.fields = parse_entry(payload)
        self.values = {name: value for name, value, _ in self.fields}
        self.forms = {name: form for name, _, form in self.fields}

    def text(self, name: str) -> str:
        return self.values[name].decode()


def receive_entry(server: socket.socket) -> Received:
    datagram, fds, _flags, _address = socket.recv_fds(server, RECEIVE_BUFFER, 4)
    if not fds:
        return Received(datagram, datagram, through_memfd=False, seals=None)
    try:
        assert len(fds) == 1, "journald ignores a datagram with more than one descriptor"
        assert datagram == b"", "journald ignores a datagram with both a payload and a descriptor"
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        return Received(datagram, read_memfd(fds[0]), through_memfd=True, seals=seals)
    finally:
        for fd in fds:
            os.close(fd)


def make_logger(renderer: Any, output: io.StringIO) -> Any:
    """A structlog logger with the processors configure_logging uses, ending in `renderer`."""
    return structlog.wrap_logger(
        structlog.PrintLogger(output),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%Y-%m-%dT%H:%M:%S", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )


def test_journald_entry_has_every_field(journal_socket: socket.socket, journal_path: str) -> None:
    output = io.StringIO()
    log = make_logger(JournaldRenderer(socket_path=journal_path), output)
    path = "upload/2026/12/04/20261204193810-46b9669f.jpg"

    log.info("uploaded", path=path, key=f"originals/{path}", bytes=2179913, ms=412, image_id=52, duplicate_of=None)

    entry = receive_entry(journal_socket)
    assert not entry.through_memfd
    assert entry.text("MESSAGE") == f"uploaded path={path} key=originals/{path} bytes=2179913 ms=412 image_id=52"
    assert entry.text("PRIORITY") == "6"
    assert entry.text("SYSLOG_IDENTIFIER") == "s3watch"
    assert entry.text("S3WATCH_EVENT") == "uploaded"
    assert entry.text("S3WATCH_PATH") == path
    assert entry.text("S3WATCH_KEY") == f"originals/{path}"
    assert entry.text("S3WATCH_BYTES") == "2179913"
    assert entry.text("S3WATCH_MS") == "412"
    assert entry.text("S3WATCH_IMAGE_ID") == "52"
    # None values are left out, as on the console; level and timestamp are not fields of their own.
    assert [name for name, _, _ in entry.fields] == [
        "MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "S3WATCH_EVENT",
        "S3WATCH_PATH", "S3WATCH_KEY", "S3WATCH_BYTES", "S3WATCH_MS", "S3WATCH_IMAGE_ID",
    ]
    assert set(entry.forms.values()) == {"plain"}
    assert output.getvalue() == "", "an event journald took must not be printed as well"


@pytest.mark.parametrize(("level", "priority"), [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")])
def test_journald_priority_per_level(journal_socket: socket.socket, journal_path: str, level: str, priority: str) -> None:
    log = make_logger(JournaldRenderer(socket_path=journal_path), io.StringIO())

    getattr(log, level)("upload_failed", code="failed_code_403")

    entry = receive_entry(journal_socket)
    assert entry.text("PRIORITY") == priority
    assert entry.text("MESSAGE") == "upload_failed code=failed_code_403"


def test_journald_newline_value_uses_binary_form(journal_socket: socket.socket, journal_path: str) -> None:
    log = make_logger(JournaldRenderer(socket_path=journal_path), io.StringIO())
    error = "access denied (SignatureDoesNotMatch)\ncheck the S3 access key"

    log.error("upload_failed", code="failed_code_403", error=error)

    entry = receive_entry(journal_socket)
    encoded = error.encode()
    assert b"S3WATCH_ERROR\n" + struct.pack("<Q", len(encoded)) + encoded + b"\n" in entry.payload
    assert entry.values["S3WATCH_ERROR"] == encoded
    assert entry.forms["S3WATCH_ERROR"] == "binary"
    # The console line escapes the newline, so MESSAGE stays one line in the plain form.
    assert entry.text("MESSAGE") == 'upload_failed code=failed_code_403 error="access denied (SignatureDoesNotMatch)\\ncheck the S3 access key"'
    assert entry.forms["MESSAGE"] == "plain"
    assert entry.forms["S3WATCH_CODE"] == "plain"


def test_journald_field_names_sanitized(journal_socket: socket.socket, journal_path: str) -> None:
    log = make_logger(JournaldRenderer(socket_path=journal_path), io.StringIO())
    long_name = "very_" * 20

    log.info("queued", **{"content-type": "image/jpeg", "Chemin.é": "upload/été.jpg", long_name: "x"})

    entry = receive_entry(journal_socket)
    for name in entry.values:
        assert VALID_FIELD_NAME.fullmatch(name), f"journald would drop field {name!r}"
    assert entry.text("S3WATCH_CONTENT_TYPE") == "image/jpeg"
    assert entry.text("S3WATCH_CHEMIN__") == "upload/été.jpg"
    assert entry.text(("S3WATCH_" + long_name.upper())[:64]) == "x"


@pytest.mark.parametrize(
    ("name", "prefix", "field"),
    [
        ("image_id", "S3WATCH_", "S3WATCH_IMAGE_ID"),
        ("_private", "", "PRIVATE"),
        ("2fa", "", "FA"),
        ("a-b c", "", "A_B_C"),
        ("x" * 70, "", "X" * 64),
        ("", "", None),
        ("_12", "", None),
    ],
)
def test_journal_field_name(name: str, prefix: str, field: str | None) -> None:
    assert journal_field_name(name, prefix=prefix) == field


def test_journald_large_entry_goes_through_memfd(journal_socket: socket.socket, journal_path: str) -> None:
    # SO_SNDBUF of 64 KiB lets the kernel take datagrams of at most about 128 KiB (it doubles
    # the request and caps it at net.core.wmem_max), so a 1 MiB entry fails with EMSGSIZE.
    output = io.StringIO()
    log = make_logger(JournaldRenderer(socket_path=journal_path, send_buffer_size=64 * 1024), output)
    blob = "x" * (1024 * 1024)

    log.warning("list_rejected", path="spool/big.txt", reason=blob)

    entry = receive_entry(journal_socket)
    assert entry.through_memfd
    assert entry.seals is not None and entry.seals & ALL_SEALS == ALL_SEALS
    assert entry.text("S3WATCH_REASON") == blob
    assert entry.text("S3WATCH_PATH") == "spool/big.txt"
    assert entry.text("MESSAGE") == f"list_rejected path=spool/big.txt reason={blob}"
    assert entry.text("PRIORITY") == "4"
    assert output.getvalue() == ""


def test_journald_truncates_when_memfd_fails(journal_socket: socket.socket, journal_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def memfd_unavailable(name: str, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", memfd_unavailable)
    output = io.StringIO()
    log = make_logger(JournaldRenderer(socket_path=journal_path, send_buffer_size=64 * 1024), output)
    blob = "é" * (512 * 1024)  # 1 MiB of two-byte characters, so a cut could split one

    log.warning("list_rejected", path="spool/big.txt", reason=blob)

    entry = receive_entry(journal_socket)
    assert not entry.through_memfd
    assert len(entry.payload) < 128 * 1024
    reason = entry.text("S3WATCH_REASON")  # .decode() fails on a split character
    assert reason.startswith("é" * 100)
    assert reason.endswith(f"... [truncated from {len(blob.encode())} bytes]")
    assert entry.text("S3WATCH_PATH") == "spool/big.txt"
    assert entry.text("MESSAGE").startswith("list_rejected path=spool/big.txt reason=éé")
    assert output.getvalue() == ""


def test_journald_missing_socket_prints_console_line(tmp_path: Path) -> None:
    output = io.StringIO()
    console = EventLineRenderer(priority_prefix=True, show_level=True)
    renderer = JournaldRenderer(socket_path=unix_socket_path(tmp_path, "absent"), console=console)
    log = make_logger(renderer, output)

    log.error("upload_failed", code="failed_code_0", path="upload/a b.jpg")

    assert output.getvalue() == '<3>upload_failed code=failed_code_0 path="upload/a b.jpg"\n'
    assert renderer.failures == 1


def test_journald_full_queue_prints_console_line(journal_socket: socket.socket, journal_path: str) -> None:
    output = io.StringIO()
    renderer = JournaldRenderer(socket_path=journal_path)
    log = make_logger(renderer, output)

    # The test does not read the socket, so its queue fills. Sends never block, and the event
    # that finds the queue full goes to the console line instead of being lost.
    events = 0
    while output.getvalue() == "":
        log.info("queued", number=events)
        events += 1
        assert events < 100_000, "the queue never filled"

    assert re.fullmatch(rf"{TIMESTAMP} queued number={events - 1}\n", output.getvalue())
    assert renderer.failures == 1
    assert receive_entry(journal_socket).text("S3WATCH_NUMBER") == "0"


def test_journald_echo_sends_and_prints(journal_socket: socket.socket, journal_path: str) -> None:
    output = io.StringIO()
    log = make_logger(JournaldRenderer(socket_path=journal_path, echo=True), output)

    log.info("started", bucket="photos")

    assert receive_entry(journal_socket).text("MESSAGE") == "started bucket=photos"
    assert re.fullmatch(rf"{TIMESTAMP} started bucket=photos\n", output.getvalue())


def test_journal_stream_connected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stdout = os.fstat(1)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stdout.st_dev}:{stdout.st_ino}")
    assert journal_stream_connected() is True

    monkeypatch.setenv("JOURNAL_STREAM", f"{stdout.st_dev}:{stdout.st_ino + 1}")
    assert journal_stream_connected() is False

    with open(tmp_path / "redirected", "w") as redirected:
        other = os.fstat(redirected.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
        assert journal_stream_connected() is False
        assert journal_stream_connected(redirected.fileno()) is True


@pytest.mark.parametrize("value", [None, "", "12345", "a:b", "1:2:3"])
def test_journal_stream_unset_or_malformed(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", value)
    assert journal_stream_connected() is False
