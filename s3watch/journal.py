"""The journal: an append-only JSON-lines file in the state directory that is the upload queue.

Each line records one state change of one upload (or the table cursor). Replaying the lines
in order rebuilds every upload's state, so a crash, kill or reboot loses nothing: the agent
makes a record durable (written and fsynced) before it acts on it or acknowledges it.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import marshal
import math
import operator
import os
import struct
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Collection, Iterable, Iterator

import orjson

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
READ_BUFFER = 1024 * 1024  # bytes read from the journal at a time when it is replayed
WRITE_BUFFER = 1024 * 1024  # bytes written at a time when the journal is compacted or repaired

# A snapshot is the replayed state, saved beside the journal at a clean stop and, while the agent
# runs, once enough records have been appended since the last one. It starts with a
# header line naming the versions it needs. Frames follow (length, CRC-32, marshal data): first a
# description of the journal it was taken of, then the finished and the unfinished uploads in
# chunks. marshal, unlike pickle, builds only plain values and runs no code, but its format may
# change between Python versions.
SNAPSHOT_VERSION = 1
_SNAPSHOT_PREFIX = b"s3watch journal snapshot "  # the start of every version's header line
_SNAPSHOT_MAGIC = _SNAPSHOT_PREFIX + f"{SNAPSHOT_VERSION} python {sys.version_info[0]}.{sys.version_info[1]} marshal {marshal.version}\n".encode()
_FRAME = struct.Struct("<QI")
# Uploads per frame. Reading and writing never keep a second copy of all uploads. On a million uploads,
# frames of 4096 started in 0.45 s at 272 MB peak, and frames of 65,536 in 0.53 s at 286 MB.
_SNAPSHOT_CHUNK = 4096
_SNAPSHOT_CHECK = 4096  # bytes compared at the start and at the end of the part of the journal the snapshot covers
# A running agent writes another snapshot once the records appended since the last one reach
# this number and half the number of uploads. Writing costs 0.3 to 0.8 s per million uploads on the
# benchmark's machines, and replaying about 2 µs per record. So a start after a crash replays at
# most about 1 s per million uploads after the snapshot, and writing snapshots costs the running
# agent under 2 µs per record appended.
SNAPSHOT_MIN_RECORDS = 50_000
# The journal and its snapshot hold paths, md5s and keys, no secret. The service's group may read
# them, so that its members can run status, url and verify, as they may read the configuration.
FILE_MODE = 0o640
COMPACTION_MIN_RECORDS = 10_000  # a smaller journal is never compacted: it replays in about 20 ms


class JournalError(Exception):
    """The journal cannot be read or written; the message names the file and the fix."""


class JournalCorrupt(JournalError):
    """A corrupt line of the journal that is not the last one. A restart cannot fix it, `s3watch journal repair` can."""


@dataclass(slots=True)
class Upload:
    """One file's way to the bucket, as the journal records it.

    An Upload read from JournalState.uploads is a copy: the journal's records are the only way
    to change an upload.
    """

    path: str  # relative to the gallery root, as images.path without './'
    event: str = "detected"
    status: str = "detected"
    ts: str = ""  # time of the latest record, ISO 8601 UTC
    detected_ts: str = ""  # time of the first record; kept only while the upload is unfinished
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


def _make_upload(path: str, record: dict[str, Any]) -> Upload:
    """Build an Upload from an upload's merged record, ignoring fields this version does not know."""
    event = record["event"]
    known = {name: value for name, value in record.items() if name in _UPLOAD_FIELDS}
    return Upload(path=path, event=event, status=STATUS_BY_EVENT[event], **known)


# A finished upload's packed form is a fixed head, then its time stamp, then any other fields as JSON.
# The head contains the event, flags saying which fields are present, the codes (indexes into
# Uploads._names, 0 for none) of its bucket, source, original and key prefix, then attempts,
# image_id, bytes, the md5 in ASCII and the length of the time stamp. etag and row_md5 are
# only ever packed when equal to the md5, and the key only as its prefix followed by the path.
_HEAD = struct.Struct("<BBBBBBqqq32sB")
_USUAL_TS_LENGTH = len("2026-12-05T08:01:02.345Z")  # now_iso's
_USUAL_HEAD = struct.Struct(_HEAD.format + f"{_USUAL_TS_LENGTH}s")  # the head and a time stamp of the usual length
_HAS_MD5 = 1
_HAS_ETAG = 2
_HAS_ROW_MD5 = 4
_HAS_ATTEMPTS = 8
_HAS_IMAGE_ID = 16
_HAS_BYTES = 32
_EVENTS = tuple(STATUS_BY_EVENT)
_HEAD_ORDER = ("md5", "etag", "row_md5", "key", "attempts", "image_id", "bytes", "ts", "bucket", "source", "original")
_HEAD_FIELDS = operator.itemgetter(*_HEAD_ORDER)
_ALL_FIELDS = 3 + len(_HEAD_ORDER)  # event, path, detected_ts and every field of the head
_OPTIONAL_INT = (int, type(None))
_FINISHES = {event: status in FINISHED for event, status in STATUS_BY_EVENT.items()}
_EVENT_CODES = {event: code for code, event in enumerate(_EVENTS)}
_ALL_FLAGS = _HAS_MD5 | _HAS_ETAG | _HAS_ROW_MD5 | _HAS_ATTEMPTS | _HAS_IMAGE_ID | _HAS_BYTES
_ONES = bytes(bin(flags).count("1") for flags in range(64))  # for each value of the flags, the number of fields present


class Uploads:
    """Every upload the journal records, by path, as a read-only mapping of path to Upload.

    An unfinished upload is kept as its merged record (a dict). A finished one, which is what
    nearly every upload becomes and which is only read from then on, is packed into one bytes
    object of about 90 bytes. On bench/run.py's journal of a million uploads this brought the
    replay's peak memory from 718 MB (an Upload object each) to about 280 MB.
    """

    def __init__(self) -> None:
        self._unfinished: dict[str, dict[str, Any]] = {}
        self._finished: dict[str, bytes] = {}
        self._names: list[str | None] = [None]  # the few distinct buckets, sources and originals
        self._name_codes: dict[str | None, int] = {None: 0}
        # The codes of (bucket, source, original, key prefix), which seldom change from one upload to the next.
        self._codes_of_names: dict[tuple[Any, ...], tuple[int | None, ...]] = {}

    def apply(self, path: str, record: dict[str, Any], finished: bool) -> dict[str, Any] | None:
        """Merge one upload record into the upload at `path`. The record may be kept: do not change it afterwards.

        `finished` is True when the record's event finishes the upload. Returns the upload's
        merged record when it does, otherwise None.
        """
        merged = self._unfinished.pop(path, None)
        if merged is None:
            packed = self._finished.pop(path, None)
            if packed is None or record["event"] == "detected":
                # A new file at the path of a finished upload (one recorded as gone) starts a new record,
                # because the old copy on arrival, error and key belonged to the missing file.
                merged = record
            else:
                # Requeued after it finished: an unfinished life starts again.
                merged = self._unpack(path, packed)
                merged.update(record)
            # A compacted journal carries detected_ts in the upload's one record.
            merged.setdefault("detected_ts", record.get("ts", ""))
        else:
            merged.update(record)

        if not finished:
            self._unfinished[path] = merged
            return None

        # A record the head cannot hold exactly (an unusual key, a value of an unexpected type)
        # keeps all its fields in the JSON part instead, at a higher cost in memory.
        try:
            packed = self._pack_head(path, merged)
        except (TypeError, ValueError, AttributeError, struct.error):
            packed = None
        if packed is None:
            rest = {name: value for name, value in merged.items() if name not in ("event", "path", "detected_ts")}
            packed = _HEAD.pack(_EVENT_CODES[merged["event"]], 0, 0, 0, 0, 0, 0, 0, 0, b"", 0) + orjson.dumps(rest)
        self._finished[path] = packed
        return merged

    def _pack_head(self, path: str, merged: dict[str, Any]) -> bytes | None:
        """Pack a finished upload whose every field fits the head.

        Returns None, or raises TypeError, ValueError, AttributeError or struct.error, for any
        other upload. This runs for every finished upload at every start, hence the terse checks.
        """
        complete = len(merged) == _ALL_FIELDS
        if complete:
            # Every field of the head may be there: read them in one call.
            try:
                values = _HEAD_FIELDS(merged)
            except KeyError:
                return None  # a field of the head is missing and an unknown field takes its place
        else:
            values = tuple(map(merged.get, _HEAD_ORDER))
        md5, etag, row_md5, key, attempts, image_id, size, ts, bucket, source, original = values

        if (complete and type(md5) is str and etag == md5 and row_md5 == md5 and type(key) is str
                and type(attempts) is int and type(image_id) is int and type(size) is int
                and ts is not None and bucket is not None and source is not None and original is not None):
            # The usual finished photo: every field of the head set, and nothing else. Checking
            # that in one go took about 9% off replaying a journal of 200,000 uploads.
            flags = _ALL_FLAGS
            if key == path and len(md5) == 32 and type(ts) is str and len(ts) == _USUAL_TS_LENGTH:
                # Its key is its path and its time stamp has the usual length: one struct call
                # packs it. That took about 7% off replaying a journal of a million uploads.
                codes = self._codes_of_names.get((bucket, source, original, ""))
                if codes is not None:
                    return _USUAL_HEAD.pack(_EVENT_CODES[merged["event"]], flags, *codes, attempts, image_id, size,
                                            md5.encode("ascii"), _USUAL_TS_LENGTH, ts.encode("ascii"))
        else:
            if (etag is not None and etag != md5) or (row_md5 is not None and row_md5 != md5):
                return None
            if type(attempts) not in _OPTIONAL_INT or type(image_id) not in _OPTIONAL_INT or type(size) not in _OPTIONAL_INT:
                return None  # struct would take True for 1
            flags = ((md5 is not None) | (etag is not None) << 1 | (row_md5 is not None) << 2 | (attempts is not None) << 3
                     | (image_id is not None) << 4 | (size is not None) << 5)
            # Event, path and detected_ts aside, every field must be one the head holds: another
            # field, or a null, would be lost.
            present = _ONES[flags] + (key is not None) + (ts is not None) + (bucket is not None) + (source is not None) + (original is not None)
            if len(merged) != 3 + present:
                return None

        if key is None:
            prefix = None
        elif key.endswith(path):
            prefix = key[: len(key) - len(path)]
        else:
            return None

        names = (bucket, source, original, prefix)
        codes = self._codes_of_names.get(names)
        if codes is None:
            codes = tuple(map(self._code, names))
            if None in codes:
                return None
            if len(self._codes_of_names) < 4096:
                self._codes_of_names[names] = codes

        md5_bytes = b"" if md5 is None else md5.encode("ascii")
        ts_bytes = (ts or "").encode("utf-8")
        if (md5 is not None and len(md5_bytes) != 32) or len(ts_bytes) > 255:
            return None
        head = _HEAD.pack(_EVENT_CODES[merged["event"]], flags, *codes, attempts or 0, image_id or 0, size or 0, md5_bytes, len(ts_bytes))
        return head + ts_bytes

    def _code(self, value: Any) -> int | None:
        """Return the code of a string with few distinct values (0 for None), or None when it gets none."""
        if value is None:
            return 0
        if type(value) is not str:
            return None
        code = self._name_codes.get(value)
        if code is None and len(self._names) < 256:
            code = len(self._names)
            self._names.append(value)
            self._name_codes[value] = code
        return code

    def _unpack(self, path: str, packed: bytes) -> dict[str, Any]:
        """Rebuild the merged record of a finished upload from its packed form."""
        event, flags, bucket, source, original, prefix, attempts, image_id, size, md5_bytes, ts_length = _HEAD.unpack_from(packed)
        ts_end = _HEAD.size + ts_length
        record: dict[str, Any] = {"ts": packed[_HEAD.size:ts_end].decode("utf-8"), "event": _EVENTS[event], "path": path}
        names = self._names

        if flags & _HAS_MD5:
            md5 = md5_bytes.decode("ascii")
            record["md5"] = md5
            if flags & _HAS_ETAG:
                record["etag"] = md5
            if flags & _HAS_ROW_MD5:
                record["row_md5"] = md5
        if prefix:
            record["key"] = names[prefix] + path
        if bucket:
            record["bucket"] = names[bucket]
        if source:
            record["source"] = names[source]
        if original:
            record["original"] = names[original]
        if flags & _HAS_ATTEMPTS:
            record["attempts"] = attempts
        if flags & _HAS_IMAGE_ID:
            record["image_id"] = image_id
        if flags & _HAS_BYTES:
            record["bytes"] = size

        if ts_end < len(packed):
            record.update(orjson.loads(packed[ts_end:]))
        return record

    def record_of(self, path: str) -> dict[str, Any] | None:
        """Return the merged record of the upload at `path` (a copy), or None when the journal has none."""
        merged = self._unfinished.get(path)
        if merged is not None:
            return dict(merged)
        packed = self._finished.get(path)
        return self._unpack(path, packed) if packed is not None else None

    def get(self, path: str, default: Upload | None = None) -> Upload | None:
        """Return the upload at `path`, or `default` when the journal has none."""
        merged = self._unfinished.get(path)
        if merged is not None:
            return _make_upload(path, merged)
        packed = self._finished.get(path)
        if packed is not None:
            return _make_upload(path, self._unpack(path, packed))
        return default

    def __getitem__(self, path: str) -> Upload:
        upload = self.get(path)
        if upload is None:
            raise KeyError(path)
        return upload

    def __contains__(self, path: object) -> bool:
        return path in self._unfinished or path in self._finished

    def __len__(self) -> int:
        return len(self._unfinished) + len(self._finished)

    def __iter__(self) -> Iterator[str]:
        yield from list(self._finished)
        yield from list(self._unfinished)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Uploads):
            return dict(self.items()) == dict(other.items())
        if isinstance(other, dict):
            return dict(self.items()) == other
        return NotImplemented

    def items(self) -> Iterator[tuple[str, Upload]]:
        """Yield (path, upload) for every upload, finished ones first."""
        for path in self:
            upload = self.get(path)
            if upload is not None:
                yield path, upload

    def values(self) -> Iterator[Upload]:
        """Yield every upload, finished ones first."""
        for _path, upload in self.items():
            yield upload

    def unfinished(self) -> list[Upload]:
        """Return the uploads not finished yet (pending or waiting for their row), without unpacking the rest."""
        return [_make_upload(path, merged) for path, merged in self._unfinished.items()]

    def finished_counts(self) -> Counter[str]:
        """Count the finished uploads by status, without unpacking them."""
        by_event = Counter(packed[0] for packed in self._finished.values())
        return Counter({STATUS_BY_EVENT[_EVENTS[code]]: count for code, count in by_event.items()})

    def finished_paths(self, status: str) -> list[str]:
        """Return the paths of the finished uploads with `status` (gone, unmatched, ...), without unpacking them."""
        codes = {_EVENT_CODES[event] for event, finished_status in STATUS_BY_EVENT.items() if finished_status == status}
        return [path for path, packed in self._finished.items() if packed[0] in codes]

    def uploaded_buckets(self) -> Counter[str | None]:
        """Count the uploads by the bucket they went to (None: not recorded).

        The bucket is read from the packed head, and from the unpacked record only for the
        uploads whose head does not contain it: extra formats, uploads in parts, uploads that
        failed before they went through.
        """
        uploaded = _EVENT_CODES["uploaded"]
        codes = Counter(packed[2] for packed in self._finished.values() if packed[0] == uploaded)
        buckets = Counter({self._names[code]: count for code, count in codes.items() if code})
        if codes[0]:
            for path, packed in self._finished.items():
                if packed[0] == uploaded and not packed[2]:
                    buckets[self._unpack(path, packed).get("bucket")] += 1
        return buckets

    def latest_finished(self, statuses: Collection[str], count: int) -> list[Upload]:
        """Return the `count` most recently finished uploads with one of `statuses`, newest first."""
        events = {_EVENT_CODES[event] for event, status in STATUS_BY_EVENT.items() if status in statuses}

        def stamped() -> Iterator[tuple[str, str]]:
            for path, packed in self._finished.items():
                if packed[0] in events:
                    length = packed[_HEAD.size - 1]
                    if length:
                        yield packed[_HEAD.size:_HEAD.size + length].decode("utf-8"), path
                    else:
                        yield str(self._unpack(path, packed).get("ts", "")), path

        latest = heapq.nlargest(count, stamped())
        return [self[path] for _ts, path in latest]

    def last_uploaded(self) -> Upload | None:
        """Return the upload that went to the bucket last, or None when none has.

        Finished uploads are kept in the order they finished, so this looks only at the newest
        few, not at every upload as latest_finished does.
        """
        uploaded = _EVENT_CODES["uploaded"]
        for path, packed in reversed(self._finished.items()):
            if packed[0] == uploaded:
                return self[path]
        return None

    def uploaded_content(self) -> Iterator[tuple[str, str]]:
        """Yield (md5, key) for every upload whose content went up, in the order they finished."""
        uploaded = _EVENT_CODES["uploaded"]
        for path, packed in self._finished.items():
            if packed[0] != uploaded:
                continue
            record = self._unpack(path, packed)
            if record.get("md5"):
                yield record["md5"], record.get("key") or path


class JournalState:
    """Everything the journal records, replayed: the uploads by path, the md5 index and the table cursors."""

    def __init__(self) -> None:
        self.uploads = Uploads()
        self.cursor: int | None = None  # highest image id the table poll has handled
        self.format_cursor: int | None = None  # highest format_id the format poll has handled
        self.records = 0
        self.snapshot_records = 0  # how many of the records were read from the snapshot instead of replayed
        self.snapshot_note: str | None = None  # why the snapshot beside the journal was not used
        self.snapshot_checksum = (0, 0)  # the byte length and CRC-32 of the part of the journal the snapshot covers
        self._md5_index: dict[str, str] | None = None

    @property
    def md5_index(self) -> dict[str, str]:
        """The md5 of each uploaded content and its key, built on first use.

        Only `uploads.prevent_duplicates` needs it, and a million entries cost about 140 MB.
        """
        if self._md5_index is None:
            index: dict[str, str] = {}
            for md5, key in self.uploads.uploaded_content():
                index.setdefault(md5, key)
            self._md5_index = index
        return self._md5_index

    def apply(self, record: dict[str, Any]) -> None:
        """Apply one record to the state. The record may be kept: do not change it afterwards.

        Raises KeyError, ValueError or TypeError for a malformed record.
        """
        event = record["event"]
        finishes = _FINISHES.get(event)
        if finishes is not None:
            path = record["path"]
            if type(path) is not str:
                raise ValueError(f"path is {type(path).__name__}, not a string")
            merged = self.uploads.apply(path, record, finishes)
            if merged is not None and self._md5_index is not None and event == "uploaded" and merged.get("md5"):
                self._md5_index.setdefault(merged["md5"], merged.get("key") or path)
        elif event == CURSOR_EVENT:
            if "image_id" in record:
                self.cursor = int(record["image_id"])
            if "format_id" in record:
                self.format_cursor = int(record["format_id"])
        elif event != HEADER_EVENT:
            raise KeyError(f"unknown event {event!r}")


# The date and time of the current second as text. A batch writes hundreds of time stamps a
# second, two per upload, and formatting the date for each cost more than the rest of the stamp.
_second: tuple[int, str] = (-1, "")


def now_iso() -> str:
    """Return the current UTC time as ISO 8601 with milliseconds, such as 2026-12-05T08:01:02.345Z."""
    global _second
    now = time.time()
    second = int(now)
    cached = _second  # one read, so that another thread's update cannot mix two seconds
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((now - second) * 1000):03d}Z"


def epoch_of(iso: str) -> float:
    """Return the seconds since the epoch of a time stamp as now_iso writes it; the current time for one that cannot be read."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def snapshot_path(journal_path: Path) -> Path:
    """Return where the snapshot of the journal at `journal_path` is kept: beside it, as <name>.snapshot."""
    return journal_path.with_suffix(".snapshot")


def _temporary_path(journal_path: Path, purpose: str) -> Path:
    """Return the file that a compaction, a snapshot or a repair of the journal writes before renaming it into place."""
    if purpose == "snapshot":
        target = snapshot_path(journal_path)
        return target.with_name(target.name + ".tmp")
    return journal_path.with_name(f"{journal_path.name}.{purpose}")


def read_journal(path: Path, use_snapshot: bool = True) -> tuple[JournalState, int]:
    """Replay the journal at `path`.

    When a snapshot of the state lies beside the journal and still matches it, the state is
    read from the snapshot, and only the records appended after it are replayed. Otherwise
    the state's `snapshot_note` gives the reason. Returns the state and the byte length of the
    valid part, so that a torn last line (an append cut short by a power loss) can be cut off
    before the next append. A missing file is an empty journal. Raises JournalCorrupt naming
    the line for a corrupt line that is not the last one, and JournalError for an unreadable file.
    """
    try:
        # Python reads in blocks of the file system's block size, 4 KiB on ext4. Larger blocks
        # take about 9% off the time to read and parse the lines of a large journal.
        handle = open(path, "rb", buffering=READ_BUFFER)
    except FileNotFoundError:
        return JournalState(), 0
    except OSError as error:
        raise JournalError(f"journal {path} could not be read ({error.strerror}): check the state directory's permissions") from None

    # The garbage collector would scan the millions of short-lived record dicts, and the
    # snapshot's uploads, again and again for cycles they cannot form: it is paused.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with handle:
            state = _restore_snapshot(path, handle) if use_snapshot else JournalState()
            return state, _replay(path, handle, state)
    finally:
        if collecting:
            gc.enable()


def _replay(path: Path, handle: BinaryIO, state: JournalState) -> int:
    """Apply the records from `handle`'s position on to `state`, and return the byte length of the journal's valid part.

    Raises JournalCorrupt naming the line for a corrupt line that is not the last one.
    """
    # This loop runs once per record, millions of times: names are bound locally.
    apply = state.apply
    apply_upload = state.uploads.apply
    finishes_upload = _FINISHES.get
    loads = orjson.loads

    bad_line: str | None = None
    valid_length: int | None = None
    number = state.records
    for number, line in enumerate(handle, start=state.records + 1):
        if bad_line is not None:
            # The bad line was not the last one, so it is corruption, not a torn append.
            raise JournalCorrupt(bad_line)
        if not line.endswith(b"\n"):
            valid_length = handle.tell() - len(line)  # a torn last line: everything before it is valid
            break
        try:
            record = loads(line)
            if type(record) is not dict:
                raise ValueError("not a JSON object")
            # An upload's record goes straight to the uploads, which is what
            # JournalState.apply does too, because a replayed state has no md5 index yet.
            event = record["event"]
            finishes = finishes_upload(event)
            if finishes is None:
                apply(record)
            else:
                upload_path = record["path"]
                if type(upload_path) is not str:
                    raise ValueError(f"path is {type(upload_path).__name__}, not a string")
                apply_upload(upload_path, record, finishes)
        except (ValueError, KeyError, TypeError) as error:
            bad_line = (
                f"journal {path} line {number} is corrupt ({type(error).__name__}: {error}): "
                "run 's3watch journal repair' to keep every valid record, or move the file aside"
            )
            valid_length = handle.tell() - len(line)

    if valid_length is None:
        state.records = number
        return handle.tell()
    state.records = number - 1  # the lines before the torn or bad one
    return valid_length


class _SnapshotMismatch(Exception):
    """The snapshot cannot replace the journal's records. The message gives the reason."""


def _restore_snapshot(journal_path: Path, handle: BinaryIO) -> JournalState:
    """Return the state saved in the snapshot of the journal open as `handle`, and move `handle` past the records it holds.

    Returns a fresh state, with `handle` left at the start, when there is no snapshot or it
    does not match the journal. The state's snapshot_note then gives the reason.
    """
    path = snapshot_path(journal_path)
    try:
        with open(path, "rb") as snapshot:
            state, offset = _read_snapshot(snapshot, handle.fileno())
    except FileNotFoundError:
        return JournalState()
    except (OSError, _SnapshotMismatch, ValueError, EOFError, TypeError, KeyError) as error:
        state = JournalState()
        reason = error.strerror if isinstance(error, OSError) else str(error)
        state.snapshot_note = f"snapshot {path} not used ({reason}); the whole journal was replayed"
        return state

    handle.seek(offset)
    return state


def _read_snapshot(snapshot: BinaryIO, journal_fd: int) -> tuple[JournalState, int]:
    """Read a snapshot and check it against the journal open as `journal_fd`.

    Returns the state and the byte length of the journal it covers. Raises _SnapshotMismatch
    (or ValueError, EOFError, TypeError, KeyError for a snapshot this code did not write).
    """
    magic = snapshot.read(len(_SNAPSHOT_MAGIC))
    if magic != _SNAPSHOT_MAGIC:
        if _SNAPSHOT_MAGIC.startswith(magic):
            raise _SnapshotMismatch("cut short")
        if magic.startswith(_SNAPSHOT_PREFIX):
            raise _SnapshotMismatch("written by another version of s3watch or of Python")
        raise _SnapshotMismatch("damaged")
    about = _read_frame(snapshot)
    if type(about) is not dict:
        raise _SnapshotMismatch("damaged")

    # The snapshot replaces the first `offset` bytes of the journal only while they are the
    # bytes it was taken of: same first and last bytes, same CRC-32 of the whole part.
    offset = about["offset"]
    if os.fstat(journal_fd).st_size < offset:
        raise _SnapshotMismatch("the journal is shorter than the part the snapshot covers")
    head, tail = about["head"], about["tail"]
    if (os.pread(journal_fd, len(head), 0) != head or os.pread(journal_fd, len(tail), offset - len(tail)) != tail
            or _checksum(journal_fd, offset) != about["checksum"]):
        raise _SnapshotMismatch("the journal differs from the one the snapshot was taken of")

    state = JournalState()
    uploads = state.uploads
    for mapping, frames in ((uploads._finished, about["finished_frames"]), (uploads._unfinished, about["unfinished_frames"])):
        for _ in range(frames):
            chunk = _read_frame(snapshot)
            if type(chunk) is not dict:
                raise _SnapshotMismatch("damaged")
            mapping.update(chunk)
    if snapshot.read(1):
        raise _SnapshotMismatch("damaged")

    uploads._names = list(about["names"])
    uploads._name_codes = {name: code for code, name in enumerate(uploads._names)}
    state.cursor = about["cursor"]
    state.format_cursor = about["format_cursor"]
    state.records = state.snapshot_records = about["records"]
    state.snapshot_checksum = (offset, about["checksum"])
    return state, offset


def _read_frame(snapshot: BinaryIO) -> Any:
    """Read one frame of a snapshot and return its value. Raises _SnapshotMismatch when it is cut short or damaged."""
    head = snapshot.read(_FRAME.size)
    if len(head) != _FRAME.size:
        raise _SnapshotMismatch("cut short")
    length, checksum = _FRAME.unpack(head)
    if length > os.fstat(snapshot.fileno()).st_size - snapshot.tell():
        raise _SnapshotMismatch("cut short")  # checked first: a damaged length could ask for more memory than there is
    data = snapshot.read(length)
    if zlib.crc32(data) != checksum:
        raise _SnapshotMismatch("damaged")
    return marshal.loads(data)


def _snapshot_frames(state: JournalState, journal_fd: int, offset: int, checksum: int) -> Iterator[bytes]:
    """Yield the bytes of a snapshot of `state`, which is the replay of the first `offset` bytes of the journal open as `journal_fd`.

    `checksum` is the CRC-32 of those bytes. Raises ValueError for a value marshal cannot hold,
    and OSError when the journal cannot be read.
    """
    check = min(offset, _SNAPSHOT_CHECK)
    uploads = state.uploads
    about = {
        "offset": offset, "checksum": checksum,
        "head": os.pread(journal_fd, check, 0), "tail": os.pread(journal_fd, check, offset - check),
        "records": state.records, "cursor": state.cursor, "format_cursor": state.format_cursor, "names": uploads._names,
        "finished_frames": -(-len(uploads._finished) // _SNAPSHOT_CHUNK), "unfinished_frames": -(-len(uploads._unfinished) // _SNAPSHOT_CHUNK),
    }
    yield _SNAPSHOT_MAGIC
    yield _frame(about)
    for mapping in (uploads._finished, uploads._unfinished):
        entries = iter(mapping.items())
        while chunk := dict(itertools.islice(entries, _SNAPSHOT_CHUNK)):
            yield _frame(chunk)


def _checksum(fd: int, length: int, known: tuple[int, int] = (0, 0)) -> int:
    """Return the CRC-32 of the first `length` bytes of the file open as `fd` (0.17 to 0.29 s for 514 MB, measured on one machine).

    `known` is the length and CRC-32 of a first part already summed: only the bytes after it
    are read. Raises _SnapshotMismatch when the file is shorter, and OSError.
    """
    position, value = known
    while position < length:
        data = os.pread(fd, min(READ_BUFFER, length - position), position)
        if not data:
            raise _SnapshotMismatch("the journal is shorter than the part the snapshot covers")
        value = zlib.crc32(data, value)
        position += len(data)
    return value


def _frame(value: Any) -> bytes:
    data = marshal.dumps(value, 4)
    return _FRAME.pack(len(data), zlib.crc32(data)) + data


def iter_records(path: Path) -> Iterator[tuple[int, bytes, dict[str, Any] | None]]:
    """Yield (line number, raw line, record or None when unparseable) for every line of a journal."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = orjson.loads(line)
                if type(record) is not dict or "event" not in record:
                    record = None
            except ValueError:
                record = None
            yield number, line, record


class Journal:
    """The journal opened for appending by the one agent that owns the state directory.

    Records are buffered by `append` and made durable together by `commit` (group commit):
    callers must commit before acting on what they appended. `commit_due` returns when records
    that only finish uploads, which no action waits for, have waited long enough.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state, valid_length = read_journal(path)
        self._buffer: list[bytes] = []
        self._buffered_at = 0.0  # time.monotonic() of the oldest buffered record
        self._buffer_gates_action = False  # whether a buffered record must be durable before the agent acts
        self._compaction_failed_at: int | None = None  # records in the journal when a compaction last failed
        self._snapshot_tried_at = self.state.snapshot_records  # records in the journal at the last snapshot written or tried
        self._snapshot_written_at: int | None = self.state.snapshot_records or None  # records the snapshot on disk covers
        # The journal only grows between compactions, so each snapshot sums only the bytes after the last one.
        self._checksummed = self.state.snapshot_checksum

        path.parent.mkdir(parents=True, exist_ok=True)
        # Only the holder of the state directory's lock writes these files, and that is the
        # caller now. Any found here were left by a crash in the middle of writing one.
        for purpose in ("compact", "snapshot", "repair"):
            _discard(_temporary_path(path, purpose))
        if valid_length == 0:
            # A snapshot left from a journal that was moved aside must not replace the new one.
            _remove_snapshot(path)
        # Read access too: a snapshot compares the bytes it covers.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # a journal created by an earlier version is private to its owner
        size = os.fstat(fd).st_size
        self.torn_bytes = max(0, size - valid_length)  # the torn last line cut off, for the agent's log
        if size > valid_length:
            # Drop a torn last line so that the next record does not glue onto it.
            os.ftruncate(fd, valid_length)
            os.fsync(fd)
        self._durable_size = os.lseek(fd, 0, os.SEEK_END)
        self._fd = fd
        if valid_length == 0:
            self.append(HEADER_EVENT, version=JOURNAL_VERSION)
            self.commit()

    def append(self, event: str, path: str | None = None, **values: Any) -> None:
        """Append a record to the buffer and apply it to the state; None values are left out.

        The record is not durable until `commit` returns. Raises TypeError (orjson's
        JSONEncodeError), with the state unchanged, for a value JSON cannot hold, such as a
        string with lone surrogates.
        """
        record: dict[str, Any] = {"ts": now_iso(), "event": event}
        if path is not None:
            record["path"] = path
        record.update((name, value) for name, value in values.items() if value is not None)
        line = orjson.dumps(record) + b"\n"
        self.state.apply(record)
        self.state.records += 1
        if not self._buffer:
            self._buffered_at = time.monotonic()
        if not _FINISHES.get(event, False):
            self._buffer_gates_action = True
        self._buffer.append(line)

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
        self._buffer_gates_action = False

    @property
    def buffered(self) -> bool:
        """Whether records are waiting for `commit`."""
        return bool(self._buffer)

    def commit_due(self, delay: float) -> float:
        """Return the seconds until the buffered records must be committed, or infinity when none are.

        It is 0 when a buffered record must be durable before the agent acts, which is every
        record but those that finish an upload. It is also 0 once the oldest has waited `delay`.
        """
        if not self._buffer:
            return math.inf
        if self._buffer_gates_action:
            return 0.0
        return max(0.0, self._buffered_at + delay - time.monotonic())

    def needs_compaction(self) -> bool:
        """Return whether the file has grown well past one record per upload.

        After a failed compaction it waits for COMPACTION_MIN_RECORDS more records, so that a
        full disk costs one attempt per that many records, not one per check.
        """
        records = self.state.records
        if self._compaction_failed_at is not None and records < self._compaction_failed_at + COMPACTION_MIN_RECORDS:
            return False
        return records > COMPACTION_MIN_RECORDS and records > 3 * (len(self.state.uploads) + 2)

    def compact(self) -> None:
        """Rewrite the journal with one record per upload and rename it into place.

        A crash at any point leaves either the old or the new file complete. Raises JournalError.
        """
        self.commit()
        self._compaction_failed_at = self.state.records  # cleared when it succeeds
        _remove_snapshot(self.path)
        self._snapshot_written_at = None
        temporary = _temporary_path(self.path, "compact")
        state = self.state
        try:
            records = _write_durably(temporary, _compacted_lines(state))
            # Opened before the rename, so that no failure can leave the appends going to the old
            # file once the new one has its name.
            fd = os.open(temporary, os.O_RDWR)
        except OSError as error:
            _discard(temporary)
            raise JournalError(f"journal {self.path} could not be compacted ({_describe(error)}): free space in the state directory or fix its permissions") from None
        try:
            os.replace(temporary, self.path)
        except OSError as error:
            os.close(fd)
            _discard(temporary)
            raise JournalError(f"journal {self.path} could not be compacted ({_describe(error)}): fix the state directory's permissions") from None

        os.close(self._fd)
        self._fd = fd
        self._durable_size = os.lseek(self._fd, 0, os.SEEK_END)
        state.records = records
        self._compaction_failed_at = None
        self._snapshot_tried_at = 0
        self._checksummed = (0, 0)
        try:
            _fsync_directory(self.path.parent)
        except OSError as error:
            raise JournalError(f"journal {self.path} was compacted, but its folder could not be synced ({_describe(error)})") from None

    def snapshot_due(self) -> bool:
        """Return whether a running agent should write a new snapshot: enough records were appended since the last one.

        A failed snapshot counts as written here, so that a full disk costs one attempt per
        SNAPSHOT_MIN_RECORDS records, not one per check.
        """
        appended = self.state.records - self._snapshot_tried_at
        return appended >= SNAPSHOT_MIN_RECORDS and appended >= len(self.state.uploads) // 2

    def snapshot_current(self) -> bool:
        """Return whether the snapshot beside the journal covers every record, so that writing it again would change nothing."""
        return self._snapshot_written_at == self.state.records and not self._buffer and snapshot_path(self.path).exists()

    def write_snapshot(self) -> int:
        """Commit, then save the state beside the journal, so that the next start need not replay every record.

        Returns the snapshot's size in bytes. Raises JournalError when the journal cannot be
        committed or the snapshot cannot be written. The journal is unharmed either way, and
        the next start replays the records the last snapshot does not cover, or the whole journal.
        """
        self.commit()
        self._snapshot_tried_at = self.state.records
        target = snapshot_path(self.path)
        temporary = _temporary_path(self.path, "snapshot")
        offset = self._durable_size
        try:
            checksum = _checksum(self._fd, offset, self._checksummed)
            _write_durably(temporary, _snapshot_frames(self.state, self._fd, offset, checksum))
            size = os.path.getsize(temporary)
            os.replace(temporary, target)
            _fsync_directory(target.parent)
        except (OSError, ValueError) as error:
            _discard(temporary)
            if isinstance(error, OSError):
                reason, advice = _describe(error), "free space in the state directory or fix its permissions"
            else:
                reason, advice = str(error), "a value in the journal cannot be saved in a snapshot, please report this as a bug"
            raise JournalError(f"snapshot {target} could not be written ({reason}): {advice}. The journal is unharmed, "
                               "and the next start replays the records the snapshot would have covered.") from None
        self._snapshot_written_at = self.state.records
        self._checksummed = (offset, checksum)
        return size

    def close(self) -> None:
        """Commit what is buffered and close the file."""
        try:
            self.commit()
        finally:
            os.close(self._fd)


def _compacted_lines(state: JournalState) -> Iterator[bytes]:
    """Yield the lines of the compacted journal of `state`: the header and the cursors, then one record per upload."""
    yield orjson.dumps({"ts": now_iso(), "event": HEADER_EVENT, "version": JOURNAL_VERSION}) + b"\n"
    if state.cursor is not None:
        yield orjson.dumps({"ts": now_iso(), "event": CURSOR_EVENT, "image_id": state.cursor}) + b"\n"
    if state.format_cursor is not None:
        yield orjson.dumps({"ts": now_iso(), "event": CURSOR_EVENT, "format_id": state.format_cursor}) + b"\n"

    for path in state.uploads:
        merged = state.uploads.record_of(path)
        assert merged is not None
        record: dict[str, Any] = {"ts": merged.get("ts", ""), "event": merged["event"], "path": path}
        for name, value in merged.items():
            if name not in record and value is not None and not (name in ("attempts", "detected_ts") and not value):
                record[name] = value
        yield orjson.dumps(record) + b"\n"


def _remove_snapshot(journal_path: Path) -> None:
    """Delete the snapshot of the journal at `journal_path`, if there is one, before the journal is replaced.

    Raises JournalError when it cannot be deleted.
    """
    path = snapshot_path(journal_path)
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        raise JournalError(f"snapshot {path} could not be deleted ({error.strerror}): remove it by hand, it is only a copy of the journal's state") from None


def _discard(path: Path) -> None:
    """Delete a temporary file if it exists. A failure is ignored, because the file only blocks the next attempt, which reports its own error."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _describe(error: OSError) -> str:
    """Return the reason an operating system call failed, with the files it failed on when there are any."""
    if error.filename2:
        return f"{error.strerror}: {error.filename} -> {error.filename2}"  # a rename
    return f"{error.strerror}: {error.filename}" if error.filename else str(error.strerror)


def _write_durably(path: Path, lines: Iterable[bytes]) -> int:
    """Write `lines` to a new file (mode FILE_MODE) and fsync it. Returns the number of lines written.

    The lines go out through a buffer of WRITE_BUFFER bytes as they come, so that rewriting the
    journal of a large gallery does not hold a second copy of it in memory. Raises OSError.
    """
    def create(name: str | Path, _flags: int) -> int:
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)

    count = 0
    with open(path, "wb", buffering=WRITE_BUFFER, opener=create) as out:
        for line in lines:
            out.write(line)
            count += 1
        out.flush()
        os.fsync(out.fileno())
    return count


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_journal(path: Path) -> tuple[int, int, Path | None]:
    """Rewrite a journal keeping every valid record, and keep the original beside it.

    Returns (records kept, lines dropped, where the original is kept). The original is renamed
    to `<name>.corrupt-<time>`. A journal without a bad line is left as it is, and the third
    value is None. Raises JournalError when the file cannot be read or written.
    """
    if not path.exists():
        raise JournalError(f"journal {path} not found: check state_dir in the configuration")

    dropped = 0
    scratch = JournalState()

    def valid_lines() -> Iterator[bytes]:
        nonlocal dropped
        for _number, line, record in iter_records(path):
            if record is None or not line.endswith(b"\n"):
                dropped += 1
                continue
            try:
                scratch.apply(record)
            except (KeyError, ValueError, TypeError):
                dropped += 1
                continue
            yield line

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.corrupt-{stamp}")
    temporary = _temporary_path(path, "repair")
    try:
        kept = _write_durably(temporary, valid_lines())
        if dropped == 0:
            _discard(temporary)
            return kept, 0, None
        _remove_snapshot(path)
        os.link(path, backup)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except OSError as error:
        _discard(temporary)
        raise JournalError(f"journal {path} could not be repaired ({_describe(error)}): check the state directory's permissions and free space") from None
    return kept, dropped, backup
