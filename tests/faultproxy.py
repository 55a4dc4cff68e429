"""A fault-injecting HTTP/1.1 proxy on loopback, between the agent and a local S3 server.

The proxy parses each request's head and body framing, so it can act on one request at a
time on a kept-alive connection. A test schedules faults at run time:

- `error_response`: the proxy responds with the status itself (and an S3 XML error body)
  instead of forwarding;
- `connection_reset`: the proxy closes the client socket with SO_LINGER 0 (the peer gets RST)
  after the request head, in the middle of the body, or after the server responded;
- `stall`: the proxy forwards part of the body, then holds the connection: either it reads and
  drops the rest until the client gives up, or it stops reading until the test heals the proxy;
- `hold`: the proxy holds the request, unread, until the test heals the proxy, then forwards it,
  so that the test can act on the server while the request is in flight.

With no fault scheduled, or for a request that a fault's `match` rejects, the request goes
to the server on a fresh upstream connection. When the server cannot be reached, the client
connection is reset, so the client sees a connection error, as with no server at all.

The proxy listens on 127.0.0.1 only and connects to nothing but the given loopback port.
It uses the standard library only: an asyncio event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

LOOPBACK = "127.0.0.1"
MAX_HEAD_BYTES = 64 * 1024
RELAY_CHUNK = 64 * 1024
# Headers that concern one connection only; the proxy sets its own on each side.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"})
LINGER_SECONDS = 5.0  # max time an error response waits for the client to close before the proxy closes
# Receive buffer of the client sockets. A small one (the kernel doubles it) makes a proxy that stops
# reading block the client's send after a few MiB, instead of after up to tcp_rmem's maximum.
RECEIVE_BUFFER = 128 * 1024
HOLD_POLL_SECONDS = 0.05
STOP_TIMEOUT = 10.0


class ProxyError(Exception):
    """The proxy could not start, or was given an upstream that is not on loopback."""


@dataclass(frozen=True)
class RequestHead:
    """A request line and its headers, as the client sent them (names keep their case)."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """Return the first value of header `name` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def path(self) -> str:
        """The target's path without its query, percent-decoded: `/bucket/key` for S3's path style."""
        return unquote(urlsplit(self.target).path)

    @property
    def expects_continue(self) -> bool:
        return (self.header("Expect") or "").lower() == "100-continue"

    @property
    def body_length(self) -> int | None:
        """The body's length in bytes: 0 without a body, None for a chunked body."""
        if "chunked" in (self.header("Transfer-Encoding") or "").lower():
            return None
        return int(self.header("Content-Length") or 0)

    @property
    def keeps_alive(self) -> bool:
        return self.version == "HTTP/1.1" and (self.header("Connection") or "").lower() != "close"

    def upstream_bytes(self) -> bytes:
        """Serialize the head for the server: hop-by-hop headers removed, `Connection: close` added.

        `Expect` goes too, because the proxy sends `100 Continue` itself. botocore does not
        sign `Expect`, so the signature stays valid. `Host` is kept because it is signed.
        """
        lines = [f"{self.method} {self.target} {self.version}"]
        lines += [f"{name}: {value}" for name, value in self.headers if name.lower() not in HOP_BY_HOP]
        lines += ["Connection: close", "", ""]
        return "\r\n".join(lines).encode("latin-1")


@dataclass(frozen=True)
class RequestRecord:
    """One request the proxy read, with what it did to it.

    `action` is `forwarded`, `unreachable` (the server refused the connection and the client
    was reset), `error`, `reset`, `stall` or `hold` (forwarded after the test healed the proxy).
    `at` is a `time.monotonic()` reading.
    """

    at: float
    method: str
    path: str
    action: str


@dataclass
class Fault:
    """A fault for the requests that `match` accepts (all when None).

    `count` is the number of requests it applies to; None keeps it until the schedule changes.
    Build faults with `error_response`, `connection_reset`, `stall` and `hold`.
    """

    kind: str  # "error", "reset", "stall" or "hold"
    status: int = 0
    body: bytes = b""
    stage: str = "headers"  # for a reset: "headers", "body" or "response"
    fraction: float = 0.5  # share of a request body forwarded before a reset or stall in the body
    keep_reading: bool = True  # for a stall: read and drop the rest of the body, or stop reading
    count: int | None = None
    match: Callable[[RequestHead], bool] | None = None


def s3_error_body(code: str, message: str) -> bytes:
    """Return an S3 error document, as S3 sends with a 4xx or 5xx status."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message><RequestId>faultproxy</RequestId></Error>"
    ).encode()


def error_response(status: int, code: str, message: str | None = None, count: int | None = None,
                   match: Callable[[RequestHead], bool] | None = None) -> Fault:
    """Respond with `status` and an S3 error body whose `Code` is `code`, without forwarding."""
    body = s3_error_body(code, message or f"fault injected by the test proxy: {code}")
    return Fault(kind="error", status=status, body=body, count=count, match=match)


def connection_reset(stage: str = "headers", count: int | None = None, match: Callable[[RequestHead], bool] | None = None,
                     fraction: float = 0.5) -> Fault:
    """Reset the client connection at `stage`.

    `headers`: right after the request head. `body`: after `fraction` of the body went to the
    server (a request without a body is reset after its head). `response`: after the server
    responded to the whole request, before the client gets the response.
    """
    if stage not in ("headers", "body", "response"):
        raise ValueError(f"invalid reset stage {stage!r}: expected headers, body or response")
    return Fault(kind="reset", stage=stage, count=count, match=match, fraction=fraction)


def stall(count: int | None = None, match: Callable[[RequestHead], bool] | None = None, fraction: float = 0.5,
          keep_reading: bool = True) -> Fault:
    """Forward the head and `fraction` of the body, then hold the connection.

    With `keep_reading`, the proxy reads and drops the rest of the body, so the client waits
    for a response until it closes the connection. Without it, the proxy stops reading, so the
    client's send blocks once the socket buffers are full, and the connection is held until
    `FaultProxy.heal` or `FaultProxy.stop`. A request without a body is held right after its
    head and never reaches the server.
    """
    return Fault(kind="stall", count=count, match=match, fraction=fraction, keep_reading=keep_reading)


def hold(count: int | None = None, match: Callable[[RequestHead], bool] | None = None) -> Fault:
    """Hold the request, unread, until `FaultProxy.heal`, then forward it as usual.

    The client waits for its response meanwhile and may time out, after which the request is
    forwarded all the same if the proxy already has its bytes.
    """
    return Fault(kind="hold", count=count, match=match)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection so that the peer gets RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def _parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Split a message head into its first line and its headers. Raises ValueError."""
    lines = raw.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


async def _body_pieces(reader: asyncio.StreamReader, length: int | None) -> AsyncIterator[bytes]:
    """Yield a message body as it is on the wire: `length` bytes, or chunked when `length` is None."""
    if length is not None:
        async for piece in _exactly(reader, length):
            yield piece
        return
    while True:
        size_line = await reader.readuntil(b"\r\n")
        yield size_line
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:
                trailer = await reader.readuntil(b"\r\n")
                yield trailer
                if trailer == b"\r\n":
                    return
        async for piece in _exactly(reader, size + 2):  # the chunk and its CRLF
            yield piece


async def _exactly(reader: asyncio.StreamReader, count: int) -> AsyncIterator[bytes]:
    """Yield the next `count` bytes in pieces of at most RELAY_CHUNK. Raises IncompleteReadError at an early end."""
    left = count
    while left > 0:
        piece = await reader.read(min(left, RELAY_CHUNK))
        if not piece:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(piece)
        yield piece


async def _relay_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, length: int | None,
                      budget: int | None = None) -> bool:
    """Copy a body from `reader` to `writer` (or discard it when `writer` is None).

    With a `budget`, stop after that many bytes. Returns whether the whole body was copied.
    """
    sent = 0
    async for piece in _body_pieces(reader, length):
        if budget is not None and sent + len(piece) >= budget:
            if writer is not None:
                writer.write(piece[: budget - sent])
                await writer.drain()
            return False
        if writer is not None:
            writer.write(piece)
            await writer.drain()
        sent += len(piece)
    return True


def _partial_budget(head: RequestHead, fraction: float) -> int:
    """Return how many body bytes to forward before a fault in the body: always short of the whole."""
    length = head.body_length
    if length is None:
        return RELAY_CHUNK // 2  # a chunked body of unknown length: its first bytes
    return max(0, min(length - 1, int(length * fraction)))


class FaultProxy:
    """A loopback HTTP/1.1 proxy to one S3 server, with a schedule of faults and request counters.

    Thread-safe: the test thread changes the schedule and reads the counters while the
    proxy's event loop serves connections in its own thread.
    """

    def __init__(self, upstream_url: str) -> None:
        self.upstream_port = self._loopback_port(upstream_url)
        self.port = 0
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._records: list[RequestRecord] = []
        self._connections = 0
        self._held_connections = 0
        self._heal_generation = 0  # incremented by each heal(), which releases held connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _loopback_port(url: str) -> int:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname != LOOPBACK or parts.port is None:
            raise ProxyError(f"upstream {url!r} is not http://{LOOPBACK}:PORT: the proxy only talks to a server on loopback")
        return parts.port

    @property
    def endpoint_url(self) -> str:
        """The proxy's address, to use as `s3.endpoint_url`."""
        return f"http://{LOOPBACK}:{self.port}"

    # Control, from the test thread --------------------------------------------------------

    def start(self) -> "FaultProxy":
        """Start serving on a free loopback port. Raises ProxyError when the loop does not start."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(STOP_TIMEOUT) or self._server is None:
            raise ProxyError("the proxy's event loop did not start")
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection, then end the loop's thread."""
        if self._loop is None or self._thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._close_all(), self._loop)
        future.result(timeout=STOP_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=STOP_TIMEOUT)
        self._loop = None
        self._thread = None

    def set_upstream(self, upstream_url: str) -> None:
        """Send later requests to another loopback server."""
        port = self._loopback_port(upstream_url)
        with self._lock:
            self.upstream_port = port

    def inject(self, *faults: Fault) -> None:
        """Replace the schedule: each fault applies in turn until its count runs out, then the next one.

        The proxy counts down copies, so a test may inject the same Fault again.
        """
        with self._lock:
            self._faults = [dataclasses.replace(fault) for fault in faults]

    def heal(self) -> None:
        """Forward every request from now on: close the stalls that stopped reading, and forward held requests.

        Stalls that keep reading stay open until their client closes them.
        """
        with self._lock:
            self._faults = []
            self._heal_generation += 1

    def records(self, action: str | None = None, since: float | None = None, until: float | None = None) -> list[RequestRecord]:
        """Return the requests read so far, optionally only those with `action` in [since, until) of time.monotonic()."""
        with self._lock:
            records = list(self._records)
        if action is not None:
            records = [record for record in records if record.action == action]
        if since is not None:
            records = [record for record in records if record.at >= since]
        if until is not None:
            records = [record for record in records if record.at < until]
        return records

    def count(self, action: str | None = None, since: float | None = None, until: float | None = None) -> int:
        """Return how many requests `records` would return."""
        return len(self.records(action, since, until))

    @property
    def connections(self) -> int:
        """The number of client connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def held(self) -> int:
        """The number of connections that a stall or a hold keeps waiting right now."""
        with self._lock:
            return self._held_connections

    # The event loop -----------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)  # accepted sockets inherit it
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, sock=listener, limit=MAX_HEAD_BYTES))
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _close_all(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_TIMEOUT)
        await self._server.wait_closed()

    def _take_fault(self, head: RequestHead) -> tuple[Fault | None, int]:
        """Return the fault for this request (None to forward it) and the heal generation.

        Uses up one of the fault's count.
        """
        with self._lock:
            generation = self._heal_generation
            if not self._faults:
                return None, generation
            fault = self._faults[0]
            if fault.match is not None and not fault.match(head):
                return None, generation
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.pop(0)
            return fault, generation

    def _record(self, head: RequestHead, action: str) -> None:
        with self._lock:
            self._records.append(RequestRecord(at=time.monotonic(), method=head.method, path=head.path, action=action))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection, one request at a time, until either side closes it."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
        try:
            while True:
                head = await self._read_request_head(reader)
                if head is None:
                    break
                fault, generation = self._take_fault(head)
                if fault is None:
                    keep_alive = await self._forward(head, reader, writer)
                elif fault.kind == "error":
                    keep_alive = await self._answer_error(head, fault, reader, writer)
                elif fault.kind == "reset":
                    keep_alive = await self._reset_request(head, fault, reader, writer)
                elif fault.kind == "stall":
                    keep_alive = await self._stall(head, fault, generation, reader, writer)
                else:
                    await self._hold_until_healed(generation)
                    keep_alive = await self._forward(head, reader, writer, action="hold")
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # the client or the server broke the connection: the client sees that break
        except asyncio.CancelledError:
            # stop() cancels every connection. Ending normally keeps asyncio from logging the cancellation as an error.
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    async def _read_request_head(self, reader: asyncio.StreamReader) -> RequestHead | None:
        """Read the next request head; None when the client closed the connection between requests."""
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            if error.partial.strip():
                raise
            return None
        request_line, headers = _parse_head(raw)
        method, target, version = request_line.split(" ", 2)
        return RequestHead(method=method, target=target, version=version, headers=tuple(headers))

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        with self._lock:
            port = self.upstream_port
        try:
            return await asyncio.open_connection(LOOPBACK, port, limit=MAX_HEAD_BYTES)
        except OSError:
            return None

    async def _send_head_upstream(self, head: RequestHead, client: asyncio.StreamWriter) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Open the upstream connection and send the head; tell a client that waits for it to send the body.

        Returns None, after resetting the client, when the server cannot be reached.
        """
        upstream = await self._open_upstream()
        if upstream is None:
            _reset(client)
            return None
        upstream[1].write(head.upstream_bytes())
        if head.expects_continue:
            client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await client.drain()
        return upstream

    async def _forward(self, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       action: str = "forwarded") -> bool:
        """Send one request to the server and its response back, and record it with `action`.

        Returns whether the client connection stays open.
        """
        upstream = await self._send_head_upstream(head, writer)
        if upstream is None:
            self._record(head, "unreachable")
            return False
        self._record(head, action)
        upstream_reader, upstream_writer = upstream
        try:
            await _relay_body(reader, upstream_writer, head.body_length)
            return await self._relay_response(head, upstream_reader, writer)
        finally:
            upstream_writer.transport.abort()

    async def _read_response_head(self, upstream: asyncio.StreamReader) -> tuple[int, str, list[tuple[str, str]]]:
        """Read the server's final response head, skipping interim 1xx responses."""
        while True:
            raw = await upstream.readuntil(b"\r\n\r\n")
            status_line, headers = _parse_head(raw)
            status = int(status_line.split(" ", 2)[1])
            if status >= 200 or status == 101:
                return status, status_line, headers

    async def _relay_response(self, head: RequestHead, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Relay the server's response to the client. Returns whether the client connection stays open."""
        status, status_line, headers = await self._read_response_head(upstream)
        names = {name.lower(): value for name, value in headers}
        if head.method == "HEAD" or status in (204, 304):
            length: int | None = 0
        elif "chunked" in names.get("transfer-encoding", "").lower():
            length = None
        elif "content-length" in names:
            length = int(names["content-length"])
        else:
            length = -1  # the body ends when the server closes the connection
        keep_alive = head.keeps_alive and length != -1
        lines = [status_line] + [f"{name}: {value}" for name, value in headers if name.lower() not in HOP_BY_HOP]
        if not keep_alive:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if length == -1:
            while piece := await upstream.read(RELAY_CHUNK):
                writer.write(piece)
                await writer.drain()
        else:
            await _relay_body(upstream, writer, length)
        await writer.drain()
        return keep_alive

    async def _answer_error(self, head: RequestHead, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Respond with the fault's status instead of forwarding, then close the connection."""
        self._record(head, "error")
        if not head.expects_continue:
            # Read the body the client is sending: closing with unread bytes would send RST.
            await _relay_body(reader, None, head.body_length)
        reason = HTTPStatus(fault.status).phrase
        lines = [
            f"HTTP/1.1 {fault.status} {reason}", "Content-Type: application/xml", f"Content-Length: {len(fault.body)}",
            "x-amz-request-id: faultproxy", "Connection: close", "", "",
        ]
        writer.write("\r\n".join(lines).encode("latin-1") + (b"" if head.method == "HEAD" else fault.body))
        await writer.drain()
        # Close gracefully: stop sending, then wait for the client to close after it read the response.
        writer.write_eof()
        try:
            await asyncio.wait_for(self._discard_until_closed(reader), LINGER_SECONDS)
        except TimeoutError:
            pass
        return False

    async def _reset_request(self, head: RequestHead, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Reset the client connection at the fault's stage; the server gets the request up to that point."""
        self._record(head, "reset")
        has_body = head.body_length != 0
        if fault.stage == "headers" or (fault.stage == "body" and not has_body):
            _reset(writer)
            return False
        upstream = await self._send_head_upstream(head, writer)
        if upstream is None:
            return False
        upstream_reader, upstream_writer = upstream
        try:
            if fault.stage == "body":
                await _relay_body(reader, upstream_writer, head.body_length, budget=_partial_budget(head, fault.fraction))
            else:
                await _relay_body(reader, upstream_writer, head.body_length)
                # The server has acted on the request once its response head is here.
                await self._read_response_head(upstream_reader)
            _reset(writer)
        finally:
            upstream_writer.transport.abort()
        return False

    async def _stall(self, head: RequestHead, fault: Fault, generation: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> bool:
        """Forward part of the request, then keep the connection open without forwarding more."""
        self._record(head, "stall")
        upstream = None
        if head.body_length != 0:
            upstream = await self._send_head_upstream(head, writer)
            if upstream is None:
                return False
        with self._lock:
            self._held_connections += 1
        try:
            if upstream is not None:
                await _relay_body(reader, upstream[1], head.body_length, budget=_partial_budget(head, fault.fraction))
            if fault.keep_reading:
                # Forward nothing more; read and drop what the client still sends, until it gives up and closes.
                await self._discard_until_closed(reader)
            else:
                await self._wait_for_heal(generation)
        finally:
            with self._lock:
                self._held_connections -= 1
            if upstream is not None:
                # A plain close (FIN), so the server gets a request body that ends early.
                upstream[1].close()
        return False

    async def _hold_until_healed(self, generation: int) -> None:
        with self._lock:
            self._held_connections += 1
        try:
            await self._wait_for_heal(generation)
        finally:
            with self._lock:
                self._held_connections -= 1

    async def _wait_for_heal(self, generation: int) -> None:
        """Return once heal() was called after the heal generation `generation` began."""
        while True:
            with self._lock:
                if self._heal_generation != generation:
                    return
            await asyncio.sleep(HOLD_POLL_SECONDS)

    @staticmethod
    async def _discard_until_closed(reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(RELAY_CHUNK):
                pass
        except (ConnectionError, OSError):
            pass
