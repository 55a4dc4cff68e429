"""Read one journal as the agent does at start, and print the time it took and the process's peak memory.

Run by measurements.replay in a fresh process, so that the peak resident memory (VmHWM) is the
read's own. `python bench/replay_journal.py JOURNAL` replays every record, as a start without a
snapshot does, then writes the snapshot that a clean stop writes. With `--from-snapshot` it
starts from that snapshot instead, and replays the records after it. Each prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from s3watch.journal import Journal, read_journal, snapshot_path


def peak_resident_bytes() -> int:
    """Return this process's peak resident memory (VmHWM in /proc/self/status) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("journal", type=Path)
    parser.add_argument("--from-snapshot", action="store_true", help="start from the snapshot beside the journal")
    arguments = parser.parse_args()
    path: Path = arguments.journal

    if arguments.from_snapshot:
        started = time.perf_counter()
        state, _valid_length = read_journal(path)
        seconds = time.perf_counter() - started
        peak = peak_resident_bytes()
        if not state.snapshot_records:
            raise SystemExit(f"the snapshot was not used: {state.snapshot_note}")
        figures = {"seconds": seconds, "peak_bytes": peak, "snapshot_records": state.snapshot_records}
    else:
        snapshot_path(path).unlink(missing_ok=True)
        started = time.perf_counter()
        journal = Journal(path)
        seconds = time.perf_counter() - started
        peak = peak_resident_bytes()
        state = journal.state
        started = time.perf_counter()
        snapshot_bytes = journal.write_snapshot()
        figures = {"seconds": seconds, "peak_bytes": peak, "snapshot_seconds": time.perf_counter() - started, "snapshot_bytes": snapshot_bytes}
        journal.close()

    figures.update(records=state.records, uploaded=state.uploads.finished_counts()["uploaded"])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
