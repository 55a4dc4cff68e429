"""Batch mode: resolving list entries (paths and image ids) to photos of the gallery, safely.

Only a regular file inside the gallery is ever accepted. An entry is resolved through '..'
and symbolic links first. One that lands outside the gallery root, or outside the upload
directory's real location when that is a link to another disk, is rejected.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .database import ImageRow, ImagesTable
from .journal import JournalState, Upload
from .piwigo import row_path
from .spool import REQUEUE_HEADER, Entry, iter_entries, move_done
from .uploader import printable

ALREADY_UPLOADED = frozenset({"uploaded", "duplicate"})
# The statuses a list from `s3watch verify --requeue` queues again, with the reason for each.
REQUEUED = {"uploaded": "requeued: the object was missing from the bucket",
            "already_present": "requeued: the other object at its key is gone"}
ALREADY_QUEUED = frozenset({"pending"})


@dataclass(frozen=True)
class Verdict:
    """The outcome of one list entry: queued, already uploaded, already queued, or rejected with a reason."""

    entry: Entry
    outcome: str  # "queued", "already uploaded", "already queued" or "rejected"
    reason: str | None = None
    row: ImageRow | None = None

    def report_line(self) -> str:
        """Return the entry's line for the list's report."""
        result = f"rejected: {self.reason}" if self.outcome == "rejected" else self.outcome
        if self.outcome == "queued" and self.reason:
            result += f" ({self.reason})"
        if self.row is not None and self.outcome != "rejected":
            result += f" (image {self.row.id}, {self.row.path})"
        # A file name may hold a line break or a terminal's escape character: each entry stays one line of plain text.
        return f"line {self.entry.line}: {printable(self.entry.text)}\t{result}"


class Gallery:
    """The gallery's folders as s3watch may read them."""

    def __init__(self, root: Path, upload_dir: str) -> None:
        self.root = Path(os.path.abspath(root))
        self.allowed = {os.path.realpath(self.root), os.path.realpath(self.root / upload_dir)}
        self._real_folders: dict[str, str] = {}

    def _inside(self, real: str) -> bool:
        return any(real == allowed or real.startswith(allowed + os.sep) for allowed in self.allowed)

    def relative_path(self, text: str) -> str | None:
        """Turn an entry's path (absolute, or relative to the root with or without './') into a
        gallery path without resolving links. Returns None when it points outside the root."""
        candidate = text if os.path.isabs(text) else os.path.join(self.root, text)
        normal = os.path.normpath(candidate)
        root = str(self.root)
        if not normal.startswith(root + os.sep):
            return None  # outside, or the root itself
        return normal[len(root) + 1:]

    def check_file(self, path: str) -> str | None:
        """Check that a gallery path is a regular file inside the gallery.

        Returns None when it is, or the reason it is not.
        """
        absolute = os.path.join(self.root, path)
        folder, name = os.path.split(absolute)
        if name in ("", ".", ".."):
            real = os.path.realpath(absolute)
        else:
            # A list names hundreds of files per day folder: each folder is resolved once.
            real_folder = self._real_folders.get(folder)
            if real_folder is None:
                real_folder = self._real_folders[folder] = os.path.realpath(folder)
            real = os.path.join(real_folder, name)
        if not self._inside(real):
            return f"outside the gallery (resolves to {real})"
        try:
            info = os.lstat(absolute)
        except FileNotFoundError:
            return "no such file"
        except OSError as error:
            return f"cannot be read ({error.strerror})"
        if stat.S_ISLNK(info.st_mode):
            target = os.path.realpath(absolute)
            if not self._inside(target):
                return f"outside the gallery (resolves to {target})"
            return "not a regular file (a symbolic link)"
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        return None


def resolve_entries(entries: list[Entry], gallery: Gallery, table: ImagesTable, state: JournalState, requeue: bool = False) -> list[Verdict]:
    """Decide what to do with each entry of a chunk of a list, in order.

    An entry is queued when it names a regular file inside the gallery that has an images row
    and is neither uploaded nor queued already (earlier entries of the same chunk count). With
    `requeue` (a list `s3watch verify --requeue` wrote), uploaded photos are queued again, and so
    are photos that found another object at their key. Without it, such a photo is rejected. Raises DatabaseError when the table cannot be read;
    nothing is decided then.
    """
    paths: dict[int, str] = {}
    verdicts: dict[int, Verdict] = {}
    for index, entry in enumerate(entries):
        if entry.path is not None:
            relative = gallery.relative_path(entry.path)
            if relative is None:
                verdicts[index] = Verdict(entry, "rejected", "outside the gallery")
            else:
                paths[index] = relative
        elif entry.image_id is None:
            verdicts[index] = Verdict(entry, "rejected", "invalid image id: write id:1234")

    rows_by_path = table.find_by_paths(set(paths.values())) if paths else {}
    ids = [entry.image_id for entry in entries if entry.image_id is not None]
    rows_by_id = table.find_by_ids(ids) if ids else {}

    queued_now: set[str] = set()
    result = []
    for index, entry in enumerate(entries):
        if index in verdicts:
            result.append(verdicts[index])
            continue

        if entry.image_id is not None:
            row = rows_by_id.get(entry.image_id)
            if row is None:
                result.append(Verdict(entry, "rejected", f"no images row with id {entry.image_id}"))
                continue
            path = row_path(row.path)
        else:
            path = paths[index]
            row = rows_by_path.get(path)

        problem = gallery.check_file(path)
        if problem == "no such file" and entry.path is not None and entry.path.isdigit():
            problem = f"no such file: for the photo with image id {entry.path}, write id:{entry.path}"
        if problem is not None:
            result.append(Verdict(entry, "rejected", problem))
            continue
        if row is None:
            result.append(Verdict(entry, "rejected", "no images row for this path"))
            continue

        upload = state.uploads.get(path)
        skipped = skipped_as(upload)
        if requeue and upload is not None and upload.status in REQUEUED and path not in queued_now:
            queued_now.add(path)
            result.append(Verdict(entry, "queued", REQUEUED[upload.status], row=row))
        elif upload is not None and upload.status == "already_present":
            result.append(Verdict(entry, "rejected", f"another object is at its key {upload.key}: move that object elsewhere, then run 's3watch verify --requeue'", row=row))
        elif skipped is not None:
            result.append(Verdict(entry, skipped, row=row))
        elif path in queued_now:
            result.append(Verdict(entry, "already queued", row=row))
        else:
            queued_now.add(path)
            result.append(Verdict(entry, "queued", row=row))
    return result


def skipped_as(upload: Upload | None) -> str | None:
    """Return why a list skips a photo whose upload the journal has: "already uploaded", "already queued", or None."""
    if upload is not None and upload.status in ALREADY_UPLOADED:
        return "already uploaded"
    if upload is not None and upload.status in ALREADY_QUEUED:
        return "already queued"
    return None


def album_with_descendants(tree: dict[int, int | None], album: int) -> list[int]:
    """Return an album's id and the ids of all its sub-albums, at any depth."""
    children: dict[int, list[int]] = {}
    for child, parent in tree.items():
        if parent is not None:
            children.setdefault(parent, []).append(child)
    found = []
    stack = [album]
    while stack:
        current = stack.pop()
        if current in found:
            continue
        found.append(current)
        stack.extend(children.get(current, []))
    return sorted(found)


class ListRun:
    """A list being processed: its entries read a chunk at a time, and its report written as it goes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.report_path = path.with_name(f".{path.name}.report.partial")
        fd = os.open(self.report_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        self._report = os.fdopen(fd, "w", encoding="utf-8")
        self._report.write(f"# s3watch report for {path.name}\n")
        self._entries = iter_entries(path)
        with open(path, encoding="utf-8", errors="replace") as handle:
            self.requeue = handle.readline().strip().lstrip("\ufeff") == REQUEUE_HEADER
        self._pushed_back: list[Entry] = []
        self.finished = False
        self.counts = {"queued": 0, "already_uploaded": 0, "already_queued": 0, "rejected": 0}

    def gallery_for(self, config: Config) -> Gallery:
        """Return the gallery the entries are resolved against."""
        return Gallery(config.piwigo.root, config.piwigo.upload_dir)

    def next_entries(self, count: int) -> list[Entry]:
        """Return up to `count` further entries; sets `finished` when the list is exhausted."""
        entries = self._pushed_back[:count]
        self._pushed_back = self._pushed_back[count:]
        while len(entries) < count:
            entry = next(self._entries, None)
            if entry is None:
                self.finished = not self._pushed_back
                break
            entries.append(entry)
        return entries

    def rewind(self, entries: list[Entry]) -> None:
        """Put entries back, to be taken again (after a database failure)."""
        self._pushed_back = entries + self._pushed_back
        self.finished = False

    def report(self, verdict: Verdict) -> None:
        """Add an entry's outcome to the report."""
        self._report.write(verdict.report_line() + "\n")
        self.counts[verdict.outcome.replace(" ", "_")] += 1

    def finish(self) -> Path:
        """Complete the report and move the list and its report to done/. Returns the list's new path."""
        counts = ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in self.counts.items())
        self._report.write(f"# {counts}\n")
        self._report.flush()
        os.fsync(self._report.fileno())
        self._report.close()
        return move_done(self.path, self.report_path)

    def close(self) -> None:
        """Drop an unfinished run; the list stays in the spool and is processed again from the start."""
        self._report.close()
        self.report_path.unlink(missing_ok=True)
