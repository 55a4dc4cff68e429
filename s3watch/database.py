"""Read-only access to Piwigo's images table, in MySQL/MariaDB or SQLite, with reconnection."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pymysql

from .piwigo import DatabaseSettings, row_path


class DatabaseError(Exception):
    """The database could not be reached or queried; the message names the failure and the fix."""


class DatabaseUnreachable(DatabaseError):
    """The database server could not be reached: it may be down or restarting, so callers wait for it."""


class TableMissing(DatabaseError):
    """A table that only some Piwigo versions have (config, image_format) does not exist."""


class NoSuchTable(DatabaseError):
    """A table every Piwigo has does not exist: the prefix is wrong, or this is not Piwigo's database."""


@dataclass(frozen=True)
class ImageRow:
    """One photo's row of the images table, as s3watch needs it."""

    id: int
    path: str  # relative to the gallery root, without the leading './'
    md5sum: str | None


@dataclass(frozen=True)
class FormatRow:
    """One extra format of a photo (Piwigo's image_format table), with its photo's path."""

    format_id: int
    image_id: int
    ext: str
    photo_path: str  # the photo's images.path without './'


class ImagesTable:
    """The gallery's images table. Never writes.

    A connection that dropped (server restart, idle past wait_timeout) is reopened once per query.
    Not thread-safe: use one instance per thread.
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        prefix = settings.table_prefix
        if not re.fullmatch(r"\w*", prefix):
            raise DatabaseError(f"table prefix {prefix!r} is invalid: use letters, digits and '_' only")
        self.prefix = prefix
        self.table = f"{prefix}images"
        self._connection: Any = None

    def connect(self) -> None:
        """Open the connection and check that the images table exists.

        Raises DatabaseError saying what failed: unreachable server, refused login, missing database or table.
        """
        self.close()
        settings = self.settings
        try:
            if settings.kind == "sqlite":
                assert settings.sqlite_path is not None
                if not settings.sqlite_path.is_file():
                    raise DatabaseError(f"SQLite database {settings.sqlite_path} not found: check piwigo.database.url")
                self._connection = sqlite3.connect(f"{settings.sqlite_path.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
            else:
                self._connection = pymysql.connect(
                    host=settings.host,
                    port=settings.port,
                    unix_socket=settings.unix_socket,
                    user=settings.user,
                    password=settings.password or "",
                    database=settings.database,
                    charset="utf8mb4",
                    connect_timeout=10,
                    read_timeout=60,
                    write_timeout=60,
                    # Autocommit so that no long-lived transaction snapshot hides new rows in InnoDB.
                    autocommit=True,
                )
        except pymysql.err.OperationalError as error:
            raise _mysql_error(error, settings) from None
        except sqlite3.Error as error:
            raise DatabaseError(f"could not open SQLite database {settings.sqlite_path}: {error}") from None

        try:
            self._query(f"SELECT id, path, md5sum FROM {self.table} WHERE 1=0", ())
        except NoSuchTable:
            self.close()
            raise NoSuchTable(f"table {self.table} not found in {settings.describe()}: "
                              f"check the table prefix ({self.prefix!r}) and that this is a Piwigo database") from None
        except DatabaseError as error:
            self.close()
            raise DatabaseError(f"table {self.table} not found or unreadable in {settings.describe()} ({error}): check the table prefix") from None

    def close(self) -> None:
        """Close the connection, if open."""
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in any way
                pass
            self._connection = None

    def find_by_paths(self, paths: Iterable[str]) -> dict[str, ImageRow]:
        """Look up the rows of files given by gallery-relative path.

        Returns the rows found, keyed by the path as given. Raises DatabaseError.
        """
        wanted = list(paths)
        found: dict[str, ImageRow] = {}
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            candidates = [f"./{path}" for path in batch] + batch
            marks = ", ".join([self._mark] * len(candidates))
            rows = self._query(f"SELECT id, path, md5sum FROM {self.table} WHERE path IN ({marks})", candidates)
            for row in rows:
                image = _image(row)
                if image.path in batch:
                    found[image.path] = image
        return found

    def find_by_ids(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        """Look up rows by image id. Returns the rows found, keyed by id. Raises DatabaseError."""
        wanted = list(ids)
        found: dict[int, ImageRow] = {}
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            marks = ", ".join([self._mark] * len(batch))
            for row in self._query(f"SELECT id, path, md5sum FROM {self.table} WHERE id IN ({marks})", batch):
                image = _image(row)
                found[image.id] = image
        return found

    def rows_after(self, image_id: int, limit: int = 1000) -> list[ImageRow]:
        """Return up to `limit` rows with an id above `image_id`, lowest first. Raises DatabaseError."""
        rows = self._query(f"SELECT id, path, md5sum FROM {self.table} WHERE id > {self._mark} ORDER BY id LIMIT {int(limit)}", (image_id,))
        return [_image(row) for row in rows]

    def iter_rows(self, since: str | None = None, id_range: tuple[int, int] | None = None,
                  album_ids: list[int] | None = None, page: int = 5000) -> Iterator[ImageRow]:
        """Yield the rows matching every given selector, lowest id first, reading `page` rows at a time.

        `since` is a date or datetime compared with date_available; `album_ids` selects photos
        linked to any of those albums (Piwigo's image_category table). Raises DatabaseError.
        """
        conditions: list[str] = []
        params: list[Any] = []
        if since is not None:
            conditions.append(f"date_available >= {self._mark}")
            params.append(since)
        if id_range is not None:
            conditions.append(f"id BETWEEN {self._mark} AND {self._mark}")
            params.extend(id_range)
        if album_ids is not None:
            if not album_ids:
                return
            marks = ", ".join([self._mark] * len(album_ids))
            conditions.append(f"id IN (SELECT image_id FROM {self.prefix}image_category WHERE category_id IN ({marks}))")
            params.extend(album_ids)

        last = 0
        while True:
            where = " AND ".join([f"id > {self._mark}", *conditions])
            rows = self._query(f"SELECT id, path, md5sum FROM {self.table} WHERE {where} ORDER BY id LIMIT {int(page)}", [last, *params])
            for row in rows:
                yield _image(row)
            if len(rows) < page:
                return
            last = int(rows[-1][0])

    def album_tree(self) -> dict[int, int | None]:
        """Return every album's parent album id (None at the top), from Piwigo's categories table. Raises DatabaseError."""
        rows = self._query(f"SELECT id, id_uppercat FROM {self.prefix}categories", ())
        return {int(row[0]): int(row[1]) if row[1] is not None else None for row in rows}

    def tagged_rows(self, tag: str) -> list[ImageRow]:
        """Return the rows of photos carrying a tag, matched by its name or URL name (tags and image_tag tables).

        Raises DatabaseError.
        """
        sql = (
            f"SELECT i.id, i.path, i.md5sum FROM {self.table} i "
            f"JOIN {self.prefix}image_tag it ON it.image_id = i.id "
            f"JOIN {self.prefix}tags t ON t.id = it.tag_id "
            f"WHERE t.name = {self._mark} OR t.url_name = {self._mark} ORDER BY i.id"
        )
        return [_image(row) for row in self._query(sql, (tag, tag))]

    def original_resize(self) -> bool:
        """Return whether Piwigo's "resize after upload" option (original_resize in the config table) is on.

        Raises TableMissing when the gallery has no config table, DatabaseError otherwise.
        """
        rows = self._query(f"SELECT value FROM {self.prefix}config WHERE param = 'original_resize'", (), optional_table=True)
        return bool(rows) and str(rows[0][0]).strip().lower() in ("true", "1")

    def formats_after(self, format_id: int, limit: int = 1000) -> list[FormatRow]:
        """Return up to `limit` extra formats with a format_id above `format_id`, lowest first.

        Raises TableMissing before Piwigo 13 (no image_format table), DatabaseError otherwise.
        """
        sql = (
            f"SELECT f.format_id, f.image_id, f.ext, i.path FROM {self.prefix}image_format f "
            f"JOIN {self.table} i ON i.id = f.image_id WHERE f.format_id > {self._mark} ORDER BY f.format_id LIMIT {int(limit)}"
        )
        return [_format(row) for row in self._query(sql, (format_id,), optional_table=True)]

    def formats_of(self, image_ids: Iterable[int]) -> list[FormatRow]:
        """Return the extra formats of the given photos. Raises TableMissing or DatabaseError."""
        wanted = list(image_ids)
        found: list[FormatRow] = []
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            marks = ", ".join([self._mark] * len(batch))
            sql = (
                f"SELECT f.format_id, f.image_id, f.ext, i.path FROM {self.prefix}image_format f "
                f"JOIN {self.table} i ON i.id = f.image_id WHERE f.image_id IN ({marks}) ORDER BY f.format_id"
            )
            found.extend(_format(row) for row in self._query(sql, batch, optional_table=True))
        return found

    def max_format_id(self) -> int:
        """Return the highest format_id, or 0. Raises TableMissing or DatabaseError."""
        rows = self._query(f"SELECT MAX(format_id) FROM {self.prefix}image_format", (), optional_table=True)
        return int(rows[0][0] or 0) if rows else 0

    def max_id(self) -> int:
        """Return the highest image id, or 0 for an empty table. Raises DatabaseError."""
        rows = self._query(f"SELECT MAX(id) FROM {self.table}", ())
        return int(rows[0][0] or 0) if rows else 0

    @property
    def _mark(self) -> str:
        return "?" if self.settings.kind == "sqlite" else "%s"

    def _query(self, sql: str, params: Any, optional_table: bool = False) -> list[tuple[Any, ...]]:
        """Run a read query, reconnecting once if the connection dropped.

        Raises TableMissing for a missing table when `optional_table` is set, DatabaseError otherwise.
        """
        for attempt in (1, 2):
            if self._connection is None:
                self.connect()
            try:
                if self.settings.kind == "sqlite":
                    return list(self._connection.execute(sql, tuple(params)).fetchall())
                with self._connection.cursor() as cursor:
                    cursor.execute(sql, tuple(params))
                    return list(cursor.fetchall())
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as error:
                self.close()
                if attempt == 2:
                    raise _mysql_error(error, self.settings) from None
            except pymysql.err.ProgrammingError as error:
                if optional_table and error.args and error.args[0] == 1146:
                    raise TableMissing(str(error.args[-1])) from None
                if error.args and error.args[0] == 1146:
                    # The missing table may be another one than images, such as categories for backfill --album.
                    raise NoSuchTable(f"{error.args[-1]}: check the table prefix ({self.prefix!r}) and that this is a Piwigo database") from None
                raise DatabaseError(f"query on {self.table} failed: {error.args[-1]}") from None
            except sqlite3.OperationalError as error:
                if optional_table and "no such table" in str(error):
                    raise TableMissing(str(error)) from None
                self.close()
                if attempt == 2:
                    raise DatabaseError(f"query on {self.table} in {self.settings.sqlite_path} failed: {error}") from None
            except sqlite3.Error as error:
                self.close()
                if attempt == 2:
                    raise DatabaseError(f"query on {self.table} in {self.settings.sqlite_path} failed: {error}") from None
        raise AssertionError("unreachable")


def _image(row: tuple[Any, ...]) -> ImageRow:
    md5 = row[2].strip().lower() if isinstance(row[2], str) and row[2].strip() else None
    return ImageRow(id=int(row[0]), path=row_path(str(row[1])), md5sum=md5)


def _format(row: tuple[Any, ...]) -> FormatRow:
    return FormatRow(format_id=int(row[0]), image_id=int(row[1]), ext=str(row[2]).lower(), photo_path=row_path(str(row[3])))


UNREACHABLE_CODES = (2002, 2003, 2006, 2013, 2055)  # client errors: no connection, or it was lost


def _mysql_error(error: Exception, settings: DatabaseSettings) -> DatabaseError:
    """Return the DatabaseError for a PyMySQL error (DatabaseUnreachable when there was no connection)."""
    code = error.args[0] if error.args and isinstance(error.args[0], int) else None
    message = _explain_mysql_error(error, settings)
    return DatabaseUnreachable(message) if code in UNREACHABLE_CODES or code is None else DatabaseError(message)


def _explain_mysql_error(error: Exception, settings: DatabaseSettings) -> str:
    """Turn a PyMySQL error into one line naming what failed and what to check."""
    code = error.args[0] if error.args and isinstance(error.args[0], int) else None
    where = settings.describe()
    if code == 1045:
        source = f" (the password is from {settings.password_source}, which takes precedence)" if settings.password_source else ""
        return f"database login refused for {where}: check the user and password{source}"
    if code == 1049:
        return f"database {settings.database!r} not found on {where}: check the database name (db_base in Piwigo's database.inc.php, or the one in piwigo.database.url)"
    if code == 1044:
        # MariaDB returns this error, not "unknown database", to a user without rights on a mistyped name.
        return (f"database user has no access to database {settings.database!r} on {where}: check the database name "
                "(db_base in Piwigo's database.inc.php, or the one in piwigo.database.url), then grant SELECT on the Piwigo tables")
    if code == 1142:
        return f"database user has no read access on {where}: grant SELECT on the Piwigo tables"
    if code in (2003, 2002, 2006, 2013, 2055) or code is None:
        return f"database server {where} could not be reached: is MariaDB running and is the address right?"
    return f"database error on {where}: {error.args[-1] if error.args else error}"
