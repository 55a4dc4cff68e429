"""The agent: the loop that takes a photo from event to match to journal to upload to journal.

One thread (the one that calls `Agent.run`) owns the journal, the matcher and the queue.
Watchdog's thread and the upload workers only post messages to its inbox, so every state
change is made, journalled and fsynced in one place, in order.
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any

import structlog

from .batch import Gallery, ListRun, resolve_entries
from .config import Config, ConfigError, load_config
from .database import DatabaseError, DatabaseUnreachable, FormatRow, ImageRow, ImagesTable, TableMissing
from .journal import Journal, JournalError, Upload, epoch_of
from .logs import configure_logging, flush_logs
from .matcher import Matcher
from .metrics import Metrics, MetricsError
from .originals import CaptureSkipped, Originals
from .piwigo import database_settings, format_path, gallery_path, is_format_file, is_original
from .sdnotify import Notifier
from .spool import SpoolError, check_list, find_lists, move_failed
from .status import WAITING_FOR_STORE
from .uploader import ALREADY_PRESENT_HINT, FILE_BUSY_CODE, DuplicateIndex, Outcome, Uploader, UploadFailed, UploadRequest, object_key
from .watcher import SpoolWatcher, UploadWatcher, WatchError

log = structlog.get_logger("s3watch.agent")

# Failures that come from the store or its settings rather than from one photo. After one of
# these, uploads pause and a single probe upload is tried with a growing delay. An outage or a
# wrong key then costs a few requests, not a storm of failing ones.
STORE_WIDE_STATUSES = frozenset({0, 301, 403, 404, 429})
FIRST_PROBE_DELAY = 5.0  # seconds
POLL_BATCH = 1000  # rows read per table poll
SPOOL_CHECK_INTERVAL = 0.5  # seconds between looks at the spool directory (a directory listing) when it is not watched
SPOOL_WATCHED_CHECK_INTERVAL = 30.0  # the same while inotify reports new lists: a look now and then, in case an event was missed
NOT_STARTED = "not_started"  # the outcome of an upload handed out ahead that a worker did not start
# Seconds records that only finish uploads may wait for the next commit (fsync). With 0.25 s
# rather than 0.05 s, a batch of small files to a SeaweedFS on the same disk went about 2%
# faster, with fewer fsyncs and less CPU per file in both programs.
COMMIT_DELAY = 0.25
EVENTS_LOST_REPEAT = 1.0  # seconds within which another report of an inotify overflow is the same overflow
LIST_CHUNK = 100  # list entries resolved per loop turn, so a long list never stalls monitoring
STOP_DEADLINE = 20.0  # seconds uploads in flight get to finish on SIGTERM; below systemd's default 90 s stop timeout
JOURNAL_CHECK_INTERVAL = 60.0  # seconds between checks whether the journal needs compacting or a new snapshot
FILE_BUSY_RETRY = 10.0  # seconds before a file that was still changing is tried again
JOURNAL_RETRY_INTERVAL = 5.0  # seconds between attempts to write the journal while the disk refuses
METRICS_INTERVAL = 5.0  # seconds between updates of the gauges that need a scan
RESIZE_OPTION_MAX_AGE = 1.0  # seconds a read of Piwigo's "resize after upload" option is trusted when a file arrives
STATUS_INTERVAL = 1.0  # seconds between STATUS= messages to systemd, which would otherwise get one per loop turn
LAST_UPLOAD_FORMAT = "%Y-%m-%d %H:%M:%S %Z"  # local time, as journalctl shows it; the zone, because `s3watch status` shows UTC


class AgentError(Exception):
    """The agent cannot start; the message gives the reason and the fix."""


def acquire_lock(state_dir: Path) -> int:
    """Take the state directory's lock, so that one agent at a time owns its journal.

    Returns the lock file's descriptor, held until the process exits. Raises AgentError when
    another agent has it or the directory cannot be created.
    """
    try:
        state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except (FileExistsError, NotADirectoryError):
        raise AgentError(f"state directory {state_dir} is a file, or lies in one, not a folder: set state_dir to a folder") from None
    except OSError as error:
        raise AgentError(f"state directory {state_dir} could not be used ({error.strerror}): create it and make it writable by this user") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AgentError(f"another s3watch agent (pid {holder}) is already running on state directory {state_dir}: stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _store_wide(code: str | None) -> bool:
    """Tell whether a failure code means the whole store failed (unreachable, denied, no bucket, 5xx), not one file."""
    status = _http_status(code)
    return status is not None and (status in STORE_WIDE_STATUSES or status >= 500)


def _http_status(code: str | None) -> int | None:
    """Return the HTTP status of a failure code such as failed_code_503 (0: no connection), or None for a local failure."""
    number = str(code).rsplit("_", 1)[-1]
    return int(number) if number.isdigit() else None


class Agent:
    """The long-running agent behind `s3watch run`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # SimpleQueue, not Queue: the signal handlers put a message, and SimpleQueue's put() may
        # interrupt a get() in the same thread without deadlocking. It is also written in C,
        # which counts at hundreds of results a second.
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.abort_event = threading.Event()  # set at the stop deadline: workers give up
        self.abandoned = 0  # uploads still in flight at the stop deadline, left to the next start
        # Set by a worker as soon as the store fails store-wide, before the loop hears of it, so
        # that uploads handed out ahead do not start meanwhile. Cleared when uploads resume.
        self.store_failed = threading.Event()

        self.journal: Journal | None = None
        self.table: ImagesTable | None = None
        self.uploader: Uploader | None = None
        self.watcher: UploadWatcher | None = None
        self.spool_watcher: SpoolWatcher | None = None
        self.matcher = Matcher(config.monitor.match_timeout)
        self.duplicates: DuplicateIndex | None = None
        self.workers: ThreadPoolExecutor | None = None
        self.worker_count = config.uploads.workers

        self.ready: deque[str] = deque()  # pending uploads to dispatch now, oldest first
        self.ready_batch: deque[str] = deque()  # the same for lists and tags; dispatched after `ready`
        self.current_list: ListRun | None = None
        self.next_spool_check = 0.0
        self.journal_failing = False  # set while the state directory refuses writes
        self.watch_limit_reported = False
        self.changed_after_upload: set[str] = set()  # uploaded photos whose file changed since, logged once each
        self.arrived_in_flight: set[str] = set()  # files that appeared while their upload was in flight
        self.folders_outside_reported: set[str] = set()  # top folders of new photos outside the upload directory, warned about once
        self.next_journal_retry = 0.0
        self.originals = Originals(config.state_dir, config.uploads.originals_cap)
        self.original_resize = False  # Piwigo's "resize after upload", read from its config table
        self.original_resize_read_at = -math.inf  # time.monotonic() of the last read of that option
        self.captures_to_delete: list[str] = []  # copies on arrival to delete once the journal is committed
        self.formats_available = True  # False before Piwigo 13, which has no image_format table
        self.notifier = Notifier.from_environment()
        self.watchdog_interval = self.notifier.watchdog_interval()
        # On the monotonic clock, unlike the loop's other deadlines: a step back of the wall
        # clock must not hold the pings back until systemd kills a healthy agent.
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.status_due = False  # the status may have changed since the last one sent
        self.ready_sent = False
        self.last_upload_ts: str | None = None  # for the status line, in LAST_UPLOAD_FORMAT
        self.last_upload_at: float | None = None  # the last upload read from the journal at start, in seconds since the epoch
        self.events_lost_at = -math.inf  # time.monotonic() of the latest report of an inotify overflow
        self.last_error: str | None = None
        self.metrics: Metrics | None = None
        self.next_metrics = 0.0
        self.waiting_for_parent: dict[str, list[str]] = {}  # photo path -> its formats, uploaded after it
        self.next_list_turn = 0.0  # a list whose database look-up failed waits until then
        self.next_tag_poll = 0.0
        self.retry_at: dict[str, float] = {}  # pending uploads that failed, with when to try again
        self.in_flight: set[str] = set()
        self.blocked_code: str | None = None  # set while a store-wide failure pauses uploads
        self.probe_at = 0.0
        self.probe_delay = FIRST_PROBE_DELAY
        self.probe_path: str | None = None  # the one upload sent while uploads are paused
        self.next_poll = 0.0
        self.next_journal_check = 0.0
        self.database_down = False

    # Start and stop -----------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM or SIGINT. Returns the exit status.

        Raises AgentError, JournalError or DatabaseError when it cannot start.
        """
        config = self.config
        self._connect_database()  # a wrong password or table fails here, before anything is written
        lock_fd = acquire_lock(config.state_dir)
        try:
            self._open_journal()
            assert self.journal is not None
            self._clean_up_originals()
            self._start_database()
            self.uploader = Uploader(config.s3, config.uploads, config.links, config.piwigo.root, stop=self.abort_event,
                                     upload_dir=config.piwigo.upload_dir)
            self.duplicates = DuplicateIndex(self.journal.state.md5_index) if config.uploads.prevent_duplicates else None
            self.worker_count = config.uploads.workers
            self.workers = ThreadPoolExecutor(max_workers=self.worker_count, thread_name_prefix="upload")
            self.workers.submit(self._check_store)
            self._create_spool_dir()
            self._start_spool_watcher()
            self._restore_queue()
            self._start_watcher_if_upload_dir_appeared()
            self._install_signal_handlers()
            self._start_metrics()
            log.info(
                "started", bucket=config.s3.bucket, endpoint=config.s3.endpoint_url or "aws", prefix=config.s3.prefix or None,
                gallery=str(config.piwigo.root), monitor=config.monitor.enabled, workers=config.uploads.workers,
                pending=len(self.ready) + len(self.ready_batch) + len(self.retry_at), waiting_for_row=len(self.matcher), journal=str(self.journal.path),
            )
            self._loop()
            self._shutdown()
            return 0
        finally:
            if self.metrics is not None:
                self.metrics.close()
            if self.watcher is not None:
                self.watcher.stop()
            if self.spool_watcher is not None:
                self.spool_watcher.stop()
            if self.journal is not None:
                try:
                    self.journal.close()
                except JournalError:
                    pass  # logged by _shutdown; the journal on disk stays consistent
            if self.table is not None:
                self.table.close()
            os.close(lock_fd)

    def _open_journal(self) -> None:
        """Replay the journal, from its snapshot when it has a matching one. Raises JournalError."""
        started = time.monotonic()
        self.journal = Journal(self.config.journal_path)
        state = self.journal.state
        if state.snapshot_note is not None:
            log.info("journal_snapshot_not_used", reason=state.snapshot_note)
        if self.journal.torn_bytes:
            log.warning("journal_torn_line_dropped", bytes=self.journal.torn_bytes,
                        hint="a crash or power loss cut the last record short before it was saved; its step is done again")
        log.info("journal_read", records=state.records, from_snapshot=state.snapshot_records, uploads=len(state.uploads),
                 ms=round((time.monotonic() - started) * 1000))

        # systemd's status line and the metrics name the last upload from the start on, not only after the next one.
        latest = state.uploads.last_uploaded()
        if latest is not None:
            self.last_upload_at = epoch_of(latest.ts)
            self.last_upload_ts = time.strftime(LAST_UPLOAD_FORMAT, time.localtime(self.last_upload_at))

    def _write_snapshot(self) -> None:
        """Save the journal's state, so that the next start need not replay every record."""
        assert self.journal is not None
        started = time.monotonic()
        try:
            size = self.journal.write_snapshot()
        except JournalError as error:
            # Only the next start's speed depends on it: that start replays the records it would have covered.
            log.warning("journal_snapshot_failed", error=str(error))
            return
        log.info("journal_snapshot_written", uploads=len(self.journal.state.uploads), bytes=size,
                 ms=round((time.monotonic() - started) * 1000))

    def _start_metrics(self) -> None:
        """Open the Prometheus endpoint when metrics.listen is set. Raises AgentError when it cannot be opened."""
        if self.config.metrics.listen is None:
            return
        self.metrics = Metrics()
        # The last success survives a restart, so that an alert on its age does not fire on a quiet gallery.
        if self.last_upload_at is not None:
            self.metrics.last_success.set(self.last_upload_at)
        try:
            self.metrics.serve(self.config.metrics.listen)
        except MetricsError as error:
            raise AgentError(str(error)) from None
        log.info("metrics_listening", listen=self.config.metrics.listen)

    def _clean_up_originals(self) -> None:
        """Keep the copies on arrival that unfinished uploads refer to; delete those a crash left behind."""
        assert self.journal is not None
        referenced = [u.capture for u in self.journal.state.uploads.unfinished() if u.capture]
        deleted = self.originals.clean_up(referenced)
        if deleted:
            log.info("originals_cleaned", deleted=deleted, kept=len(referenced))

    def _connect_database(self) -> None:
        """Connect to the images table.

        An unreachable server is waited for, because it may start after the agent at boot. A
        refused login or a missing table is a configuration error and raises DatabaseError.
        """
        self.table = ImagesTable(database_settings(self.config))
        try:
            self.table.connect()
        except DatabaseUnreachable as error:
            self._database_unavailable(error)

    def _start_database(self) -> None:
        """Set the poll cursor on a first start, and read Piwigo's settings, once the database is reachable."""
        assert self.journal is not None and self.table is not None
        if self.database_down:
            return
        if self.journal.state.cursor is None:
            # A first start queues only photos added from now on; older ones are for batch mode.
            self.journal.append("cursor", image_id=self.table.max_id())
            self.journal.commit()
        self._refresh_original_resize()

    def _restore_queue(self) -> None:
        """Rebuild the queue from the journal: pending uploads go back in line, files without a row wait again."""
        assert self.journal is not None
        now = time.time()
        pending = sorted(self.journal.state.uploads.unfinished(), key=lambda u: u.ts)
        for upload in pending:
            if upload.status == "pending":
                self._line_for(upload.source).append(upload.path)
            else:
                self.matcher.add(upload.path, epoch_of(upload.detected_ts or upload.ts), now)

        # A photo recorded as gone whose file arrived while the agent was stopped: no file event
        # reports it. A file the upload would refuse again (a symbolic link, a path that leads
        # outside the gallery) stays gone. Finding the gone ones took about 0.07 s among a
        # million finished uploads.
        gallery = Gallery(self.config.piwigo.root, self.config.piwigo.upload_dir)
        for path in self.journal.state.uploads.finished_paths("gone"):
            if gallery.check_file(path) is None:
                self._on_file(os.path.join(self.config.piwigo.root, path))

    def _create_spool_dir(self) -> None:
        try:
            self.config.spool_dir.mkdir(mode=0o770, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            log.warning("spool_unavailable", spool_dir=str(self.config.spool_dir), error=error.strerror,
                        hint="it is a file, or lies in one, not a folder: set spool_dir to a folder to use batch mode")
        except OSError as error:
            log.warning("spool_unavailable", spool_dir=str(self.config.spool_dir), error=error.strerror,
                        hint="create it and make it writable by this user to use batch mode")

    def _start_spool_watcher(self) -> None:
        """Watch the spool directory for new lists; without the watch, it is looked at every SPOOL_CHECK_INTERVAL."""
        watcher = SpoolWatcher(self.config.spool_dir, on_list=lambda: self.inbox.put(("list", None)))
        try:
            watcher.start()
        except WatchError as error:
            log.warning("spool_watch_failed", error=str(error), hint=f"lists are picked up by looking every {SPOOL_CHECK_INTERVAL:g} s")
            return
        self.spool_watcher = watcher

    def _start_watcher(self) -> None:
        if not self.config.monitor.enabled or self.watcher is not None:
            return
        upload_path = self.config.piwigo.upload_path
        if not upload_path.is_dir():
            # Piwigo creates the upload directory at the first upload; the poll tick looks again.
            return
        watcher = UploadWatcher(upload_path, on_file=lambda path: self.inbox.put(("file", path)), on_events_lost=lambda: self.inbox.put(("lost", None)),
                                on_watch_limit=lambda message: self.inbox.put(("watch_limit", message)))
        watcher.start()
        self.watcher = watcher
        log.info("watching", upload_dir=str(upload_path))

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_stop(signum: int, _frame: FrameType | None) -> None:
            self.stop_event.set()
            self.inbox.put(("wake", None))

        def on_reload(_signum: int, _frame: FrameType | None) -> None:
            self.reload_event.set()
            self.inbox.put(("wake", None))

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def request_stop(self) -> None:
        """Ask the loop to stop, as SIGTERM does (for callers that run the agent in a thread)."""
        self.stop_event.set()
        self.inbox.put(("wake", None))

    def _shutdown(self) -> None:
        """Stop taking work, let uploads in flight finish until the deadline, record their outcomes."""
        assert self.journal is not None and self.workers is not None
        self.notifier.stopping()
        log.info("stopping", in_flight=len(self.in_flight))
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        deadline = time.monotonic() + STOP_DEADLINE
        while self.in_flight and time.monotonic() < deadline:
            self._handle_messages(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            self._commit(time.time())
        if self.in_flight:
            # Abandoned uploads stay pending in the journal; the next start sends them again,
            # and a conditional write keeps a finished one from being written twice.
            self.abort_event.set()
            self.abandoned = len(self.in_flight)
            log.warning("stop_deadline_passed", abandoned=self.abandoned)
        # A request that hangs keeps its worker busy until s3.read_timeout (60 s by default),
        # past systemd's stop timeout, so the workers of abandoned uploads are not waited for.
        self.workers.shutdown(wait=not self.abandoned, cancel_futures=True)
        self._handle_messages(timeout=0)
        self.next_journal_retry = 0.0
        if self._commit(time.time()):
            self._delete_captures()
            if not self.journal.snapshot_current():
                self._write_snapshot()
        else:
            log.error("journal_not_saved", hint="the last outcomes could not be recorded; their photos are checked again at the next start")
        log.info("stopped")

    # The loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self.journal is not None
        while not self.stop_event.is_set():
            self._handle_messages(timeout=self._seconds_to_next_deadline())
            if self.stop_event.is_set():
                break
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.notifier.reloading()
                self._reload()
                self.notifier.ready(self._status_line())

            now = time.time()
            self._match_due(now)
            if now >= self.next_poll:
                self._poll_table(now)
            if self.config.batch.tag and now >= self.next_tag_poll:
                self._poll_tag(now)
            self._release_retries(now)
            if self._commit_if_due(now):
                if not self.journal.buffered:
                    self._delete_captures()
                self._dispatch(now)
                if self._process_spool(now) and self._commit(now):
                    self._dispatch(now)  # what the list just queued goes to idle workers now
            # Health first: READY and the watchdog ping need not wait for a compaction or a snapshot.
            self._report_health(now)
            if now >= self.next_journal_check:
                self._maintain_journal(now)

    def _seconds_to_next_deadline(self) -> float:
        now = time.time()
        deadlines = [self.next_poll, self.next_journal_check, self.next_spool_check]
        if self.current_list is not None:
            deadlines.append(self.next_list_turn)
        if self.config.batch.tag:
            deadlines.append(self.next_tag_poll)
        match = self.matcher.next_due()
        if match is not None:
            deadlines.append(match)
        if self.retry_at:
            deadlines.append(min(self.retry_at.values()))
        if self.blocked_code and (self.ready or self.ready_batch):
            deadlines.append(self.probe_at)
        if self.watchdog_interval is not None:
            deadlines.append(now + self.next_watchdog - time.monotonic())
        if self.status_due:
            deadlines.append(self.next_status)
        if self.journal_failing:
            deadlines.append(self.next_journal_retry)
        elif self.journal is not None:
            deadlines.append(now + self.journal.commit_due(COMMIT_DELAY))
        return max(0.0, min(min(deadlines) - now, 5.0))

    def _report_health(self, now: float) -> None:
        """Tell systemd the agent is alive and what it is doing, and update the metrics.

        The watchdog ping comes from this loop, not a side thread, so a hung loop gets restarted.
        READY=1 waits until the journal is replayed, the watches are in place and a database
        query has succeeded.
        """
        if not self.ready_sent and self.table is not None and not self.database_down and self.journal is not None and self.journal.state.cursor is not None:
            self.ready_sent = True
            self.notifier.ready(self._status_line())
            log.info("ready", pending=self._pending_count())
        elif self.ready_sent and self.notifier.enabled:
            # At most one status a second. A change within that second is sent when it ends.
            self.status_due = now < self.next_status
            if not self.status_due and self.notifier.status(self._status_line()):
                self.next_status = now + STATUS_INTERVAL
        if self.watchdog_interval is not None and time.monotonic() >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = time.monotonic() + self.watchdog_interval
        if self.metrics is not None and now >= self.next_metrics:
            self.next_metrics = now + METRICS_INTERVAL
            self._update_gauges(now)

    def _pending_count(self) -> int:
        return len(self.ready) + len(self.ready_batch) + len(self.retry_at) + len(self.in_flight) + len(self.matcher) + sum(map(len, self.waiting_for_parent.values()))

    def _status_line(self) -> str:
        """Return the short line `systemctl status` shows: queue, last upload, last error."""
        failing = f", store failing with {self.blocked_code}" if self.blocked_code else ""
        return (f"{self._pending_count()} pending{failing}; last upload {self.last_upload_ts or 'none yet'}; "
                f"last error {self.last_error or 'none'}")

    def _update_gauges(self, now: float) -> None:
        """Set the gauges that need a look at the queue or the journal file."""
        assert self.metrics is not None and self.journal is not None
        self.metrics.queue_length.set(self._pending_count())
        heads = [line[0] for line in (self.ready, self.ready_batch) if line] + list(self.retry_at) + list(self.in_flight)
        oldest = min((self.journal.state.uploads[path].detected_ts for path in heads if path in self.journal.state.uploads), default=None)
        self.metrics.oldest_pending_age.set(max(0.0, now - epoch_of(oldest)) if oldest else 0.0)
        try:
            self.metrics.journal_bytes.set(self.journal.path.stat().st_size)
        except OSError:
            pass

    def _handle_messages(self, timeout: float) -> None:
        """Wait up to `timeout` for a message, then take every message waiting."""
        flush_logs()  # the lines of the last turn, before waiting
        try:
            message = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = message
            if kind == "file":
                self._on_file(value)
            elif kind == "result":
                self._on_result(value)
            elif kind == "list":
                self.next_spool_check = 0.0
            elif kind == "lost":
                # watchdog may report one overflow twice, with its event and with its warning.
                if time.monotonic() - self.events_lost_at > EVENTS_LOST_REPEAT:
                    log.warning("events_lost", hint="the kernel's inotify queue overflowed; polling the images table now")
                self.events_lost_at = time.monotonic()
                self.next_poll = 0.0
            elif kind == "watch_limit" and not self.watch_limit_reported:
                self.watch_limit_reported = True
                log.warning("watch_limit_reached", error=value,
                            hint=f"raise fs.inotify.max_user_watches (sysctl -w fs.inotify.max_user_watches=524288); until then new photos "
                                 f"in unwatched folders are found by the table poll every {self.config.monitor.poll_interval:g} s")
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _delete_captures(self) -> None:
        for name in self.captures_to_delete:
            self.originals.delete(name)
        self.captures_to_delete.clear()

    def _commit_if_due(self, now: float) -> bool:
        """Commit when a buffered record must be durable before the loop acts, or has waited COMMIT_DELAY.

        Records that only finish uploads may wait, so that at a high rate many share one fsync. If
        a crash loses them, the next start sends those photos again and the conditional write
        finds the object of our own earlier upload. Returns whether the loop may act.
        """
        assert self.journal is not None
        if self.journal_failing or self.journal.commit_due(COMMIT_DELAY) == 0.0:
            return self._commit(now)
        return True

    def _commit(self, now: float) -> bool:
        """Make the records of this turn durable before anything is acted on. Returns whether they are.

        While the state directory is full or read-only, nothing is dispatched and the records wait
        in memory. The commit is tried again every few seconds, and the loop goes on meanwhile,
        so the watchdog keeps being pinged.
        """
        assert self.journal is not None
        if self.journal_failing and now < self.next_journal_retry:
            return False
        try:
            self.journal.commit()
        except JournalError as error:
            if not self.journal_failing:
                log.error("journal_write_failed", error=str(error), hint="uploads wait until the journal can be written again")
            self.journal_failing = True
            self.next_journal_retry = now + JOURNAL_RETRY_INTERVAL
            return False
        if self.journal_failing:
            log.info("journal_writable", hint="uploads go on")
            self.journal_failing = False
        return True

    # Event -> match -----------------------------------------------------------------------

    def _on_file(self, absolute: str) -> None:
        """Record a new file under the upload directory and wait for its images row.

        Files already in the journal, files that are not originals, and every file while
        monitoring is off are ignored. A file recorded as gone is the exception: its upload found
        no file, as when Piwigo's row came before the file, and the file is here now.
        """
        assert self.journal is not None
        path = gallery_path(self.config.piwigo.root, absolute)
        if path is None:
            return
        if not is_original(path, self.config.piwigo.upload_dir):
            if self.config.uploads.formats and is_format_file(path, self.config.piwigo.upload_dir):
                self._on_format_file(path)
            return
        upload = self.journal.state.uploads.get(path)
        if path in self.in_flight:
            # Its upload may be failing right now because this file was missing, so its result decides.
            self.arrived_in_flight.add(path)
        if upload is not None and upload.status == "uploaded" and path not in self.changed_after_upload:
            # Piwigo keeps the path of a photo whose file is replaced. Copies are one-time, so
            # the new bytes are not sent, and one log line per path and run reports it.
            self.changed_after_upload.add(path)
            log.info("changed_after_upload", path=path, image_id=upload.image_id, key=upload.key,
                     hint="copies are one-time: the object keeps the bytes uploaded first")
        if (upload is not None and upload.status != "gone") or not self.config.monitor.enabled:
            return
        now = time.time()
        self.journal.append("detected", path, source="monitor", **self._capture_on_arrival(absolute))
        self.matcher.add(path, now, now)
        log.debug("detected", path=path)

    def _on_format_file(self, path: str) -> None:
        """Handle a new file in a pwg_format/ folder: poll for its row, or queue a format recorded as gone again."""
        assert self.journal is not None
        upload = self.journal.state.uploads.get(path)
        if upload is None:
            self.next_poll = 0.0  # its image_format row comes soon: poll for it now
            return

        if path in self.in_flight:
            self.arrived_in_flight.add(path)
        elif upload.status == "gone" and upload.format_id is not None and upload.image_id is not None and upload.parent and self.config.monitor.enabled:
            # Its image_format row came before the file. The poll has passed that row, so the
            # journal's record of the format stands in for it.
            row = FormatRow(format_id=upload.format_id, image_id=upload.image_id, ext=PurePosixPath(path).suffix[1:], photo_path=upload.parent)
            self._queue_format(row, source="monitor")

    def _capture_on_arrival(self, absolute: str) -> dict[str, Any]:
        """Copy a new file before Piwigo's "resize after upload" can rewrite it. Returns the journal fields."""
        if self.config.uploads.originals != "as_uploaded":
            return {}
        if not self.original_resize and not self.database_down and time.monotonic() - self.original_resize_read_at > RESIZE_OPTION_MAX_AGE:
            # Piwigo rewrites the file about a second after it arrives, so an admin who has just
            # switched the option on would otherwise lose the originals until the next poll.
            self._refresh_original_resize()
        if not self.original_resize:
            return {}
        try:
            capture = self.originals.capture(Path(absolute))
        except CaptureSkipped as skipped:
            log.warning("original_not_captured", path=absolute, reason=str(skipped))
            return {"capture_note": str(skipped)}
        return {"capture": capture.name, "capture_md5": capture.md5}

    def _refresh_original_resize(self) -> None:
        """Follow Piwigo's "resize after upload" option, which an admin may switch at any time."""
        assert self.table is not None
        self.original_resize_read_at = time.monotonic()
        try:
            enabled = self.table.original_resize()
        except TableMissing:
            enabled = False
        except DatabaseError as error:
            self._database_unavailable(error)
            return
        if enabled != self.original_resize:
            self.original_resize = enabled
            log.info("original_resize_changed", enabled=enabled,
                     copies_on_arrival=enabled and self.config.uploads.originals == "as_uploaded")

    def _match_due(self, now: float) -> None:
        """Look up the rows of the files whose look-up is due; queue the matched, give up on the expired."""
        assert self.journal is not None and self.table is not None
        due = self.matcher.due(now)
        if not due:
            return
        try:
            rows = self.table.find_by_paths(due)
            self._database_back()
        except DatabaseError as error:
            self._database_unavailable(error)
            for path in due:
                self.matcher.postpone(path, now)
            return
        for path in due:
            row = rows.get(path)
            if row is not None:
                self.matcher.discard(path)
                self._queue(path, row)
            elif not self.matcher.retry(path, now):
                timeout = self.config.monitor.match_timeout
                self.journal.append("unmatched", path, error=f"no images row for this file within {timeout:g} s")
                if self.metrics is not None:
                    self.metrics.uploads.labels(outcome="unmatched").inc()
                self._forget_capture(self.journal.state.uploads.get(path))
                log.warning("unmatched", path=path, waited_s=timeout)

    def _poll_table(self, now: float) -> None:
        """Read rows added since the cursor: photos whose file event was missed are found here."""
        assert self.journal is not None and self.table is not None
        self.next_poll = now + self.config.monitor.poll_interval
        self._start_watcher_if_upload_dir_appeared()
        if self.database_down:
            self._refresh_database_settings()
        try:
            cursor = self.journal.state.cursor
            if cursor is None:
                cursor = self.table.max_id()
                self.journal.append("cursor", image_id=cursor)
            rows = self.table.rows_after(cursor, POLL_BATCH)
            self._database_back()
        except DatabaseError as error:
            self._database_unavailable(error)
            return
        self._refresh_original_resize()
        self._poll_formats()
        if not rows:
            return

        for row in rows:
            upload = self.journal.state.uploads.get(row.path)
            if upload is not None:
                # A file reported unmatched whose row came late is queued now.
                if upload.status in ("detected", "unmatched"):
                    self._queue(row.path, row)
                continue
            if self.config.monitor.enabled and is_original(row.path, self.config.piwigo.upload_dir):
                self._queue(row.path, row, source="poll")
            elif self.config.monitor.enabled and not row.path.startswith(self.config.piwigo.upload_dir + "/"):
                self._report_outside_upload_dir(row)
        self.journal.append("cursor", image_id=rows[-1].id)
        if len(rows) == POLL_BATCH:
            self.next_poll = now  # more rows are waiting

    def _report_outside_upload_dir(self, row: ImageRow) -> None:
        """Warn, once per folder, that a new photo lies outside the upload directory and is not uploaded.

        Piwigo puts photos elsewhere when its upload_dir differs from piwigo.upload_dir, and
        for galleries synchronised into galleries/.
        """
        folder = row.path.partition("/")[0]
        if folder in self.folders_outside_reported:
            return
        self.folders_outside_reported.add(folder)
        upload_dir = self.config.piwigo.upload_dir
        log.warning("photo_outside_upload_dir", path=row.path, image_id=row.id,
                    hint=f"s3watch uploads new photos from {upload_dir}/ only: if Piwigo's $conf['upload_dir'] is another folder, set "
                         f"piwigo.upload_dir to it; to send the photos in {folder}/, use 's3watch backfill' or 's3watch enqueue'")

    def _poll_formats(self) -> None:
        """Queue extra formats (RAW files and the like) added since the last poll, to existing photos too."""
        assert self.journal is not None and self.table is not None
        if not self.config.uploads.formats or not self.formats_available:
            return
        try:
            cursor = self.journal.state.format_cursor
            if cursor is None:
                self.journal.append("cursor", format_id=self.table.max_format_id())
                return
            rows = self.table.formats_after(cursor, POLL_BATCH)
        except TableMissing:
            self.formats_available = False
            log.info("formats_unavailable", hint="this gallery has no image_format table (Piwigo before 13): no extra formats to upload")
            return
        except DatabaseError as error:
            self._database_unavailable(error)
            return
        if not rows:
            return
        if self.config.monitor.enabled:
            for row in rows:
                self._queue_format(row, source="poll")
        self.journal.append("cursor", format_id=rows[-1].format_id)
        if len(rows) == POLL_BATCH:
            self.next_poll = 0.0

    def _queue_format(self, row: FormatRow, source: str) -> None:
        """Queue a photo's extra format unless it is known already; it is uploaded after its photo."""
        assert self.journal is not None
        path = format_path(row.photo_path, row.ext)
        upload = self.journal.state.uploads.get(path)
        if upload is not None and upload.status not in ("unmatched", "gone"):
            return
        self.journal.append("queued", path, image_id=row.image_id, kind="format", format_id=row.format_id, parent=row.photo_path, source=source)
        self._line_for(source).append(path)
        log.info("queued", path=path, image_id=row.image_id, format_id=row.format_id, source=source)

    def _start_watcher_if_upload_dir_appeared(self) -> None:
        """Start the watch once the upload directory exists, or once monitoring was switched on.

        The tree is not scanned: a file already there is found by the table poll when its row
        is newer than the cursor, and otherwise was added while monitoring was off.
        """
        if self.watcher is not None or not self.config.monitor.enabled:
            return
        try:
            self._start_watcher()
        except WatchError as error:
            log.error("watch_failed", error=str(error))

    def _refresh_database_settings(self) -> None:
        """Read Piwigo's database settings again, and use them from now on if they changed.

        While the database fails, each poll calls this, so that a password or server that the
        admin changed in database.inc.php (or in the db_password credential) is used without a
        reload. Settings that cannot be read right now, say a file in the middle of being
        written, leave the ones in use.
        """
        assert self.table is not None
        try:
            settings = database_settings(self.config)
            if settings == self.table.settings:
                return
            table = ImagesTable(settings)
        except (ConfigError, DatabaseError):
            return
        self.table.close()
        self.table = table
        log.info("database_settings_changed", database=settings.describe())

    def _database_unavailable(self, error: DatabaseError) -> None:
        if not self.database_down:
            log.error("database_unavailable", error=str(error), hint="retrying at every poll")
            self.database_down = True

    def _database_back(self) -> None:
        if self.database_down:
            log.info("database_available")
            self.database_down = False

    # Match -> journal ---------------------------------------------------------------------

    def _queue(self, path: str, row: ImageRow, source: str | None = None) -> None:
        """Record a matched file as queued and put it in line for an upload."""
        assert self.journal is not None
        if source is None:
            upload = self.journal.state.uploads.get(path)
            source = (upload.source if upload else None) or "monitor"
        self.matcher.discard(path)
        self.journal.append("queued", path, image_id=row.id, row_md5=row.md5sum, source=source)
        self._line_for(source).append(path)
        # A list's entries are in its report, and a list of 100,000 photos would log 100,000
        # lines at once, past journald's default rate limit (10,000 lines in 30 s).
        (log.debug if source == "batch" else log.info)("queued", path=path, image_id=row.id, source=source)
        if self.blocked_code is not None:
            self._mark_waiting(path, self.blocked_code)

    def _line_for(self, source: str | None) -> deque[str]:
        """Return the queue an upload waits in: photos from lists and tags wait behind new ones."""
        return self.ready_batch if source in ("batch", "tag") else self.ready

    # Batch mode: lists and tags -----------------------------------------------------------

    def _process_spool(self, now: float) -> bool:
        """Take the next list from the spool directory, or resolve the next chunk of the current one.

        Returns whether a chunk was resolved.
        """
        if self.current_list is not None and now < self.next_list_turn:
            return False
        if self.current_list is None:
            if now < self.next_spool_check:
                return False
            self.next_spool_check = now + (SPOOL_WATCHED_CHECK_INTERVAL if self.spool_watcher is not None else SPOOL_CHECK_INTERVAL)
            self._open_next_list()
            if self.current_list is None:
                return False
        self._resolve_chunk(self.current_list)
        return True

    def _open_next_list(self) -> None:
        spool_dir = self.config.spool_dir
        try:
            lists = find_lists(spool_dir)
        except SpoolError as error:
            log.error("spool_unreadable", error=str(error))
            return
        for path in lists:
            try:
                check_list(path)
            except SpoolError as error:
                self._reject_list(path, str(error))
                continue
            try:
                self.current_list = ListRun(path)
            except OSError as error:
                log.error("list_failed", list=str(path), error=error.strerror)
                continue
            log.info("list_started", list=path.name)
            return

    def _reject_list(self, path: Path, reason: str) -> None:
        try:
            moved = move_failed(path, reason)
        except OSError as error:
            log.error("list_failed", list=str(path), error=f"{reason}; moving it to failed/ failed too: {error.strerror}")
            return
        log.warning("list_rejected", list=path.name, reason=reason, moved_to=str(moved))

    def _resolve_chunk(self, run: ListRun) -> None:
        """Resolve up to LIST_CHUNK entries of a list, queue what can be queued and report every entry."""
        assert self.journal is not None and self.table is not None
        entries = run.next_entries(LIST_CHUNK)
        if entries:
            try:
                verdicts = resolve_entries(entries, run.gallery_for(self.config), self.table, self.journal.state, requeue=run.requeue)
                self._database_back()
            except DatabaseError as error:
                self._database_unavailable(error)
                run.rewind(entries)
                self.next_list_turn = time.time() + self.config.monitor.poll_interval
                return
            for verdict in verdicts:
                if verdict.outcome == "queued" and verdict.row is not None:
                    self._queue(verdict.row.path, verdict.row, source="batch")
                run.report(verdict)
            self._queue_formats_of([v.row.id for v in verdicts if v.outcome == "queued" and v.row is not None], "batch")
        if run.finished:
            # The queued records must be durable before the list leaves the spool.
            if not self._commit(time.time()):
                return
            try:
                moved = run.finish()
            except OSError as error:
                log.error("list_failed", list=run.path.name, error=error.strerror)
                self.current_list = None
                return
            if run.counts.get("rejected"):
                log.warning("list_processed", list=run.path.name, moved_to=str(moved), **run.counts,
                            hint=f"the report {moved.name}.report beside the list gives each rejected entry's reason")
            else:
                log.info("list_processed", list=run.path.name, moved_to=str(moved), **run.counts)
            self.current_list = None

    def _queue_formats_of(self, image_ids: list[int], source: str) -> None:
        """Queue the extra formats of photos just queued from a list or a tag."""
        assert self.table is not None
        if not image_ids or not self.config.uploads.formats or not self.formats_available:
            return
        try:
            rows = self.table.formats_of(image_ids)
        except TableMissing:
            self.formats_available = False
            return
        except DatabaseError as error:
            # The photos stay queued; their formats are found by the next list or tag poll.
            log.warning("formats_lookup_failed", error=str(error), photos=len(image_ids))
            return
        for row in rows:
            self._queue_format(row, source)

    def _poll_tag(self, now: float) -> None:
        """Queue every photo that carries the configured tag and is not known to the journal yet."""
        assert self.journal is not None and self.table is not None
        self.next_tag_poll = now + self.config.batch.tag_poll_interval
        tag = self.config.batch.tag
        assert tag is not None
        try:
            rows = self.table.tagged_rows(tag)
            self._database_back()
        except DatabaseError as error:
            self._database_unavailable(error)
            return
        gallery = Gallery(self.config.piwigo.root, self.config.piwigo.upload_dir)
        queued: list[int] = []
        for row in rows:
            upload = self.journal.state.uploads.get(row.path)
            if upload is not None and upload.status not in ("detected", "unmatched"):
                continue
            problem = gallery.check_file(row.path)
            if problem is not None:
                if upload is None:
                    self.journal.append("gone", row.path, image_id=row.id, source="tag", error=f"tagged {tag!r} but {problem}")
                    log.warning("tagged_photo_rejected", path=row.path, image_id=row.id, reason=problem)
                continue
            self._queue(row.path, row, source="tag")
            queued.append(row.id)
        self._queue_formats_of(queued, "tag")

    # Journal -> upload --------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        """Hand queued uploads to free workers; while the store is failing, send one probe at a time."""
        assert self.journal is not None and self.workers is not None
        # Twice as many uploads as workers are handed out, so that a worker that finishes starts
        # the next one at once instead of waiting for this loop's turn (its fsync and its logs).
        free = 2 * self.worker_count - len(self.in_flight)
        if self.blocked_code is not None:
            if self.in_flight or now < self.probe_at:
                return
            free = 1
        while free > 0 and (self.ready or self.ready_batch):
            path = self.ready.popleft() if self.ready else self.ready_batch.popleft()
            upload = self.journal.state.uploads.get(path)
            if upload is None or upload.status != "pending" or path in self.in_flight:
                continue
            parent = self.journal.state.uploads.get(upload.parent) if upload.parent else None
            if parent is not None and parent.status in ("pending", "detected"):
                self.waiting_for_parent.setdefault(parent.path, []).append(path)
                continue
            try:
                key = object_key(self.config.s3.key_template, self.config.s3.prefix, path, upload.image_id, upload.row_md5)
            except ValueError as error:
                # Reported, not mangled: a reload with another key template or prefix may fix it.
                self.journal.append("failed", path, code="failed_code_400", error=str(error), attempts=upload.attempts)
                log.error("invalid_key", path=path, error=str(error))
                if self.metrics is not None:
                    self.metrics.failures.labels(code="failed_code_400").inc()
                self.retry_at[path] = now + self.config.uploads.retry_interval
                continue
            request = self._request(upload, key)
            self.in_flight.add(path)
            if self.blocked_code is not None:
                # The probe: the next one waits a full delay, whatever this one's outcome.
                self.probe_path = path
                self.probe_at = now + self.probe_delay
            future = self.workers.submit(self._upload, request)
            future.add_done_callback(functools.partial(self._crashed_worker, path=path))
            free -= 1

    def _request(self, upload: Upload, key: str) -> UploadRequest:
        """Build a worker's request: the copy taken on arrival goes along when there is one."""
        capture = self.originals.path_of(upload.capture) if upload.capture else None
        note = None
        if capture is None and upload.row_md5 and self.config.uploads.originals == "as_uploaded":
            # Used only if the file turns out not to hold the bytes as uploaded.
            note = f"no copy was taken on arrival: {upload.capture_note or self._why_no_capture(upload)}"
        return UploadRequest(
            path=upload.path, image_id=upload.image_id, key=key, row_md5=upload.row_md5,
            capture=capture, format_id=upload.format_id, original_note=note,
        )

    @staticmethod
    def _why_no_capture(upload: Upload) -> str:
        """Say why an upload without a recorded reason has no copy taken on arrival."""
        if upload.source == "monitor" and not upload.capture:
            return "Piwigo's resize after upload was off when the file arrived, as far as s3watch knew (it reads that option at each table poll)"
        if upload.source == "poll":
            return "the table poll found the photo after it arrived (s3watch was not running, or missed the file's event)"
        if upload.source in ("batch", "tag"):
            return f"the photo was queued from a {'list' if upload.source == 'batch' else 'tag'}, long after it arrived"
        return "the copy taken on arrival is gone"

    def _upload(self, request: UploadRequest) -> None:
        """Run in a worker: upload and post the outcome to the loop.

        An upload handed out ahead is not started when the agent is stopping, or when the store
        failed meanwhile and this upload is not the probe.
        """
        uploader = self.uploader  # read once, because a reload may replace it meanwhile
        assert uploader is not None
        if self.stop_event.is_set() or ((self.blocked_code is not None or self.store_failed.is_set()) and request.path != self.probe_path):
            self.inbox.put(("result", Outcome(path=request.path, event=NOT_STARTED, attempts=0)))
            return
        outcome = uploader.upload(request, self.duplicates)
        if outcome.event == "failed" and _store_wide(outcome.code):
            self.store_failed.set()
        self.inbox.put(("result", outcome))

    def _check_store(self) -> None:
        """Run in a worker at start and after a reload: report early whether the bucket can be used."""
        assert self.uploader is not None
        try:
            self.uploader.ensure_store_ready()
        except UploadFailed as failure:
            log.warning("store_unavailable", bucket=self.config.s3.bucket, code=failure.code, error=failure.message)
            return
        log.info("store_ready", bucket=self.config.s3.bucket, conditional_writes=self.uploader.conditional_writes)

    def _crashed_worker(self, future: Any, path: str) -> None:
        error = future.exception() if not future.cancelled() else None
        if error is not None:
            self.inbox.put(("result", Outcome(path=path, event="failed", code="failed_code_0", error=f"internal error: {error!r}", transient=True)))

    # Upload -> journal --------------------------------------------------------------------

    def _on_result(self, outcome: Outcome) -> None:
        """Record how an upload ended, and pause or resume uploads when the store fails or recovers."""
        assert self.journal is not None
        self.in_flight.discard(outcome.path)
        arrived = outcome.path in self.arrived_in_flight
        self.arrived_in_flight.discard(outcome.path)
        upload = self.journal.state.uploads.get(outcome.path)
        if outcome.event == NOT_STARTED:
            self._line_for(upload.source if upload else None).appendleft(outcome.path)
            if self.blocked_code is not None:
                self._mark_waiting(outcome.path, self.blocked_code)
            return
        attempts = (upload.attempts if upload else 0) + outcome.attempts
        now = time.time()

        if self.metrics is not None:
            if outcome.event == "failed":
                self.metrics.failures.labels(code=outcome.code or "failed_code_0").inc(max(1, outcome.attempts))
            else:
                self.metrics.uploads.labels(outcome=outcome.event).inc()
            if outcome.event == "uploaded":
                self.metrics.uploaded_bytes.inc(outcome.bytes or 0)
                self.metrics.last_success.set(now)

        if outcome.event == "failed":
            self.last_error = f"{outcome.code} at {time.strftime('%H:%M:%S %Z')}"
            self.journal.append("failed", outcome.path, code=outcome.code, error=outcome.error, attempts=attempts)
            log.warning("upload_failed", path=outcome.path, image_id=upload.image_id if upload else None, key=outcome.key,
                        code=outcome.code, error=outcome.error, attempts=attempts)
            if _store_wide(outcome.code):
                self._block(outcome.code or "failed_code_0", now, outcome.path)
                self._line_for(upload.source if upload else None).appendleft(outcome.path)
            elif outcome.code == FILE_BUSY_CODE:
                self.retry_at[outcome.path] = now + min(FILE_BUSY_RETRY, self.config.uploads.retry_interval)
            else:
                self.retry_at[outcome.path] = now + self.config.uploads.retry_interval
            return

        # The bucket of the uploader that sent it, because a reload may have changed s3.bucket meanwhile.
        fields: dict[str, Any] = {"key": outcome.key, "bucket": outcome.bucket or self.config.s3.bucket, "md5": outcome.md5, "bytes": outcome.bytes,
                                  "attempts": attempts, "original": outcome.original, "original_note": outcome.original_note}
        if outcome.event == "uploaded":
            fields["etag"] = outcome.etag
        if outcome.event == "duplicate":
            fields["duplicate_of"] = outcome.duplicate_of
        if outcome.event == "gone":
            fields = {"error": outcome.error, "attempts": attempts}
        self.journal.append(outcome.event, outcome.path, **fields)
        if outcome.event == "uploaded":
            self.last_upload_ts = time.strftime(LAST_UPLOAD_FORMAT)
        self._forget_capture(upload)
        for waiting in self.waiting_for_parent.pop(outcome.path, []):
            self.ready.appendleft(waiting)
        if outcome.event == "gone":
            log.warning("gone", path=outcome.path, image_id=upload.image_id if upload else None, error=outcome.error)
            if arrived:
                # The file came while the upload found none, and no later event would queue it again.
                self._on_file(os.path.join(self.config.piwigo.root, outcome.path))
        elif outcome.event == "already_present":
            log.warning("already_present", path=outcome.path, image_id=upload.image_id if upload else None, key=outcome.key,
                        hint=ALREADY_PRESENT_HINT)
        else:
            log.info(outcome.event, path=outcome.path, image_id=upload.image_id if upload else None,
                     key=outcome.key if outcome.event != "duplicate" else None, bytes=outcome.bytes, ms=outcome.ms,
                     duplicate_of=outcome.duplicate_of, original=outcome.original, note=outcome.original_note,
                     found_at_key=outcome.existing or None)
        if outcome.event in ("uploaded", "already_present", "duplicate") and self.blocked_code is not None:
            self._unblock("store answered again")

    def _forget_capture(self, upload: Upload | None) -> None:
        """Schedule an upload's copy on arrival for deletion once its final record is committed."""
        if upload is not None and upload.capture:
            self.captures_to_delete.append(upload.capture)

    def _block(self, code: str, now: float, path: str) -> None:
        """Pause uploads after a store-wide failure; one probe upload is tried at growing intervals.

        Only a failed probe doubles the delay: uploads that were already in flight when the store
        failed end one after the other and must not push the first probe further away.
        """
        if self.blocked_code is None:
            self.probe_delay = min(FIRST_PROBE_DELAY, self.config.uploads.retry_interval)
            self.probe_at = now + self.probe_delay
            log.warning("uploads_paused", code=code, retry_in_s=self.probe_delay)
        elif path == self.probe_path:
            self.probe_delay = min(self.probe_delay * 2, self.config.uploads.retry_interval)
            self.probe_at = now + self.probe_delay
        if path == self.probe_path:
            self.probe_path = None
        if code != self.blocked_code:
            for waiting in [*self.ready, *self.ready_batch]:
                self._mark_waiting(waiting, code)
        self.blocked_code = code

    def _mark_waiting(self, path: str, code: str) -> None:
        """Record the store's failure on an upload that waits behind it, so that status shows why it waits."""
        assert self.journal is not None
        upload = self.journal.state.uploads.get(path)
        if upload is not None and upload.status == "pending" and upload.code != code:
            self.journal.append("failed", path, code=code, error=WAITING_FOR_STORE, attempts=upload.attempts)

    def _unblock(self, reason: str) -> None:
        log.info("uploads_resumed", reason=reason, after=self.blocked_code)
        self.blocked_code = None
        self.store_failed.clear()
        self.probe_delay = FIRST_PROBE_DELAY

    def _release_retries(self, now: float) -> None:
        """Put uploads whose retry time has come back in line."""
        due = [path for path, at in self.retry_at.items() if at <= now]
        for path in due:
            del self.retry_at[path]
            upload = self.journal.state.uploads.get(path) if self.journal else None
            self._line_for(upload.source if upload else None).append(path)

    # Reload and maintenance ---------------------------------------------------------------

    def _reload(self) -> None:
        """Re-read the configuration (SIGHUP); keep the old one if the new one is invalid, retry failed uploads."""
        try:
            config = load_config(self.config.source)
            settings = database_settings(config)  # database.inc.php may have become unreadable too
        except ConfigError as error:
            log.error("reload_rejected", error=str(error), hint="the previous configuration stays in use")
            return
        if config.state_dir != self.config.state_dir:
            log.warning("reload_partial", hint="state_dir changes take effect at the next restart")
            config = Config(**{**config.__dict__, "state_dir": self.config.state_dir})

        old = self.config
        self.config = config
        self.matcher.match_timeout = config.monitor.match_timeout
        self.originals.cap_bytes = config.uploads.originals_cap
        assert self.table is not None
        if config.piwigo != old.piwigo or settings != self.table.settings:
            self.table.close()
            self.table = ImagesTable(settings)
            if config.piwigo.upload_path != old.piwigo.upload_path and self.watcher is not None:
                self.watcher.stop()
                self.watcher = None  # started again below, on the new upload directory
        if (config.s3, config.uploads, config.links, config.piwigo) != (old.s3, old.uploads, old.links, old.piwigo):
            self.uploader = Uploader(config.s3, config.uploads, config.links, config.piwigo.root, stop=self.abort_event,
                                     upload_dir=config.piwigo.upload_dir)
            assert self.workers is not None
            self.workers.submit(self._check_store)
        if config.monitor.enabled and self.watcher is None:
            self._start_watcher_if_upload_dir_appeared()
        elif not config.monitor.enabled and self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if config.spool_dir != old.spool_dir:
            if self.spool_watcher is not None:
                self.spool_watcher.stop()
                self.spool_watcher = None
            self._create_spool_dir()
            self._start_spool_watcher()
            self.next_spool_check = 0.0
        if config.uploads.workers != old.uploads.workers:
            log.warning("reload_partial", hint="uploads.workers changes take effect at the next restart")
        if config.metrics != old.metrics:
            log.warning("reload_partial", hint="metrics changes take effect at the next restart")
        if config.uploads.prevent_duplicates != old.uploads.prevent_duplicates:
            assert self.journal is not None
            self.duplicates = DuplicateIndex(self.journal.state.md5_index) if config.uploads.prevent_duplicates else None
        if config.log != old.log:
            configure_logging(config.log.format, config.log.level, buffered=True)

        # A setting may have been the cause of every failure: try them all again now.
        self._release_retries(float("inf"))
        if self.blocked_code is not None:
            self._unblock("configuration reloaded")
        self.next_poll = 0.0
        self.next_tag_poll = 0.0
        log.info("reloaded", bucket=config.s3.bucket, endpoint=config.s3.endpoint_url or "aws", monitor=config.monitor.enabled, pending=len(self.ready) + len(self.ready_batch))

    def _maintain_journal(self, now: float) -> None:
        """Compact the journal when it has grown well past one record per upload, and save a snapshot when one is due.

        The snapshot keeps a start after a crash or a kill from replaying the whole journal of a
        large gallery. Both pause the loop: writing a snapshot took 0.3 to 0.8 s per million
        uploads on the benchmark's machines.
        """
        assert self.journal is not None
        self.next_journal_check = now + JOURNAL_CHECK_INTERVAL
        if self.journal_failing:
            return  # both would fail on the same disk, and the commit's retries already report it
        if self.journal.needs_compaction():
            before = self.journal.state.records
            try:
                self.journal.compact()
            except JournalError as error:
                log.error("journal_compaction_failed", error=str(error))
                return
            log.info("journal_compacted", records_before=before, records_after=self.journal.state.records)
        if self.journal.snapshot_due():
            self._write_snapshot()

