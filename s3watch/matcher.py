"""Matching new files to their images rows: which files to look up when, and when to give up.

Piwigo moves a photo into place and inserts its row 0.1 to 0.5 s later (longer when it resizes
the file first), so a file is looked up again with a growing delay until its row appears or
`monitor.match_timeout` has passed since it was seen.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

FIRST_DELAY = 0.05  # seconds before the first look-up
# Piwigo inserts the row within about half a second, so look-ups stay frequent at first: a row
# is found at most a quarter of a second after it appears. Later look-ups come every 2 s.
EARLY_MAX_DELAY = 0.25
EARLY_PERIOD = 10.0  # seconds after the file was seen
MAX_DELAY = 2.0


@dataclass(order=True)
class _Waiting:
    due: float
    path: str = field(compare=False)
    seen: float = field(compare=False)
    delay: float = field(compare=False)


class Matcher:
    """Files waiting for their images row, ordered by when each is next looked up.

    Times are wall-clock seconds (time.time()), because a file's first sighting comes back
    from the journal after a restart.
    """

    def __init__(self, match_timeout: float) -> None:
        self.match_timeout = match_timeout
        self._heap: list[_Waiting] = []
        self._waiting: dict[str, _Waiting] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, path: object) -> bool:
        return path in self._waiting

    def add(self, path: str, seen: float, now: float) -> None:
        """Start waiting for the row of `path`, first seen at `seen`."""
        if path in self._waiting:
            return
        entry = _Waiting(due=now + FIRST_DELAY, path=path, seen=seen, delay=FIRST_DELAY)
        self._waiting[path] = entry
        heapq.heappush(self._heap, entry)

    def discard(self, path: str) -> None:
        """Stop waiting for `path` (its row was found, or it was dealt with otherwise)."""
        self._waiting.pop(path, None)

    def due(self, now: float) -> list[str]:
        """Return the paths whose look-up is due now, and take them off the schedule until `retry` or `discard`."""
        paths = []
        while self._heap and self._heap[0].due <= now:
            entry = heapq.heappop(self._heap)
            if self._waiting.get(entry.path) is entry:
                paths.append(entry.path)
        return paths

    def retry(self, path: str, now: float) -> bool:
        """Schedule another look-up of `path` with a longer delay.

        Returns False, and stops waiting, when the match timeout has passed: the file is unmatched.
        """
        entry = self._waiting.get(path)
        if entry is None:
            return False
        if now - entry.seen >= self.match_timeout:
            del self._waiting[path]
            return False
        cap = EARLY_MAX_DELAY if now - entry.seen < EARLY_PERIOD else MAX_DELAY
        entry.delay = min(entry.delay * 2, cap)
        entry.due = now + entry.delay
        heapq.heappush(self._heap, entry)
        return True

    def postpone(self, path: str, now: float) -> None:
        """Schedule another look-up of `path` after a look-up that could not be made (database down).

        The time since the previous look-up does not count toward the match timeout, so an
        outage never turns a file into a false "unmatched".
        """
        entry = self._waiting.get(path)
        if entry is None:
            return
        previous = entry.due - entry.delay
        entry.seen += max(0.0, now - previous)
        entry.due = now + entry.delay
        heapq.heappush(self._heap, entry)

    def next_due(self) -> float | None:
        """Return when the next look-up is due, or None when nothing waits."""
        while self._heap and self._waiting.get(self._heap[0].path) is not self._heap[0]:
            heapq.heappop(self._heap)
        return self._heap[0].due if self._heap else None
