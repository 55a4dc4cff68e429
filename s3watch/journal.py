"""The journal: an append-only JSON-lines file in the state directory that is the upload queue.

Each line records one state change of one upload (or the table cursor). Replaying the lines
in order rebuilds every upload's state, so a crash, kill or reboot loses nothing: the agent
makes a record durable (written and fsynced) before it acts on it or acknowledges it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

JOURNAL_VERSION = 1

# The status an upload has after each kind of record.
STATUS_BY_EVENT = {
    "detected": "detected",  # a new file was seen; waiting for its images row
    "queued": "pending",  # matched to its row; waiting to be uploaded
    "failed": "pending",  # an attempt failed; it is retried later
    "uploaded": "uploaded",
    "already_present": "already_present",  # another object was at the key; left untouched
    "duplicate": "duplicate",  # same content already uploaded at another key
    "unmatched": "unmatched",  # no images row came within monitor.match_timeout
    "gone": "gone",  # the file disappeared before it could be uploaded
}
FINISHED = frozenset({"uploaded", "already_present", "duplicate", "unmatched", "gone"})
CURSOR_EVENT = "cursor"
HEADER_EVENT = "journal"


class JournalError(Exception):
    """The journal cannot be read or written; the message names the file and the fix."""


@dataclass(slots=True)
class Upload:
    """One file's way to the bucket, as the journal records it."""

    path: str  # relative to the gallery root, as images.path without './'
    event: str = "detected"
    status: str = "detected"
    ts: str = ""  # time of the latest record, ISO 8601 UTC
    detected_ts: str = ""
    image_id: int | None = None
    source: str | None = None  # "monitor", "poll" or "batch"
    key: str | None = None
    md5: str | None = None  # md5 of the bytes uploaded
    row_md5: str | None = None  # md5sum of the images row
    bytes: int | None = None
    code: str | None = None  # the latest failure, e.g. "failed_code_403"
    error: str | None = None
    attempts: int = 0
    duplicate_of: str | None = None
    etag: str | None = None
    bucket: str | None = None  # the bucket the object went to (the configured one may change later)
    kind: str | None = None  # "format" for a photo's extra format; None for the photo itself
    format_id: int | None = None
    parent: str | None = None  # for a format: its photo's path
    capture: str | None = None  # file name of the copy taken on arrival, in the state directory's originals/
    capture_md5: str | None = None
    capture_note: str | None = None  # why no copy was taken on arrival
    original: str | None = None  # which bytes the object holds: "as_uploaded" or "as_stored"
    original_note: str | None = None  # why the bytes as uploaded could not be sent

    @property
    def finished(self) -> bool:
        """Whether nothing more will be done for this upload."""
        return self.status in FINISHED


_UPLOAD_FIELDS = frozenset(f.name for f in fields(Upload)) - {"path", "event", "status"}


@dataclass
class JournalState:
    """Everything the journal records, replayed: uploads by path, the md5 index and the table cursor."""

    uploads: dict[str, Upload] = field(default_factory=dict)
    md5_index: dict[str, str] = field(default_factory=dict)  # md5 of uploaded content -> its key
    cursor: int | None = None  # highest image id the table poll has handled
    format_cursor: int | None = None  # highest format_id the format poll has handled
    records: int = 0

    def apply(self, record: dict[str, Any]) -> None:
        """Apply one record to the state. Raises KeyError or ValueError for a malformed record."""
        event = record["event"]
        self.records += 1
        if event == HEADER_EVENT:
            return
        if event == CURSOR_EVENT:
            if "image_id" in record:
                self.cursor = int(record["image_id"])
            if "format_id" in record:
                self.format_cursor = int(record["format_id"])
            return

        status = STATUS_BY_EVENT[event]
        path = record["path"]
        upload = self.uploads.get(path)
        if upload is None:
            upload = Upload(path=path, detected_ts=record.get("ts", ""))
            self.uploads[path] = upload
        for name, value in record.items():
            if name in _UPLOAD_FIELDS:
                if name in _SHARED_STRINGS and value is not None:
                    value = sys.intern(value)
                setattr(upload, name, value)
        upload.event = event
        upload.status = status
        if status in FINISHED:
            _share_strings(upload)
        if status == "uploaded" and upload.md5:
            self.md5_index.setdefault(upload.md5, upload.key or path)


# Fields with few distinct values, kept once in memory however many uploads carry them.
_SHARED_STRINGS = frozenset({"source", "bucket", "original", "kind", "code"})


def _share_strings(upload: Upload) -> None:
    """Let a finished upload's equal strings share one object, and drop what only pending ones need.

    A million finished uploads are replayed at every start, so each saved string counts.
    """
    if upload.key == upload.path:
        upload.key = upload.path
    if upload.etag is not None and upload.etag == upload.md5:
        upload.etag = upload.md5
    if upload.row_md5 is not None and upload.row_md5 == upload.md5:
        upload.row_md5 = upload.md5
    upload.detected_ts = ""


def now_iso() -> str:
    """Return the current UTC time as ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_scan = json.JSONDecoder().scan_once  # the C scanner, without json.loads's per-call checks


def _decode(line: bytes) -> dict[str, Any]:
    """Decode one journal line. Raises ValueError unless it is exactly one JSON object."""
    text = line.decode("utf-8").rstrip("\n")
    try:
        record, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text) or not isinstance(record, dict):
        raise ValueError("not one JSON object")
    return record


def read_journal(path: Path) -> tuple[JournalState, int]:
    """Replay the journal at `path`.

    Returns the state and the byte length of the valid part, so that a torn last line (an
    append cut short by a power loss) can be cut off before the next append. A missing file
    is an empty journal. Raises JournalError naming the line for a corrupt line that is not
    the last one, and for an unreadable file.
    """
    state = JournalState()
    valid_length = 0
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return state, 0
    except OSError as error:
        raise JournalError(f"journal {path} could not be read ({error.strerror}): check the state directory's permissions") from None

    with handle:
        pending_error: str | None = None
        number = 0
        for number, line in enumerate(handle, start=1):
            if pending_error is not None:
                # The bad line was not the last one, so it is corruption, not a torn append.
                raise JournalError(pending_error)
            if not line.endswith(b"\n"):
                break  # a torn last line: everything before it is valid
            try:
                state.apply(_decode(line))
            except (ValueError, KeyError, TypeError) as error:
                pending_error = (
                    f"journal {path} line {number} is corrupt ({type(error).__name__}: {error}): "
                    "run 's3watch journal repair' to keep every valid record, or move the file aside"
                )
                continue
            valid_length += len(line)
    return state, valid_length


def iter_records(path: Path) -> Iterator[tuple[int, bytes, dict[str, Any] | None]]:
    """Yield (line number, raw line, record or None when unparseable) for every line of a journal."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "event" not in record:
                    record = None
            except ValueError:
                record = None
            yield number, line, record


class Journal:
    """The journal opened for appending by the one agent that owns the state directory.

    Records are buffered by `append` and made durable together by `commit` (group commit):
    callers must commit before acting on what they appended.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state, valid_length = read_journal(path)
        self._buffer: list[bytes] = []
        self._appended_since_compaction = 0

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        size = os.fstat(fd).st_size
        if size > valid_length:
            # Drop a torn last line so that the next record does not glue onto it.
            os.ftruncate(fd, valid_length)
            os.fsync(fd)
        self._durable_size = os.lseek(fd, 0, os.SEEK_END)
        self._fd = fd
        if valid_length == 0:
            self.append(HEADER_EVENT, version=JOURNAL_VERSION)
            self.commit()

    def append(self, event: str, path: str | None = None, **values: Any) -> dict[str, Any]:
        """Append a record to the buffer and apply it to the state. Returns the record.

        The record is not durable until `commit` returns.
        """
        record: dict[str, Any] = {"ts": now_iso(), "event": event}
        if path is not None:
            record["path"] = path
        record.update((name, value) for name, value in values.items() if value is not None)
        self.state.apply(record)
        self._buffer.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
        self._appended_since_compaction += 1
        return record

    def commit(self) -> None:
        """Write the buffered records and fsync the file. Raises JournalError when the disk refuses."""
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], self._durable_size + written)
            os.fsync(self._fd)
        except OSError as error:
            # Cut back to the last durable record: the retry writes the whole buffer again, and
            # neither half a line nor a record twice may stay behind.
            try:
                os.ftruncate(self._fd, self._durable_size)
            except OSError:
                pass
            raise JournalError(f"journal {self.path} could not be written ({error.strerror}): free space in the state directory or fix its permissions") from None
        self._durable_size += len(data)
        self._buffer.clear()

    def needs_compaction(self) -> bool:
        """Return whether the file has grown well past one record per upload."""
        live = len(self.state.uploads) + 2
        return self.state.records > 10_000 and self.state.records > 3 * live

    def compact(self) -> None:
        """Rewrite the journal with one record per upload and rename it into place.

        A crash at any point leaves either the old or the new file complete. Raises JournalError.
        """
        self.commit()
        temporary = self.path.with_name(self.path.name + ".compact")
        state = self.state
        lines = [json.dumps({"ts": now_iso(), "event": HEADER_EVENT, "version": JOURNAL_VERSION}).encode() + b"\n"]
        if state.cursor is not None:
            lines.append(json.dumps({"ts": now_iso(), "event": CURSOR_EVENT, "image_id": state.cursor}).encode() + b"\n")
        if state.format_cursor is not None:
            lines.append(json.dumps({"ts": now_iso(), "event": CURSOR_EVENT, "format_id": state.format_cursor}).encode() + b"\n")
        for upload in state.uploads.values():
            record: dict[str, Any] = {"ts": upload.ts, "event": upload.event, "path": upload.path}
            for name in _UPLOAD_FIELDS:
                value = getattr(upload, name)
                if value is not None and name != "ts" and not (name == "attempts" and value == 0):
                    record[name] = value
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")

        try:
            _write_durably(temporary, b"".join(lines))
            os.replace(temporary, self.path)
            _fsync_directory(self.path.parent)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise JournalError(f"journal {self.path} could not be compacted ({error.strerror}): free space in the state directory") from None

        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY)
        self._durable_size = os.lseek(self._fd, 0, os.SEEK_END)
        state.records = len(lines)
        self._appended_since_compaction = 0

    def close(self) -> None:
        """Commit what is buffered and close the file."""
        try:
            self.commit()
        finally:
            os.close(self._fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write a new private file (mode 0600) and fsync it. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_journal(path: Path) -> tuple[int, int]:
    """Rewrite a journal keeping every valid record, and keep the original beside it.

    Returns (records kept, lines dropped). The original is renamed to `<name>.corrupt-<time>`.
    Raises JournalError when the file cannot be read or written.
    """
    kept: list[bytes] = []
    dropped = 0
    scratch = JournalState()
    try:
        for _number, line, record in iter_records(path):
            if record is None or not line.endswith(b"\n"):
                dropped += 1
                continue
            try:
                scratch.apply(record)
            except (KeyError, ValueError, TypeError):
                dropped += 1
                continue
            kept.append(line)
    except FileNotFoundError:
        raise JournalError(f"journal {path} not found: check state_dir in the configuration") from None

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.corrupt-{stamp}")
    temporary = path.with_name(path.name + ".repair")
    try:
        _write_durably(temporary, b"".join(kept))
        os.link(path, backup)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise JournalError(f"journal {path} could not be repaired ({error.strerror})") from None
    return len(kept), dropped
