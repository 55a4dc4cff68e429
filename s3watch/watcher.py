"""Watching the upload directory with inotify (watchdog) and reporting every file that may be a new original."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Callable

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

try:
    from watchdog.events import EventsLostEvent
except ImportError:  # watchdog before 6 reports no lost events; the table poll still finds the photos
    EventsLostEvent = None  # type: ignore[assignment,misc]

log = structlog.get_logger("s3watch.watcher")

# The events the handlers use. Passed to watchdog as event_filter, they also set the inotify mask,
# so that the kernel no longer reports every open and close. Piwigo opens the originals to make
# thumbnails, and watchdog opens each folder it lists while adding its watches: on a gallery of
# 4,000 day folders that was 0.7 CPU-s of events decoded for nothing at every start.
_UPLOAD_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, FileMovedEvent, FileClosedEvent, DirCreatedEvent, DirMovedEvent]
if EventsLostEvent is not None:
    _UPLOAD_EVENTS.append(EventsLostEvent)
_SPOOL_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, FileMovedEvent, FileClosedEvent]


class WatchError(Exception):
    """The upload directory could not be watched; the message names the limit or setting to change."""


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into absolute file paths; new folders are scanned, because a file
    moved in right after its folder was created can arrive before the folder's watch."""

    def __init__(self, on_file: Callable[[str], None], on_events_lost: Callable[[], None]) -> None:
        # Not named on_events_lost, because watchdog calls the handler's on_events_lost(event).
        # A callback of that name without the event argument raised TypeError and ended watchdog's thread.
        self._on_file = on_file
        self._report_events_lost = on_events_lost

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent):
            self._on_file(os.fsdecode(event.dest_path))
        elif isinstance(event, (FileCreatedEvent, FileClosedEvent)):
            self._on_file(os.fsdecode(event.src_path))
        elif isinstance(event, DirMovedEvent):
            self._scan(os.fsdecode(event.dest_path))
        elif isinstance(event, DirCreatedEvent):
            self._scan(os.fsdecode(event.src_path))

    def on_events_lost(self, event: FileSystemEvent) -> None:
        """Report an overflow of the kernel's event queue; watchdog calls this for an EventsLostEvent."""
        self._report_events_lost()

    def _scan(self, folder: str) -> None:
        for current, _folders, files in os.walk(folder):
            for name in files:
                self._on_file(os.path.join(current, name))


class _WatchdogLogHandler(logging.Handler):
    """A log handler for watchdog's warnings that a folder below the root could not be watched
    (watch limit reached) and that the kernel's event queue overflowed."""

    def __init__(self, on_watch_limit: Callable[[str], None], on_events_lost: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_watch_limit = on_watch_limit
        self._report_events_lost = on_events_lost

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Unable to watch" in message:
            self._on_watch_limit(message)
        elif "queue overflowed" in message:
            # watchdog 7 logs this for a recursive watch as it rebuilds it. Its EventsLostEvent was
            # seen not to reach the handler, so the warning reports the loss too. The agent logs repeats once.
            self._report_events_lost()


class UploadWatcher:
    """A recursive inotify watch on the upload directory.

    `on_file` is called from watchdog's thread with the absolute path of every file created,
    moved in or closed after writing, including files in folders created later. The same path
    may be reported several times: the caller coalesces. `on_events_lost` is called when the
    kernel's event queue overflowed, and `on_watch_limit` when a folder could not be watched.
    """

    def __init__(self, upload_path: Path, on_file: Callable[[str], None], on_events_lost: Callable[[], None],
                 on_watch_limit: Callable[[str], None] | None = None) -> None:
        self.upload_path = upload_path
        self._handler = _Handler(on_file, on_events_lost)
        self._observer: InotifyObserver | None = None
        # watchdog only logs a sub-folder it could not watch; this turns the log record into a call.
        self._limit_handler = _WatchdogLogHandler(on_watch_limit or (lambda _message: None), on_events_lost)
        self._watchdog_logger = logging.getLogger("watchdog.observers.inotify")

    def start(self) -> None:
        """Start watching. Raises WatchError when inotify refuses, naming the limit to raise."""
        observer = InotifyObserver()
        self._watchdog_logger.addHandler(self._limit_handler)
        try:
            observer.schedule(self._handler, str(self.upload_path), recursive=True, event_filter=_UPLOAD_EVENTS)
            observer.start()
        except OSError as error:
            observer.stop()
            self._watchdog_logger.removeHandler(self._limit_handler)
            if error.errno == errno.ENOSPC:
                raise WatchError(
                    f"inotify watch limit reached while watching {self.upload_path}: "
                    "raise fs.inotify.max_user_watches (sysctl -w fs.inotify.max_user_watches=524288)"
                ) from None
            if error.errno == errno.EMFILE:
                raise WatchError("inotify instance limit reached: raise fs.inotify.max_user_instances (sysctl -w fs.inotify.max_user_instances=1024)") from None
            raise WatchError(f"could not watch {self.upload_path}: {error.strerror or error}") from None
        self._observer = observer

    @property
    def running(self) -> bool:
        """Whether the watch is in place."""
        return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        """Stop watching and wait for watchdog's thread to end."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
        self._watchdog_logger.removeHandler(self._limit_handler)


class _SpoolHandler(FileSystemEventHandler):
    """Calls `on_list` for every file created, moved in or closed after writing in the spool directory."""

    def __init__(self, on_list: Callable[[], None]) -> None:
        self._on_list = on_list

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, (FileCreatedEvent, FileMovedEvent, FileClosedEvent)):
            self._on_list()


class SpoolWatcher:
    """An inotify watch on the spool directory (not its subfolders), so that a list dropped
    there is picked up at once instead of at the next look at the directory.

    `on_list` is called from watchdog's thread, possibly several times for one list.
    """

    def __init__(self, spool_dir: Path, on_list: Callable[[], None]) -> None:
        self.spool_dir = spool_dir
        self._handler = _SpoolHandler(on_list)
        self._observer: InotifyObserver | None = None

    def start(self) -> None:
        """Start watching. Raises WatchError when inotify refuses or the directory is missing."""
        observer = InotifyObserver()
        try:
            observer.schedule(self._handler, str(self.spool_dir), recursive=False, event_filter=_SPOOL_EVENTS)
            observer.start()
        except OSError as error:
            observer.stop()
            raise WatchError(f"could not watch {self.spool_dir}: {error.strerror or error}") from None
        self._observer = observer

    def stop(self) -> None:
        """Stop watching and wait for watchdog's thread to end."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
