"""Fixtures: a real SeaweedFS, a real MariaDB database per test, a gallery that adds photos as Piwigo does, and the agent as a process."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pymysql
import pytest
import yaml

from s3watch.config import load_config
from s3watch.demo import PIWIGO_IMAGES_TABLE, PiwigoImitation, mariadb_from_environment
from s3watch.journal import read_journal
from s3watch.seaweed import SeaweedFS
from s3watch.status import build_status

MARIADB = mariadb_from_environment()


# Secrets the whole suite uses; the last test checks that none reaches any output.
TEST_DB_PASSWORD = "db-secret-Zq8vXw"
TEST_S3_SECRET = "test-secret-Kp3mN9"
CLI_OUTPUTS: list[str] = []  # everything the command line printed during the session


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session; tests make their own buckets."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), access_key="test-access", secret_key=TEST_S3_SECRET,
                       read_only_keys=("test-reader", "test-reader-secret"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(seaweed: SeaweedFS) -> Iterator[str]:
    """A fresh bucket, deleted afterwards so that the session's SeaweedFS does not run out of volumes."""
    name = f"test-{secrets.token_hex(6)}"
    seaweed.create_bucket(name)
    yield name
    seaweed.delete_bucket(name)
    seaweed.delete_bucket(f"{name}-new")


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh MariaDB database holding Piwigo's images table; dropped afterwards. Yields its name."""
    name = f"s3watch_test_{secrets.token_hex(6)}"
    admin = pymysql.connect(**MARIADB, autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}`")
        cursor.execute(f"USE `{name}`")
        cursor.execute(PIWIGO_IMAGES_TABLE.replace("{prefix}", "piwigo_"))
        cursor.execute(f"CREATE USER IF NOT EXISTS 's3watch_test'@'%' IDENTIFIED BY '{TEST_DB_PASSWORD}'")
        cursor.execute(f"CREATE USER IF NOT EXISTS 's3watch_test'@'localhost' IDENTIFIED BY '{TEST_DB_PASSWORD}'")
        cursor.execute(f"GRANT SELECT ON `{name}`.* TO 's3watch_test'@'%'")
        cursor.execute(f"GRANT SELECT ON `{name}`.* TO 's3watch_test'@'localhost'")
    yield name
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE `{name}`")
        # The tests share the user; only its grants on this database go, so that they do not pile up.
        for host in ("%", "localhost"):
            try:
                cursor.execute(f"REVOKE SELECT ON `{name}`.* FROM 's3watch_test'@'{host}'")
            except pymysql.MySQLError:
                pass  # the test took the grant away itself
    admin.close()


@pytest.fixture
def gallery_root(tmp_path: Path) -> Path:
    root = tmp_path / "gallery"
    (root / "upload").mkdir(parents=True)
    return root


@pytest.fixture
def piwigo(gallery_root: Path, database: str) -> PiwigoImitation:
    """Adds photos to the test gallery the way Piwigo does, into the MariaDB images table."""
    return PiwigoImitation(gallery_root, lambda: pymysql.connect(**MARIADB, database=database, autocommit=True), mark="%s")


class Setup:
    """One test's configuration file, with helpers to rewrite it and read the agent's journal."""

    def __init__(self, directory: Path, values: dict[str, Any]) -> None:
        self.directory = directory
        self.values = values
        self.path = directory / "s3watch.yaml"
        self.write()

    def write(self) -> None:
        self.path.write_text(yaml.safe_dump(self.values, sort_keys=False))
        self.path.chmod(0o600)

    def update(self, section: str, **values: Any) -> None:
        self.values.setdefault(section, {}).update(values)
        self.write()

    @property
    def state_dir(self) -> Path:
        return Path(self.values["state_dir"])

    @property
    def spool_dir(self) -> Path:
        return Path(self.values["spool_dir"])

    def journal(self) -> Any:
        return read_journal(self.state_dir / "journal.jsonl")[0]

    def records(self) -> list[dict[str, Any]]:
        path = self.state_dir / "journal.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def status(self) -> dict[str, Any]:
        return build_status(load_config(self.path))

    def upload_status(self, path: str) -> str | None:
        upload = self.journal().uploads.get(path)
        return upload.status if upload else None


@pytest.fixture
def setup(tmp_path: Path, gallery_root: Path, database: str, seaweed: SeaweedFS, bucket: str) -> Setup:
    """A configuration for the test gallery, its MariaDB database and its bucket, tuned for fast tests."""
    values = {
        "piwigo": {
            "root": str(gallery_root),
            "database": {"url": f"mysql://s3watch_test:{TEST_DB_PASSWORD}@127.0.0.1:{MARIADB['port']}/{database}", "table_prefix": "piwigo_"},
        },
        "monitor": {"enabled": True, "poll_interval": 0.5, "match_timeout": 30},
        "s3": {"bucket": bucket, "endpoint_url": seaweed.endpoint_url, "access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key},
        "uploads": {"workers": 4, "attempts": 2, "retry_interval": 1},
        "state_dir": str(tmp_path / "state"),
        "spool_dir": str(tmp_path / "spool"),
    }
    return Setup(tmp_path, values)


class AgentProcess:
    """`s3watch run` as a child process, as systemd runs it; its output goes to a log file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.environment: dict[str, str] = {}  # extra environment variables for the agent

    def start(self, wait_for_log: bool = True) -> "AgentProcess":
        earlier = len(self.log())  # a restart appends to the log of the earlier runs
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "s3watch", "--config", str(self.config), "run"], stdout=log,
                                            stderr=subprocess.STDOUT, env={**os.environ, **self.environment})
        if not wait_for_log:
            return self

        def started() -> bool:
            output = self.log()[earlier:]
            return "watching" in output or "started" in output or self.process.poll() is not None

        wait_for(started, 30, "the agent to start")
        assert self.process.poll() is None, f"agent exited at start:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged(self, event: str) -> bool:
        """Tell whether the agent logged `event` as a whole word: `ready` is not `store_ready`."""
        return re.search(rf"(?m)(^|\s){re.escape(event)}(\s|$)", self.log()) is not None

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def agent(setup: Setup, tmp_path: Path) -> Iterator[AgentProcess]:
    """The agent for this test's setup (not started)."""
    process = AgentProcess(setup.path, tmp_path / "agent.log")
    yield process
    process.stop()


def run_cli(*arguments: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the s3watch command line, with `env` added to the environment, and return its result."""
    result = subprocess.run([sys.executable, "-m", "s3watch", *arguments], capture_output=True, text=True, input=stdin, timeout=120,
                            env={**os.environ, **(env or {})})
    CLI_OUTPUTS.append(result.stdout + result.stderr)
    return result
