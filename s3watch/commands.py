"""The batch-mode commands: `enqueue`, `backfill` and `url`."""

from __future__ import annotations

import argparse
import itertools
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Iterable, Iterator

from .batch import Gallery, album_with_descendants, skipped_as
from .config import Config
from .database import DatabaseError, ImageRow, ImagesTable
from .journal import JournalError, JournalState, Upload, read_journal
from .logs import print_problem
from .piwigo import database_settings, row_path
from .spool import SpoolError, parse_entry, write_list
from .status import upload_status
from .uploader import ALREADY_PRESENT_HINT, Uploader, UploadFailed

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DRY_RUN_SHOWN = 10


class UsageError(Exception):
    """Bad arguments or input; the message names the value and the fix."""


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _error(message: str) -> None:
    print_problem("error", message)


def _checked_entries(lines: Iterable[str], source: str, gallery: Gallery) -> Iterator[str]:
    """Yield the entries to write, raising UsageError for an entry the agent would certainly reject.

    That is an invalid image id, a bare number (a path to no file, most likely meant as an id),
    and a path outside the gallery, to no file, or to something else than a regular file. A
    file this user may not read is left to the agent, which may.
    """
    for number, line in enumerate(lines, start=1):
        where = f"argument {number}" if source == "argument" else f"{source} line {number}"
        if "\x00" in line:
            # No path contains a NUL byte, and the file system calls below would raise ValueError on one.
            raise UsageError(f"{where}: a NUL byte, so this is not a list: give paths or id:N as text, one a line")
        entry = parse_entry(number, line)
        if entry is None:
            continue
        if entry.path is None and entry.image_id is None:
            raise UsageError(f"{where}: invalid image id {entry.text!r}: write id:1234")
        if entry.path is not None:
            if entry.path.isdigit():
                raise UsageError(f"{where}: {entry.path!r} is read as a file's path: for the photo with image id {entry.path}, write id:{entry.path}")
            relative = gallery.relative_path(entry.path)
            problem = "outside the gallery" if relative is None else gallery.check_file(relative)
            if problem == "no such file":
                raise UsageError(f"{where}: {entry.path}: no such file in the gallery {gallery.root}: "
                                 "paths start at the gallery root, as in upload/2024/05/14/20240514093000-1a2b3c4d.jpg")
            if problem is not None and not problem.startswith("cannot be read"):
                raise UsageError(f"{where}: {entry.path}: {problem}")
        yield entry.text


def _read_lines(name: str) -> Iterator[str]:
    if name == "-":
        yield from sys.stdin
        return
    try:
        with open(name, encoding="utf-8") as handle:
            yield from handle
    except FileNotFoundError:
        raise UsageError(f"--from {name}: file not found") from None
    except UnicodeDecodeError:
        raise UsageError(f"{name} is not UTF-8 text: give a list of paths or id:N, one a line") from None
    except OSError as error:
        raise UsageError(f"{name} could not be read ({error.strerror})") from None


def enqueue(config: Config, entries: list[str], from_file: str | None) -> int:
    """Write the given entries (and those of `from_file`) into the spool directory as one list.

    Returns the exit status. Nothing is written when an entry is invalid or the input cannot be read.
    """
    if not entries and from_file is None:
        _error("nothing to enqueue: give ENTRY arguments or --from FILE ('-' for standard input)")
        return EXIT_USAGE
    gallery = Gallery(config.piwigo.root, config.piwigo.upload_dir)
    sources: list[Iterable[str]] = [_checked_entries(entries, "argument", gallery)]
    if from_file is not None:
        sources.append(_checked_entries(_read_lines(from_file), "standard input" if from_file == "-" else from_file, gallery))
    try:
        path, count = write_list(config.spool_dir, itertools.chain(*sources))
    except UsageError as error:
        _error(str(error))
        return EXIT_USAGE
    except SpoolError as error:
        _error(str(error))
        return EXIT_FAILED
    if count == 0:
        path.unlink(missing_ok=True)
        _error("nothing to enqueue: the input holds only blank lines and comments")
        return EXIT_USAGE
    _announce_list(path, count)
    return EXIT_OK


def _announce_list(path: Path, count: int) -> None:
    print(f"wrote {count} {'entry' if count == 1 else 'entries'} to {path}")
    print(f"the agent queues them at its next look at the spool; its report will be {path.parent / 'done' / path.name}.report")


def _parse_since(text: str) -> str:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time())
        except ValueError:
            raise UsageError(f"--since {text!r} is not a date: write YYYY-MM-DD or 'YYYY-MM-DD HH:MM:SS'") from None
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _parse_ids(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    if not first.strip().isdigit() or (last and not last.strip().isdigit()):
        raise UsageError(f"--ids {text!r} is not a range: write FIRST-LAST, for example 100-250")
    low, high = int(first), int(last or first)
    if low > high:
        raise UsageError(f"--ids {text!r} is empty: the first id must not be above the last")
    return low, high


def backfill(config: Config, arguments: argparse.Namespace) -> int:
    """Write a list of the photos selected from the images table, or print them with --dry-run.

    Returns the exit status.
    """
    try:
        if arguments.recursive and arguments.album is None:
            raise UsageError("--recursive goes with --album ID")
        if not (arguments.all or arguments.since or arguments.album is not None or arguments.ids):
            raise UsageError("choose the photos: --all, --since DATE, --album ID [--recursive] or --ids FIRST-LAST")
        if arguments.all and (arguments.since or arguments.album is not None or arguments.ids):
            raise UsageError("--all cannot be combined with another selector")
        since = _parse_since(arguments.since) if arguments.since else None
        id_range = _parse_ids(arguments.ids) if arguments.ids else None
    except UsageError as error:
        _error(str(error))
        return EXIT_USAGE

    table = ImagesTable(database_settings(config))
    try:
        table.connect()
        albums = None
        if arguments.album is not None:
            tree = table.album_tree()
            if arguments.album not in tree:
                _error(f"album {arguments.album} not found in {table.prefix}categories: check the album id in Piwigo's album list")
                return EXIT_USAGE
            albums = album_with_descendants(tree, arguments.album) if arguments.recursive else [arguments.album]
        rows = table.iter_rows(since=since, id_range=id_range, album_ids=albums)
        selection = _Selection(rows, _journal_or_none(config))

        if arguments.dry_run:
            for row in itertools.islice(selection.rows, DRY_RUN_SHOWN):
                print(f"id:{row.id}\t{row_path(row.path)}")
            for _row in selection.rows:
                pass  # the rest only for the counts
            later = "" if selection.journal_read else "; photos already uploaded or queued are skipped when the agent reads the list"
            print(f"{selection.summary()} (dry run: nothing queued{later})")
            return EXIT_OK

        path, count = write_list(config.spool_dir, (f"id:{row.id}" for row in selection.rows), keep_empty=False)
    except DatabaseError as error:
        _error(str(error))
        return EXIT_FAILED
    except SpoolError as error:
        _error(str(error))
        return EXIT_FAILED
    finally:
        table.close()

    if count == 0:
        print(f"{selection.summary()}: nothing queued")
        return EXIT_OK
    print(selection.summary())
    _announce_list(path, count)
    return EXIT_OK


class _Selection:
    """The rows backfill selected, without the photos the journal already has as uploaded or queued.

    The agent would skip those when it reads the list. Leaving them out makes a second backfill
    of the same photos write no list and print why. `rows` yields the rows left, and the counts
    are complete once it ends.
    """

    def __init__(self, rows: Iterable[ImageRow], state: JournalState | None) -> None:
        self.journal_read = state is not None
        self.selected = 0
        self.left_out = {"already uploaded": 0, "already queued": 0}
        self.rows = self._filter(rows, state)

    def _filter(self, rows: Iterable[ImageRow], state: JournalState | None) -> Iterator[ImageRow]:
        for row in rows:
            self.selected += 1
            reason = skipped_as(state.uploads.get(row_path(row.path))) if state is not None else None
            if reason is None:
                yield row
            else:
                self.left_out[reason] += 1

    def summary(self) -> str:
        """Return the line that counts the selected photos and those left out, such as '12 photos selected, 10 already uploaded'."""
        parts = [f"{count} {reason}" for reason, count in self.left_out.items() if count]
        return ", ".join([f"{_plural(self.selected, 'photo')} selected", *parts])


def _journal_or_none(config: Config) -> JournalState | None:
    """Return the journal's state, or None when this user cannot read it: the agent then does the skipping alone."""
    try:
        state, _ = read_journal(config.journal_path)
    except JournalError:
        return None
    return state


def url(config: Config, text: str) -> int:
    """Print the download link of an uploaded photo (exit 0), or why it is not uploaded (exit 1).

    Only the link goes to standard output, so that a script can take it from there.
    """
    entry = parse_entry(1, text)
    if entry is None or (entry.path is None and entry.image_id is None):
        _error(f"invalid entry {text!r}: give a photo's path or id:1234")
        return EXIT_USAGE

    try:
        state, _ = read_journal(config.journal_path)
    except JournalError as error:
        _error(str(error))
        return EXIT_FAILED

    if entry.image_id is not None:
        table = ImagesTable(database_settings(config))
        try:
            table.connect()
            row = table.find_by_ids([entry.image_id]).get(entry.image_id)
        except DatabaseError as error:
            _error(str(error))
            return EXIT_FAILED
        finally:
            table.close()
        if row is not None:
            path = row.path
        else:
            # The photo may have been deleted in Piwigo since: its copy is what the admin is after.
            found = _path_of_image(state, entry.image_id)
            if found is None:
                print(f"not uploaded: no images row with id {entry.image_id}, and s3watch has no record of that image", file=sys.stderr)
                return EXIT_FAILED
            print(f"note: image {entry.image_id} has no images row any more (deleted in Piwigo?); its record in the journal follows",
                  file=sys.stderr)
            path = found
    else:
        relative = Gallery(config.piwigo.root, config.piwigo.upload_dir).relative_path(entry.path or "")
        if relative is None:
            print(f"not uploaded: {entry.path} is outside the gallery {config.piwigo.root}", file=sys.stderr)
            return EXIT_FAILED
        path = relative

    upload = state.uploads.get(path)
    if upload is None:
        if entry.image_id is not None:
            print(f"not uploaded: s3watch has no record of {path}, the file of images row {entry.image_id}: queue it with: s3watch enqueue id:{entry.image_id}", file=sys.stderr)
        elif path.isdigit():
            print(f"not uploaded: s3watch has no record of a file named {path}; for the photo with image id {path}, write id:{path}", file=sys.stderr)
        elif not (config.piwigo.root / path).exists():
            print(f"not uploaded: s3watch has no record of {path}, and there is no such file in the gallery {config.piwigo.root}", file=sys.stderr)
        else:
            print(f"not uploaded: s3watch has no record of {path}: queue it with: s3watch enqueue {path} "
                  "(the agent uploads it once it has an images row)", file=sys.stderr)
        return EXIT_FAILED

    try:
        return _explain(Uploader(config.s3, config.uploads, config.links, config.piwigo.root), upload)
    except UploadFailed as failure:
        _error(f"no download link for {path}: {failure.message}")
        return EXIT_FAILED


def _path_of_image(state: JournalState, image_id: int) -> str | None:
    """Return the path of the photo the journal records for an image id, or None. Looks at every upload."""
    for path, upload in state.uploads.items():
        if upload.image_id == image_id and upload.kind is None:
            return path
    return None


def _explain(uploader: Uploader, upload: Upload) -> int:
    """Print the link of an upload, or of the object with its content for a duplicate (exit status 0), or why there is none (1).

    Raises UploadFailed when a presigned link cannot be signed.
    """
    if upload.status == "uploaded" and upload.key:
        print(uploader.download_url(upload.key, upload.bucket))
        if upload.original == "as_uploaded":
            print("bytes as uploaded (their md5 was the images row's md5sum when the upload was recorded)", file=sys.stderr)
        elif upload.original == "as_stored":
            print(f"bytes as stored, not as uploaded{': ' + upload.original_note if upload.original_note else ''}", file=sys.stderr)
        return EXIT_OK
    if upload.status == "duplicate" and upload.duplicate_of:
        # The same content is in the bucket under the other key: that object is this photo's copy, as status links it.
        print(uploader.download_url(upload.duplicate_of, upload.bucket))
        print(f"same content as {upload.duplicate_of}, uploaded before; this link is that object's", file=sys.stderr)
        return EXIT_OK
    reasons = {
        "pending": f"not uploaded yet: {upload_status(upload)}"
        + (f" after {_plural(upload.attempts, 'attempt')}, last at {upload.ts}: {upload.error}" if upload.code else ", waiting for a worker"),
        "detected": f"not uploaded yet: waiting for its images row since {upload.detected_ts}",
        "unmatched": f"not uploaded: unmatched ({upload.error})",
        "gone": f"not uploaded: gone ({upload.error})",
        "already_present": f"not uploaded: {upload.key}: {ALREADY_PRESENT_HINT}",
    }
    print(reasons.get(upload.status, f"not uploaded: {upload.status}"), file=sys.stderr)
    return EXIT_FAILED

