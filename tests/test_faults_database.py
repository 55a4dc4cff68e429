"""Database faults under the agent: a MariaDB server of the test's own is stopped, restarted and times out idle connections.

Each test installs a data directory under its tmp_path and runs mariadbd on a free loopback
port, so the machine's shared server (the one the other tests use) is never touched here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pymysql
import pytest

from s3watch.demo import PiwigoImitation, sample_photo
from s3watch.seaweed import SeaweedFS

from .conftest import PIWIGO_IMAGES_TABLE, AgentProcess, Setup, run_cli, wait_for

MARIADBD = Path("/usr/sbin/mariadbd")
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")

DB_NAME = "piwigo"
DB_USER = "s3watch"
DB_PASSWORD = "fault-secret-T4kW9p"
WRONG_PASSWORD = "not-the-password-Hq2x"

pytestmark = pytest.mark.skipif(not MARIADBD.is_file() or INSTALL_DB is None, reason="needs /usr/sbin/mariadbd and mariadb-install-db")

# A console log line is "2026-12-04T19:38:11 [LEVEL ]event field=value ...", and INFO lines have no level.
EVENT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (?:(DEBUG|WARNING|ERROR|CRITICAL) )?(\w+)")


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MariaDBServer:
    """A throwaway MariaDB server: data directory, socket, pid file and error log in `directory`, on a free loopback port.

    mariadbd runs with --user=root, because pytest's tmp_path (mode 700, owned by root) is not
    reachable by the mysql user. `stop` and `start` keep the port and the data directory, so a
    client configured once connects to the same server after a restart.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data_dir = directory / "data"
        self.pid_file = directory / "mariadbd.pid"
        self.error_log = directory / "error.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        # Linux limits a Unix socket path to 107 bytes, so a deep tmp_path gets a short folder instead.
        self.socket_dir: Path | None = None
        self.socket_path = directory / "mariadbd.sock"
        if len(os.fsencode(self.socket_path)) > 100:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="s3watch-mariadb-"))
            self.socket_path = self.socket_dir / "mariadbd.sock"

    def install(self) -> None:
        """Create the system tables, with an empty password for root (over TCP from 127.0.0.1 too)."""
        assert INSTALL_DB is not None
        result = subprocess.run(
            [INSTALL_DB, "--no-defaults", "--user=root", f"--datadir={self.data_dir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", "--innodb-log-file-size=8M"],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, f"{INSTALL_DB} failed with status {result.returncode}:\n{result.stdout}\n{result.stderr}"

    def start(self, *options: str) -> None:
        """Start mariadbd with extra `options` (such as --wait-timeout=2) and wait until it accepts connections."""
        assert self.process is None, "the server is already running"
        command = [
            str(MARIADBD), "--no-defaults", "--user=root", f"--datadir={self.data_dir}",
            "--bind-address=127.0.0.1", f"--port={self.port}", f"--socket={self.socket_path}", f"--pid-file={self.pid_file}",
            f"--log-error={self.error_log}", "--skip-name-resolve", "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
            *options,
        ]
        with open(self.directory / "mariadbd.out", "ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        wait_for(self._accepts_connections, 60, f"mariadbd on port {self.port} to accept connections")

    def _accepts_connections(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            code = self.process.returncode
            self.process = None
            raise AssertionError(f"mariadbd exited with status {code}:\n{self.error_log_tail()}")
        try:
            self.connect(connect_timeout=1).close()
        except pymysql.err.OperationalError:
            return False
        return True

    def stop(self) -> None:
        """Send SIGTERM to the pid in the pid file and wait for a clean shutdown, or SIGKILL it and fail after 60 s."""
        if self.process is None:
            return
        pid = int(self.pid_file.read_text().strip()) if self.pid_file.exists() else self.process.pid
        assert pid == self.process.pid, f"pid file {self.pid_file} names {pid}, not the mariadbd this test started ({self.process.pid})"
        os.kill(pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise AssertionError(f"mariadbd did not stop within 60 s of SIGTERM:\n{self.error_log_tail()}") from None
        finally:
            self.process = None

    def restart(self, *options: str) -> None:
        self.stop()
        self.start(*options)

    def remove_socket_dir(self) -> None:
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def connect(self, **options: Any) -> pymysql.connections.Connection:
        """Connect as root over TCP, with autocommit."""
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", autocommit=True, **options)

    def execute(self, *statements: str, database: str | None = None) -> list[tuple[Any, ...]]:
        """Run statements as root on a new connection. Returns the rows of the last one."""
        connection = self.connect(database=database)
        try:
            rows: list[tuple[Any, ...]] = []
            with connection.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
                    rows = list(cursor.fetchall())
            return rows
        finally:
            connection.close()

    def status_value(self, name: str) -> int:
        """Return a counter of SHOW GLOBAL STATUS, such as Aborted_clients."""
        rows = self.execute(f"SHOW GLOBAL STATUS LIKE '{name}'")
        return int(rows[0][1])

    def connections_of(self, user: str) -> int:
        """Return how many connections `user` has open now."""
        rows = self.execute(f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = '{user}'")
        return int(rows[0][0])

    def url(self, user: str, password: str, database: str) -> str:
        return f"mysql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def error_log_tail(self, lines: int = 20) -> str:
        if not self.error_log.exists():
            return "(no error log)"
        return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def mariadb(tmp_path: Path) -> Iterator[MariaDBServer]:
    """A running MariaDB server of this test's own, stopped afterwards."""
    server = MariaDBServer(tmp_path / "mariadb")
    server.install()
    server.start()
    yield server
    server.stop()
    server.remove_socket_dir()


@pytest.fixture
def database(mariadb: MariaDBServer) -> str:
    """The gallery's database on the test's own server: Piwigo's images table, readable by a user with a password.

    Overrides conftest's fixture of the same name, so `setup` and `piwigo` use this server.
    """
    mariadb.execute(
        f"CREATE DATABASE `{DB_NAME}`",
        f"USE `{DB_NAME}`",
        PIWIGO_IMAGES_TABLE.replace("{prefix}", "piwigo_"),
        f"CREATE USER '{DB_USER}'@'%' IDENTIFIED BY '{DB_PASSWORD}'",
        f"GRANT SELECT ON `{DB_NAME}`.* TO '{DB_USER}'@'%'",
    )
    return DB_NAME


@pytest.fixture
def piwigo(gallery_root: Path, mariadb: MariaDBServer, database: str) -> PiwigoImitation:
    """An imitation of Piwigo that adds photos into the images table on the test's own server."""
    return PiwigoImitation(gallery_root, lambda: mariadb.connect(database=database), mark="%s")


@pytest.fixture
def setup(setup: Setup, mariadb: MariaDBServer, database: str) -> Setup:
    """Conftest's configuration, pointed at the test's own server with a password-protected user."""
    setup.update("piwigo", database={"url": mariadb.url(DB_USER, DB_PASSWORD, database), "table_prefix": "piwigo_"})
    return setup


def uploaded(setup: Setup, path: str) -> bool:
    return setup.upload_status(path) == "uploaded"


def object_bytes(seaweed: SeaweedFS, bucket: str, key: str) -> bytes:
    return seaweed.client().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]


def log_lines(agent: AgentProcess) -> list[tuple[str, str, str]]:
    """Return (level, event, line) for each line of the agent's log.

    A line that is not an event, such as a traceback, comes back with the level "UNPARSED".
    """
    lines = []
    for line in agent.log().splitlines():
        match = EVENT_LINE.match(line)
        if match is None:
            lines.append(("UNPARSED", "", line))
        else:
            lines.append((match.group(1) or "INFO", match.group(2), line))
    return lines


def log_events(agent: AgentProcess) -> list[str]:
    return [event for _, event, _ in log_lines(agent)]


def wait_until_uploaded(setup: Setup, paths: list[str], timeout: float = 60.0) -> None:
    for path in paths:
        wait_for(lambda: uploaded(setup, path), timeout, f"{path} to be uploaded")


def assert_objects_hold(seaweed: SeaweedFS, bucket: str, photos: dict[str, bytes]) -> None:
    for path, data in photos.items():
        assert object_bytes(seaweed, bucket, path) == data, f"the object at {path} differs from the file"


@pytest.mark.parametrize("match_timeout", [30, 1], ids=["outage-within-match-timeout", "outage-past-match-timeout"])
def test_server_restart_under_running_agent(match_timeout: int, setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation,
                                            mariadb: MariaDBServer, seaweed: SeaweedFS, bucket: str) -> None:
    # Past match_timeout, the files moved in during the outage are reported unmatched, and the
    # table poll (its cursor set before the outage) must still find their rows.
    setup.update("monitor", match_timeout=match_timeout)
    agent.start()
    before = {}
    for number in range(2):
        data = sample_photo(number, size=100_000)
        before[piwigo.add_photo(data)[1]] = data
    wait_until_uploaded(setup, list(before))

    mariadb.stop()
    # Piwigo moves a file in before it inserts the row, so with the server down only the files arrive.
    during = {}
    for number in range(2, 5):
        data = sample_photo(number, size=100_000)
        during[piwigo.place_file(data)] = data
    wait_for(lambda: "database_unavailable" in log_events(agent), 30, "database_unavailable")
    # Let several polls (0.5 s apart) fail, because each failure after the first must stay silent.
    time.sleep(3.0)
    assert agent.process is not None
    assert agent.process.poll() is None, f"the agent exited during the outage:\n{agent.log()}"
    assert log_events(agent).count("database_unavailable") == 1

    mariadb.start()
    for path, data in during.items():
        piwigo.insert_row(path, hashlib.md5(data).hexdigest(), len(data))
    after = {}
    for number in range(5, 7):
        data = sample_photo(number, size=100_000)
        after[piwigo.add_photo(data)[1]] = data

    photos = {**before, **during, **after}
    wait_until_uploaded(setup, list(photos))
    assert_objects_hold(seaweed, bucket, photos)

    events = log_events(agent)
    assert events.count("database_unavailable") == 1, agent.log()
    assert events.count("database_available") == 1, agent.log()
    assert events.index("database_unavailable") < events.index("database_available")
    assert DB_PASSWORD not in agent.log()


def test_idle_connection_past_wait_timeout(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, mariadb: MariaDBServer,
                                           seaweed: SeaweedFS, bucket: str) -> None:
    mariadb.restart("--wait-timeout=2", "--interactive-timeout=2")
    # No table poll between photos, so each photo's look-up is the first query on a connection
    # the server closed while it idled.
    setup.update("monitor", poll_interval=60)
    aborted_before = mariadb.status_value("Aborted_clients")
    agent.start()
    wait_for(lambda: "ready" in log_events(agent), 30, "the agent to be ready")

    photos = {}
    for number in range(2):
        # The fault needs time to pass: the server closes a connection idle for 2 s.
        wait_for(lambda: mariadb.connections_of(DB_USER) == 0, 30, "the server to close the agent's idle connection")
        data = sample_photo(number)
        _, path = piwigo.add_photo(data)
        photos[path] = data
        wait_until_uploaded(setup, [path], timeout=30)

    # The server, not the agent, ended both connections, once per idle period.
    assert mariadb.status_value("Aborted_clients") - aborted_before >= 2
    assert_objects_hold(seaweed, bucket, photos)
    problems = [line for level, _, line in log_lines(agent) if level not in ("INFO", "DEBUG")]
    assert problems == [], "the reconnection after an idle timeout should be silent"


def test_unreachable_at_start_then_available(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, mariadb: MariaDBServer,
                                             seaweed: SeaweedFS, bucket: str) -> None:
    mariadb.stop()
    agent.start()
    wait_for(lambda: "database_unavailable" in log_events(agent), 30, "database_unavailable")
    during = {}
    for number in range(2):
        data = sample_photo(number)
        during[piwigo.place_file(data)] = data
    # Let several polls (0.5 s apart) fail while the agent waits for the server.
    time.sleep(3.0)
    assert agent.process is not None
    assert agent.process.poll() is None, f"the agent exited while the server was down:\n{agent.log()}"
    events = log_events(agent)
    assert events.count("database_unavailable") == 1
    assert "ready" not in events, "the agent reported ready before the database answered"

    mariadb.start()
    for path, data in during.items():
        piwigo.insert_row(path, hashlib.md5(data).hexdigest(), len(data))
    after = {}
    for number in range(2, 4):
        data = sample_photo(number)
        after[piwigo.add_photo(data)[1]] = data

    photos = {**during, **after}
    wait_until_uploaded(setup, list(photos))
    assert_objects_hold(seaweed, bucket, photos)
    # The photos can be matched before the first table poll that succeeds, which is what makes the agent ready.
    wait_for(lambda: "ready" in log_events(agent), 30, "ready")
    events = log_events(agent)
    assert events.count("database_unavailable") == 1, agent.log()
    assert events.count("database_available") == 1, agent.log()
    assert events.index("database_available") < events.index("ready")
    assert DB_PASSWORD not in agent.log()


@pytest.mark.slow
def test_unreachable_at_start_past_match_timeout(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, mariadb: MariaDBServer) -> None:
    # The outage outlasts match_timeout. The poll interval is long, so Piwigo's row insert after
    # the server comes back lands before the agent's first poll that succeeds.
    setup.update("monitor", match_timeout=1, poll_interval=10)
    mariadb.stop()
    agent.start()
    first_poll = time.monotonic()  # the loop polls once just after logging "started", then 10 s later
    data = sample_photo(1)
    path = piwigo.place_file(data)
    time.sleep(2.5)

    mariadb.start()
    piwigo.insert_row(path, hashlib.md5(data).hexdigest(), len(data))
    assert time.monotonic() - first_poll < 9, "the machine was too slow: the row came after the agent's second poll, so this test proves nothing"

    wait_until_uploaded(setup, [path], timeout=30)


def break_database_setting(fault: str, setup: Setup, mariadb: MariaDBServer, database: str) -> None:
    """Introduce one bad database setting into the test's configuration or database."""
    if fault == "wrong password":
        setup.update("piwigo", database={"url": mariadb.url(DB_USER, WRONG_PASSWORD, database), "table_prefix": "piwigo_"})
    elif fault == "missing table":
        mariadb.execute("DROP TABLE piwigo_images", database=database)
    elif fault == "wrong database":
        setup.update("piwigo", database={"url": mariadb.url(DB_USER, DB_PASSWORD, "no_such_gallery"), "table_prefix": "piwigo_"})
    elif fault == "wrong prefix":
        setup.update("piwigo", database={"url": mariadb.url(DB_USER, DB_PASSWORD, database), "table_prefix": "gallery_"})
    else:
        raise ValueError(f"unknown fault {fault!r}")


BAD_SETTINGS = [
    ("wrong password", f"database login refused for mysql://{DB_USER}@127.0.0.1:"),
    ("missing table", "table piwigo_images not found"),
    ("wrong prefix", "table gallery_images not found"),
    ("wrong database", "check the database name"),
]


@pytest.mark.parametrize(("fault", "expected"), BAD_SETTINGS, ids=[fault.replace(" ", "-") for fault, _ in BAD_SETTINGS])
def test_bad_database_setting_stops_start(fault: str, expected: str, setup: Setup, mariadb: MariaDBServer, database: str) -> None:
    break_database_setting(fault, setup, mariadb, database)

    result = run_cli("--config", str(setup.path), "run")

    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.returncode == 2, output
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    assert expected in lines[0]
    assert DB_PASSWORD not in output
    assert WRONG_PASSWORD not in output


@pytest.mark.parametrize("fault", [fault for fault, _ in BAD_SETTINGS], ids=[fault.replace(" ", "-") for fault, _ in BAD_SETTINGS])
def test_bad_setting_leaves_state_dir_empty(fault: str, setup: Setup, mariadb: MariaDBServer, database: str) -> None:
    break_database_setting(fault, setup, mariadb, database)

    result = run_cli("--config", str(setup.path), "run")

    assert result.returncode == 2, result.stderr
    written = sorted(entry.name for entry in setup.state_dir.iterdir()) if setup.state_dir.exists() else []
    assert set(written) <= {"agent.lock"}, f"the failed start wrote {written} into the state directory"


def write_database_inc(gallery_root: Path, mariadb: MariaDBServer, password: str) -> None:
    """Write Piwigo's local/config/database.inc.php for the test's own server, as Piwigo's installer does."""
    folder = gallery_root / "local" / "config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "database.inc.php").write_text(
        "<?php\n$conf['dblayer'] = 'mysqli';\n"
        f"$conf['db_base'] = '{DB_NAME}';\n$conf['db_user'] = '{DB_USER}';\n"
        f"$conf['db_password'] = '{password}';\n$conf['db_host'] = '127.0.0.1:{mariadb.port}';\n\n"
        "$prefixeTable = 'piwigo_';\n\ndefine('PHPWG_INSTALLED', true);\n?>"
    )


def test_changed_database_password_used_without_reload(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation,
                                                                 mariadb: MariaDBServer, gallery_root: Path, seaweed: SeaweedFS, bucket: str) -> None:
    # s3watch reads the database settings from Piwigo's own file.
    write_database_inc(gallery_root, mariadb, DB_PASSWORD)
    del setup.values["piwigo"]["database"]
    setup.write()
    agent.start()
    data = sample_photo(1, size=100_000)
    _, first = piwigo.add_photo(data)
    wait_until_uploaded(setup, [first])

    # The admin gives the database user a new password, and Piwigo's file with it. The server
    # restarts, so the agent must log in again.
    mariadb.execute(f"ALTER USER '{DB_USER}'@'%' IDENTIFIED BY 'a-new-password'")
    write_database_inc(gallery_root, mariadb, "a-new-password")
    mariadb.restart()
    data = sample_photo(2, size=100_000)
    _, second = piwigo.add_photo(data)

    wait_until_uploaded(setup, [second])
    assert object_bytes(seaweed, bucket, second) == data
    assert "a-new-password" not in agent.log()
    assert DB_PASSWORD not in agent.log()
