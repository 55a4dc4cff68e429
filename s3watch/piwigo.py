"""Piwigo's gallery layout: its database settings, its paths and which files are originals."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

from .config import Config, ConfigError

# Piwigo writes its database settings here at install time.
DATABASE_INC = Path("local/config/database.inc.php")

# Socket paths of MariaDB on Debian, Fedora and upstream builds. PHP's mysqli connects to the
# socket for db_host 'localhost', and so does s3watch, because 'piwigo'@'localhost' may not match a TCP login.
DEFAULT_SOCKETS = ("/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock", "/var/lib/mysql/mysql.sock", "/tmp/mysql.sock")

# Folders under the upload directory that never hold an original: Piwigo's chunk buffer, and
# the representative pictures and extra formats it keeps beside a photo.
IGNORED_FOLDERS = {"pwg_representative", "pwg_format"}
BUFFER_FOLDER = "buffer"

# Names that are never originals: Piwigo's guard page, and the temporary names of uploaders and editors.
IGNORED_NAMES = {"index.htm", "index.html", "index.php"}
TEMPORARY_SUFFIXES = (".part", ".tmp", ".temp", ".chunk", ".merged", ".block", ".swp", "~", ".crdownload")


@dataclass(frozen=True)
class DatabaseSettings:
    """How to reach the images table: a MySQL/MariaDB server or an SQLite file."""

    kind: str  # "mysql" or "sqlite"
    table_prefix: str
    host: str | None = None
    port: int = 3306
    unix_socket: str | None = None
    user: str | None = None
    password: str | None = None
    database: str | None = None
    sqlite_path: Path | None = None
    password_source: str | None = None  # where the password came from when not from the usual place, for messages

    def describe(self) -> str:
        """Return where the database is, for messages; never includes the password."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.sqlite_path}"
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"mysql://{self.user}@{where}/{self.database}"

    def __repr__(self) -> str:
        return f"DatabaseSettings({self.describe()}, table_prefix={self.table_prefix!r})"


def database_settings(config: Config) -> DatabaseSettings:
    """Resolve the database settings from the configuration, or from Piwigo's database.inc.php.

    Returns the settings. Raises ConfigError when the URL is invalid, or when database.inc.php
    is missing, unreadable or lacks a setting.
    """
    from dataclasses import replace

    from .config import read_credential

    if config.piwigo.database is not None:
        settings = parse_database_url(config.piwigo.database.url, config.piwigo.database.table_prefix)
    else:
        settings = read_database_inc(config.piwigo.root)
    password = read_credential("db_password")
    if password is not None and settings.kind == "mysql":
        settings = replace(settings, password=password, password_source="the db_password credential in $CREDENTIALS_DIRECTORY")
    return settings


def parse_database_url(url: str, table_prefix: str) -> DatabaseSettings:
    """Parse `mysql://user:password@host:port/db` or `sqlite:///PATH` into settings.

    Raises ConfigError naming the problem; the message never repeats the password.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        # sqlite:///var/x.db and SQLAlchemy's sqlite:////var/x.db both name /var/x.db.
        path = "/" + unquote(parts.path).lstrip("/")
        if not parts.path.startswith("/") or parts.netloc:
            raise ConfigError("piwigo.database.url: write an SQLite database as sqlite:///ABSOLUTE/PATH (three slashes)")
        return DatabaseSettings(kind="sqlite", table_prefix=table_prefix, sqlite_path=Path(path))

    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise ConfigError("piwigo.database.url has no database name: end it with /DATABASE, for example mysql://piwigo:PASSWORD@127.0.0.1/piwigo")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ConfigError(f"piwigo.database.url has an invalid port in host {parts.netloc.rpartition('@')[2]!r}: write it as HOST:3306") from None
    options = parse_qs(parts.query)
    socket = options.get("unix_socket", [None])[0]
    host = parts.hostname or "localhost"
    if socket is None and host == "localhost" and parts.port is None:
        socket = _default_socket()
    return DatabaseSettings(
        kind="mysql",
        table_prefix=table_prefix,
        host=host,
        port=port,
        unix_socket=socket,
        user=unquote(parts.username) if parts.username else "root",
        password=unquote(parts.password) if parts.password else "",
        database=database,
    )


def read_database_inc(root: Path) -> DatabaseSettings:
    """Read the database settings Piwigo's installer wrote to local/config/database.inc.php.

    Returns the settings. Raises ConfigError when the file is missing, unreadable or lacks a setting.
    """
    path = root / DATABASE_INC
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: set piwigo.root to the gallery's root folder, or set piwigo.database.url") from None
    except OSError as error:
        raise ConfigError(f"{path} could not be read ({error.strerror}): give this user read access, or set piwigo.database.url") from None

    values: dict[str, str] = {}
    # PHP string literals in either quote style, with backslash escapes.
    literal = r"""(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")"""
    for match in re.finditer(r"\$conf\[\s*['\"](\w+)['\"]\s*\]\s*=\s*" + literal + r"\s*;", text):
        values[match.group(1)] = _php_unescape(match.group(2), match.group(3))
    for match in re.finditer(r"\$conf\[\s*['\"](db_\w+|dblayer)['\"]\s*\]\s*=", text):
        if match.group(1) not in values:
            # An expression (concatenation, constant, getenv) rather than one string literal.
            raise ConfigError(f"{path}: {match.group(1)} is not a plain PHP string, which s3watch cannot evaluate: set piwigo.database.url")
    prefix = re.search(r"\$prefixeTable\s*=\s*" + literal + r"\s*;", text)

    missing = [name for name in ("db_base", "db_user", "db_host") if name not in values]
    if prefix is None:
        missing.append("$prefixeTable")
    if missing or prefix is None:
        raise ConfigError(f"{path} could not be parsed: missing {', '.join(missing)}; set piwigo.database.url instead")
    table_prefix = _php_unescape(prefix.group(1), prefix.group(2))

    layer = values.get("dblayer", "mysqli")
    if layer in ("sqlite", "pdo_sqlite", "sqlite3"):
        # NOTE: the place of Piwigo 2.5's SQLite file (_data/db/<db_base>.db) is an assumption,
        # checked against neither a 2.5 gallery nor its source; piwigo.database.url overrides it.
        sqlite_path = root / "_data" / "db" / f"{values['db_base']}.db"
        return DatabaseSettings(kind="sqlite", table_prefix=table_prefix, sqlite_path=sqlite_path)
    if layer not in ("mysqli", "mysql"):
        raise ConfigError(f"{path}: database layer {layer!r} is not supported: set piwigo.database.url")

    host, port, socket = _split_db_host(values["db_host"])
    return DatabaseSettings(
        kind="mysql",
        table_prefix=table_prefix,
        host=host,
        port=port,
        unix_socket=socket,
        user=values["db_user"],
        password=values.get("db_password", ""),
        database=values["db_base"],
    )


def _php_unescape(single: str | None, double: str | None) -> str:
    if single is not None:
        return single.replace("\\'", "'").replace("\\\\", "\\")
    return (double or "").replace('\\"', '"').replace("\\\\", "\\").replace("\\$", "$")


def _split_db_host(value: str) -> tuple[str | None, int, str | None]:
    """Split Piwigo's db_host, which is `host`, `host:port`, or a socket path starting with '/'."""
    if value.startswith("/"):
        return None, 3306, value
    host, _, port = value.partition(":")
    if port.startswith("/"):
        return host or "localhost", 3306, port
    if port:
        if not port.isdigit():
            raise ConfigError(f"db_host {value!r} in database.inc.php has an invalid port: set piwigo.database.url")
        return host, int(port), None
    if host == "localhost":
        return host, 3306, _default_socket()
    return host, 3306, None


def _default_socket() -> str | None:
    for candidate in DEFAULT_SOCKETS:
        if os.path.exists(candidate):
            return candidate
    return None


def gallery_path(root: Path, absolute: str) -> str | None:
    """Return a file's path relative to the gallery root, as the images table stores it without './'.

    Returns None for a path outside the root.
    """
    try:
        relative = PurePosixPath(absolute).relative_to(PurePosixPath(root))
    except ValueError:
        return None
    return str(relative)


def is_original(path: str, upload_dir: str) -> bool:
    """Tell whether a gallery-relative file path may be a photo's original.

    Everything in the chunk buffer, representative and format folders, hidden names,
    temporary names and the guard pages Piwigo writes is not.
    """
    parts = PurePosixPath(path).parts
    upload_parts = PurePosixPath(upload_dir).parts
    if parts[: len(upload_parts)] != upload_parts or len(parts) <= len(upload_parts):
        return False
    inside = parts[len(upload_parts):]
    if inside[0] == BUFFER_FOLDER:
        return False
    if any(part.startswith(".") or part in IGNORED_FOLDERS for part in inside):
        return False
    name = inside[-1]
    if name.lower() in IGNORED_NAMES:
        return False
    return not name.lower().endswith(TEMPORARY_SUFFIXES)


def format_path(photo_path: str, ext: str) -> str:
    """Return where Piwigo (13 and later) stores a photo's extra format: `pwg_format/<name>.<ext>` beside the photo."""
    photo = PurePosixPath(photo_path)
    return str(photo.parent / "pwg_format" / f"{photo.stem}.{ext}")


def is_format_file(path: str, upload_dir: str) -> bool:
    """Tell whether a gallery-relative path is in a `pwg_format` folder of the upload directory."""
    parts = PurePosixPath(path).parts
    return len(parts) >= 3 and parts[0] == PurePosixPath(upload_dir).parts[0] and parts[-2] == "pwg_format" and not parts[-1].startswith(".")


def row_path(column: str) -> str:
    """Return the images.path column without its leading './'."""
    while column.startswith("./"):
        column = column[2:]
    return column
