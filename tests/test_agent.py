"""The agent end to end, against a real MariaDB images table and a real SeaweedFS bucket."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from s3watch.demo import PiwigoImitation, sample_photo
from s3watch.journal import SNAPSHOT_MIN_RECORDS, Journal
from s3watch.seaweed import SeaweedFS

from .conftest import AgentProcess, Setup, run_cli, wait_for


def object_bytes(seaweed: SeaweedFS, bucket: str, key: str) -> bytes:
    return seaweed.client().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]


def uploaded(setup: Setup, path: str) -> bool:
    return setup.upload_status(path) == "uploaded"


def test_photos_added_like_piwigo_arrive_with_their_bytes(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    agent.start()
    photos = {}
    for number in range(3):
        data = sample_photo(number, size=150_000)
        image_id, path = piwigo.add_photo(data)
        photos[path] = (image_id, data)

    # The resize option: the file is moved in, rewritten in place, and only then gets its row.
    original = sample_photo(99, size=300_000)
    path = piwigo.place_file(original)
    time.sleep(0.3)
    resized = sample_photo(100, size=120_000)
    with open(piwigo.root / path, "r+b") as handle:
        handle.write(resized)
        handle.truncate()
    image_id = piwigo.insert_row(path, hashlib.md5(original).hexdigest(), len(resized))
    photos[path] = (image_id, resized)

    for path in photos:
        wait_for(lambda: uploaded(setup, path), what=f"{path} uploaded")
    for path, (image_id, data) in photos.items():
        assert object_bytes(seaweed, bucket, path) == data
        head = seaweed.client().head_object(Bucket=bucket, Key=path)  # type: ignore[attr-defined]
        assert head["Metadata"]["piwigo-image-id"] == str(image_id)
        assert head["Metadata"]["md5"] == hashlib.md5(data).hexdigest()
    assert "uploaded path=" in agent.log()


def test_file_without_row_is_reported_unmatched(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    setup.update("monitor", match_timeout=2)
    agent.start()
    path = piwigo.place_file(sample_photo(1))

    wait_for(lambda: setup.upload_status(path) == "unmatched", what="the file to be unmatched")
    problems = setup.status()["problems"]
    assert [item["path"] for item in problems] == [path]
    assert problems[0]["status"] == "unmatched"
    assert "unmatched" in agent.log()


def test_files_that_are_not_originals_are_ignored(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, gallery_root: Path) -> None:
    agent.start()
    day = gallery_root / "upload" / "2026" / "01" / "02"
    (day / "pwg_representative").mkdir(parents=True)
    (day / "index.htm").write_text("Not allowed!")
    (day / ".hidden.jpg").write_bytes(b"x")
    (day / "pwg_representative" / "a.jpg").write_bytes(b"x")
    (gallery_root / "upload" / "buffer").mkdir(exist_ok=True)
    (gallery_root / "upload" / "buffer" / "0b5f049e74fdffceeaf48f4072d90d95").write_bytes(b"x")
    (day / "photo.jpg.part").write_bytes(b"x")
    # A real photo after the others: once it is uploaded, the others have been seen too.
    _, path = piwigo.add_photo(sample_photo(1))

    wait_for(lambda: uploaded(setup, path), what="the photo")
    assert list(setup.journal().uploads) == [path]


def test_photos_outside_upload_dir_are_reported_once(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, gallery_root: Path) -> None:
    agent.start()
    wait_for(lambda: "ready" in agent.log(), what="the agent to be ready")
    # Piwigo's FTP synchronisation puts photos under galleries/, which s3watch does not watch.
    synced = []
    for number in (1, 2):
        data = sample_photo(number)
        path = f"galleries/holidays/photo-{number}.jpg"
        (gallery_root / path).parent.mkdir(parents=True, exist_ok=True)
        (gallery_root / path).write_bytes(data)
        piwigo.insert_row(path, hashlib.md5(data).hexdigest(), len(data))
        synced.append(path)
    _, path = piwigo.add_photo(sample_photo(3))

    wait_for(lambda: uploaded(setup, path), what="the photo in the upload directory")
    wait_for(lambda: "photo_outside_upload_dir" in agent.log(), what="the warning")
    assert agent.log().count("photo_outside_upload_dir") == 1
    assert "set piwigo.upload_dir to it; to send the photos in galleries/" in agent.log()
    assert all(setup.journal().uploads.get(path) is None for path in synced)


def test_object_already_at_key_is_left_untouched(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    data = sample_photo(1)
    day_path = piwigo.place_file(data)
    seaweed.client().put_object(Bucket=bucket, Key=day_path, Body=b"someone else's object")  # type: ignore[attr-defined]
    agent.start()
    piwigo.insert_row(day_path, hashlib.md5(data).hexdigest(), len(data))

    wait_for(lambda: setup.upload_status(day_path) == "already_present", what="already_present")
    assert object_bytes(seaweed, bucket, day_path) == b"someone else's object"

    # The photo has no copy, and every command reports that.
    report = setup.status()
    assert report["uploaded"] == []
    assert [(item["status"], item["key"]) for item in report["problems"]] == [("already_present", day_path)]
    assert "this photo has no copy in the bucket" in report["problems"][0]["error"]
    url = run_cli("--config", str(setup.path), "url", day_path)
    assert url.returncode == 1
    assert url.stdout == ""
    assert "not uploaded" in url.stderr
    assert "no copy" in url.stderr
    verify = run_cli("--config", str(setup.path), "verify")
    assert verify.returncode == 1
    assert f"occupied  {day_path}" in verify.stdout
    assert f"(that object: size 21, the file's when tried {len(data)}; md5 " in verify.stdout
    assert "1 photo found another object at its key when uploaded, 0 of them can be sent now" in verify.stdout
    assert "--requeue" not in verify.stdout.splitlines()[-1]  # a new upload cannot fix it while the object is there

    # Once the admin removes the other object, verify --requeue sends the photo.
    seaweed.client().delete_object(Bucket=bucket, Key=day_path)  # type: ignore[attr-defined]
    requeued = run_cli("--config", str(setup.path), "verify", "--requeue")
    assert requeued.returncode == 1
    assert f"missing   {day_path}" in requeued.stdout
    assert "queued 1 photo again" in requeued.stdout
    wait_for(lambda: setup.upload_status(day_path) == "uploaded", what="the photo uploaded after the other object was removed")
    assert object_bytes(seaweed, bucket, day_path) == data
    assert run_cli("--config", str(setup.path), "verify").returncode == 0


def test_original_at_key_after_journal_loss(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS,
                                               bucket: str, gallery_root: Path, database: str) -> None:
    # Two photos uploaded, then the journal is lost. Piwigo's resize rewrote one file after the copy
    # on arrival was sent (its row keeps the md5 of the bytes as uploaded). The other photo was replaced.
    from .test_batch import execute

    agent.start()
    _, resized = piwigo.add_photo(sample_photo(1))
    replaced_id, replaced = piwigo.add_photo(sample_photo(2))
    for path in (resized, replaced):
        wait_for(lambda: uploaded(setup, path), what=f"{path}")
    agent.stop()
    first = {path: object_bytes(seaweed, bucket, path) for path in (resized, replaced)}

    (gallery_root / resized).write_bytes(sample_photo(11, size=50_000))
    new_bytes = sample_photo(12)
    (gallery_root / replaced).write_bytes(new_bytes)
    execute(database, f"UPDATE piwigo_images SET md5sum = '{hashlib.md5(new_bytes).hexdigest()}' WHERE id = {replaced_id}")
    shutil.rmtree(setup.state_dir)

    agent.start()
    assert run_cli("--config", str(setup.path), "backfill", "--all").returncode == 0
    wait_for(lambda: uploaded(setup, resized), what="the resized photo recorded as uploaded")
    wait_for(lambda: setup.upload_status(replaced) == "already_present", what="the replaced photo's object left alone")

    # The objects stay as they were. The resized photo's object contains the bytes as uploaded,
    # as its images row records, and the journal records the object as it is.
    journal = setup.journal()
    for path in (resized, replaced):
        assert object_bytes(seaweed, bucket, path) == first[path]
    assert journal.uploads[resized].md5 == hashlib.md5(first[resized]).hexdigest()
    assert journal.uploads[resized].bytes == len(first[resized])
    assert journal.uploads[resized].original == "as_uploaded"
    assert agent.log().count("found_at_key=True") == 1

    # Nothing distinguishes the replaced photo's first file from another photo's object: a person decides.
    assert journal.uploads[replaced].status == "already_present"
    assert "it may be an earlier file of this photo" in setup.status()["problems"][0]["error"]


def test_same_content_at_key_is_uploaded(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS,
                                                            bucket: str) -> None:
    # Another tool copied the photo before s3watch, without s3watch's metadata: its ETag is the md5.
    data = sample_photo(1)
    day_path = piwigo.place_file(data)
    seaweed.client().put_object(Bucket=bucket, Key=day_path, Body=data)  # type: ignore[attr-defined]
    agent.start()
    piwigo.insert_row(day_path, hashlib.md5(data).hexdigest(), len(data))

    wait_for(lambda: setup.upload_status(day_path) == "uploaded", what="uploaded")
    assert run_cli("--config", str(setup.path), "verify").returncode == 0
    assert "found_at_key=True" in agent.log()


@pytest.mark.parametrize("prevent", [True, False])
def test_duplicate_content_skipped_only_when_enabled(prevent: bool, setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("uploads", prevent_duplicates=prevent)
    agent.start()
    data = sample_photo(1)
    _, first = piwigo.add_photo(data)
    wait_for(lambda: uploaded(setup, first), what="the first copy")
    _, second = piwigo.add_photo(data)

    if prevent:
        wait_for(lambda: setup.upload_status(second) == "duplicate", what="duplicate")
        assert setup.journal().uploads[second].duplicate_of == first
        listing = seaweed.client().list_objects_v2(Bucket=bucket, Prefix="upload/")  # type: ignore[attr-defined]
        assert [item["Key"] for item in listing["Contents"]] == [first]
        link = run_cli("--config", str(setup.path), "url", second)
        assert link.returncode == 0, link.stderr
        assert link.stdout.strip().endswith(f"/{bucket}/{first}")
        assert f"same content as {first}" in link.stderr
    else:
        wait_for(lambda: uploaded(setup, second), what="the second copy")
        assert object_bytes(seaweed, bucket, second) == data


def test_killed_agent_finishes_batch_after_restart(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("uploads", workers=2)
    agent.start()
    photos = {}
    for number in range(40):
        data = sample_photo(number, size=400_000)
        _, path = piwigo.add_photo(data)
        photos[path] = data

    wait_for(lambda: sum(1 for u in setup.journal().uploads.values() if u.status == "uploaded") >= 5, what="some uploads")
    agent.kill()
    before = {path for path, upload in setup.journal().uploads.items() if upload.status == "uploaded"}
    etags = {path: seaweed.client().head_object(Bucket=bucket, Key=path)["ETag"] for path in before}  # type: ignore[attr-defined]

    agent.start()
    for path in photos:
        wait_for(lambda: uploaded(setup, path), what=f"{path} after the restart")
    for path, data in photos.items():
        assert object_bytes(seaweed, bucket, path) == data
    for path, etag in etags.items():
        assert seaweed.client().head_object(Bucket=bucket, Key=path)["ETag"] == etag  # type: ignore[attr-defined]
    # A finished upload is never sent again: each photo has exactly one "uploaded" record.
    records = [r for r in setup.records() if r["event"] == "uploaded"]
    assert sorted(r["path"] for r in records) == sorted(photos)


def test_bad_credentials_fail_403_then_upload_after_reload(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("s3", secret_access_key="wrong-secret")
    agent.start()
    paths = [piwigo.add_photo(sample_photo(n))[1] for n in range(3)]

    def all_failed_403() -> bool:
        pending = {item["path"]: item["status"] for item in setup.status()["pending"]}
        return all(pending.get(path) == "failed_code_403" for path in paths)

    wait_for(all_failed_403, what="failed_code_403 on every photo")

    setup.update("s3", secret_access_key=seaweed.secret_key)
    agent.signal(signal.SIGHUP)
    for path in paths:
        wait_for(lambda: uploaded(setup, path), what=f"{path} after the key was fixed")
    assert setup.status()["pending"] == []
    assert "wrong-secret" not in agent.log()


def test_wrong_bucket_fails_404(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, tmp_path: Path) -> None:
    # This store creates a missing bucket on the first write, as SeaweedFS does by default.
    store = SeaweedFS(tmp_path / "store", access_key="test-access", secret_key="test-secret-Kp3mN9", auto_create_buckets=True)
    store.start()
    try:
        setup.update("s3", bucket="no-such-bucket-s3watch", endpoint_url=store.endpoint_url)
        agent.start()
        _, path = piwigo.add_photo(sample_photo(1))

        wait_for(lambda: any(item["path"] == path and item["status"] == "failed_code_404" for item in setup.status()["pending"]), what="failed_code_404")
        assert store.client().list_buckets()["Buckets"] == []  # type: ignore[attr-defined]
        assert "store_unavailable" in agent.log()
    finally:
        agent.stop()
        store.stop()


def test_unreachable_endpoint_fails_0_and_recovers(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, tmp_path: Path) -> None:
    store = SeaweedFS(tmp_path / "store", access_key="test-access", secret_key="test-secret-Kp3mN9")
    store.start()
    store.create_bucket("recovering")
    store.stop()
    setup.update("s3", bucket="recovering", endpoint_url=store.endpoint_url, connect_timeout=1)
    agent.start()
    _, path = piwigo.add_photo(sample_photo(1))

    wait_for(lambda: any(item["path"] == path and item["status"] == "failed_code_0" for item in setup.status()["pending"]), what="failed_code_0")
    store.start()
    try:
        wait_for(lambda: uploaded(setup, path), timeout=90, what="the upload once the store is back")
    finally:
        store.stop()


def test_torn_last_journal_line_is_survived(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    _, first = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: uploaded(setup, first), what="the first photo")
    agent.stop()

    journal = setup.state_dir / "journal.jsonl"
    with open(journal, "ab") as handle:
        handle.write(b'{"ts":"2026-12-04T10:00:00.000Z","event":"queued","path":"upl')
    assert setup.status()["counts"]["uploaded"] == 1

    agent.start()
    _, second = piwigo.add_photo(sample_photo(2))
    wait_for(lambda: uploaded(setup, second), what="a photo after the restart")
    assert all(line.endswith(b"}") for line in journal.read_bytes().splitlines())
    assert "journal_torn_line_dropped bytes=61 " in agent.log()


def test_corrupt_middle_line_stops_start_with_line_number(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    _, first = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: uploaded(setup, first), what="the photo")
    agent.stop()
    journal = setup.state_dir / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines.insert(2, b"this is not json\n")
    journal.write_bytes(b"".join(lines))

    from .conftest import run_cli

    result = run_cli("--config", str(setup.path), "run")
    assert result.returncode == 2  # the status the unit does not restart on: a restart cannot fix it
    assert "line 3 is corrupt" in result.stderr
    assert "s3watch journal repair" in result.stderr

    repaired = run_cli("--config", str(setup.path), "journal", "repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "dropped 1 corrupt line; the original is kept as " in repaired.stdout
    assert setup.upload_status(first) == "uploaded"


def test_monitoring_disabled_queues_nothing(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    setup.update("monitor", enabled=False)
    agent.start()
    image_id, path = piwigo.add_photo(sample_photo(1))

    # The poll moves the cursor past the new row without queueing it.
    wait_for(lambda: setup.journal().cursor == image_id, what="the poll to pass the row")
    assert setup.journal().uploads == {}

    setup.update("monitor", enabled=True)
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in agent.log(), what="the reload")
    _, later = piwigo.add_photo(sample_photo(2))
    wait_for(lambda: uploaded(setup, later), what="a photo added after monitoring was switched on")
    assert path not in setup.journal().uploads


def test_restart_catches_up_on_photos_added_while_down(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    _, first = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: uploaded(setup, first), what="the first photo")
    assert agent.stop() == 0
    assert agent.logged("journal_snapshot_written")

    missed = [piwigo.add_photo(sample_photo(n))[1] for n in range(2, 5)]
    agent.start()
    first, second = re.findall(r"journal_read records=(\d+) from_snapshot=(\d+)", agent.log())
    assert first[1] == "0"
    assert second[1] == second[0] != "0"  # the second start read every record from the snapshot
    for path in missed:
        wait_for(lambda: uploaded(setup, path), what=f"{path} found by the table poll")
    assert {setup.journal().uploads[path].source for path in missed} == {"poll"}


def write_earlier_uploads(setup: Setup) -> None:
    """Write a journal of earlier uploads, long enough for the running agent to save a snapshot of it at its first check."""
    journal = Journal(setup.state_dir / "journal.jsonl")
    for number in range(SNAPSHOT_MIN_RECORDS // 2):
        photo = f"upload/2025/01/01/{number:06d}.jpg"
        journal.append("queued", photo, image_id=100_000 + number)
        journal.append("already_present", photo, key=photo, attempts=1)
    journal.close()


def test_killed_agent_starts_from_running_snapshot(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    write_earlier_uploads(setup)
    agent.start()
    wait_for(lambda: agent.logged("journal_snapshot_written"), what="the snapshot written while running")
    _, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: uploaded(setup, path), what="a photo added after the snapshot")
    agent.kill()

    agent.start()
    (first, _), (records, from_snapshot) = re.findall(r"journal_read records=(\d+) from_snapshot=(\d+)", agent.log())
    assert int(first) <= int(from_snapshot) < int(records)  # the records of the new photo were replayed after it
    assert setup.upload_status(path) == "uploaded"


def test_unwritable_snapshot_keeps_agent_running(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    write_earlier_uploads(setup)
    # A directory with a file in it where the snapshot's temporary file goes: it can be neither written nor deleted.
    in_the_way = setup.state_dir / "journal.snapshot.tmp"
    in_the_way.mkdir()
    (in_the_way / "file").touch()

    agent.start()
    wait_for(lambda: agent.logged("journal_snapshot_failed"), what="the failed snapshot")
    _, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: uploaded(setup, path), what="a photo added after the failure")
    assert agent.stop() == 0
    assert f"Is a directory: {in_the_way}" in agent.log()
    assert agent.logged("stopped")


def test_names_with_spaces_and_accents_keep_their_key(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("s3", prefix="originals/")
    agent.start()
    names = ["holiday photo 4.jpg", "été à Noël.jpg", "Tom & Jerry's.jpg"]
    paths = [piwigo.add_photo(sample_photo(n), name=name)[1] for n, name in enumerate(names)]

    for path in paths:
        wait_for(lambda: uploaded(setup, path), what=f"{path}")
    listing = seaweed.client().list_objects_v2(Bucket=bucket, Prefix="originals/upload/")  # type: ignore[attr-defined]
    keys = {item["Key"] for item in listing["Contents"]}
    assert keys == {f"originals/{path}" for path in paths}
    assert {setup.journal().uploads[path].key for path in paths} == keys


def test_second_agent_on_same_state_dir_exits(setup: Setup, agent: AgentProcess) -> None:
    from .conftest import run_cli

    agent.start()
    result = run_cli("--config", str(setup.path), "run")
    assert result.returncode == 1
    assert "already running on state directory" in result.stderr


def test_upload_dir_created_after_start_is_watched(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, gallery_root: Path) -> None:
    os.rmdir(gallery_root / "upload")
    agent.start()
    _, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: uploaded(setup, path), what="a photo in an upload directory created after the start")


def test_large_file_goes_up_in_parts(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("uploads", multipart_threshold_mb=5, part_size_mb=5)
    agent.start()
    data = sample_photo(1, size=12 * 1024 * 1024)
    _, path = piwigo.add_photo(data)

    wait_for(lambda: uploaded(setup, path), what="the large photo")
    head = seaweed.client().head_object(Bucket=bucket, Key=path)  # type: ignore[attr-defined]
    assert head["ETag"].strip('"').endswith("-3")
    assert head["Metadata"]["md5"] == hashlib.md5(data).hexdigest()
    assert object_bytes(seaweed, bucket, path) == data


def test_sigterm_leaves_journal_consistent(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    paths = [piwigo.add_photo(sample_photo(n, size=300_000))[1] for n in range(10)]
    wait_for(lambda: any(uploaded(setup, path) for path in paths), what="a first upload")
    assert agent.stop() == 0
    assert "stopped" in agent.log()

    agent.start()
    for path in paths:
        wait_for(lambda: uploaded(setup, path), what=f"{path}")


def test_unmatched_file_is_queued_when_row_comes_late(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    setup.update("monitor", match_timeout=1)
    agent.start()
    data = sample_photo(1)
    path = piwigo.place_file(data)
    wait_for(lambda: setup.upload_status(path) == "unmatched", what="unmatched")

    piwigo.insert_row(path, hashlib.md5(data).hexdigest(), len(data))
    wait_for(lambda: uploaded(setup, path), what="the upload once the row came")


def test_file_after_row_is_uploaded(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, gallery_root: Path) -> None:
    # A restore that loads the database before copying the files: the poll finds the rows, and
    # the uploads find no file yet. A file's arrival queues its photo again, and so does the
    # next start for a file that arrived while the agent was stopped.
    agent.start()
    photos = {f"upload/2026/12/06/2026120602463{number}-b506806f.jpg": sample_photo(number) for number in range(2)}
    for path, data in photos.items():
        piwigo.insert_row(path, hashlib.md5(data).hexdigest(), len(data))
    for path in photos:
        wait_for(lambda: setup.upload_status(path) == "gone", what="the upload that found no file")
    assert "not written yet" in setup.status()["problems"][0]["error"]

    running, stopped = photos
    (gallery_root / running).parent.mkdir(parents=True, exist_ok=True)
    (gallery_root / running).write_bytes(photos[running])
    wait_for(lambda: uploaded(setup, running), what="the upload once the file came")

    agent.stop()
    (gallery_root / stopped).write_bytes(photos[stopped])
    agent.start()
    wait_for(lambda: uploaded(setup, stopped), what="the upload of the file that came while the agent was stopped")
    assert setup.status()["problems"] == []


def test_replaced_file_keeps_first_copy(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str,
                                        gallery_root: Path) -> None:
    agent.start()
    data = sample_photo(1)
    _, path = piwigo.add_photo(data)
    wait_for(lambda: uploaded(setup, path), what="the upload")

    # Piwigo keeps the path of a replaced photo's file.
    (gallery_root / path).write_bytes(sample_photo(2))
    wait_for(lambda: agent.logged("changed_after_upload"), what="the log line on the new file")
    assert object_bytes(seaweed, bucket, path) == data
    assert agent.log().count("changed_after_upload") == 1
    assert uploaded(setup, path)


def test_reload_switches_duplicate_detection(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    data = sample_photo(1)
    _, first = piwigo.add_photo(data)
    wait_for(lambda: uploaded(setup, first), what="the first copy")

    setup.update("uploads", prevent_duplicates=True)
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in agent.log(), what="the reload")
    _, second = piwigo.add_photo(data)
    wait_for(lambda: setup.upload_status(second) == "duplicate", what="the duplicate")


def test_links_keep_the_bucket_of_each_upload(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    agent.start()
    _, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: uploaded(setup, path), what="the upload")
    agent.stop()

    other = f"{bucket}-new"
    seaweed.create_bucket(other)
    setup.update("s3", bucket=other)
    item = setup.status()["uploaded"][0]
    assert item["bucket"] == bucket
    assert f"/{bucket}/{path}" in item["url"]


def test_reload_with_unreadable_database_inc_is_rejected(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, gallery_root: Path) -> None:
    agent.start()
    (gallery_root / "local" / "config").mkdir(parents=True)
    (gallery_root / "local" / "config" / "database.inc.php").write_text("<?php // no settings\n")
    database = setup.values["piwigo"].pop("database")
    setup.write()
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "reload_rejected" in agent.log(), what="the rejected reload")
    assert "database.inc.php could not be parsed" in agent.log()

    setup.values["piwigo"]["database"] = database
    setup.write()
    _, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: uploaded(setup, path), what="an upload with the previous configuration")


def test_file_during_gone_upload(setup: Setup, gallery_root: Path) -> None:
    # The race of a restore, forced in order in one process: the worker finds no file and is about
    # to report the photo gone when the file's event reaches the loop. The result queues it again.
    from s3watch.agent import Agent
    from s3watch.config import load_config
    from s3watch.uploader import Outcome

    agent = Agent(load_config(setup.path))
    agent._open_journal()
    assert agent.journal is not None
    agent.original_resize_read_at = time.monotonic() + 3600  # no database read at the file's arrival
    path = "upload/2026/12/06/20261206024630-b506806f.jpg"
    agent.journal.append("queued", path, image_id=1, row_md5="0" * 32, source="poll")
    agent.in_flight.add(path)

    absolute = gallery_root / path
    absolute.parent.mkdir(parents=True, exist_ok=True)
    absolute.write_bytes(b"the file, restored a moment later")
    agent._on_file(str(absolute))
    agent._on_result(Outcome(path=path, event="gone", error=f"{path} is missing: deleted or renamed, or not written yet"))

    assert agent.journal.state.uploads[path].status == "detected"
    assert path in agent.matcher
    agent.journal.close()
