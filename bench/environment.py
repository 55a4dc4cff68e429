"""The benchmark's environment: its work folder, a MariaDB database, SeaweedFS buckets,
deterministic data sets and s3watch agents as child processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import botocore.exceptions
import pymysql
import yaml

from s3watch.demo import PIWIGO_IMAGES_TABLE, mariadb_from_environment
from s3watch.journal import FINISHED, JournalState, read_journal
from s3watch.seaweed import SeaweedFS

# The same variables as the test suite, so one MariaDB setting serves both.
MARIADB = mariadb_from_environment()
TABLE_PREFIX = "piwigo_"


CONTENT_POOL_BYTES = 32 * 1024 * 1024
HEADER_BYTES = 64
AGENT_STOP_TIMEOUT = 60.0  # seconds, above the 20 s the agent gives uploads in flight at SIGTERM


class BenchError(Exception):
    """A measurement could not be completed. The message names what failed and where to look."""


# Data sets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    """One generated file: its gallery path (as images.path without './'), size and md5."""

    path: str
    size: int
    md5: str


@dataclass
class DataSet:
    """Files of one size class in a gallery, all under `subtree` (for example upload/2024)."""

    name: str
    root: Path
    subtree: str
    photos: list[Photo] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """The sum of the file sizes."""
        return sum(photo.size for photo in self.photos)


class ContentGenerator:
    """Deterministic file contents from one seeded random.Random.

    Each file is a unique random 64-byte header followed by bytes cut from a 32 MiB random pool
    at a random offset. So every file has its own md5, yet generating gigabytes costs little
    more than writing them (random.Random.randbytes makes about 180 MB/s).
    """

    def __init__(self, seed: int | str) -> None:
        self.random = random.Random(seed)
        self.pool = self.random.randbytes(CONTENT_POOL_BYTES)

    def write(self, path: Path, size: int) -> str:
        """Write `size` bytes to `path` and return their md5 (hex)."""
        digest = hashlib.md5()
        header = self.random.randbytes(min(HEADER_BYTES, size))
        chunks = [header]
        remaining = size - len(header)
        offset = self.random.randrange(CONTENT_POOL_BYTES)
        while remaining > 0:
            chunk = self.pool[offset:offset + remaining]
            chunks.append(chunk)
            remaining -= len(chunk)
            offset = 0
        with open(path, "wb") as handle:
            for chunk in chunks:
                digest.update(chunk)
                handle.write(chunk)
        return digest.hexdigest()


def generate_data_set(generator: ContentGenerator, name: str, root: Path, year: int, count: int,
                      size_range: tuple[int, int], per_day: int) -> DataSet:
    """Write `count` files with sizes drawn uniformly from `size_range` (bytes) into day folders
    upload/YEAR/MM/DD, `per_day` files a day from January 1st, named as Piwigo names uploads
    (YYYYMMDDhhmmss-xxxxxxxx.jpg)."""
    data = DataSet(name=name, root=root, subtree=f"upload/{year}")
    first_day = date(year, 1, 1)
    for index in range(count):
        day = first_day + timedelta(days=index // per_day)
        folder = root / "upload" / f"{day:%Y}" / f"{day:%m}" / f"{day:%d}"
        folder.mkdir(parents=True, exist_ok=True)
        seconds = 8 * 3600 + (index % per_day) * 37
        stamp = f"{day:%Y%m%d}{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
        size = generator.random.randint(*size_range)
        temporary = folder / f".{index}.tmp"
        md5 = generator.write(temporary, size)
        final = folder / f"{stamp}-{md5[:8]}.jpg"
        os.replace(temporary, final)
        data.photos.append(Photo(path=str(final.relative_to(root)), size=size, md5=md5))
    return data


def generate_pool(generator: ContentGenerator, folder: Path, count: int, size_range: tuple[int, int]) -> list[Photo]:
    """Write `count` files outside any gallery, for the latency runs to link into the gallery's buffer."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for index in range(count):
        size = generator.random.randint(*size_range)
        path = folder / f"{index:05d}.jpg"
        md5 = generator.write(path, size)
        photos.append(Photo(path=str(path), size=size, md5=md5))
    return photos


def create_day_folders(upload: Path, count: int, first_day: date = date(2014, 1, 1)) -> None:
    """Create `count` consecutive empty day folders upload/YYYY/MM/DD from `first_day` on."""
    for offset in range(count):
        day = first_day + timedelta(days=offset)
        (upload / f"{day:%Y}" / f"{day:%m}" / f"{day:%d}").mkdir(parents=True, exist_ok=True)


# Database -----------------------------------------------------------------------------------


class BenchDatabase:
    """A MariaDB database of its own (s3watch_bench_<random>) with Piwigo's images table."""

    def __init__(self) -> None:
        self.name = f"s3watch_bench_{secrets.token_hex(6)}"
        self.created = False

    def create(self) -> None:
        """Create the database and its images table. Raises BenchError when MariaDB is unreachable."""
        try:
            admin = pymysql.connect(**MARIADB, autocommit=True)
        except pymysql.MySQLError as error:
            raise BenchError(
                f"MariaDB at {MARIADB['host']}:{MARIADB['port']} could not be used as {MARIADB['user']!r} ({error}): "
                "start it, or set S3WATCH_TEST_DB_HOST, _PORT, _USER and _PASSWORD"
            ) from None
        with admin, admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{self.name}`")
            self.created = True
            cursor.execute(f"USE `{self.name}`")
            cursor.execute(PIWIGO_IMAGES_TABLE.replace("{prefix}", TABLE_PREFIX))

    def connect(self) -> Any:
        """Return a new autocommit connection to the database."""
        return pymysql.connect(**MARIADB, database=self.name, autocommit=True)

    @property
    def url(self) -> str:
        """The database as s3watch's piwigo.database.url."""
        user = quote(MARIADB["user"], safe="")
        password = quote(MARIADB["password"], safe="")
        return f"mysql://{user}:{password}@{MARIADB['host']}:{MARIADB['port']}/{self.name}"

    def insert_rows(self, photos: list[Photo]) -> None:
        """Insert the images rows of files already in the gallery, as Piwigo stores them."""
        rows = [
            (Path(photo.path).name, "2024-06-01 12:00:00", Path(photo.path).stem, photo.size // 1024, f"./{photo.path}", photo.md5)
            for photo in photos
        ]
        connection = self.connect()
        with connection, connection.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {TABLE_PREFIX}images (file, date_available, name, filesize, path, md5sum) VALUES (%s, %s, %s, %s, %s, %s)",
                rows,
            )

    def version(self) -> str:
        """Return the server's version string."""
        connection = self.connect()
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            return str(cursor.fetchone()[0])

    def drop(self) -> None:
        """Drop the database if this run created it."""
        if not self.created:
            return
        admin = pymysql.connect(**MARIADB, autocommit=True)
        with admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        self.created = False


# The agent ----------------------------------------------------------------------------------


def read_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds a process has used, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces, so split after it.
    fields = text[text.rindex(")") + 2:].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")


def read_bytes_read(pid: int | str) -> int:
    """Return the bytes a process has read so far with read() and its kind (rchar in /proc/PID/io).

    That counts reads served from the page cache too, which is what "each byte read at most
    twice" is about. It also counts the few bytes of S3 and database responses.
    """
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise BenchError(f"no rchar line in /proc/{pid}/io")


def read_resident_bytes(pid: int) -> int:
    """Return a process's resident memory (VmRSS in /proc/PID/status) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS line in /proc/{pid}/status")


class AgentProcess:
    """`s3watch run` as a child process in its own session, with its output in a log file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The agent's process id."""
        assert self.process is not None
        return self.process.pid

    def start(self, events: tuple[str, ...], timeout: float = 120.0) -> float:
        """Start the agent and wait until it has logged each of `events`.

        Returns the seconds from the start to the last of them. Raises BenchError when the agent
        exits, reports that the store is unavailable, or is not ready within `timeout` seconds.
        """
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            # A session of its own keeps a Ctrl-C in the terminal from reaching the agent, so the
            # benchmark decides when it stops.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "s3watch", "--config", str(self.config), "run"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"the agent exited with status {self.process.returncode} at start:\n{self.log_tail()}")
            if self.logged("store_unavailable"):
                raise BenchError(f"the agent could not use the bucket:\n{self.log_tail()}")
            if all(self.logged(event) for event in events):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise BenchError(f"the agent did not log {', '.join(events)} within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def logged(self, event: str) -> bool:
        """Tell whether the agent has logged `event` (the word after the time stamp and level)."""
        for line in self.log_text().splitlines():
            if event in line.split()[:3]:
                return True
        return False

    def log_text(self) -> str:
        """Return the agent's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 8) -> str:
        """Return the last lines of the agent's output, indented, and the log's path."""
        tail = self.log_text().splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in tail) + f"\n    (log: {self.log_path})"

    def running(self) -> bool:
        """Tell whether the process is still running."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the agent with SIGTERM, as systemd does, and kill it when it takes over a minute."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=AGENT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


# Journal following --------------------------------------------------------------------------


def parse_iso(text: str) -> float:
    """Return the epoch seconds of a journal time stamp (ISO 8601 UTC with milliseconds)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class JournalTail:
    """Follows a journal while the agent appends to it, parsing only the lines added since the last read.

    Re-reading the whole journal with read_journal every 0.1 s would cost about 70 ms of CPU per
    read at 6,000 records (measured on the benchmark machine), taken from the agent it measures.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.latest: dict[str, str] = {}  # path -> latest event
        self.first_ts: dict[tuple[str, str], str] = {}  # (path, event) -> time stamp of its first record

    def read(self) -> None:
        """Parse the lines appended since the last call."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:
            # The agent compacted the journal into a new file: start over.
            self.__init__(self.path)  # type: ignore[misc]
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            record = json.loads(line)
            path = record.get("path")
            if path is None:
                continue
            self.latest[path] = record["event"]
            self.first_ts.setdefault((path, record["event"]), record["ts"])

    def count(self, paths: list[str], events: frozenset[str]) -> int:
        """Return how many of `paths` have one of `events` as their latest record."""
        return sum(1 for path in paths if self.latest.get(path) in events)


def wait_for_uploads(agent: AgentProcess, journal: Path, paths: list[str], timeout: float) -> tuple[JournalTail, JournalState]:
    """Poll the journal every 0.1 s until every path is finished, then check that each was uploaded.

    Returns the tail (with the time stamps of each path's records) and the state replayed by
    s3watch's read_journal. Raises BenchError when the agent exits, the timeout passes, or a
    path finished as anything but `uploaded`.
    """
    tail = JournalTail(journal)
    deadline = time.monotonic() + timeout
    while True:
        tail.read()
        finished = tail.count(paths, FINISHED)
        if finished == len(paths):
            break
        if not agent.running():
            raise BenchError(f"the agent exited with {finished} of {len(paths)} uploads finished:\n{agent.log_tail()}")
        if time.monotonic() > deadline:
            failed = tail.count(paths, frozenset({"failed"}))
            raise BenchError(
                f"{finished} of {len(paths)} uploads finished within {timeout:g} s ({failed} last failed):\n{agent.log_tail()}"
            )
        time.sleep(0.1)

    state, _ = read_journal(journal)
    for path in paths:
        upload = state.uploads[path]
        if upload.status != "uploaded":
            raise BenchError(f"{path} finished as {upload.status} ({upload.code or ''} {upload.error or ''}), not uploaded:\n{agent.log_tail()}")
    return tail, state


# The whole environment ----------------------------------------------------------------------


class Environment:
    """The work folder, database, SeaweedFS and every agent the benchmark starts, all ended by `close`."""

    def __init__(self, work: Path, keep: bool) -> None:
        self.work = work
        self.keep = keep
        self.database = BenchDatabase()
        self.seaweed = SeaweedFS(work / "seaweedfs", access_key="s3watch-bench", secret_key=secrets.token_hex(16))
        self.agents: list[AgentProcess] = []

    def start(self) -> None:
        """Create the database and start SeaweedFS. Raises BenchError."""
        self.database.create()
        try:
            self.seaweed.start()
        except Exception as error:  # noqa: BLE001 - SeaweedError and botocore errors alike end the run
            raise BenchError(f"SeaweedFS could not be started: {error}") from None

    def client(self) -> Any:
        """Return a boto3 S3 client for the SeaweedFS server."""
        return self.seaweed.client()

    def create_bucket(self, name: str) -> str:
        """Create a bucket and return its name."""
        self.seaweed.create_bucket(name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket with its objects, to give the disk space back.

        SeaweedFS deletes a bucket that still contains objects, which AWS rejects. Where the
        deletion fails, the objects stay until `close` removes the whole SeaweedFS folder.
        """
        try:
            self.client().delete_bucket(Bucket=name)
        except botocore.exceptions.ClientError:
            pass

    def write_agent_config(self, name: str, root: Path, bucket: str, monitor: bool, workers: int) -> Path:
        """Write an agent configuration in a folder of its own (with its state and spool folders).

        Only the gallery, database, bucket, monitoring and worker count are set; everything else
        keeps s3watch's defaults (poll_interval 10 s, match_timeout 600 s, attempts 5).
        """
        folder = self.work / "agents" / name
        folder.mkdir(parents=True)
        values = {
            "piwigo": {"root": str(root), "database": {"url": self.database.url, "table_prefix": TABLE_PREFIX}},
            "monitor": {"enabled": monitor},
            "s3": {
                "bucket": bucket,
                "endpoint_url": self.seaweed.endpoint_url,
                "access_key_id": self.seaweed.access_key,
                "secret_access_key": self.seaweed.secret_key,
            },
            "uploads": {"workers": workers},
            "state_dir": str(folder / "state"),
            "spool_dir": str(folder / "spool"),
        }
        path = folder / "s3watch.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        path.chmod(0o600)
        return path

    def agent(self, config: Path) -> AgentProcess:
        """Return an agent (not started) for a configuration. `close` stops it."""
        agent = AgentProcess(config, config.parent / "agent.log")
        self.agents.append(agent)
        return agent

    def close(self) -> list[str]:
        """Stop every agent and SeaweedFS, drop the database and remove the work folder unless kept.

        Returns the problems met on the way, so that one failure does not leave the rest running.
        """
        problems: list[str] = []
        steps: list[tuple[str, Callable[[], None]]] = [
            *((f"stopping agent {agent.config.parent.name}", agent.stop) for agent in self.agents),
            ("stopping SeaweedFS", self.seaweed.stop),
            (f"dropping database {self.database.name}", self.database.drop),
        ]
        if not self.keep:
            steps.append((f"removing {self.work}", lambda: shutil.rmtree(self.work)))
        for description, step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - go on with the rest of the clean-up
                problems.append(f"{description} failed: {error}")
        return problems
