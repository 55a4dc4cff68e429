"""The bytes as uploaded when Piwigo resizes after upload, and photos' extra formats."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from s3watch.agent import RESIZE_OPTION_MAX_AGE
from s3watch.demo import PiwigoImitation, sample_photo
from s3watch.seaweed import SeaweedFS

from .conftest import AgentProcess, Setup, wait_for
from .test_batch import execute

CONFIG_TABLE = "CREATE TABLE piwigo_config (param varchar(40) NOT NULL DEFAULT '', value text, comment varchar(255) DEFAULT NULL, PRIMARY KEY (param)) ENGINE=MyISAM"
FORMAT_TABLE = (
    "CREATE TABLE piwigo_image_format (format_id int(11) unsigned NOT NULL AUTO_INCREMENT, image_id mediumint(8) unsigned NOT NULL DEFAULT 0, "
    "ext varchar(255) NOT NULL, filesize mediumint(9) unsigned DEFAULT NULL, PRIMARY KEY (format_id)) ENGINE=MyISAM"
)


@pytest.fixture
def resize_on(database: str) -> None:
    execute(database, CONFIG_TABLE, FORMAT_TABLE, "INSERT INTO piwigo_config (param, value) VALUES ('original_resize', 'true')")


def head(seaweed: SeaweedFS, bucket: str, key: str) -> dict:
    return seaweed.client().head_object(Bucket=bucket, Key=key)  # type: ignore[attr-defined,no-any-return]


def body(seaweed: SeaweedFS, bucket: str, key: str) -> bytes:
    return seaweed.client().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined,no-any-return]


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Rewrite a file in place, same inode, as Piwigo's resize does."""
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate()


def add_resized_photo(piwigo: PiwigoImitation, original: bytes, resized: bytes, delay: float = 0.8) -> tuple[int, str]:
    """Imitate Piwigo with resize on: move the upload in, rewrite it in place, then insert the row with the upload's md5."""
    path = piwigo.place_file(original)
    time.sleep(delay)  # the delay Piwigo's resize took on a real gallery
    rewrite_in_place(piwigo.root / path, resized)
    image_id = piwigo.insert_row(path, hashlib.md5(original).hexdigest(), len(resized))
    return image_id, path


def wait_until_resize_seen(agent: AgentProcess) -> None:
    wait_for(lambda: "original_resize_changed enabled=True" in agent.log(), what="the agent to read original_resize")


def test_resized_photo_keeps_bytes_as_uploaded(resize_on: None, setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    agent.start()
    wait_until_resize_seen(agent)
    original, resized = sample_photo(1, size=400_000), sample_photo(2, size=150_000)
    _, path = add_resized_photo(piwigo, original, resized)

    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
    assert body(seaweed, bucket, path) == original
    metadata = head(seaweed, bucket, path)["Metadata"]
    assert metadata["s3watch-bytes"] == "as-uploaded"
    assert metadata["md5"] == hashlib.md5(original).hexdigest()
    item = setup.status()["uploaded"][0]
    assert item["original"] == "as_uploaded"
    wait_for(lambda: not any((setup.state_dir / "originals").iterdir()), what="the copy to be deleted")


def test_as_stored_uploads_rewritten_bytes(resize_on: None, setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("uploads", originals="as_stored")
    agent.start()
    wait_until_resize_seen(agent)
    original, resized = sample_photo(1, size=400_000), sample_photo(2, size=150_000)
    _, path = add_resized_photo(piwigo, original, resized)

    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
    assert body(seaweed, bucket, path) == resized
    assert head(seaweed, bucket, path)["Metadata"]["s3watch-bytes"] == "as-stored"
    assert setup.status()["uploaded"][0]["original"] == "as_stored"
    assert not (setup.state_dir / "originals").exists() or not any((setup.state_dir / "originals").iterdir())


def test_rewrite_before_copy_is_reported_not_mislabelled(resize_on: None, setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    agent.start()
    wait_until_resize_seen(agent)
    original, resized = sample_photo(1), sample_photo(2)
    # The file the agent sees is already the rewritten one: the upload's bytes were never on disk for it.
    path = piwigo.place_file(resized)
    piwigo.insert_row(path, hashlib.md5(original).hexdigest(), len(resized))

    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
    assert body(seaweed, bucket, path) == resized
    assert head(seaweed, bucket, path)["Metadata"]["s3watch-bytes"] == "as-stored"
    item = setup.status()["uploaded"][0]
    assert item["original"] == "as_stored"
    assert "rewritten before it could be copied" in item["original_note"]


def test_photo_added_while_stopped_has_reason(resize_on: None, setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    wait_until_resize_seen(agent)
    agent.stop()
    original, resized = sample_photo(1), sample_photo(2)
    _, path = add_resized_photo(piwigo, original, resized, delay=0)

    agent.start()
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
    item = setup.status()["uploaded"][0]
    assert item["original"] == "as_stored"
    assert item["original_note"] == ("no copy was taken on arrival: the table poll found the photo after it arrived "
                                     "(s3watch was not running, or missed the file's event)")


def test_copies_respect_the_cap(resize_on: None, setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("uploads", originals_cap_mb=1)
    agent.start()
    wait_until_resize_seen(agent)
    original, resized = sample_photo(1, size=2_000_000), sample_photo(2, size=100_000)
    _, path = add_resized_photo(piwigo, original, resized)

    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
    assert body(seaweed, bucket, path) == resized
    item = setup.status()["uploaded"][0]
    assert item["original"] == "as_stored"
    assert "originals_cap_mb" in item["original_note"]
    assert "original_not_captured" in agent.log()


def test_crash_with_copies_pending_loses_nothing(resize_on: None, setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("monitor", match_timeout=120)
    agent.start()
    wait_until_resize_seen(agent)
    original, resized = sample_photo(1, size=300_000), sample_photo(2, size=100_000)
    path = piwigo.place_file(original)
    wait_for(lambda: (upload := setup.journal().uploads.get(path)) is not None and upload.capture, what="the copy on arrival")
    agent.kill()

    rewrite_in_place(piwigo.root / path, resized)
    piwigo.insert_row(path, hashlib.md5(original).hexdigest(), len(resized))
    stray = setup.state_dir / "originals" / "left-by-a-crash"
    stray.write_bytes(b"x")

    agent.start()
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload after the restart")
    assert body(seaweed, bucket, path) == original
    assert head(seaweed, bucket, path)["Metadata"]["s3watch-bytes"] == "as-uploaded"
    assert not stray.exists()
    wait_for(lambda: not any((setup.state_dir / "originals").iterdir()), what="the copy to be deleted")


def add_format(piwigo: PiwigoImitation, database: str, image_id: int, photo_path: str, ext: str, data: bytes) -> str:
    """Attach an extra format to a photo as Piwigo 13 does: the file in pwg_format/, then its image_format row."""
    photo = piwigo.root / photo_path
    folder = photo.parent / "pwg_format"
    folder.mkdir(exist_ok=True)
    temporary = folder / f".{photo.stem}.{ext}.tmp"
    temporary.write_bytes(data)
    os.rename(temporary, folder / f"{photo.stem}.{ext}")
    execute(database, f"INSERT INTO piwigo_image_format (image_id, ext, filesize) VALUES ({image_id}, '{ext}', {len(data) // 1024})")
    return str((folder / f"{photo.stem}.{ext}").relative_to(piwigo.root))


def test_photo_with_raw_format_gets_two_objects(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str, seaweed: SeaweedFS, bucket: str) -> None:
    execute(database, CONFIG_TABLE, FORMAT_TABLE)
    agent.start()
    data, raw = sample_photo(1), sample_photo(2, size=500_000)
    image_id, path = piwigo.add_photo(data)
    raw_path = add_format(piwigo, database, image_id, path, "cr2", raw)

    wait_for(lambda: setup.upload_status(raw_path) == "uploaded", what="the RAW format")
    assert setup.upload_status(path) == "uploaded"
    assert body(seaweed, bucket, raw_path) == raw
    assert head(seaweed, bucket, raw_path)["Metadata"]["piwigo-image-id"] == str(image_id)
    uploads = setup.journal().uploads
    assert uploads[raw_path].kind == "format"
    assert uploads[raw_path].parent == path
    assert uploads[raw_path].ts > uploads[path].ts
    kinds = {item["path"]: item["kind"] for item in setup.status()["uploaded"]}
    assert kinds == {path: "photo", raw_path: "format"}


def test_format_added_later_is_uploaded(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str, seaweed: SeaweedFS, bucket: str) -> None:
    execute(database, CONFIG_TABLE, FORMAT_TABLE)
    agent.start()
    image_id, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the photo")
    agent.stop()

    # A day later, with the agent restarted in between, a TIFF is attached to the same photo.
    agent.start()
    tiff = sample_photo(3)
    tiff_path = add_format(piwigo, database, image_id, path, "tif", tiff)
    wait_for(lambda: setup.upload_status(tiff_path) == "uploaded", what="the later format")
    assert body(seaweed, bucket, tiff_path) == tiff


def test_formats_off_uploads_none(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str, seaweed: SeaweedFS, bucket: str) -> None:
    execute(database, CONFIG_TABLE, FORMAT_TABLE)
    setup.update("uploads", formats=False)
    agent.start()
    image_id, path = piwigo.add_photo(sample_photo(1))
    raw_path = add_format(piwigo, database, image_id, path, "cr2", sample_photo(2))
    _, later = piwigo.add_photo(sample_photo(3))

    wait_for(lambda: setup.upload_status(later) == "uploaded", what="a photo added after the format")
    assert raw_path not in setup.journal().uploads
    keys = {item["Key"] for item in seaweed.client().list_objects_v2(Bucket=bucket, Prefix="upload/")["Contents"]}  # type: ignore[attr-defined]
    assert raw_path not in keys


def test_backfill_includes_formats(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str) -> None:
    execute(database, CONFIG_TABLE, FORMAT_TABLE)
    setup.update("monitor", enabled=False)
    image_id, path = piwigo.add_photo(sample_photo(1))
    raw_path = add_format(piwigo, database, image_id, path, "dng", sample_photo(2))
    agent.start()
    from .conftest import run_cli

    assert run_cli("--config", str(setup.path), "backfill", "--all").returncode == 0
    wait_for(lambda: setup.upload_status(raw_path) == "uploaded", what="the format from backfill")
    assert setup.upload_status(path) == "uploaded"
    assert setup.journal().uploads[raw_path].source == "batch"


def test_resize_option_followed_without_restart(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str, seaweed: SeaweedFS, bucket: str) -> None:
    execute(database, CONFIG_TABLE, FORMAT_TABLE, "INSERT INTO piwigo_config (param, value) VALUES ('original_resize', 'false')")
    agent.start()
    execute(database, "UPDATE piwigo_config SET value = 'true' WHERE param = 'original_resize'")
    wait_until_resize_seen(agent)
    original, resized = sample_photo(1, size=300_000), sample_photo(2)
    _, path = add_resized_photo(piwigo, original, resized)
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
    assert body(seaweed, bucket, path) == original


def test_resize_switched_on_before_photo(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str, seaweed: SeaweedFS,
                                                bucket: str) -> None:
    # The next table poll is a minute away: the agent reads the option again when the file arrives.
    setup.update("monitor", poll_interval=60)
    execute(database, CONFIG_TABLE, FORMAT_TABLE, "INSERT INTO piwigo_config (param, value) VALUES ('original_resize', 'false')")
    agent.start()
    wait_for(lambda: agent.logged("ready"), what="the agent's first poll")
    # The agent trusts a read of the option for RESIZE_OPTION_MAX_AGE. Its last read came before
    # "ready", so once that much time has passed since, the next arrival reads the option again.
    time.sleep(RESIZE_OPTION_MAX_AGE)
    execute(database, "UPDATE piwigo_config SET value = 'true' WHERE param = 'original_resize'")

    original, resized = sample_photo(1, size=300_000), sample_photo(2)
    _, path = add_resized_photo(piwigo, original, resized)
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
    assert body(seaweed, bucket, path) == original
    assert "original_resize_changed enabled=True" in agent.log()



def test_format_file_after_row(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str, seaweed: SeaweedFS,
                                               bucket: str) -> None:
    # A restore that loads the database first: each image_format row comes before its file. One
    # file arrives while the agent runs, the other while it is stopped.
    execute(database, CONFIG_TABLE, FORMAT_TABLE)
    agent.start()
    image_id, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the photo")
    photo = piwigo.root / path
    formats = {}
    for ext, number in (("cr2", 2), ("tif", 3)):
        execute(database, f"INSERT INTO piwigo_image_format (image_id, ext, filesize) VALUES ({image_id}, '{ext}', 300)")
        formats[str((photo.parent / "pwg_format" / f"{photo.stem}.{ext}").relative_to(piwigo.root))] = sample_photo(number, size=300_000)
    for format_path in formats:
        wait_for(lambda: setup.upload_status(format_path) == "gone", what=f"{format_path} without its file")

    running, stopped = formats
    (photo.parent / "pwg_format").mkdir()
    (piwigo.root / running).write_bytes(formats[running])
    wait_for(lambda: setup.upload_status(running) == "uploaded", what="the format whose file came while the agent ran")

    agent.stop()
    (piwigo.root / stopped).write_bytes(formats[stopped])
    agent.start()
    wait_for(lambda: setup.upload_status(stopped) == "uploaded", what="the format whose file came while the agent was stopped")
    for format_path, data in formats.items():
        assert body(seaweed, bucket, format_path) == data
