"""Copies of new photos taken the moment they arrive, so the bytes as uploaded survive Piwigo's "resize after upload".

With that option on, Piwigo rewrites a photo in place about a second after moving it into the
upload directory, and only then inserts its row, whose md5sum is still the md5 of the upload.
A copy taken on arrival whose md5 equals the row's md5sum is proven to be the original.
The copies live in `<state_dir>/originals/` until their upload is recorded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

FICLONE = 0x40049409  # ioctl of linux/fs.h: a copy-on-write clone on btrfs, XFS and other filesystems that share extents
COPY_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Capture:
    """A copy taken on arrival: its file name in the originals folder, md5 and size."""

    name: str
    md5: str
    size: int


class CaptureSkipped(Exception):
    """No copy was taken; the message gives the reason (over the cap, file gone, disk full)."""


class Originals:
    """The folder of copies taken on arrival, with a cap on their total size."""

    def __init__(self, state_dir: Path, cap_bytes: int) -> None:
        self.folder = state_dir / "originals"
        self.cap_bytes = cap_bytes
        self.total = 0

    def path_of(self, name: str) -> Path:
        """Return the path of a copy by its file name."""
        return self.folder / name

    def capture(self, source: Path) -> Capture:
        """Copy a new file (hashing it on the way) before Piwigo can rewrite it.

        Returns the copy. Raises CaptureSkipped when the cap would be exceeded or the copy fails;
        a partial copy is removed.
        """
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            raise CaptureSkipped(f"the file could not be opened ({error.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if self.total + size > self.cap_bytes:
                raise CaptureSkipped(f"the copies on arrival would exceed uploads.originals_cap_mb ({self.cap_bytes // (1024 * 1024)} MiB)")
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            name = secrets.token_hex(16)
            target = self.folder / name
            try:
                md5, copied = _copy(fd, target)
            except OSError as error:
                target.unlink(missing_ok=True)
                raise CaptureSkipped(f"the copy failed ({error.strerror})") from None
        finally:
            os.close(fd)
        self.total += copied
        return Capture(name=name, md5=md5, size=copied)

    def delete(self, name: str) -> None:
        """Delete a copy whose upload is recorded."""
        path = self.folder / name
        try:
            size = path.stat().st_size
            path.unlink()
            self.total = max(0, self.total - size)
        except FileNotFoundError:
            pass

    def clean_up(self, referenced: Iterable[str]) -> int:
        """Delete copies that no unfinished upload refers to (left by a crash) and count the rest against the cap.

        Returns how many copies were deleted.
        """
        keep = set(referenced)
        deleted = 0
        self.total = 0
        if not self.folder.is_dir():
            return 0
        for entry in os.scandir(self.folder):
            if entry.name in keep and entry.is_file(follow_symlinks=False):
                self.total += entry.stat().st_size
                continue
            os.unlink(entry.path)
            deleted += 1
        return deleted


def _copy(source_fd: int, target: Path) -> tuple[str, int]:
    """Copy a file (a copy-on-write clone where the filesystem allows) and return its md5 and size."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            fcntl.ioctl(fd, FICLONE, source_fd)
            cloned = True
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF, errno.EPERM):
                raise
            cloned = False

        # The md5 is taken from the copy when it is a clone (it cannot change any more), and
        # from the bytes on their way otherwise, so the file is read only once.
        digest = hashlib.md5()
        size = 0
        if cloned:
            with open(target, "rb") as clone:
                while block := clone.read(COPY_BLOCK):
                    digest.update(block)
                    size += len(block)
        else:
            os.lseek(source_fd, 0, os.SEEK_SET)
            while block := os.read(source_fd, COPY_BLOCK):
                digest.update(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
                size += len(block)
        return digest.hexdigest(), size
    finally:
        os.close(fd)
