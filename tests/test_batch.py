"""Batch mode: lists in the spool directory, enqueue, backfill, url and the Batch Manager tag."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pymysql
import pytest

from s3watch.config import load_config
from s3watch.demo import PiwigoImitation, sample_photo
from s3watch.seaweed import SeaweedFS
from s3watch.uploader import Uploader
from s3watch.verify import listed_objects

from .conftest import MARIADB, AgentProcess, Setup, run_cli, wait_for

# The albums and tags tables of Piwigo, with the columns s3watch reads.
PIWIGO_ALBUM_AND_TAG_TABLES = [
    "CREATE TABLE piwigo_categories (id smallint(5) unsigned NOT NULL AUTO_INCREMENT, name varchar(255) NOT NULL DEFAULT '', "
    "id_uppercat smallint(5) unsigned DEFAULT NULL, uppercats varchar(255) NOT NULL DEFAULT '', PRIMARY KEY (id)) ENGINE=MyISAM",
    "CREATE TABLE piwigo_image_category (image_id mediumint(8) unsigned NOT NULL DEFAULT 0, category_id smallint(5) unsigned NOT NULL DEFAULT 0, "
    "PRIMARY KEY (image_id, category_id)) ENGINE=MyISAM",
    "CREATE TABLE piwigo_tags (id smallint(5) unsigned NOT NULL AUTO_INCREMENT, name varchar(255) NOT NULL DEFAULT '', "
    "url_name varchar(255) NOT NULL DEFAULT '', PRIMARY KEY (id)) ENGINE=MyISAM",
    "CREATE TABLE piwigo_image_tag (image_id mediumint(8) unsigned NOT NULL DEFAULT 0, tag_id smallint(5) unsigned NOT NULL DEFAULT 0, "
    "PRIMARY KEY (image_id, tag_id)) ENGINE=MyISAM",
]


def execute(database: str, *statements: str) -> None:
    connection = pymysql.connect(**MARIADB, database=database, autocommit=True)
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    connection.close()


def drop_list(spool: Path, name: str, text: str | bytes) -> Path:
    """Drop a list the way writers must: under a temporary name, then renamed into place."""
    spool.mkdir(parents=True, exist_ok=True)
    temporary = spool / f".{name}.tmp"
    temporary.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    os.rename(temporary, spool / name)
    return spool / name


def report_of(setup: Setup, name: str) -> str:
    path = setup.spool_dir / "done" / f"{name}.report"
    wait_for(path.exists, what=f"the report of {name}")
    return path.read_text()


def photo(piwigo: PiwigoImitation, number: int, **kwargs: str) -> tuple[int, str]:
    return piwigo.add_photo(sample_photo(number), **kwargs)


def test_list_with_every_kind_of_entry(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, gallery_root: Path, tmp_path: Path, seaweed: SeaweedFS, bucket: str) -> None:
    setup.update("monitor", enabled=False)
    relative_id, relative = photo(piwigo, 1)
    dotted_id, dotted = photo(piwigo, 2)
    absolute_id, absolute = photo(piwigo, 3)
    by_id, by_id_path = photo(piwigo, 4)
    untouched_id, untouched = photo(piwigo, 5)
    no_row = piwigo.place_file(sample_photo(6))
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("not a photo")
    link = gallery_root / "upload" / "link.jpg"
    link.symlink_to(secret)
    execute(setup.values["piwigo"]["database"]["url"].rsplit("/", 1)[1],
            "INSERT INTO piwigo_images (file, path, md5sum) VALUES ('link.jpg', './upload/link.jpg', 'x')")
    agent.start()

    lines = [
        "\ufeff# photos for the backup",
        relative,
        "",
        f"./{dotted}",
        str(gallery_root / absolute),
        f"id:{by_id}",
        "../../etc/passwd",
        "/etc/passwd",
        "upload/link.jpg",
        "upload/2099/01/01/missing.jpg",
        no_row,
        "upload",
        "id:abc",
        "id:999999",
        relative,
        "42",
        "upload/\x1b[31mred.jpg",
    ]
    drop_list(setup.spool_dir, "mixed.list", "\r\n".join(lines) + "\r\n")
    report = report_of(setup, "mixed.list")

    for path in (relative, dotted, absolute, by_id_path):
        wait_for(lambda: setup.upload_status(path) == "uploaded", what=f"{path} uploaded")
    assert untouched not in setup.journal().uploads
    assert {setup.journal().uploads[path].source for path in (relative, dotted, absolute, by_id_path)} == {"batch"}

    report_lines = [line for line in report.splitlines() if not line.startswith("#")]
    assert len(report_lines) == 15
    assert f"line 2: {relative}\tqueued (image {relative_id}, {relative})" in report
    assert f"line 4: ./{dotted}\tqueued (image {dotted_id}" in report
    assert f"line 5: {gallery_root / absolute}\tqueued (image {absolute_id}" in report
    assert f"line 6: id:{by_id}\tqueued (image {by_id}, {by_id_path})" in report
    assert "line 7: ../../etc/passwd\trejected: outside the gallery" in report
    assert "line 8: /etc/passwd\trejected: outside the gallery" in report
    assert "line 9: upload/link.jpg\trejected: outside the gallery (resolves to" in report
    assert "line 10: upload/2099/01/01/missing.jpg\trejected: no such file" in report
    assert f"line 11: {no_row}\trejected: no images row for this path" in report
    assert "line 12: upload\trejected: not a regular file" in report
    assert "line 13: id:abc\trejected: invalid image id" in report
    assert "line 14: id:999999\trejected: no images row with id 999999" in report
    assert f"line 15: {relative}\talready queued" in report
    assert "line 16: 42\trejected: no such file: for the photo with image id 42, write id:42" in report
    assert "line 17: upload/\\x1b[31mred.jpg\trejected: no such file" in report
    assert (setup.spool_dir / "done" / "mixed.list").exists()
    assert not (setup.spool_dir / "mixed.list").exists()

    keys = {item["Key"] for item in seaweed.client().list_objects_v2(Bucket=bucket, Prefix="upload/")["Contents"]}  # type: ignore[attr-defined]
    assert keys == {relative, dotted, absolute, by_id_path}
    assert untouched_id not in {item["image_id"] for item in setup.status()["uploaded"]}


def test_list_dropped_while_stopped_is_taken_on_start(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    _, path = photo(piwigo, 1)
    drop_list(setup.spool_dir, "early.list", f"{path}\n")
    agent.start()
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the listed photo")
    assert "queued" in report_of(setup, "early.list")


def test_half_written_list_waits_for_rename(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    _, first = photo(piwigo, 1)
    _, second = photo(piwigo, 2)
    wait_for(lambda: setup.upload_status(second) == "uploaded", what="the photos from monitoring")
    setup.spool_dir.mkdir(exist_ok=True)
    (setup.spool_dir / "pending.list.tmp").write_text(f"{first}\n")
    (setup.spool_dir / ".hidden.list").write_text(f"{first}\n")
    # A list dropped after them: once it is processed, the two were passed over at least once.
    drop_list(setup.spool_dir, "marker.list", f"{second}\n")
    report_of(setup, "marker.list")
    assert (setup.spool_dir / "pending.list.tmp").exists()
    assert (setup.spool_dir / ".hidden.list").exists()

    os.rename(setup.spool_dir / "pending.list.tmp", setup.spool_dir / "pending.list")
    assert f"{first}\talready uploaded" in report_of(setup, "pending.list")


def test_binary_and_non_utf8_files_go_to_failed(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    drop_list(setup.spool_dir, "photo.jpg", sample_photo(1))
    drop_list(setup.spool_dir, "latin1.list", "upload/caf\xe9.jpg\n".encode("latin-1"))
    failed = setup.spool_dir / "failed"
    wait_for(lambda: (failed / "photo.jpg.reason").exists() and (failed / "latin1.list.reason").exists(), what="both files in failed/")
    assert "binary file" in (failed / "photo.jpg.reason").read_text()
    assert "not UTF-8 text" in (failed / "latin1.list.reason").read_text()
    assert (failed / "photo.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert "list_rejected" in agent.log()


def test_enqueue_writes_list_and_rejects_bad_input(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    setup.update("monitor", enabled=False)
    image_id, path = photo(piwigo, 1)
    _, other = photo(piwigo, 2)

    bad = run_cli("--config", str(setup.path), "enqueue", path, "id:x1")
    assert bad.returncode == 2
    assert "argument 2: invalid image id 'id:x1'" in bad.stderr
    # Entries the agent would certainly reject are refused here, with the reason.
    day_folder = path.rsplit("/", 1)[0]
    for entry, reason in ((str(image_id), f"for the photo with image id {image_id}, write id:{image_id}"),
                          (path.removeprefix("upload/"), "no such file in the gallery"),
                          ("/etc/passwd", "outside the gallery"),
                          (day_folder, "not a regular file")):
        refused = run_cli("--config", str(setup.path), "enqueue", entry)
        assert refused.returncode == 2, entry
        assert reason in refused.stderr, refused.stderr
    binary = run_cli("--config", str(setup.path), "enqueue", "--from", "-", stdin=f"{other}\nupload/a\x00b.jpg\n")
    assert binary.returncode == 2
    assert "standard input line 2: a NUL byte, so this is not a list" in binary.stderr
    assert "Traceback" not in binary.stderr
    assert not setup.spool_dir.exists() or not [p for p in setup.spool_dir.iterdir() if p.is_file()]

    result = run_cli("--config", str(setup.path), "enqueue", f"id:{image_id}")
    assert result.returncode == 0, result.stderr
    assert f"wrote 1 entry to {setup.spool_dir}" in result.stdout
    piped = run_cli("--config", str(setup.path), "enqueue", "--from", "-", stdin=f"# one more\n{other}\n")
    assert piped.returncode == 0, piped.stderr

    agent.start()
    for wanted in (path, other):
        wait_for(lambda: setup.upload_status(wanted) == "uploaded", what=f"{wanted}")
    statuses = {item["path"]: item for item in setup.status()["uploaded"]}
    assert statuses[path]["status"] == "uploaded"


def test_url_command_explains_each_state(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str) -> None:
    agent.start()
    image_id, path = photo(piwigo, 1)
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")

    by_id = run_cli("--config", str(setup.path), "url", f"id:{image_id}")
    assert by_id.returncode == 0, by_id.stdout + by_id.stderr
    assert by_id.stdout.strip().endswith(f"/{setup.values['s3']['bucket']}/{path}")
    by_path = run_cli("--config", str(setup.path), "url", f"./{path}")
    assert by_path.stdout == by_id.stdout

    unknown = run_cli("--config", str(setup.path), "url", "upload/2020/01/01/none.jpg")
    assert unknown.returncode == 1
    assert "no record of upload/2020/01/01/none.jpg, and there is no such file in the gallery" in unknown.stderr
    assert unknown.stdout == ""  # only a link goes to standard output
    bare = run_cli("--config", str(setup.path), "url", str(image_id))
    assert bare.returncode == 1
    assert f"write id:{image_id}" in bare.stderr

    # A photo deleted in Piwigo keeps its copy, and its id still finds it.
    execute(database, f"DELETE FROM piwigo_images WHERE id = {image_id}")
    deleted = run_cli("--config", str(setup.path), "url", f"id:{image_id}")
    assert deleted.returncode == 0
    assert deleted.stdout == by_id.stdout
    assert "has no images row any more" in deleted.stderr
    never = run_cli("--config", str(setup.path), "url", "id:999999")
    assert never.returncode == 1
    assert "no images row with id 999999, and s3watch has no record of that image" in never.stderr

    # Presigned links need credentials: without them, one line saying so.
    presigned = dict(setup.values["links"]) if "links" in setup.values else {}
    setup.update("links", mode="presigned")
    keys = {name: setup.values["s3"].pop(name) for name in ("access_key_id", "secret_access_key")}
    setup.write()
    no_keys = run_cli("--config", str(setup.path), "url", f"./{path}",
                      env={"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"})
    assert no_keys.returncode == 1
    assert "Traceback" not in no_keys.stderr
    assert f"no download link for {path}: no S3 credentials found" in no_keys.stderr
    status = run_cli("--config", str(setup.path), "status",
                     env={"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"})
    assert status.returncode == 0
    assert "  no download links: no S3 credentials found" in status.stdout
    setup.values["links"] = presigned
    setup.update("s3", **keys)

    agent.stop()
    unrecorded_id, unrecorded = photo(piwigo, 3)  # a row the stopped agent has not seen
    by_row = run_cli("--config", str(setup.path), "url", f"id:{unrecorded_id}")
    assert by_row.returncode == 1
    assert f"no record of {unrecorded}, the file of images row {unrecorded_id}: queue it with: s3watch enqueue id:{unrecorded_id}" in by_row.stderr

    setup.update("s3", secret_access_key="wrong-secret")
    agent.start()
    _, failing = photo(piwigo, 2)
    wait_for(lambda: "failed_code_403" in run_cli("--config", str(setup.path), "url", failing).stderr, what="the pending reason")


def test_backfill_selectors_write_right_entries(setup: Setup, piwigo: PiwigoImitation, database: str) -> None:
    execute(database, *PIWIGO_ALBUM_AND_TAG_TABLES)
    ids = [photo(piwigo, number)[0] for number in range(6)]
    execute(
        database,
        "INSERT INTO piwigo_categories (id, name, id_uppercat, uppercats) VALUES (1, 'Trips', NULL, '1'), (2, 'Alps', 1, '1,2'), (3, 'Other', NULL, '3')",
        f"INSERT INTO piwigo_image_category VALUES ({ids[0]}, 1), ({ids[1]}, 2), ({ids[2]}, 3), ({ids[1]}, 1)",
        f"UPDATE piwigo_images SET date_available = '2020-01-01 00:00:00' WHERE id IN ({ids[0]}, {ids[1]})",
    )

    def selected(*arguments: str) -> list[int]:
        result = run_cli("--config", str(setup.path), "backfill", *arguments)
        assert result.returncode == 0, result.stderr
        written = Path(re.search(r"wrote \d+ entr(?:y|ies) to (\S+)", result.stdout).group(1))  # type: ignore[union-attr]
        entries = [int(line[3:]) for line in written.read_text().splitlines()]
        written.unlink()
        return entries

    assert selected("--all") == ids
    assert selected("--since", "2021-01-01") == ids[2:]
    assert selected("--album", "1") == [ids[0], ids[1]]
    assert selected("--album", "1", "--recursive") == [ids[0], ids[1]]
    assert selected("--album", "2") == [ids[1]]
    assert selected("--album", "3") == [ids[2]]
    assert selected("--ids", f"{ids[2]}-{ids[4]}") == ids[2:5]

    dry = run_cli("--config", str(setup.path), "backfill", "--all", "--dry-run")
    assert dry.returncode == 0
    assert f"id:{ids[0]}\t" in dry.stdout
    assert "6 photos selected (dry run: nothing queued)" in dry.stdout
    # An empty selection writes no list, which a running agent could otherwise pick up half removed.
    empty = run_cli("--config", str(setup.path), "backfill", "--ids", f"{ids[-1] + 1000}-{ids[-1] + 1001}")
    assert empty.returncode == 0
    assert "0 photos selected: nothing queued" in empty.stdout
    assert not [p for p in setup.spool_dir.iterdir() if p.is_file()]

    for arguments, message in [((), "choose the photos"), (("--all", "--ids", "1-2"), "cannot be combined"),
                               (("--ids", "9-3"), "is empty"), (("--since", "yesterday"), "is not a date"),
                               (("--album", "77"), "album 77 not found"), (("--recursive", "--all"), "--recursive goes with --album")]:
        result = run_cli("--config", str(setup.path), "backfill", *arguments)
        assert result.returncode == 2, arguments
        assert message in result.stderr, arguments


def test_backfill_recursive_album_takes_sub_albums(setup: Setup, piwigo: PiwigoImitation, database: str) -> None:
    execute(database, *PIWIGO_ALBUM_AND_TAG_TABLES)
    top, child, grandchild, elsewhere = (photo(piwigo, number)[0] for number in range(4))
    execute(
        database,
        "INSERT INTO piwigo_categories (id, name, id_uppercat, uppercats) VALUES (1, 'A', NULL, '1'), (2, 'B', 1, '1,2'), (3, 'C', 2, '1,2,3'), (4, 'D', NULL, '4')",
        f"INSERT INTO piwigo_image_category VALUES ({top}, 1), ({child}, 2), ({grandchild}, 3), ({elsewhere}, 4)",
    )
    result = run_cli("--config", str(setup.path), "backfill", "--album", "1", "--recursive", "--dry-run")
    assert [int(line.split("\t")[0][3:]) for line in result.stdout.splitlines() if line.startswith("id:")] == [top, child, grandchild]


def test_backfilled_photos_upload_with_monitoring_off(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    setup.update("monitor", enabled=False)
    paths = [photo(piwigo, number)[1] for number in range(3)]
    agent.start()
    result = run_cli("--config", str(setup.path), "backfill", "--all")
    assert result.returncode == 0, result.stderr
    for path in paths:
        wait_for(lambda: setup.upload_status(path) == "uploaded", what=f"{path}")
    pending = setup.status()
    assert pending["counts"]["uploaded"] == 3
    assert {item["path"] for item in pending["uploaded"]} == set(paths)

    # A second backfill leaves out what the journal has as uploaded, and prints the counts.
    lists_before = sorted(p.name for p in setup.spool_dir.iterdir() if p.is_file())
    newest = photo(piwigo, 3)[1]
    dry = run_cli("--config", str(setup.path), "backfill", "--all", "--dry-run")
    assert "4 photos selected, 3 already uploaded (dry run: nothing queued)" in dry.stdout
    again = run_cli("--config", str(setup.path), "backfill", "--all")
    assert again.returncode == 0, again.stderr
    assert "4 photos selected, 3 already uploaded" in again.stdout
    assert "wrote 1 entry to" in again.stdout
    wait_for(lambda: setup.upload_status(newest) == "uploaded", what="the photo added since")
    nothing = run_cli("--config", str(setup.path), "backfill", "--all")
    assert "4 photos selected, 4 already uploaded: nothing queued" in nothing.stdout
    assert sorted(p.name for p in setup.spool_dir.iterdir() if p.is_file()) == lists_before


def test_tagged_photo_is_queued_and_uploaded(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, database: str, seaweed: SeaweedFS, bucket: str) -> None:
    execute(database, *PIWIGO_ALBUM_AND_TAG_TABLES)
    setup.update("monitor", enabled=False)
    setup.update("batch", tag="s3upload", tag_poll_interval=1)
    tagged_id, tagged = photo(piwigo, 1)
    _, untagged = photo(piwigo, 2)
    agent.start()
    execute(database, "INSERT INTO piwigo_tags (id, name, url_name) VALUES (7, 'S3 upload', 's3upload')",
            f"INSERT INTO piwigo_image_tag VALUES ({tagged_id}, 7)")

    wait_for(lambda: setup.upload_status(tagged) == "uploaded", what="the tagged photo")
    assert setup.journal().uploads[tagged].source == "tag"
    assert untagged not in setup.journal().uploads
    data = seaweed.client().get_object(Bucket=bucket, Key=tagged)["Body"].read()  # type: ignore[attr-defined]
    assert hashlib.md5(data).hexdigest() == setup.journal().uploads[tagged].md5


@pytest.mark.slow
def test_long_list_does_not_stall_monitoring(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    lines = [f"upload/2001/01/01/missing-{number}.jpg" for number in range(30_000)]
    agent.start()
    drop_list(setup.spool_dir, "long.list", "\n".join(lines) + "\n")
    wait_for(lambda: "list_started" in agent.log(), what="the list to start")
    _, path = photo(piwigo, 1)
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="a monitored photo during the list")
    report = report_of(setup, "long.list")
    assert report.count("rejected: no such file") == 30_000


def test_verify_finds_deleted_and_altered_objects(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str) -> None:
    agent.start()
    paths = [photo(piwigo, number)[1] for number in range(5)]
    for path in paths:
        wait_for(lambda: setup.upload_status(path) == "uploaded", what=f"{path}")

    clean = run_cli("--config", str(setup.path), "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "checked 5 uploaded objects: 5 as recorded, 0 missing, 0 different" in clean.stdout
    # verify takes sizes and ETags from a listing, and sends a HEAD only for what the listing does not confirm.
    config = load_config(setup.path)
    uploads = [upload for upload in setup.journal().uploads.values() if upload.status == "uploaded"]
    listed = listed_objects(Uploader(config.s3, config.uploads, config.links, config.piwigo.root), uploads)
    assert listed == {(bucket, upload.key): (upload.bytes, upload.md5) for upload in uploads}

    client = seaweed.client()
    client.delete_object(Bucket=bucket, Key=paths[0])  # type: ignore[attr-defined]
    client.delete_object(Bucket=bucket, Key=paths[1])  # type: ignore[attr-defined]
    client.put_object(Bucket=bucket, Key=paths[2], Body=b"altered behind the agent's back")  # type: ignore[attr-defined]
    result = run_cli("--config", str(setup.path), "verify")
    assert result.returncode == 1
    assert "checked 5 uploaded objects: 2 as recorded, 2 missing, 1 different" in result.stdout
    reported = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines() if line.startswith(("missing", "different"))}
    assert reported == {paths[0]: "missing", paths[1]: "missing", paths[2]: "different"}

    requeued = run_cli("--config", str(setup.path), "verify", "--requeue")
    assert requeued.returncode == 1
    assert "queued 2 photos again" in requeued.stdout
    wait_for(lambda: run_cli("--config", str(setup.path), "verify").stdout.count("missing ") == 0, what="the missing objects to be uploaded again")
    final = run_cli("--config", str(setup.path), "verify")
    assert "checked 5 uploaded objects: 4 as recorded, 0 missing, 1 different" in final.stdout
