"""Replay one journal with s3watch's read_journal and print the time it took and the process's peak memory.

Run by measurements.replay in a fresh process, so that the peak resident memory (VmHWM) is the
replay's own: `python bench/replay_journal.py JOURNAL` prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from s3watch.journal import read_journal


def peak_resident_bytes() -> int:
    """Return this process's peak resident memory (VmHWM in /proc/self/status) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status")


def main() -> None:
    path = Path(sys.argv[1])
    started = time.perf_counter()
    state, _valid_length = read_journal(path)
    seconds = time.perf_counter() - started
    uploaded = sum(1 for upload in state.uploads.values() if upload.status == "uploaded")
    print(json.dumps({"seconds": seconds, "records": state.records, "uploaded": uploaded, "peak_bytes": peak_resident_bytes()}))


if __name__ == "__main__":
    main()
