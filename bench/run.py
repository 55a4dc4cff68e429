"""Benchmark s3watch against its targets: batch throughput, latency, journal and idle cost.

Run from the repository root inside the project's virtual environment:

    .venv/bin/python bench/run.py            # 5 runs of everything, about 17 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # 1 run on smaller data, about 1 minute

It starts its own SeaweedFS on free loopback ports and creates its own MariaDB database
(s3watch_bench_<random>) at 127.0.0.1:3306 as root, and removes both, its agents and its work
folder at the end, also after Ctrl-C or an error. bench/README.md explains each figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Callable

import boto3

import s3watch
from s3watch.journal import SNAPSHOT_MIN_RECORDS
from s3watch.seaweed import weed_binary

import measurements
from environment import BenchError, ContentGenerator, DataSet, Environment, Photo, create_day_folders, generate_data_set, generate_pool

SECTIONS = ("batch", "latency", "journal", "idle")
COMMIT_GROUPS = (1, 10, 100)
PHOTO_SIZES = (2_000_000, 6_000_000)  # bytes
SMALL_SIZES = (50_000, 200_000)


@dataclass(frozen=True)
class Sizes:
    """How much data each measurement uses."""

    photos: int
    small_files: int
    paced_photos: int
    burst_photos: int
    replay_uploads: int
    day_folders: int
    idle_seconds: float
    commit_seconds: float  # per commit group size


FULL = Sizes(photos=400, small_files=3000, paced_photos=30, burst_photos=200, replay_uploads=1_000_000,
             day_folders=4000, idle_seconds=60.0, commit_seconds=3.0)
QUICK = Sizes(photos=40, small_files=300, paced_photos=10, burst_photos=50, replay_uploads=100_000,
              day_folders=400, idle_seconds=15.0, commit_seconds=1.0)


# Results and the table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal for one figure, such as `< 0.3`."""

    text: str
    check: Callable[[float], bool]


def at_least(limit: float) -> Target:
    return Target(f">= {limit:g}", lambda value: value >= limit)


def at_most_rounded(limit: float) -> Target:
    """At most `limit` once rounded to 0.01: for reads per byte, whose count also has the S3 and database responses."""
    return Target(f"<= {limit:g}", lambda value: round(value, 2) <= limit)


def below(limit: float) -> Target:
    return Target(f"< {limit:g}", lambda value: value < limit)


class Results:
    """Figures by key, one value per run, and notes for figures that were skipped or failed."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.notes: dict[str, str] = {}

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.values.get(key)
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class Row:
    """One line of the table: a label, the key of its figure, its unit, and an optional target."""

    label: str
    key: str
    unit: str
    target: Target | None = None


def format_number(value: float) -> str:
    """Format with three significant digits, and thousands separators above 1,000."""
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def print_table(title: str, rows: list[Row], results: Results) -> tuple[list[str], list[str]]:
    """Print one section of the table. Returns the labels of the targets missed, and of those not measured."""
    print(f"\n{title}")
    print(f"  {'figure':<52} {'median':>9} {'runs: min .. max':>20}  {'target':>8}  result")
    missed: list[str] = []
    unmeasured: list[str] = []
    for row in rows:
        values = results.values.get(row.key, [])
        label = f"{row.label} ({row.unit})" if row.unit else row.label
        if not values:
            note = results.notes.get(row.key, "not measured")
            print(f"  {label:<52} {'-':>9} {'':>20}  {row.target.text if row.target else '':>8}  {note}")
            if row.target is not None:
                unmeasured.append(label)
            continue
        median = statistics.median(values)
        spread = f"{format_number(min(values))} .. {format_number(max(values))}" if len(values) > 1 else ""
        verdict = ""
        if row.target is not None:
            verdict = "met" if row.target.check(median) else "MISSED"
            if verdict == "MISSED":
                missed.append(label)
        target_text = row.target.text if row.target else ""
        print(f"  {label:<52} {format_number(median):>9} {spread:>20}  {target_text:>8}  {verdict}")
    return missed, unmeasured


def print_report(results: Results, sizes: Sizes, data: dict[str, DataSet], workers: int, runs: int, quick: bool) -> None:
    """Print the table of medians, ratios and targets, then the targets missed and not measured."""
    print(f"\n=== s3watch benchmark: medians of {runs} run(s){' (--quick: smaller data)' if quick else ''} ===")
    print("MB = 10^6 bytes. 'result' compares the median with the target.")
    sections: list[tuple[str, str, list[Row]]] = []

    for name, dataset in data.items():
        rows: list[Row] = []
        for tool, label in (("s3watch", "s3watch"), ("raw", "raw boto3"), ("rclone", "rclone copy")):
            rows.append(Row(label, f"batch.{name}.{tool}.files", "files/s"))
            rows.append(Row(label, f"batch.{name}.{tool}.mb", "MB/s"))
            rows.append(Row(f"{label}: its CPU per 1,000 files", f"batch.{name}.{tool}.cpu", "CPU-s"))
            if tool != "rclone":
                rows.append(Row(f"{label}: reads of each byte", f"batch.{name}.{tool}.reads", "times", at_most_rounded(2.0) if tool == "s3watch" else None))
        rows.append(Row("s3watch / raw", f"batch.{name}.ratio.files", "files/s", at_least(0.9)))
        rows.append(Row("s3watch / raw", f"batch.{name}.ratio.mb", "MB/s", at_least(0.9)))
        rows.append(Row("s3watch / rclone copy", f"batch.{name}.ratio_rclone", "files/s, MB/s", at_least(1.0)))
        rows.append(Row("s3watch: list dropped to first queued", f"batch.{name}.s3watch.pickup", "s"))
        rows.append(Row("s3watch: first queued to first uploaded", f"batch.{name}.s3watch.first_upload", "s"))
        title = (f"1. Batch throughput, {name}: {len(dataset.photos):,} files, {dataset.total_bytes / 1e6:,.0f} MB, "
                 f"{workers} workers")
        sections.append((title, f"batch {name}", rows))

    sections.append(("2. Latency (photos of 2-6 MB; end = the journal's uploaded record)", "latency", [
        Row(f"paced ({sizes.paced_photos} photos, 1/s): INSERT to uploaded p50", "latency.paced.p50", "s", below(0.3)),
        Row("paced: INSERT to uploaded p99", "latency.paced.p99", "s", below(1.0)),
        Row("paced: INSERT to queued p50", "latency.paced.queued.p50", "s"),
        Row(f"burst ({sizes.burst_photos} photos): INSERT to uploaded p50", "latency.burst.p50", "s", below(0.3)),
        Row("burst: INSERT to uploaded p99", "latency.burst.p99", "s", below(1.0)),
        Row("burst: INSERT to queued p50", "latency.burst.queued.p50", "s"),
        Row("burst: its bytes at the raw photos MB/s", "latency.burst.floor", "s"),
    ]))

    replay_records = 2 * sizes.replay_uploads + 2
    sections.append(("3. Journal", "journal", [
        # One fsync per record is the disk's fsync rate. The agent commits once per loop turn
        # (group commit), so the target applies to the rows with groups.
        *(Row(f"durable records/s, commit every {group}", f"journal.commit.{group}", "records/s", at_least(5000) if group > 1 else None)
          for group in COMMIT_GROUPS),
        Row(f"replay {sizes.replay_uploads:,} uploads ({replay_records:,} records)", "journal.replay.seconds", "s", below(5.0)),
        Row("replay: peak resident memory", "journal.replay.peak", "MB", below(300.0)),
        Row("snapshot of those uploads: written", "journal.snapshot.write", "s"),
        Row("snapshot: size", "journal.snapshot.size", "MB"),
        Row("start from the snapshot", "journal.snapshot.start", "s"),
        Row("start from the snapshot: peak resident memory", "journal.snapshot.peak", "MB"),
        Row(f"start after a crash: snapshot {behind_snapshot(sizes):,} records behind", "journal.snapshot.behind", "s"),
    ]))

    sections.append((f"4. Idle: {sizes.day_folders:,} day folders, {sizes.idle_seconds:g} s", "idle", [
        Row("CPU", "idle.cpu", "CPU-s/min", below(0.1)),
        Row(f"CPU without the first {min(10.0, sizes.idle_seconds / 3):g} s", "idle.cpu_settled", "CPU-s/min"),
        Row("resident memory (VmRSS)", "idle.rss", "MB", below(80.0)),
        Row("start until watching and store_ready", "idle.start", "s"),
    ]))

    missed: list[str] = []
    unmeasured: list[str] = []
    for title, short_name, rows in sections:
        if not any(row.key in results.values or row.key in results.notes for row in rows):
            continue  # a section left out with --only
        section_missed, section_unmeasured = print_table(title, rows, results)
        missed += [f"{short_name}: {label}" for label in section_missed]
        unmeasured += [f"{short_name}: {label}" for label in section_unmeasured]

    print()
    print(f"targets missed: {'; '.join(missed)}" if missed else "targets missed: none")
    if unmeasured:
        print(f"targets not measured: {'; '.join(unmeasured)}")
    if quick:
        print("note: --quick uses smaller data than the targets are stated for (1,000,000 uploads, 4,000 folders, 60 s)")


def percentile(samples: list[float], percent: int) -> float:
    """Return the `percent`th percentile of `samples` (linear interpolation between closest ranks)."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


# Preparation and the runs -------------------------------------------------------------------


def describe_machine(env: Environment) -> None:
    """Print what the figures depend on: hardware, software versions and the work folder's file system."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    weed = subprocess.run([weed_binary(), "version"], capture_output=True, text=True).stdout.strip().splitlines()
    filesystem = "unknown file system"
    try:
        found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(env.work)], capture_output=True, text=True)
        filesystem = found.stdout.strip() or filesystem
    except FileNotFoundError:
        pass
    revision = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), {memory / 1e9:.0f} GB memory, {platform.platform()}")
    print(f"software: s3watch {s3watch.__version__} (git {revision}), Python {platform.python_version()}, boto3 {boto3.__version__}, "
          f"SeaweedFS {weed[0] if weed else 'SeaweedFS (version unknown)'}, MariaDB {env.database.version()}")
    print(f"work folder: {env.work} ({filesystem}); SeaweedFS S3 at {env.seaweed.endpoint_url}; database {env.database.name}")


@dataclass
class Prepared:
    """The data every run uses, generated once."""

    data: dict[str, DataSet]
    latency_root: Path
    latency_pool: list[Photo]
    idle_root: Path
    replay_journal: Path
    behind_journal: Path  # the replay journal with a snapshot as far behind its end as a running agent leaves it


def prepare(env: Environment, sizes: Sizes, sections: set[str], seed: int) -> Prepared:
    """Generate the data sets, the images rows, the idle gallery and the replay journal."""
    gallery = env.work / "gallery"
    (gallery / "upload").mkdir(parents=True)
    prepared = Prepared(data={}, latency_root=gallery, latency_pool=[], idle_root=env.work / "idle-gallery",
                        replay_journal=env.work / "journal" / "replay.jsonl", behind_journal=env.work / "journal" / "behind" / "replay.jsonl")
    started = time.monotonic()

    # Each data set has its own generator, so that choosing sections does not change the bytes.
    if "batch" in sections:
        prepared.data["photos"] = generate_data_set(ContentGenerator(f"{seed}:photos"), "photos", gallery, 2024,
                                                    sizes.photos, PHOTO_SIZES, per_day=20)
        prepared.data["small"] = generate_data_set(ContentGenerator(f"{seed}:small"), "small", gallery, 2023,
                                                   sizes.small_files, SMALL_SIZES, per_day=100)
        env.database.insert_rows([photo for dataset in prepared.data.values() for photo in dataset.photos])
    if "latency" in sections:
        prepared.latency_pool = generate_pool(ContentGenerator(f"{seed}:latency"), env.work / "latency-pool",
                                              sizes.paced_photos + sizes.burst_photos, PHOTO_SIZES)
    if "idle" in sections:
        create_day_folders(prepared.idle_root / "upload", sizes.day_folders)
    if "journal" in sections:
        prepared.replay_journal.parent.mkdir(parents=True)
        measurements.write_replay_journal(prepared.replay_journal, sizes.replay_uploads, seed)
        prepared.behind_journal.parent.mkdir()
        measurements.write_journal_behind_snapshot(prepared.replay_journal, prepared.behind_journal, behind_snapshot(sizes))

    generated = sum(dataset.total_bytes for dataset in prepared.data.values()) + sum(photo.size for photo in prepared.latency_pool)
    items = [f"{generated / 1e6:,.0f} MB of files"] if generated else []
    if "idle" in sections:
        items.append(f"{sizes.day_folders:,} empty day folders")
    if "journal" in sections:
        items.append(f"a journal of {sizes.replay_uploads:,} uploads")
    print(f"prepared {', '.join(items)} in {time.monotonic() - started:.1f} s")
    return prepared


def behind_snapshot(sizes: Sizes) -> int:
    """Return the most records that a running agent leaves after its last snapshot, for the replay journal's size.

    It writes a snapshot once the records appended since the last one reach SNAPSHOT_MIN_RECORDS
    and half the number of uploads.
    """
    return max(SNAPSHOT_MIN_RECORDS, sizes.replay_uploads // 2)


def progress(run: int, runs: int, text: str) -> None:
    print(f"run {run}/{runs}  {text}", flush=True)


def run_batch(env: Environment, prepared: Prepared, results: Results, workers: int, run: int, runs: int) -> None:
    """Measure s3watch, raw boto3 and rclone on each batch data set, each into a fresh bucket."""
    for name, dataset in prepared.data.items():
        figures: dict[str, measurements.Throughput] = {}

        # A warm-up: whichever tool went first on a data set was about 10% slower, also after a
        # sync and a quiet store. A raw boto3 upload of the same files into a scratch bucket,
        # not measured, takes that place.
        bucket = env.create_bucket(f"bench-r{run}-{name}-warm-up")
        try:
            measurements.batch_raw(env, dataset, bucket, workers)
        except BenchError as error:
            progress(run, runs, f"batch {name} warm-up: FAILED: {error}")
        finally:
            env.delete_bucket(bucket)

        # s3watch and raw boto3 take turns going first, and rclone goes last. On the small files,
        # whichever tool went right after rclone was about 9% slower, even after a sync and a
        # quiet store. The next data set's unmeasured warm-up takes that place.
        tools = ["s3watch", "raw"] if run % 2 else ["raw", "s3watch"]
        if measurements.rclone_available():
            tools.append("rclone")
        else:
            results.notes.update(dict.fromkeys([f"batch.{name}.rclone.{kind}" for kind in ("files", "mb", "cpu")], "skipped: rclone is not on PATH"))
        for tool in tools:
            keys = [f"batch.{name}.{tool}.{kind}" for kind in ("files", "mb", "cpu")]
            bucket = env.create_bucket(f"bench-r{run}-{name}-{tool}")
            try:
                if tool == "s3watch":
                    figure = measurements.batch_s3watch(env, dataset, bucket, workers, f"r{run}-{name}-batch")
                elif tool == "raw":
                    figure = measurements.batch_raw(env, dataset, bucket, workers)
                else:
                    figure = measurements.batch_rclone(env, dataset, bucket, workers, f"r{run}-{name}")
            except BenchError as error:
                progress(run, runs, f"batch {name} {tool}: FAILED: {error}")
                results.notes.update(dict.fromkeys(keys, "failed (see above)"))
                continue
            finally:
                env.delete_bucket(bucket)
            figures[tool] = figure
            results.add(f"batch.{name}.{tool}.files", figure.files_per_second)
            results.add(f"batch.{name}.{tool}.mb", figure.megabytes_per_second)
            results.add(f"batch.{name}.{tool}.cpu", figure.client_cpu_per_thousand)
            if figure.reads_per_byte is not None:
                results.add(f"batch.{name}.{tool}.reads", figure.reads_per_byte)
            pickup = ""
            if figure.pickup_seconds is not None and figure.first_upload_seconds is not None:
                results.add(f"batch.{name}.{tool}.pickup", figure.pickup_seconds)
                results.add(f"batch.{name}.{tool}.first_upload", figure.first_upload_seconds)
                pickup = f"; first queued after {figure.pickup_seconds:.2f} s, first uploaded {figure.first_upload_seconds:.2f} s later"
            progress(run, runs, f"batch {name:<6} {tool:<7} {figure.seconds:6.1f} s  {figure.files_per_second:7.1f} files/s  "
                                f"{figure.megabytes_per_second:6.1f} MB/s; CPU-s per 1,000 files: {figure.client_cpu_per_thousand:.1f} "
                                f"{tool}, {figure.server_cpu_per_thousand:.1f} SeaweedFS{pickup}")
        if "s3watch" in figures and "raw" in figures:
            ratio = figures["raw"].seconds / figures["s3watch"].seconds
            # Both upload the same files, so the files/s and MB/s ratios are the same number.
            results.add(f"batch.{name}.ratio.files", ratio)
            results.add(f"batch.{name}.ratio.mb", ratio)
        if "s3watch" in figures and "rclone" in figures:
            results.add(f"batch.{name}.ratio_rclone", figures["rclone"].seconds / figures["s3watch"].seconds)
        elif "rclone" not in tools:
            results.notes[f"batch.{name}.ratio_rclone"] = "skipped: rclone is not on PATH"


def run_latency(env: Environment, prepared: Prepared, results: Results, sizes: Sizes, workers: int, run: int, runs: int) -> None:
    try:
        paced, burst = measurements.latency(env, prepared.latency_root, prepared.latency_pool, sizes.paced_photos,
                                            sizes.burst_photos, workers, run)
    except BenchError as error:
        progress(run, runs, f"latency: FAILED: {error}")
        for scenario in ("paced", "burst"):
            for kind in ("p50", "p99", "queued.p50"):
                results.notes[f"latency.{scenario}.{kind}"] = "failed (see above)"
        return
    for scenario, samples in (("paced", paced), ("burst", burst)):
        p50, p99 = percentile(samples.uploaded, 50), percentile(samples.uploaded, 99)
        results.add(f"latency.{scenario}.p50", p50)
        results.add(f"latency.{scenario}.p99", p99)
        results.add(f"latency.{scenario}.queued.p50", percentile(samples.queued, 50))
        progress(run, runs, f"latency {scenario}: p50 {p50:.3f} s, p99 {p99:.3f} s, max {max(samples.uploaded):.3f} s, "
                            f"INSERT to queued p50 {percentile(samples.queued, 50):.3f} s")
    raw_rate = results.median("batch.photos.raw.mb")
    if raw_rate:
        burst_bytes = sum(photo.size for photo in prepared.latency_pool[sizes.paced_photos:sizes.paced_photos + sizes.burst_photos])
        results.values["latency.burst.floor"] = [burst_bytes / 1e6 / raw_rate]
    else:
        results.notes["latency.burst.floor"] = "needs the batch section"


def run_journal(env: Environment, prepared: Prepared, results: Results, sizes: Sizes, run: int, runs: int) -> None:
    folder = env.work / "journal"
    rates = []
    for group in COMMIT_GROUPS:
        rate = measurements.journal_commit_rate(folder, group, sizes.commit_seconds)
        results.add(f"journal.commit.{group}", rate)
        rates.append(f"every {group}: {rate:,.0f}")
    progress(run, runs, f"journal durable records/s, commit {', '.join(rates)}")
    try:
        # As for the batch clocks: the commit rates above leave dirty pages to write back.
        measurements.settle(env)
        replay = measurements.replay(prepared.replay_journal, sizes.replay_uploads)
        start = measurements.replay(prepared.replay_journal, sizes.replay_uploads, from_snapshot=True)
        behind = measurements.replay(prepared.behind_journal, sizes.replay_uploads, from_snapshot=True, behind=behind_snapshot(sizes))
    except BenchError as error:
        progress(run, runs, f"journal replay: FAILED: {error}")
        for key in ("replay.seconds", "replay.peak", "snapshot.write", "snapshot.size", "snapshot.start", "snapshot.peak", "snapshot.behind"):
            results.notes[f"journal.{key}"] = "failed (see above)"
        return
    assert replay.snapshot_seconds is not None and replay.snapshot_bytes is not None
    results.add("journal.replay.seconds", replay.seconds)
    results.add("journal.replay.peak", replay.peak_bytes / 1e6)
    results.add("journal.snapshot.write", replay.snapshot_seconds)
    results.add("journal.snapshot.size", replay.snapshot_bytes / 1e6)
    results.add("journal.snapshot.start", start.seconds)
    results.add("journal.snapshot.peak", start.peak_bytes / 1e6)
    results.add("journal.snapshot.behind", behind.seconds)
    progress(run, runs, f"journal replay of {sizes.replay_uploads:,} uploads: {replay.seconds:.2f} s, peak {replay.peak_bytes / 1e6:,.0f} MB; "
             f"snapshot written in {replay.snapshot_seconds:.2f} s ({replay.snapshot_bytes / 1e6:,.0f} MB); "
             f"start from it {start.seconds:.2f} s, peak {start.peak_bytes / 1e6:,.0f} MB; after a crash {behind.seconds:.2f} s")


def run_idle(env: Environment, prepared: Prepared, results: Results, sizes: Sizes, workers: int, run: int, runs: int) -> None:
    try:
        cost = measurements.idle(env, prepared.idle_root, sizes.idle_seconds, workers, run)
    except BenchError as error:
        progress(run, runs, f"idle: FAILED: {error}")
        results.notes["idle.cpu"] = results.notes["idle.rss"] = "failed (see above)"
        return
    results.add("idle.cpu", cost.cpu_seconds_per_minute)
    results.add("idle.cpu_settled", cost.settled_cpu_seconds_per_minute)
    results.add("idle.rss", cost.resident_bytes / 1e6)
    results.add("idle.start", cost.start_seconds)
    progress(run, runs, f"idle: {cost.cpu_seconds_per_minute:.3f} CPU-s/min ({cost.settled_cpu_seconds_per_minute:.3f} "
                        f"without the first {cost.settle_seconds:g} s), VmRSS {cost.resident_bytes / 1e6:.0f} MB; "
                        f"start took {cost.start_seconds:.1f} s and {cost.start_cpu_seconds:.2f} CPU-s")


# Command line -------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark s3watch: batch throughput, latency, journal and idle cost.")
    parser.add_argument("--quick", action="store_true", help="one run on smaller data, as a smoke test (about 1 minute)")
    parser.add_argument("--runs", type=int, default=None, metavar="N", help="repetitions of each measurement (default: 5, or 1 with --quick)")
    parser.add_argument("--workers", type=int, default=4, metavar="N", help="upload workers for s3watch, raw boto3 and rclone (default: 4, s3watch's default)")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section ({', '.join(SECTIONS)}); repeat for several")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated data (default: 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (agent logs, journals, data) for inspection")
    arguments = parser.parse_args(argv)
    if arguments.runs is not None and arguments.runs < 1:
        parser.error("--runs must be 1 or more")
    if arguments.workers < 1 or arguments.workers > 64:
        parser.error("--workers must be from 1 to 64, as s3watch's uploads.workers")
    return arguments


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    sizes = QUICK if arguments.quick else FULL
    runs = arguments.runs or (1 if arguments.quick else 5)
    sections = set(arguments.only or SECTIONS)

    # SIGTERM takes the same way out as Ctrl-C, through the clean-up below. SIGINT gets its
    # handler back even where the shell ignored it (a background job), so `kill -INT` works too.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    env = Environment(Path(tempfile.mkdtemp(prefix="s3watch-bench-")), keep=arguments.keep)
    results = Results()
    prepared: Prepared | None = None
    status = 0
    try:
        env.start()
        describe_machine(env)
        prepared = prepare(env, sizes, sections, arguments.seed)
        for run in range(1, runs + 1):
            if "batch" in sections:
                run_batch(env, prepared, results, arguments.workers, run, runs)
            if "latency" in sections:
                run_latency(env, prepared, results, sizes, arguments.workers, run, runs)
            if "journal" in sections:
                run_journal(env, prepared, results, sizes, run, runs)
            if "idle" in sections:
                run_idle(env, prepared, results, sizes, arguments.workers, run, runs)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process this benchmark started", file=sys.stderr)
        status = 130
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        status = 1
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if prepared is not None and results.values:
            print_report(results, sizes, prepared.data, arguments.workers, runs, arguments.quick)
        for problem in env.close():
            print(f"bench: clean-up: {problem}", file=sys.stderr)
            status = status or 1
        if arguments.keep:
            print(f"kept the work folder {env.work}")
    return status


if __name__ == "__main__":
    sys.exit(main())
