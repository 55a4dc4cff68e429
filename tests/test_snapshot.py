"""The journal's snapshot: the replayed state saved at a clean stop, read instead of the records it covers."""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

import s3watch.journal
from s3watch.journal import Journal, JournalError, JournalState, read_journal, repair_journal, snapshot_path

MD5 = "6513270e269e0d37f2a74de452e6b438"


def fill(journal: Journal, first: int, count: int) -> None:
    """Append the records of `count` photos in every state the agent leaves them in."""
    for number in range(first, first + count):
        photo = f"upload/2026/12/05/{number:06d}.jpg"
        md5 = f"{number:032x}"
        journal.append("detected", photo, source="monitor")
        journal.append("queued", photo, image_id=number, row_md5=md5)
        kind = number % 7
        if kind == 0:
            journal.append("failed", photo, code="failed_code_403", error="denied", attempts=1)  # still pending
        elif kind == 1:
            journal.append("uploaded", photo, key=f"originals/{photo}", bucket="gallery", md5=md5, etag=md5, bytes=number,
                           attempts=1, original="as_uploaded")
        elif kind == 2:
            journal.append("already_present", photo, key=photo, bucket="gallery", attempts=1)
        elif kind == 3:
            journal.append("duplicate", photo, duplicate_of="upload/other.jpg", md5=MD5, bucket="gallery")
        elif kind == 4:
            # An etag that is not the md5 and a field this version does not know: kept as JSON.
            journal.append("uploaded", photo, key=photo, bucket="other-bucket", md5=md5, etag="multipart-2", bytes=1, attempts=2,
                           original="as_stored", future_field={"a": [1, 2.5, None]})
        elif kind == 5:
            journal.append("gone", photo)
        # kind 6 stays queued
    journal.append("cursor", image_id=first + count)
    journal.append("cursor", format_id=first)


def observable(state: JournalState) -> dict[str, Any]:
    """Everything the agent and the commands read from a replayed state."""
    return {
        "uploads": dict(state.uploads.items()),
        "order": list(state.uploads),
        "uploaded_content": list(state.uploads.uploaded_content()),
        "counts": state.uploads.finished_counts(),
        "latest": state.uploads.latest_finished({"uploaded", "already_present"}, 10),
        "unfinished": state.uploads.unfinished(),
        "md5_index": state.md5_index,
        "cursors": (state.cursor, state.format_cursor),
        "records": state.records,
    }


def snapshotted_journal(tmp_path: Path, photos: int) -> Path:
    """Write a journal of `photos` photos and a snapshot of all of it, and return the journal's path."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    fill(journal, 1, photos)
    journal.write_snapshot()
    journal.close()
    return path


def test_snapshot_replaces_covered_records(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    fill(journal, 1, 200)
    journal.append("queued", "upload/2026/12/05/000008.jpg", image_id=8, source="batch")  # a finished upload queued again
    journal.write_snapshot()
    covered = journal.state.records
    fill(journal, 1000, 30)  # after the snapshot: replayed from the journal
    journal.close()

    whole, whole_length = read_journal(path, use_snapshot=False)
    state, length = read_journal(path)
    assert (state.snapshot_records, state.snapshot_note) == (covered, None)
    assert length == whole_length == path.stat().st_size
    assert observable(state) == observable(whole)

    # New uploads packed after a start from the snapshot use the same codes for bucket and source.
    journal = Journal(path)
    assert journal.state.snapshot_records == covered
    journal.append("queued", "upload/new.jpg", image_id=5000, row_md5=MD5, source="batch")
    journal.append("uploaded", "upload/new.jpg", key="originals/upload/new.jpg", bucket="gallery", md5=MD5, etag=MD5, bytes=3,
                   attempts=1, original="as_uploaded")
    journal.append("queued", "upload/new2.jpg", image_id=5001, row_md5=MD5, source="poll")
    journal.append("uploaded", "upload/new2.jpg", key="upload/new2.jpg", bucket="third", md5=MD5, etag=MD5, bytes=3, attempts=1)
    in_memory = observable(journal.state)
    journal.write_snapshot()
    journal.close()
    assert observable(read_journal(path)[0]) == in_memory == observable(read_journal(path, use_snapshot=False)[0])


def test_snapshot_of_an_empty_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.write_snapshot()
    journal.close()
    state, length = read_journal(path)
    assert (state.snapshot_records, len(state.uploads), length) == (1, 0, path.stat().st_size)


def other_journal(path: Path) -> None:
    # Another gallery's journal, longer than the part the snapshot covers.
    other = snapshotted_journal(path.parent / "other", 400)
    shutil.copy(other, path)


def other_snapshot(path: Path) -> None:
    other = snapshotted_journal(path.parent / "other", 200)
    shutil.copy(snapshot_path(other), snapshot_path(path))


def cut_journal(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


def lengthen_record(path: Path) -> None:
    # The last photo that was gone now has a field more, before the snapshot's end.
    data = path.read_bytes()
    at = data.rindex(b'"event":"gone"') + len(b'"event":"gone"')
    path.write_bytes(data[:at] + b',"note":"edited"' + data[at:])


def edit_middle(path: Path) -> None:
    # Same length, far from both ends: one photo uploaded becomes one just detected.
    data = path.read_bytes()
    at = data.index(b'"event":"uploaded"', len(data) // 2)
    path.write_bytes(data[:at] + b'"event":"detected"' + data[at + len(b'"event":"uploaded"'):])


def damage_snapshot(path: Path) -> None:
    snapshot = snapshot_path(path)
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0x01
    snapshot.write_bytes(bytes(data))


def cut_snapshot(path: Path) -> None:
    snapshot = snapshot_path(path)
    os.truncate(snapshot, snapshot.stat().st_size - 10)


def empty_snapshot(path: Path) -> None:
    snapshot_path(path).write_bytes(b"")


def not_a_snapshot(path: Path) -> None:
    snapshot_path(path).write_bytes(b"notes kept here by hand\n")


def other_format(path: Path) -> None:
    snapshot = snapshot_path(path)
    data = snapshot.read_bytes()
    snapshot.write_bytes(data.replace(b"snapshot 1 ", b"snapshot 2 ", 1))


def other_python(path: Path) -> None:
    snapshot = snapshot_path(path)
    data = snapshot.read_bytes()
    snapshot.write_bytes(data.replace(b"python 3.", b"python 3.1", 1))


@pytest.mark.parametrize(("change", "reason"), [
    (other_journal, "the journal differs from the one the snapshot was taken of"),
    (other_snapshot, "the journal differs from the one the snapshot was taken of"),
    (cut_journal, "the journal is shorter than the part the snapshot covers"),
    (lengthen_record, "the journal differs from the one the snapshot was taken of"),
    (edit_middle, "the journal differs from the one the snapshot was taken of"),
    (damage_snapshot, "damaged"),
    (cut_snapshot, "cut short"),
    (empty_snapshot, "cut short"),
    (not_a_snapshot, "damaged"),
    (other_format, "written by another version of s3watch or of Python"),
    (other_python, "written by another version of s3watch or of Python"),
])
def test_mismatched_snapshot_not_used(tmp_path: Path, change: Callable[[Path], None], reason: str) -> None:
    path = snapshotted_journal(tmp_path, 300)

    change(path)

    state, length = read_journal(path)
    whole, whole_length = read_journal(path, use_snapshot=False)
    assert state.snapshot_records == 0
    assert state.snapshot_note == f"snapshot {snapshot_path(path)} not used ({reason}); the whole journal was replayed"
    assert (observable(state), length) == (observable(whole), whole_length)


def test_moved_journal_keeps_snapshot(tmp_path: Path) -> None:
    path = snapshotted_journal(tmp_path, 50)
    copy = tmp_path / "copy"
    shutil.copy(path, copy)
    os.replace(copy, path)  # a new file, as after a restore from a backup

    state, _ = read_journal(path)
    assert (state.snapshot_records, state.snapshot_note) == (state.records, None)


def test_snapshot_path_directory_error(tmp_path: Path) -> None:
    path = snapshotted_journal(tmp_path, 20)
    snapshot = snapshot_path(path)
    snapshot.unlink()
    snapshot.mkdir()

    state, _ = read_journal(path)
    assert state.snapshot_note == f"snapshot {snapshot} not used (Is a directory); the whole journal was replayed"
    cannot_delete = f"snapshot {snapshot} could not be deleted (Is a directory): remove it by hand, it is only a copy of the journal's state"
    journal = Journal(path)
    with pytest.raises(JournalError, match=re.escape(cannot_delete)):
        journal.compact()
    with pytest.raises(JournalError, match=rf"snapshot .* could not be written \(Is a directory: .*\.tmp -> {re.escape(str(snapshot))}\): free space"):
        journal.write_snapshot()
    journal.close()
    with open(path, "ab") as handle:
        handle.write(b'{"event":"queued"\n')  # a line to repair
    with pytest.raises(JournalError, match=re.escape(cannot_delete)):
        repair_journal(path)
    assert not list(tmp_path.glob("journal.jsonl.corrupt-*"))  # nothing was repaired, so no copy is kept
    path.rename(tmp_path / "journal.old")
    with pytest.raises(JournalError, match=re.escape(cannot_delete)):
        Journal(path)  # a new journal


def test_rewritten_journal_removes_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    fill(journal, 1, 100)
    journal.write_snapshot()
    journal.compact()
    assert not snapshot_path(path).exists()
    journal.write_snapshot()
    journal.close()

    # A journal without a bad line is left as it is, and its snapshot still matches it.
    assert repair_journal(path)[2] is None
    assert snapshot_path(path).exists()
    with open(path, "ab") as handle:
        handle.write(b'{"event":"queued"\n')
    repair_journal(path)
    assert not snapshot_path(path).exists()

    journal = Journal(path)
    journal.write_snapshot()
    journal.close()
    path.rename(tmp_path / "journal.old")
    Journal(path).close()  # a new, empty journal
    assert not snapshot_path(path).exists()


def test_corrupt_line_after_snapshot_numbered(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    fill(journal, 1, 20)
    journal.write_snapshot()
    journal.append("queued", "upload/a.jpg", image_id=1)
    journal.close()
    lines = len(path.read_bytes().splitlines())
    with open(path, "ab") as handle:
        handle.write(b'{"event":"queued"\n{"event":"queued","path":"upload/b.jpg"}\n')

    with pytest.raises(JournalError, match=f"line {lines + 1} is corrupt"):
        read_journal(path)


def test_torn_line_after_snapshot_cut(tmp_path: Path) -> None:
    path = snapshotted_journal(tmp_path, 20)
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b'{"event":"uploaded","pa')

    state, length = read_journal(path)
    assert (length, state.snapshot_note) == (size, None)
    journal = Journal(path)
    journal.append("queued", "upload/b.jpg", image_id=2)
    journal.close()
    state = read_journal(path)[0]
    assert state.snapshot_records > 0
    assert "upload/b.jpg" in state.uploads
    assert observable(state) == observable(read_journal(path, use_snapshot=False)[0])


def test_failed_snapshot_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    fill(journal, 1, 20)
    journal.write_snapshot()
    before = snapshot_path(path).read_bytes()
    # orjson writes a datetime as text, but the in-memory record keeps the object, which marshal cannot hold.
    journal.append("queued", "upload/a.jpg", image_id=1, seen=datetime(2026, 12, 5, tzinfo=timezone.utc))

    with pytest.raises(JournalError, match=r"snapshot .* could not be written \(unmarshallable object\): .* report this as a bug\. The journal is unharmed"):
        journal.write_snapshot()
    journal.close()
    assert snapshot_path(path).read_bytes() == before  # the earlier one, which still matches a prefix of the journal
    assert not list(tmp_path.glob("*.tmp"))
    state = read_journal(path)[0]
    assert state.uploads["upload/a.jpg"].status == "pending"
    assert observable(state) == observable(read_journal(path, use_snapshot=False)[0])


def test_damaged_frame_length_not_used(tmp_path: Path) -> None:
    path = snapshotted_journal(tmp_path, 20)
    snapshot = snapshot_path(path)
    data = snapshot.read_bytes()
    header = data.index(b"\n") + 1
    snapshot.write_bytes(data[:header] + (2**63).to_bytes(8, "little") + data[header + 8:])

    state, _ = read_journal(path)
    assert state.snapshot_note == f"snapshot {snapshot} not used (cut short); the whole journal was replayed"
    assert observable(state) == observable(read_journal(path, use_snapshot=False)[0])


def test_snapshot_due_after_enough_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3watch.journal, "SNAPSHOT_MIN_RECORDS", 100)
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    fill(journal, 1, 30)
    assert journal.state.records < 100
    assert not journal.snapshot_due()
    fill(journal, 31, 30)
    assert journal.snapshot_due()
    journal.write_snapshot()
    assert not journal.snapshot_due()

    # Past the minimum, the records appended must also reach half the number of uploads.
    fill(journal, 61, 340)
    journal.write_snapshot()
    assert len(journal.state.uploads) == 400  # so the threshold is 200 records, above the minimum of 100
    for attempt in range(1, 201):
        assert not journal.snapshot_due()
        journal.append("failed", "upload/2026/12/05/000006.jpg", code="failed_code_0", error="unreachable", attempts=attempt)
    assert journal.snapshot_due()

    # A failed attempt waits for as many records again, and the earlier snapshot stays.
    journal.append("queued", "upload/a.jpg", image_id=1, seen=datetime(2026, 12, 5, tzinfo=timezone.utc))
    with pytest.raises(JournalError):
        journal.write_snapshot()
    assert not journal.snapshot_due()

    # Compaction deletes the snapshot: every record of the compacted journal is uncovered.
    journal.compact()
    assert not snapshot_path(path).exists()
    assert journal.snapshot_due()
    journal.close()


def test_snapshot_due_from_start_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3watch.journal, "SNAPSHOT_MIN_RECORDS", 100)
    path = snapshotted_journal(tmp_path, 60)
    journal = Journal(path)
    assert journal.state.snapshot_records > 100
    assert not journal.snapshot_due()
    journal.close()

    snapshot_path(path).unlink()
    journal = Journal(path)
    assert journal.snapshot_due()  # the whole journal was replayed
    journal.close()


def test_temporary_file_in_the_way(tmp_path: Path) -> None:
    path = snapshotted_journal(tmp_path, 20)
    temporary = tmp_path / "journal.snapshot.tmp"
    temporary.mkdir()
    (temporary / "file").touch()  # so that it cannot be deleted either

    journal = Journal(path)
    with pytest.raises(JournalError, match=rf"could not be written \(Is a directory: {re.escape(str(temporary))}\)"):
        journal.write_snapshot()
    journal.close()
    assert read_journal(path)[0].snapshot_note is None  # the earlier snapshot is still there, and still used


def test_leftover_temporary_files_deleted(tmp_path: Path) -> None:
    path = snapshotted_journal(tmp_path, 20)
    leftovers = [tmp_path / name for name in ("journal.jsonl.compact", "journal.snapshot.tmp", "journal.jsonl.repair")]
    for leftover in leftovers:
        leftover.write_bytes(b"cut short by a crash")

    Journal(path).close()
    assert [leftover for leftover in leftovers if leftover.exists()] == []
    assert snapshot_path(path).exists()


def test_failed_compaction_waits_for_records(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    for attempt in range(1, 10_001):
        journal.append("failed", "upload/a.jpg", code="failed_code_0", error="unreachable", attempts=attempt)
    snapshot_path(path).mkdir()  # compaction deletes the snapshot first, and cannot
    (snapshot_path(path) / "file").touch()
    assert journal.needs_compaction()

    with pytest.raises(JournalError, match="could not be deleted"):
        journal.compact()
    assert not journal.needs_compaction()
    for attempt in range(10_001, 20_001):
        journal.append("failed", "upload/a.jpg", code="failed_code_0", error="unreachable", attempts=attempt)
    assert journal.needs_compaction()

    shutil.rmtree(snapshot_path(path))
    journal.compact()
    assert journal.state.records == 2  # the header and the one upload
    assert not journal.needs_compaction()
    journal.close()


def test_snapshot_current_until_a_record(tmp_path: Path) -> None:
    path = snapshotted_journal(tmp_path, 20)
    journal = Journal(path)
    assert journal.snapshot_current()

    journal.append("queued", "upload/a.jpg", image_id=1)
    assert not journal.snapshot_current()
    journal.write_snapshot()
    assert journal.snapshot_current()

    snapshot_path(path).unlink()
    assert not journal.snapshot_current()
    journal.close()


def test_later_snapshots_sum_only_new_bytes(tmp_path: Path) -> None:
    path = snapshotted_journal(tmp_path, 20)

    # From the snapshot read at start, then from the one just written, then after a compaction.
    journal = Journal(path)
    for first, compact in ((21, False), (41, False), (61, True)):
        fill(journal, first, 20)
        if compact:
            journal.compact()
        journal.write_snapshot()
        state, _ = read_journal(path)
        assert state.snapshot_note is None
        assert state.snapshot_records == state.records
        assert observable(state) == observable(read_journal(path, use_snapshot=False)[0])
    journal.close()
