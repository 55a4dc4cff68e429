"""The check and status commands, and an agent on an SQLite images table."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from s3watch.cli import _folder_line
from s3watch.config import ConfigError, load_config
from s3watch.demo import PiwigoImitation, sample_photo

from .conftest import TEST_DB_PASSWORD, AgentProcess, Setup, run_cli, wait_for


def test_check_passes_on_good_setup(setup: Setup) -> None:
    result = run_cli("--config", str(setup.path), "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    assert "(writable, refuses overwrites)" in result.stdout
    # The test buckets are private, so their public links are refused: a note, not a failure.
    assert "links: note: the store refuses a public link without credentials (HTTP 403)" in result.stdout
    setup.update("links", mode="presigned")
    presigned = run_cli("--config", str(setup.path), "check")
    assert presigned.returncode == 0
    assert "links:" not in presigned.stdout
    assert TEST_DB_PASSWORD not in result.stdout + result.stderr


def test_check_fails_on_wrong_bucket(setup: Setup) -> None:
    setup.update("s3", bucket="no-such-bucket-s3watch")
    result = run_cli("--config", str(setup.path), "check")
    assert result.returncode == 1
    assert "bucket no-such-bucket-s3watch" in result.stdout
    assert "FAILED: failed_code_404" in result.stdout


def test_check_fails_on_wrong_key(setup: Setup) -> None:
    setup.update("s3", secret_access_key="not-the-secret")
    result = run_cli("--config", str(setup.path), "check")
    assert result.returncode == 1
    assert "FAILED: failed_code_403" in result.stdout
    assert "not-the-secret" not in result.stdout + result.stderr


def test_check_fails_on_keys_that_may_only_read(setup: Setup) -> None:
    # Such keys pass the bucket check (a listing) and would fail every upload.
    setup.update("s3", access_key_id="test-reader", secret_access_key="test-reader-secret")
    result = run_cli("--config", str(setup.path), "check")
    assert result.returncode == 1, result.stdout
    assert "FAILED: failed_code_403: the keys may list the bucket but not write to it: grant s3:PutObject" in result.stdout


def test_check_fails_on_mistyped_upload_dir(setup: Setup, piwigo: PiwigoImitation) -> None:
    piwigo.add_photo(sample_photo(1))
    setup.update("piwigo", upload_dir="uploads")
    result = run_cli("--config", str(setup.path), "check")
    assert result.returncode == 1, result.stdout
    assert "uploads: FAILED: it does not exist, but the images table has photos (the newest is upload/" in result.stdout


def test_check_folder_that_is_file(setup: Setup, agent: AgentProcess) -> None:
    spool = setup.path.parent / "spool-file"
    spool.write_text("not a folder")
    setup.values["spool_dir"] = str(spool)
    setup.write()
    for command in (["check"], ["check", "--offline"]):
        result = run_cli("--config", str(setup.path), *command)
        assert result.returncode == 1, result.stdout
        assert f"spool directory {spool}: FAILED: it is a file, not a folder: set spool_dir to a folder" in result.stdout

    # Batch mode is off, with the reason, and the agent goes on.
    agent.start()
    wait_for(lambda: agent.logged("spool_unavailable"), what="the spool warning")
    assert "set spool_dir to a folder to use batch mode" in agent.log()
    agent.stop()

    state = setup.path.parent / "state-file"
    state.write_text("not a folder")
    setup.values["state_dir"] = str(state)
    setup.write()
    result = run_cli("--config", str(setup.path), "run")
    assert result.returncode == 1
    assert f"state directory {state} is a file, or lies in one, not a folder: set state_dir to a folder" in result.stderr


def test_check_fails_on_unreachable_database(setup: Setup) -> None:
    setup.values["piwigo"]["database"]["url"] = f"mysql://s3watch_test:{TEST_DB_PASSWORD}@127.0.0.1:1/piwigo"
    setup.write()
    result = run_cli("--config", str(setup.path), "check")
    assert result.returncode == 1
    assert "database: FAILED: database server mysql://s3watch_test@127.0.0.1:1/piwigo could not be reached" in result.stdout
    assert TEST_DB_PASSWORD not in result.stdout + result.stderr


def test_check_fails_on_wrong_password_and_table_prefix(setup: Setup) -> None:
    url = setup.values["piwigo"]["database"]["url"]
    setup.values["piwigo"]["database"]["url"] = url.replace(TEST_DB_PASSWORD, "wrong-password")
    setup.write()
    result = run_cli("--config", str(setup.path), "check")
    assert "database login refused" in result.stdout
    assert "wrong-password" not in result.stdout + result.stderr

    setup.values["piwigo"]["database"] = {"url": url, "table_prefix": "pwg_"}
    setup.write()
    result = run_cli("--config", str(setup.path), "check")
    assert result.returncode == 1
    assert "table pwg_images not found" in result.stdout


def test_status_json_fields(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    agent.start()
    image_id, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")

    result = run_cli("--config", str(setup.path), "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pending"] == []
    item = report["uploaded"][0]
    assert (item["path"], item["image_id"], item["status"], item["key"]) == (path, image_id, "uploaded", path)
    assert item["url"].endswith(f"/{setup.values['s3']['bucket']}/{path}")
    assert report["counts"]["uploaded"] == 1

    text = run_cli("--config", str(setup.path), "status")
    assert path in text.stdout
    assert item["url"] in text.stdout


def test_agent_on_sqlite_images_table(setup: Setup, tmp_path: Path, gallery_root: Path) -> None:
    database = tmp_path / "piwigo.db"
    piwigo = PiwigoImitation(gallery_root, lambda: sqlite3.connect(database))
    piwigo.create_table()
    setup.values["piwigo"]["database"] = {"url": f"sqlite:///{database}", "table_prefix": "piwigo_"}
    setup.update("links", mode="presigned", expires=600)
    agent = AgentProcess(setup.path, tmp_path / "sqlite-agent.log").start()
    try:
        _, path = piwigo.add_photo(sample_photo(1))
        wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
        url = setup.status()["uploaded"][0]["url"]
        assert "X-Amz-Signature=" in url
        assert "X-Amz-Expires=600" in url
    finally:
        agent.stop()


def test_status_piped_into_head_exits_quietly(setup: Setup) -> None:
    import subprocess
    import sys

    result = subprocess.run(f"{sys.executable} -m s3watch --config {setup.path} status --json | head -1", shell=True, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "{"
    assert "Traceback" not in result.stderr


def test_status_without_journal_warns(setup: Setup) -> None:
    setup.values["state_dir"] = str(setup.path.parent / "mistyped-state")
    setup.write()
    for command in (["status"], ["verify"], ["url", "upload/2026/01/01/a.jpg"]):
        result = run_cli("--config", str(setup.path), *command)
        assert f"s3watch: warning: no journal at {setup.path.parent / 'mistyped-state' / 'journal.jsonl'}" in result.stderr, command
        assert "or state_dir is wrong" in result.stderr


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A temporary folder that every user may enter, unlike tmp_path under a private one; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="s3watch-other-user-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user needs root")
def test_check_folder_of_other_user(open_folder: Path) -> None:
    # A member of the service's group checks a state directory that only the service user may write to.
    base = open_folder
    state = base / "state"
    state.mkdir(mode=0o750)  # root's, as /var/lib/s3watch is the service user's
    owned, missing = as_user(65534, lambda: (_folder_line("state directory", state), _folder_line("state directory", base / "missing")))

    assert owned == [f"state directory {state}: ok for its owner root, who must be the user that runs the agent (this user may not write to it)", False]
    # A missing folder this user cannot create stays a failure.
    assert missing[0].startswith(f"state directory {base / 'missing'}: FAILED: not writable by this user")
    assert missing[1] is True


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root")
def test_config_unreadable_named(open_folder: Path) -> None:
    config = open_folder / "s3watch.yaml"
    config.write_text("s3:\n  bucket: b\n")
    config.chmod(0o600)

    def message() -> str:
        try:
            load_config(config)
        except ConfigError as error:
            return str(error)
        return "no error"

    answer = as_user(65534, message)
    assert answer == f"configuration file {config} is not readable by this user: fix its permissions or run as its owner"


def as_user(uid: int, work: Callable[[], Any]) -> Any:
    """Return what `work` returns when run in a child process as user and group `uid`, without supplementary groups.

    A forked child, because this interpreter may be in a folder that user cannot open (under /root).
    """
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(writer, json.dumps(work()).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    assert data, "the child process failed"
    return json.loads(data)
