"""The sd_notify protocol: readiness, reload, stop, status and watchdog messages to systemd.

A service started with Type=notify or Type=notify-reload finds the service manager's socket in
$NOTIFY_SOCKET and sends it datagrams of newline-separated `KEY=value` assignments (sd_notify(3)).
This module speaks that protocol with the standard library only, so s3watch needs no libsystemd.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

# The value of $NOTIFY_SOCKET starts with "/" for a socket in the file system and with "@" for one
# in the Linux abstract namespace (sd_notify(3)). systemd also accepts "vsock:CID:PORT", which
# this module does not support: a Notifier for such an address sends nothing.
ABSTRACT_PREFIX = "@"


def notify_socket_address(value: str) -> str | bytes | None:
    """Convert a $NOTIFY_SOCKET value to an AF_UNIX address for socket.sendmsg.

    Returns the path for a file-system socket, the name with a leading NUL byte for an abstract
    socket, or None when the value is empty or of another kind (vsock, a relative path).
    """
    if value.startswith("/"):
        return value
    if value.startswith(ABSTRACT_PREFIX) and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def monotonic_usec() -> int:
    """Return CLOCK_MONOTONIC in microseconds, the clock MONOTONIC_USEC= is read against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _single_line(text: str) -> str:
    # A newline would end the STATUS= assignment and start another one, so a status built from a
    # file name could otherwise send READY=1 or MAINPID= to the service manager.
    return text.replace("\r", " ").replace("\n", " ")


class Notifier:
    """A sender of sd_notify messages to the service manager, or a no-op without $NOTIFY_SOCKET.

    Each method returns True when its datagram was sent and False when nothing was sent. Sending
    never blocks and never raises: when the socket is gone or its queue is full, the message is
    dropped and the method returns False. The methods may be called from any thread.
    """

    def __init__(self, address: str | bytes | None, environ: Mapping[str, str] | None = None) -> None:
        """Create a notifier that sends to `address` (an AF_UNIX address, or None for a no-op).

        `environ` is where watchdog_interval() reads $WATCHDOG_USEC and $WATCHDOG_PID; it
        defaults to os.environ.
        """
        self.address = address
        self._environ = os.environ if environ is None else environ
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._last_status: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Create a notifier for $NOTIFY_SOCKET in `environ` (default os.environ).

        Returns a notifier that sends nothing when the variable is unset, empty or not a
        file-system or abstract socket address.
        """
        environ = os.environ if environ is None else environ
        address = notify_socket_address(environ.get("NOTIFY_SOCKET", ""))
        return cls(address, environ)

    @property
    def enabled(self) -> bool:
        """Whether this notifier has a socket address to send to."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `assignments` ("READY=1", "STATUS=...") to the service manager in one datagram.

        Returns True when the datagram was sent; False when the notifier is a no-op, the socket
        could not be created, or the send failed (socket gone, queue full, access denied).
        """
        with self._lock:
            return self._send(assignments)

    def ready(self, status: str | None = None) -> bool:
        """Send READY=1, with STATUS= when `status` is given: start-up or a reload has finished."""
        if status is None:
            return self.notify("READY=1")
        status = _single_line(status)
        with self._lock:
            sent = self._send(("READY=1", f"STATUS={status}"))
            if sent:
                self._last_status = status
        return sent

    def reloading(self) -> bool:
        """Send RELOADING=1 with MONOTONIC_USEC=, which starts a reload for the service manager.

        Type=notify-reload needs both fields in one datagram since systemd 253, and it waits for
        ready() to finish the reload (systemd.service(5)).
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        """Send STOPPING=1: the service has begun its shutdown."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Send STATUS=`text` (newlines become spaces) unless it equals the last status sent.

        Returns False without sending when the status is unchanged, so a loop may call this on
        every turn. A status whose send failed is sent again at the next call.
        """
        text = _single_line(text)
        with self._lock:
            if text == self._last_status:
                return False
            sent = self._send((f"STATUS={text}",))
            if sent:
                self._last_status = text
        return sent

    def watchdog(self) -> bool:
        """Send WATCHDOG=1, the keep-alive ping that WatchdogSec= expects."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Return the seconds between watchdog() calls: half of $WATCHDOG_USEC (sd_watchdog_enabled(3)).

        Returns None when the notifier is a no-op, $WATCHDOG_USEC is unset or not a positive
        integer, or $WATCHDOG_PID is set to another process's pid (the variables were then
        meant for a parent process). The environment is read at each call.
        """
        if self.address is None:
            return None
        try:
            usec = int(self._environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None

        pid = self._environ.get("WATCHDOG_PID")
        if pid is not None:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket; a later message opens a new one."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send(self, assignments: tuple[str, ...]) -> bool:
        """Send the assignments as one datagram; the caller holds self._lock."""
        if self.address is None:
            return False
        # "replace" because a status built from an undecodable file name contains lone surrogates.
        payload = ("\n".join(assignments) + "\n").encode(errors="replace")

        # One unconnected socket serves every message. Each datagram carries the address, so a
        # service manager that re-creates its socket is still reached.
        if self._socket is None:
            try:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError:
                return False
            self._socket.setblocking(False)
        try:
            self._socket.sendmsg([payload], [], socket.MSG_NOSIGNAL, self.address)
        except OSError:
            # ENOENT or ECONNREFUSED when the socket is gone, EAGAIN when its queue is full:
            # the message is lost, and the caller carries on.
            return False
        return True
