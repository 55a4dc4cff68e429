"""Small units: keys, error codes, the Expect header, the journal file, its packed uploads and the matcher's schedule."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import botocore.exceptions
import pytest
import structlog

import s3watch.logs
from s3watch.config import load_config
from s3watch.journal import Journal, JournalError, JournalState, Uploads, now_iso, read_journal, repair_journal
from s3watch.logs import configure_logging, flush_logs
from s3watch.matcher import Matcher
from s3watch.seaweed import free_ports
from s3watch.uploader import EXPECT_CONTINUE_THRESHOLD, UploadRequest, Uploader, _read_body, classify_error, object_key
from s3watch.watcher import _Handler, _WatchdogLogHandler

from .conftest import Setup


def test_object_key_from_template() -> None:
    path = "upload/2026/12/04/20261204193815-f12a555d.jpg"
    assert object_key("{prefix}{path}", "originals/", path, 7, "abc") == f"originals/{path}"
    assert object_key("{prefix}{image_id}/{file}", "", path, 7, "abc") == "7/20261204193815-f12a555d.jpg"
    assert object_key("{md5}.{ext}", "", path, 7, "abc") == "abc.jpg"
    assert object_key("{prefix}{path}", "", "upload/été à Noël.jpg", 1, None) == "upload/été à Noël.jpg"


def test_object_key_rejects_invalid_keys() -> None:
    with pytest.raises(ValueError, match="over S3's limit of 1024"):
        object_key("{prefix}{path}", "p" * 1000, "upload/" + "x" * 30, 1, None)
    with pytest.raises(ValueError, match="control characters"):
        object_key("{prefix}{path}", "", "upload/a\nb.jpg", 1, None)
    with pytest.raises(ValueError, match="not UTF-8"):
        object_key("{prefix}{path}", "", "upload/a\udcff.jpg", 1, None)


def client_error(status: int, code: str, operation: str = "PutObject") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


@pytest.mark.parametrize(
    ("error", "code", "transient"),
    [
        (client_error(403, "SignatureDoesNotMatch"), "failed_code_403", False),
        (client_error(403, "InvalidAccessKeyId"), "failed_code_403", False),
        (client_error(404, "NoSuchBucket"), "failed_code_404", False),
        (client_error(404, "404", "HeadBucket"), "failed_code_404", False),
        (client_error(503, "SlowDown"), "failed_code_503", True),
        (client_error(500, "InternalError"), "failed_code_500", True),
        (client_error(409, "ConditionalRequestConflict"), "failed_code_409", True),
        (client_error(400, "BadDigest"), "failed_code_400", True),
        (client_error(400, "InvalidArgument"), "failed_code_400", False),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "failed_code_0", True),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), "failed_code_0", True),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), "failed_code_0", True),
        (botocore.exceptions.NoCredentialsError(), "failed_code_403", False),
        (botocore.exceptions.SSLError(endpoint_url="https://127.0.0.1:1", error="WRONG_VERSION_NUMBER"), "failed_code_0", True),
    ],
)
def test_error_codes(error: Exception, code: str, transient: bool) -> None:
    failure = classify_error(error)
    assert failure.code == code
    assert failure.transient is transient


def test_handler_reports_lost_events() -> None:
    events = pytest.importorskip("watchdog.events")
    if not hasattr(events, "EventsLostEvent"):
        pytest.skip("this watchdog reports no lost events")
    files: list[str] = []
    losses: list[None] = []
    handler = _Handler(on_file=files.append, on_events_lost=lambda: losses.append(None))

    # Through watchdog's own dispatch, as its observer thread calls it.
    handler.dispatch(events.EventsLostEvent("/gallery/upload", is_directory=True))
    handler.dispatch(events.FileCreatedEvent("/gallery/upload/2026/12/05/photo.jpg"))

    assert losses == [None]
    assert files == ["/gallery/upload/2026/12/05/photo.jpg"]


def test_overflow_warning_reports_lost_events() -> None:
    losses: list[None] = []
    limits: list[str] = []
    handler = _WatchdogLogHandler(on_watch_limit=limits.append, on_events_lost=lambda: losses.append(None))
    overflow = logging.LogRecord("watchdog.observers.inotify", logging.WARNING, __file__, 1,
                                 "Inotify queue overflowed; reconciling recursive watches below %r", (b"/gallery/upload",), None)

    handler.emit(overflow)

    assert losses == [None]
    assert limits == []


def test_small_file_read_into_memory(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"jpeg" * 1000)
    handle = open(photo, "rb")

    body, md5, size, _after = _read_body(handle, "photo.jpg", in_memory_limit=4000)

    assert body == b"jpeg" * 1000
    assert (md5, size) == (hashlib.md5(b"jpeg" * 1000).hexdigest(), 4000)
    assert handle.closed


def test_large_file_hashed_then_rewound(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"jpeg" * 1000)
    handle = open(photo, "rb")

    body, md5, size, _after = _read_body(handle, "photo.jpg", in_memory_limit=3999)

    assert body is handle
    assert not handle.closed
    assert handle.tell() == 0
    assert (md5, size) == (hashlib.md5(b"jpeg" * 1000).hexdigest(), 4000)
    handle.close()


def test_expect_header_from_2_mib(setup: Setup, gallery_root: Path) -> None:
    config = load_config(setup.path)
    uploader = Uploader(config.s3, config.uploads, config.links, gallery_root)
    expect_headers: dict[str, str | None] = {}
    uploader.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: expect_headers.__setitem__(request.url.rsplit("/", 1)[-1], request.headers.get("Expect")))
    sizes = {"small.jpg": 150_000, "just-below.jpg": EXPECT_CONTINUE_THRESHOLD - 1, "large.jpg": EXPECT_CONTINUE_THRESHOLD}

    for name, size in sizes.items():
        content = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        (gallery_root / "upload" / name).write_bytes(content)
        outcome = uploader.upload(UploadRequest(path=f"upload/{name}", image_id=1, key=f"expect/{name}", row_md5=hashlib.md5(content).hexdigest()), None)
        assert (outcome.event, outcome.bytes) == ("uploaded", size)

    assert {name: expect_headers[name] for name in sizes} == {"small.jpg": None, "just-below.jpg": None, "large.jpg": b"100-continue"}


def test_attempts_counted_per_upload_in_each_worker(setup: Setup, gallery_root: Path) -> None:
    # Nothing listens on this port: every attempt fails with failed_code_0, which is retried.
    setup.update("s3", endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}")
    setup.update("uploads", attempts=3)
    config = load_config(setup.path)
    uploader = Uploader(config.s3, config.uploads, config.links, gallery_root)
    (gallery_root / "upload" / "a.jpg").write_bytes(b"a")
    requests = [UploadRequest(path="upload/a.jpg", image_id=n, key=f"attempts/{n}.jpg", row_md5=None) for n in range(4)]

    # Two workers, two uploads each: the count starts again at every upload, in every thread.
    with ThreadPoolExecutor(max_workers=2) as workers:
        outcomes = list(workers.map(lambda request: uploader.upload(request, None), requests))

    assert [(outcome.event, outcome.code, outcome.attempts) for outcome in outcomes] == [("failed", "failed_code_0", 3)] * 4


def test_now_iso_utc_with_milliseconds() -> None:
    before = datetime.now(timezone.utc)
    stamps = [now_iso() for _ in range(3)]
    after = datetime.now(timezone.utc)

    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert moment >= before - timedelta(milliseconds=1)  # the stamp drops the microseconds
        assert moment <= after
    assert stamps == sorted(stamps)


def test_journal_replays_state_and_index(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append("cursor", image_id=10)
    journal.append("detected", "upload/a.jpg", source="monitor")
    journal.append("queued", "upload/a.jpg", image_id=11, row_md5="aa")
    journal.append("failed", "upload/a.jpg", code="failed_code_0", error="down", attempts=1)
    journal.append("uploaded", "upload/a.jpg", key="k/a.jpg", md5="aa", bytes=5, attempts=2)
    journal.append("queued", "upload/b.jpg", image_id=12)
    journal.close()

    state, _ = read_journal(path)
    assert state.cursor == 10
    a = state.uploads["upload/a.jpg"]
    assert (a.status, a.image_id, a.key, a.attempts, a.source) == ("uploaded", 11, "k/a.jpg", 2, "monitor")
    assert state.uploads["upload/b.jpg"].status == "pending"
    assert state.md5_index == {"aa": "k/a.jpg"}
    assert oct(path.stat().st_mode & 0o777) == "0o640"  # the service's group may read it, as it may read the configuration


def test_journal_torn_tail_is_cut_before_next_append(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append("queued", "upload/a.jpg", image_id=1)
    journal.close()
    with open(path, "ab") as handle:
        handle.write(b'{"event":"uploaded","pa')

    journal = Journal(path)
    journal.append("queued", "upload/b.jpg", image_id=2)
    journal.close()
    lines = path.read_bytes().splitlines()
    assert all(json.loads(line) for line in lines)
    assert set(read_journal(path)[0].uploads) == {"upload/a.jpg", "upload/b.jpg"}


def test_journal_corrupt_middle_line_names_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"event":"journal","version":1}\n{"event":"queued"\n{"event":"queued","path":"upload/a.jpg"}\n')
    with pytest.raises(JournalError, match="line 2 is corrupt"):
        read_journal(path)

    kept, dropped, backup = repair_journal(path)
    assert (kept, dropped) == (2, 1)
    assert read_journal(path)[0].uploads["upload/a.jpg"].status == "pending"
    assert list(tmp_path.glob("journal.jsonl.corrupt-*")) == [backup]

    # Once repaired, another repair changes nothing and keeps no copy.
    repaired = path.read_bytes()
    assert repair_journal(path) == (2, 0, None)
    assert path.read_bytes() == repaired
    assert list(tmp_path.glob("journal.jsonl.corrupt-*")) == [backup]


def test_journal_compaction_keeps_every_upload(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append("cursor", image_id=99)
    for number in range(50):
        name = f"upload/{number}.jpg"
        journal.append("detected", name, source="monitor")
        journal.append("queued", name, image_id=number)
        if number % 2:
            journal.append("uploaded", name, key=name, md5=f"{number:032x}", bytes=number)
        else:
            journal.append("failed", name, code="failed_code_403", error="denied", attempts=3)
    before = journal.state
    snapshot = {p: (u.status, u.image_id, u.key, u.code, u.attempts, u.source, u.md5) for p, u in before.uploads.items()}
    journal.compact()
    journal.append("queued", "upload/new.jpg", image_id=100)
    journal.close()

    state, _ = read_journal(path)
    assert state.cursor == 99
    after = {p: (u.status, u.image_id, u.key, u.code, u.attempts, u.source, u.md5) for p, u in state.uploads.items() if p != "upload/new.jpg"}
    assert after == snapshot
    assert state.uploads["upload/new.jpg"].status == "pending"
    assert len(path.read_bytes().splitlines()) == 53


MD5 = "6513270e269e0d37f2a74de452e6b438"
PHOTO = "upload/2015/01/01/20150101080000-6513270e.jpg"
QUEUED = {"ts": "2025-01-01T00:00:00.001Z", "event": "queued", "path": PHOTO, "image_id": 1, "row_md5": MD5, "source": "batch"}
UPLOADED = {"ts": "2025-01-01T00:00:00.540Z", "event": "uploaded", "path": PHOTO, "key": PHOTO, "bucket": "gallery", "md5": MD5,
            "bytes": 4730217, "attempts": 1, "original": "as_uploaded", "etag": MD5}


@pytest.mark.parametrize("changes", [
    {},
    {"key": "piwigo/" + PHOTO},
    {"key": "by-id/1.jpg"},
    {"md5": MD5.upper(), "etag": MD5.upper()},
    {"etag": "9f" * 16 + "-2"},
    {"row_md5": "0" * 32},
    {"event": "gone", "key": None, "md5": None, "etag": None, "bytes": None, "bucket": None, "original": None, "error": "deleted"},
    {"event": "duplicate", "duplicate_of": "upload/other.jpg", "etag": None},
    {"image_id": True},
    {"bytes": 4.5},
    {"attempts": 0},
    {"attempts": None},
    {"source": None, "bucket": ["not", "a", "string"]},
    {"ts": "2025-01-01T00:00:00.540+01:00 été"},
    {"future_field": {"nested": [1, 2]}},
    {"etag": None, "future_field": 1},
    {"path": "upload/2015/01/01/photo été.jpg", "key": "upload/2015/01/01/photo été.jpg"},
])
def test_finished_upload_unpacks_as_recorded(changes: dict[str, object]) -> None:
    queued = {**QUEUED, "path": changes.get("path", PHOTO)}
    finished = {name: value for name, value in {**UPLOADED, **changes}.items() if value is not None}  # None: no such field
    path = finished["path"]
    uploads = Uploads()
    # A usual upload first, so that the case below may take the short way of packing, which needs the names' codes known.
    uploads.apply("upload/first.jpg", {**QUEUED, "path": "upload/first.jpg"}, finished=False)
    uploads.apply("upload/first.jpg", {**UPLOADED, "path": "upload/first.jpg", "key": "upload/first.jpg"}, finished=True)

    uploads.apply(path, dict(queued), finished=False)
    uploads.apply(path, dict(finished), finished=True)

    assert uploads.record_of(path) == {**queued, **finished}
    upload = uploads[path]
    assert (upload.path, upload.event, upload.ts, upload.key) == (path, finished["event"], finished["ts"], finished.get("key"))


@pytest.mark.parametrize("field", ["original", "bucket", "source", "ts", "key", "md5", "etag", "row_md5", "attempts", "image_id", "bytes"])
def test_packed_upload_keeps_null_field(field: str) -> None:
    uploads = Uploads()

    uploads.apply(PHOTO, dict(QUEUED), finished=False)
    uploads.apply(PHOTO, {**UPLOADED, field: None}, finished=True)

    assert uploads.record_of(PHOTO) == {**QUEUED, **UPLOADED, field: None}


def test_packed_upload_is_small() -> None:
    uploads = Uploads()
    uploads.apply(PHOTO, dict(QUEUED), finished=False)
    uploads.apply(PHOTO, dict(UPLOADED), finished=True)
    assert len(uploads._finished[PHOTO]) < 100


def test_usual_upload_packs_same_both_ways() -> None:
    uploads = Uploads()
    other = "upload/2015/01/01/other.jpg"

    # The first upload is packed the general way, which learns the codes of its bucket, source
    # and original. So the second, with the same fields, is packed the short way.
    for path in (PHOTO, other):
        uploads.apply(path, {**QUEUED, "path": path}, finished=False)
        uploads.apply(path, {**UPLOADED, "path": path, "key": path}, finished=True)

    assert uploads._finished[other] == uploads._finished[PHOTO]
    assert uploads.record_of(other) == {**QUEUED, **UPLOADED, "path": other, "key": other}


def test_finished_upload_requeued_starts_again(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append("queued", "upload/a.jpg", image_id=1, source="batch")
    journal.append("uploaded", "upload/a.jpg", key="upload/a.jpg", md5=MD5, bytes=3, attempts=1)
    journal.append("queued", "upload/a.jpg", image_id=1, source="batch")
    journal.close()

    upload = read_journal(path)[0].uploads["upload/a.jpg"]
    assert (upload.status, upload.key, upload.md5, upload.source) == ("pending", "upload/a.jpg", MD5, "batch")
    assert upload.detected_ts == upload.ts


def test_upload_read_is_a_copy() -> None:
    state = JournalState()
    state.apply(dict(QUEUED))
    state.uploads[PHOTO].status = "uploaded"
    assert state.uploads[PHOTO].status == "pending"


def test_md5_index_built_on_first_use_then_kept(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append("queued", "upload/a.jpg", image_id=1)
    journal.append("uploaded", "upload/a.jpg", key="k/a.jpg", md5="a" * 32)
    journal.append("queued", "upload/b.jpg", image_id=2)
    journal.append("duplicate", "upload/b.jpg", md5="a" * 32, duplicate_of="k/a.jpg")

    assert journal.state.md5_index == {"a" * 32: "k/a.jpg"}
    journal.append("queued", "upload/c.jpg", image_id=3)
    journal.append("uploaded", "upload/c.jpg", key="upload/c.jpg", md5="c" * 32)
    assert journal.state.md5_index == {"a" * 32: "k/a.jpg", "c" * 32: "upload/c.jpg"}
    journal.close()


def _write_large_journal(path: Path, uploads: int) -> Journal:
    """Return an open journal with `uploads` finished uploads, two records each."""
    journal = Journal(path)
    for number in range(uploads):
        name = f"upload/2024/05/{number:06d}.jpg"
        journal.append("queued", name, image_id=number, row_md5=f"{number:032x}", source="batch")
        journal.append("uploaded", name, key=name, bucket="photos", md5=f"{number:032x}", etag=f"{number:032x}", bytes=number, attempts=1)
    journal.commit()
    return journal


def _peak_traced_bytes(step: Callable[[], object]) -> int:
    """Run `step` and return the peak of the memory Python allocated meanwhile (tracemalloc)."""
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_compaction_streams_to_disk(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = _write_large_journal(path, 20_000)

    peak = _peak_traced_bytes(journal.compact)
    journal.close()

    # Built in memory, the compacted lines alone would take the file's size, and joining them twice that.
    size = path.stat().st_size
    assert size > 3_000_000
    assert peak < size / 2
    assert len(read_journal(path)[0].uploads) == 20_000


def test_repair_streams_to_disk(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _write_large_journal(path, 10_000).close()
    with open(path, "ab") as handle:
        handle.write(b'{"event":"uploaded","pa\n{"event":"queued","path":"upload/last.jpg"}\n')
    size = path.stat().st_size

    peak = _peak_traced_bytes(lambda: repair_journal(path))

    # The state that checks each record takes about three quarters of the file's size here.
    # Kept in memory and joined, the lines would add twice the file's size to that.
    assert size > 3_000_000
    assert peak < size
    state, _ = read_journal(path)
    assert len(state.uploads) == 10_001
    assert len(list(tmp_path.glob("journal.jsonl.corrupt-*"))) == 1


def test_compaction_keeps_detected_ts_and_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append("detected", "upload/a.jpg", source="monitor")
    detected_ts = journal.state.uploads["upload/a.jpg"].detected_ts
    journal.append("queued", "upload/a.jpg", image_id=1, row_md5=MD5)
    journal.append("queued", "upload/b.jpg", image_id=2)
    journal.append("uploaded", "upload/b.jpg", key="upload/b.jpg", md5=MD5, future_field="kept")
    journal.compact()
    journal.close()

    state, _ = read_journal(path)
    assert state.uploads["upload/a.jpg"].detected_ts == detected_ts
    assert state.uploads.record_of("upload/b.jpg")["future_field"] == "kept"
    assert state.records == 3


def test_matcher_backs_off_then_gives_up() -> None:
    matcher = Matcher(match_timeout=30)
    matcher.add("a", seen=100.0, now=100.0)
    assert matcher.due(100.0) == []
    assert matcher.due(100.06) == ["a"]
    assert matcher.retry("a", 100.06)
    assert matcher.next_due() == pytest.approx(100.16)

    # Early look-ups are at most a quarter of a second apart, later ones up to 2 s.
    now = 100.06
    delays = []
    while True:
        due = matcher.next_due()
        assert due is not None
        delays.append(due - now)
        now = due
        assert matcher.due(now) == ["a"]
        if not matcher.retry("a", now):
            break
    assert max(delay for delay, at in zip(delays, range(len(delays))) if at < 5) <= 0.25 + 1e-9
    assert max(delays) == pytest.approx(2.0)
    assert now - 100.0 >= 30
    assert "a" not in matcher
    assert matcher.next_due() is None


def test_matcher_postpone_does_not_count_outage() -> None:
    matcher = Matcher(match_timeout=3)
    matcher.add("a", seen=100.0, now=100.0)
    assert matcher.due(100.05) == ["a"]
    matcher.postpone("a", 150.0)  # the database was down for 50 s
    assert matcher.due(150.1) == ["a"]
    assert matcher.retry("a", 150.1)
    assert "a" in matcher


def test_buffered_log_flushes_worker_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(s3watch.logs, "_buffered", None)
    configure_logging(stream=stream, buffered=True)
    log = structlog.get_logger()
    try:
        log.info("loop_line")
        assert stream.getvalue() == ""  # the loop's own lines wait for its next turn

        # A worker's line goes out at once, after the loop line collected before it.
        worker = threading.Thread(target=lambda: log.warning("worker_line"))
        worker.start()
        worker.join()
        assert [line.split()[-1] for line in stream.getvalue().splitlines()] == ["loop_line", "worker_line"]

        log.info("next_loop_line")
        assert "next_loop_line" not in stream.getvalue()
        flush_logs()
        assert stream.getvalue().splitlines()[-1].endswith("next_loop_line")
    finally:
        structlog.reset_defaults()


def test_status_text_waiting_and_control_characters() -> None:
    from s3watch.status import WAITING_FOR_STORE, render_text

    def pending(path: str, code: str, error: str) -> dict[str, Any]:
        return {"path": path, "image_id": 1, "status": code, "error": error, "attempts": 0, "last_try": None, "source": "monitor", "since": "",
                "note": None}

    report = {
        "bucket": "b", "links_error": None, "uploaded": [], "problems": [], "uploaded_elsewhere": {},
        "counts": dict.fromkeys(("uploaded", "pending", "failed", "waiting_for_row", "already_present", "duplicate", "unmatched", "gone"), 0),
        "pending": [pending("upload/a.jpg", "failed_code_403", WAITING_FOR_STORE),
                    pending("upload/b\n\x1b[31m.jpg", "failed_code_400", "key 'upload/b\\n.jpg' contains control characters")],
    }
    lines = render_text(report).splitlines()

    assert "upload/a.jpg  image 1  not tried yet: waiting while the store fails other uploads" in lines[3]
    assert lines[4].strip().startswith("failed_code_400")
    assert "not tried yet" not in lines[4]
    assert "upload/b\\n\\x1b[31m.jpg" in lines[4]
    assert "contains control characters" in lines[5]
    assert len(lines) == 8  # counts, blank, heading, 3 lines of pending, blank, "Uploaded: none"


def test_status_note_on_stalled_row() -> None:
    from s3watch.status import _pending_item, render_text

    state = JournalState()
    state.apply({"ts": "2026-12-05T10:00:00.000Z", "event": "detected", "path": "upload/a.jpg", "source": "monitor"})
    upload = state.uploads["upload/a.jpg"]
    detected = datetime(2026, 12, 5, 10, tzinfo=timezone.utc).timestamp()

    assert _pending_item(upload, 30, detected + 30)["note"] is None
    item = _pending_item(upload, 30, detected + 600)
    assert item["note"] == ("waiting for its row for 600 s, longer than monitor.match_timeout (30 s): the agent cannot read the database "
                            "or is not running; see journalctl -u s3watch -p warning")
    report = {
        "bucket": "b", "links_error": None, "uploaded": [], "problems": [], "uploaded_elsewhere": {}, "pending": [item],
        "counts": dict.fromkeys(("uploaded", "pending", "failed", "waiting_for_row", "already_present", "duplicate", "unmatched", "gone"), 0),
    }
    assert render_text(report).splitlines()[4].strip().startswith("waiting for its row for 600 s")


def test_status_counts_uploads_by_bucket() -> None:
    from s3watch.status import render_text

    state = JournalState()
    for number, bucket in enumerate(("old-bucket", "old-bucket", "new-bucket")):
        path = f"upload/{number}.jpg"
        state.apply({"ts": "2026-12-05T10:00:00.000Z", "event": "queued", "path": path, "image_id": number, "row_md5": "a" * 32, "source": "monitor"})
        state.apply({"ts": "2026-12-05T10:00:01.000Z", "event": "uploaded", "path": path, "key": path, "bucket": bucket, "md5": "a" * 32,
                     "etag": "a" * 32, "bytes": 1, "attempts": 1, "original": "as_uploaded"})
    # An upload in parts: its ETag is not the md5, so its bucket is kept outside the packed head.
    state.apply({"ts": "2026-12-05T10:00:02.000Z", "event": "uploaded", "path": "upload/big.tif", "key": "upload/big.tif", "bucket": "old-bucket",
                 "md5": "b" * 32, "etag": "c" * 32 + "-3", "bytes": 3, "attempts": 1, "kind": "format", "format_id": 7})
    assert state.uploads.uploaded_buckets() == {"old-bucket": 3, "new-bucket": 1}

    report = {
        "bucket": "new-bucket", "links_error": None, "uploaded": [], "problems": [], "pending": [], "uploaded_elsewhere": {"old-bucket": 3},
        "counts": dict.fromkeys(("uploaded", "pending", "failed", "waiting_for_row", "already_present", "duplicate", "unmatched", "gone"), 0),
    }
    assert render_text(report).splitlines()[1] == "  of the uploaded, 3 went to bucket old-bucket, the bucket configured before"


def test_verify_listing_rejected_falls_back(capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from s3watch.journal import Upload
    from s3watch.verify import listed_objects

    class RejectingClient:
        """A client whose store rejects listings, as a policy without s3:ListBucket does."""

        def get_paginator(self, _name: str) -> Any:
            raise botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                                                  "ListObjectsV2")

    uploader = SimpleNamespace(client=RejectingClient(), s3=SimpleNamespace(bucket="gallery"))
    upload = Upload(path="upload/a.jpg", key="upload/a.jpg", status="uploaded", bucket="gallery")

    assert listed_objects(uploader, [upload]) == {}  # type: ignore[arg-type]
    assert "bucket gallery could not be listed (failed_code_403: access denied" in capsys.readouterr().err
