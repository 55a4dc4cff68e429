"""The spool directory: list files that queue photos by hand (batch mode), and what becomes of them.

A list is UTF-8 text with one entry a line: a photo's path as Piwigo stores it (with or without
a leading './'), an absolute path inside the gallery, or an image id written `id:1234`. Blank
lines and lines starting with '#' are skipped; a byte-order mark and CRLF line ends are allowed.
Writers create a list under a hidden or `.tmp` name and rename it into place, so the agent
never reads half a list.
"""

from __future__ import annotations

import codecs
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

# First line of a list that queues uploaded photos again (written by `s3watch verify --requeue`).
REQUEUE_HEADER = "# s3watch: requeue missing objects"
DONE = "done"
FAILED = "failed"
BOM = "\ufeff"
CHECK_BLOCK = 1024 * 1024


class SpoolError(Exception):
    """The spool directory or a list in it could not be used; the message gives the reason."""


@dataclass(frozen=True)
class Entry:
    """One entry of a list: its line number and text, and what it names."""

    line: int
    text: str
    image_id: int | None = None  # for `id:N` entries
    path: str | None = None  # for path entries, as written (absolute or relative to the gallery root)


def is_list_name(name: str) -> bool:
    """Tell whether a file name in the spool directory is a finished list (not hidden or temporary)."""
    return not name.startswith(".") and not name.endswith((".tmp", ".part", "~"))


def find_lists(spool_dir: Path) -> list[Path]:
    """Return the lists waiting in the spool directory, oldest first. A missing directory has none."""
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise SpoolError(f"spool directory {spool_dir} could not be read ({error.strerror}): fix its permissions") from None
    lists = [entry for entry in entries if is_list_name(entry.name) and entry.is_file(follow_symlinks=False)]
    lists.sort(key=lambda entry: (entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
    return [Path(entry.path) for entry in lists]


def check_list(path: Path) -> None:
    """Check that a file is a list: readable UTF-8 text without NUL bytes. Reads it once, a block at a time.

    Raises SpoolError with the reason otherwise.
    """
    try:
        handle = open(path, "rb")
    except OSError as error:
        # A list written with a private umask (077) is readable by its writer alone. s3watch enqueue writes 0640.
        raise SpoolError(f"unreadable ({error.strerror}): make it readable by the agent's group (chmod g+r) and drop it again") from None
    with handle:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        while True:
            block = handle.read(CHECK_BLOCK)
            if b"\x00" in block:
                raise SpoolError("binary file (contains NUL bytes), not a list")
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise SpoolError(f"not UTF-8 text (invalid byte near offset {offset + max(error.start, 0)})") from None
            if not block:
                return
            offset += len(block)


def parse_entry(line: int, text: str) -> Entry | None:
    """Parse one line of a list. Returns None for a blank line or a comment."""
    text = text.rstrip("\r\n").strip()
    if line == 1 and text.startswith(BOM):
        text = text[1:].strip()
    if not text or text.startswith("#"):
        return None
    if text.lower().startswith("id:"):
        number = text[3:].strip()
        if number.isdigit() and int(number) > 0:
            return Entry(line=line, text=text, image_id=int(number))
        return Entry(line=line, text=text)  # rejected later as an invalid id
    return Entry(line=line, text=text, path=text)


def iter_entries(path: Path, start_line: int = 1) -> Iterator[Entry]:
    """Yield the entries of a checked list, one line at a time, from `start_line` on."""
    with open(path, encoding="utf-8", newline="") as handle:
        for number, text in enumerate(handle, start=1):
            if number < start_line:
                continue
            entry = parse_entry(number, text)
            if entry is not None:
                yield entry


def write_list(spool_dir: Path, entries: Iterable[str], header: str | None = None, keep_empty: bool = True) -> tuple[Path, int]:
    """Write entries as a new list in the spool directory, atomically (temporary name, fsync, rename).

    `header` becomes the list's first line. Without `keep_empty`, a list with no entries is
    removed instead of renamed into place, where a running agent could already be reading it.
    Returns the list's path and the number of entries. Raises SpoolError.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}-{secrets.token_hex(4)}.list"
    temporary = spool_dir / f".{name}.tmp"
    count = 0
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if header is not None:
                handle.write(header + "\n")
            for entry in entries:
                entry = entry.strip()
                if "\n" in entry or "\r" in entry:
                    raise SpoolError(f"entry {entry!r} contains a line break")
                handle.write(entry + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        if count == 0 and not keep_empty:
            temporary.unlink()
            return spool_dir / name, 0
        _share_with_agent(spool_dir, temporary)
        os.rename(temporary, spool_dir / name)
    except OSError as error:
        _remove_quietly(temporary)
        raise SpoolError(f"could not write a list in {spool_dir} ({error.strerror}): run as a user who may write there") from None
    except BaseException:
        _remove_quietly(temporary)
        raise
    return spool_dir / name, count


def _remove_quietly(path: Path) -> None:
    """Remove a file left by a failed write, if it is there and this user may remove it."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a folder this user may not search or write: the file was never created there


def _share_with_agent(spool_dir: Path, path: Path) -> None:
    """Give a list the spool directory's group, so the agent's user can read it when root wrote it."""
    try:
        os.chown(path, -1, spool_dir.stat().st_gid)
    except OSError:
        pass  # not root and not in that group: the file keeps this user's group


def move_done(path: Path, report: Path) -> Path:
    """Move a processed list and its finished report into done/. Returns the list's new path."""
    done = path.parent / DONE
    done.mkdir(mode=0o750, exist_ok=True)
    target = _free_name(done, path.name)
    os.replace(report, done / f"{target.name}.report")
    os.replace(path, target)
    return target


def move_failed(path: Path, reason: str) -> Path:
    """Move a file that is not a list into failed/, with a `.reason` file beside it. Returns its new path."""
    failed = path.parent / FAILED
    failed.mkdir(mode=0o750, exist_ok=True)
    target = _free_name(failed, path.name)
    reason_path = failed / f"{target.name}.reason"
    fd = os.open(reason_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(reason + "\n")
    os.replace(path, target)
    return target


def _free_name(folder: Path, name: str) -> Path:
    """Return `folder/name`, or a numbered variant when that name is taken, so nothing is overwritten."""
    target = folder / name
    number = 1
    while target.exists() or Path(f"{target}.report").exists():
        target = folder / f"{name}.{number}"
        number += 1
    return target
