"""`s3watch demo`: a sample gallery that adds photos the way Piwigo does, a local SeaweedFS, and the agent between them.

`PiwigoImitation` is also what the tests and the benchmark use to add photos: it writes files and
rows in the order a real Piwigo does (file moved into place first, optionally rewritten, row
inserted last).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

# -P: Python would otherwise import a folder named s3watch in the current directory, such as
# the clone itself when the demo is started from the folder above it.
_S3WATCH = (sys.executable, "-P", "-m", "s3watch")

# A 16x16 JPEG; each sample photo is this picture with a comment segment that makes its bytes unique.
_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1RV19iZ2hnPk1xeXBkeFxl"
    "Z2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2P/wAARCAAQABADASIAAhEB"
    "AxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS"
    "0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKz"
    "tLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgEC"
    "BAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpj"
    "ZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6"
    "/9oADAMBAAIRAxEAPwCSiiivGPWP/9k="
)

# Piwigo's own images table in MySQL/MariaDB, as `SHOW CREATE TABLE` printed it on a Piwigo 17
# gallery with MariaDB 10.11; the tests and the benchmark create it.
PIWIGO_IMAGES_TABLE = """
CREATE TABLE `{prefix}images` (
  `id` mediumint(8) unsigned NOT NULL AUTO_INCREMENT,
  `file` varchar(255) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL DEFAULT '',
  `date_available` datetime NOT NULL DEFAULT '1970-01-01 00:00:00',
  `date_creation` datetime DEFAULT NULL,
  `name` varchar(255) DEFAULT NULL,
  `comment` text DEFAULT NULL,
  `author` varchar(255) DEFAULT NULL,
  `hit` int(10) unsigned NOT NULL DEFAULT 0,
  `filesize` mediumint(9) unsigned DEFAULT NULL,
  `width` smallint(9) unsigned DEFAULT NULL,
  `height` smallint(9) unsigned DEFAULT NULL,
  `coi` char(4) DEFAULT NULL,
  `representative_ext` varchar(4) DEFAULT NULL,
  `date_metadata_update` date DEFAULT NULL,
  `rating_score` float(5,2) unsigned DEFAULT NULL,
  `path` varchar(255) NOT NULL DEFAULT '',
  `storage_category_id` smallint(5) unsigned DEFAULT NULL,
  `level` tinyint(3) unsigned NOT NULL DEFAULT 0,
  `md5sum` char(32) DEFAULT NULL,
  `added_by` mediumint(8) unsigned NOT NULL DEFAULT 0,
  `rotation` tinyint(3) unsigned DEFAULT NULL,
  `latitude` double(8,6) DEFAULT NULL,
  `longitude` double(9,6) DEFAULT NULL,
  `lastmodified` timestamp NULL DEFAULT current_timestamp() ON UPDATE current_timestamp(),
  PRIMARY KEY (`id`),
  KEY `images_i7` (`path`)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb3 COLLATE=utf8mb3_general_ci
"""

# The columns s3watch reads, and a few more, for the demo's SQLite gallery.
IMAGES_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS {prefix}images (
  id INTEGER PRIMARY KEY {autoincrement},
  file VARCHAR(255) NOT NULL DEFAULT '',
  date_available DATETIME NOT NULL DEFAULT '1970-01-01 00:00:00',
  name VARCHAR(255) DEFAULT NULL,
  filesize INTEGER DEFAULT NULL,
  path VARCHAR(255) NOT NULL DEFAULT '',
  md5sum CHAR(32) DEFAULT NULL,
  level INTEGER NOT NULL DEFAULT 0
)
"""


def mariadb_from_environment() -> dict[str, Any]:
    """Return PyMySQL connection arguments for the MariaDB the tests and the benchmark use.

    S3WATCH_TEST_DB_HOST, _PORT, _USER and _PASSWORD override 127.0.0.1:3306 as root without a password.
    """
    return {
        "host": os.environ.get("S3WATCH_TEST_DB_HOST", "127.0.0.1"),
        "port": int(os.environ.get("S3WATCH_TEST_DB_PORT", "3306")),
        "user": os.environ.get("S3WATCH_TEST_DB_USER", "root"),
        "password": os.environ.get("S3WATCH_TEST_DB_PASSWORD", ""),
    }


def sample_photo(number: int, size: int = 0) -> bytes:
    """Return a unique, valid JPEG; `size` pads it (in a comment segment chain) to at least that many bytes."""
    comment = f"s3watch sample photo {number} {secrets.token_hex(8)}".encode()
    segments = [b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment]
    padding = max(0, size - len(_JPEG) - len(segments[0]))
    while padding > 0:
        chunk = min(padding, 65533 - 2) or 1
        body = os.urandom(chunk)
        segments.append(b"\xff\xfe" + (chunk + 2).to_bytes(2, "big") + body)
        padding -= chunk + 4
    return _JPEG[:2] + b"".join(segments) + _JPEG[2:]


class PiwigoImitation:
    """Adds photos to a gallery folder and images table in Piwigo's order of events.

    `connect` returns a DB-API connection (sqlite3 or PyMySQL) with autocommit; `mark` is its
    parameter placeholder.
    """

    def __init__(self, root: Path, connect: Callable[[], Any], mark: str = "?", prefix: str = "piwigo_", upload_dir: str = "upload") -> None:
        self.root = root
        self.connect = connect
        self.mark = mark
        self.prefix = prefix
        self.upload_dir = upload_dir

    def create_table(self) -> None:
        """Create the images table (the columns s3watch reads, and a few more) if missing."""
        autoincrement = "AUTOINCREMENT" if self.mark == "?" else "AUTO_INCREMENT"
        self._execute(IMAGES_TABLE_SQL.format(prefix=self.prefix, autoincrement=autoincrement), ())

    def place_file(self, data: bytes, name: str | None = None, day: datetime | None = None, ext: str = "jpg") -> str:
        """Move a photo into its day folder as Piwigo does (write in the buffer, then rename). Returns its gallery path."""
        day = day or datetime.now(timezone.utc)
        md5 = hashlib.md5(data).hexdigest()
        if name is None:
            name = f"{day:%Y%m%d%H%M%S}-{md5[:4]}{secrets.token_hex(2)}.{ext}"
        folder = self.root / self.upload_dir / f"{day:%Y}" / f"{day:%m}" / f"{day:%d}"
        buffer = self.root / self.upload_dir / "buffer"
        buffer.mkdir(parents=True, exist_ok=True)
        temporary = buffer / f"{md5}.part"
        temporary.write_bytes(data)
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, folder / name)
        return str((folder / name).relative_to(self.root))

    def insert_row(self, path: str, md5: str, size: int, file: str = "photo.jpg") -> int:
        """Insert the images row of a placed file, as Piwigo does after the file is in place. Returns the image id."""
        sql = (
            f"INSERT INTO {self.prefix}images (file, date_available, name, filesize, path, md5sum) "
            f"VALUES ({', '.join([self.mark] * 6)})"
        )
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        return self._execute(sql, (file, now, Path(file).stem, size // 1024, f"./{path}", md5))

    def add_photo(self, data: bytes, name: str | None = None, file: str = "photo.jpg") -> tuple[int, str]:
        """Add a photo the whole way: file moved in, then its row. Returns (image id, gallery path)."""
        path = self.place_file(data, name=name)
        image_id = self.insert_row(path, hashlib.md5(data).hexdigest(), len(data), file=file)
        return image_id, path

    def _execute(self, sql: str, params: tuple[Any, ...]) -> int:
        connection = self.connect()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            row_id = int(cursor.lastrowid or 0)
            connection.commit()
            return row_id
        finally:
            connection.close()


def _sqlite_connect(path: Path) -> Callable[[], sqlite3.Connection]:
    return lambda: sqlite3.connect(path)


def _write_config(directory: Path, gallery: Path, database: Path, endpoint: str, access_key: str, secret_key: str) -> Path:
    config = directory / "s3watch.yaml"
    config.write_text(
        "# Written by `s3watch demo`.\n"
        "piwigo:\n"
        f"  root: {gallery}\n"
        "  database:\n"
        f"    url: sqlite:///{str(database).lstrip('/')}\n"
        "    table_prefix: piwigo_\n"
        "monitor:\n"
        "  poll_interval: 1\n"
        "s3:\n"
        "  bucket: gallery-originals\n"
        f"  endpoint_url: {endpoint}\n"
        f"  access_key_id: {access_key}\n"
        f"  secret_access_key: {secret_key}\n"
        "links:\n"
        "  mode: presigned\n"
        "  expires: 3600\n"
        f"state_dir: {directory / 'state'}\n"
        # Not the default /var/spool/s3watch, where the demo's agent would take a real agent's lists.
        f"spool_dir: {directory / 'spool'}\n"
    )
    config.chmod(0o600)
    return config


def run_demo(directory: Path | None, photos: int) -> int:
    """Run the demo end to end and print the status. Returns 0 when every photo reached the bucket."""
    from .logs import print_problem
    from .seaweed import SeaweedError, SeaweedFS

    if not 1 <= photos <= 1000:
        print("s3watch demo: error: --photos must be a whole number from 1 to 1000", file=sys.stderr)
        return 2
    work = directory or Path(tempfile.mkdtemp(prefix="s3watch-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    gallery = work / "gallery"
    # Piwigo creates upload/ at its first upload; made here so that the demo shows photos found
    # through inotify rather than by the table poll.
    (gallery / "upload").mkdir(parents=True, exist_ok=True)
    database = work / "piwigo.db"
    piwigo = PiwigoImitation(gallery, _sqlite_connect(database))
    piwigo.create_table()

    print(f"demo folder: {work}")
    server = SeaweedFS(work / "seaweedfs")
    try:
        server.start()
    except SeaweedError as error:
        print_problem("error", str(error))
        return 1
    agent: subprocess.Popen[bytes] | None = None
    try:
        server.create_bucket("gallery-originals")
        print(f"SeaweedFS S3 endpoint: {server.endpoint_url} (bucket gallery-originals)")
        config = _write_config(work, gallery, database, server.endpoint_url, server.access_key, server.secret_key)
        log_path = work / "agent.log"
        with open(log_path, "ab") as log:
            agent = subprocess.Popen([*_S3WATCH, "--config", str(config), "run"], stdout=log, stderr=subprocess.STDOUT)
        print(f"agent started (pid {agent.pid}); its log: {log_path}")

        # Photos added before the watch is in place would be found by the table poll instead.
        _wait(lambda: "watching" in log_path.read_text(errors="replace"), 30, agent, f"the agent to start watching {gallery / 'upload'}")

        for number in range(1, photos + 1):
            data = sample_photo(number, size=200_000)
            image_id, path = piwigo.add_photo(data, file=f"IMG_{number:04d}.jpg")
            print(f"added photo {image_id}: {path}")

        def uploaded() -> bool:
            result = subprocess.run([*_S3WATCH, "--config", str(config), "status", "--json"], capture_output=True, text=True)
            return result.returncode == 0 and json.loads(result.stdout)["counts"]["uploaded"] >= photos

        _wait(uploaded, 60, agent, f"all {photos} photos to be uploaded")
        print()
        subprocess.run([*_S3WATCH, "--config", str(config), "status"], check=False)
        print(f"\nall {photos} photos are in the bucket; the configuration used is {config}")
        print("the links work until the demo stops its SeaweedFS server, which it does now")
        return 0
    except TimeoutError as error:
        print(f"s3watch demo: error: {error}; see {work / 'agent.log'}", file=sys.stderr)
        return 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        server.stop()


def _wait(condition: Callable[[], bool], timeout: float, agent: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise TimeoutError(f"the agent exited with status {agent.returncode}")
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
