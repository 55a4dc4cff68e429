"""The four measurements: batch throughput, latency, journal and idle cost.

Each function runs one measurement once and returns its figures. `run.py` repeats them and
takes the medians.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import itertools
import json
import mimetypes
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from s3watch.commands import enqueue
from s3watch.config import load_config
from s3watch.demo import PiwigoImitation
from s3watch.journal import JOURNAL_VERSION, Journal
from s3watch.uploader import expect_continue_only_for_large_bodies

from environment import (
    AgentProcess, BenchError, DataSet, Environment, Photo, parse_iso, read_bytes_read, read_cpu_seconds, read_resident_bytes,
    wait_for_uploads,
)

WARM_UP_KEY = "bench-warm-up"
REPLAY_CHILD = Path(__file__).with_name("replay_journal.py")


def upload_timeout(files: int, total_bytes: int) -> float:
    """Return a generous time limit in seconds for uploading a data set (2 minutes plus 5 MB/s and 20 files/s)."""
    return 120.0 + total_bytes / 5e6 + files / 20


# 1. Batch throughput -----------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """One batch upload: how many files and bytes went up in how many seconds."""

    files: int
    bytes: int
    seconds: float
    client_cpu_seconds: float  # CPU used by the uploading process: the agent, this process's threads, or rclone
    server_cpu_seconds: float  # CPU used by SeaweedFS meanwhile
    pickup_seconds: float | None = None  # s3watch only: from the list's drop to its first `queued` record
    bytes_read: int | None = None  # what the uploading process read meanwhile (rchar); None for rclone, not measured
    first_upload_seconds: float | None = None  # s3watch only: from the first `queued` to the first `uploaded` record

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds

    @property
    def reads_per_byte(self) -> float | None:
        """How many times each byte of the data set was read, on average."""
        return None if self.bytes_read is None else self.bytes_read / self.bytes

    @property
    def client_cpu_per_thousand(self) -> float:
        """Client CPU seconds per 1,000 files."""
        return self.client_cpu_seconds * 1000 / self.files

    @property
    def server_cpu_per_thousand(self) -> float:
        """SeaweedFS CPU seconds per 1,000 files."""
        return self.server_cpu_seconds * 1000 / self.files


def server_cpu_seconds(env: Environment) -> float:
    """Return the CPU seconds SeaweedFS (one `weed mini` process) has used so far."""
    assert env.seaweed.process is not None
    return read_cpu_seconds(env.seaweed.process.pid)


def settle(env: Environment, quiet_cpu: float = 0.05, timeout: float = 20.0) -> None:
    """Flush the page cache's dirty data and wait until SeaweedFS is quiet, before a clock starts.

    The previous measurement leaves up to gigabytes to write back and a deleted bucket's
    volumes to remove. Without this, whichever tool went next ran about 10% slower.
    """
    os.sync()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = server_cpu_seconds(env)
        time.sleep(0.5)
        if server_cpu_seconds(env) - before <= quiet_cpu:
            return


def batch_s3watch(env: Environment, data: DataSet, bucket: str, workers: int, name: str) -> Throughput:
    """Queue a data set with `s3watch enqueue --from FILE` into a running agent and time it.

    The clock starts when `enqueue` (called in this process, so without an interpreter start)
    has renamed the list into the spool, and stops at the time stamp of the last `uploaded`
    record in the journal.
    """
    config_path = env.write_agent_config(name, data.root, bucket, monitor=False, workers=workers)
    agent = env.agent(config_path)
    agent.start(("started", "store_ready"))
    try:
        config = load_config(config_path)
        entries = config_path.parent / "entries.txt"
        entries.write_text("".join(f"{photo.path}\n" for photo in data.photos))

        settle(env)
        agent_cpu = read_cpu_seconds(agent.pid)
        agent_read = read_bytes_read(agent.pid)
        server_cpu = server_cpu_seconds(env)
        with contextlib.redirect_stdout(io.StringIO()) as output:
            status = enqueue(config, [], str(entries))
        dropped = time.time()
        if status != 0:
            raise BenchError(f"s3watch enqueue exited with status {status}: {output.getvalue().strip()}")

        paths = [photo.path for photo in data.photos]
        tail, state = wait_for_uploads(agent, config.journal_path, paths, upload_timeout(len(paths), data.total_bytes))
        agent_cpu = read_cpu_seconds(agent.pid) - agent_cpu
        agent_read = read_bytes_read(agent.pid) - agent_read
        server_cpu = server_cpu_seconds(env) - server_cpu
        finished = max(parse_iso(state.uploads[path].ts) for path in paths)
        first_queued = min(parse_iso(tail.first_ts[(path, "queued")]) for path in paths)
        first_uploaded = min(parse_iso(tail.first_ts[(path, "uploaded")]) for path in paths)
    finally:
        agent.stop()
    return Throughput(
        files=len(paths), bytes=data.total_bytes, seconds=finished - dropped,
        client_cpu_seconds=agent_cpu, server_cpu_seconds=server_cpu, bytes_read=agent_read,
        pickup_seconds=first_queued - dropped, first_upload_seconds=first_uploaded - first_queued,
    )


def raw_client(env: Environment, workers: int) -> object:
    """Return a plain boto3 client with s3watch's request settings.

    Those are: path style, checksums only when required, no payload signing, and Expect:
    100-continue only for bodies of 2 MiB and more.
    """
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=env.seaweed.endpoint_url,
        aws_access_key_id=env.seaweed.access_key,
        aws_secret_access_key=env.seaweed.secret_key,
        region_name="us-east-1",
        config=BotoConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            max_pool_connections=workers,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    client.meta.events.register_last("before-call.s3", expect_continue_only_for_large_bodies)
    return client


def warm_up(client: object, bucket: str) -> None:
    """Write one small object into a new bucket before the clock starts.

    SeaweedFS creates a bucket's volumes at its first write, which takes a noticeable fraction
    of a second. s3watch's conditional-write probe at its start has done that write before
    its clock starts, so raw boto3 and rclone get the same head start.
    """
    client.put_object(Bucket=bucket, Key=WARM_UP_KEY, Body=b"warm-up\n")  # type: ignore[attr-defined]


def batch_raw(env: Environment, data: DataSet, bucket: str, workers: int) -> Throughput:
    """Upload a data set with a ThreadPoolExecutor of boto3 put_object calls: the limit s3watch is compared with.

    Each upload checks integrity as s3watch does: the file is read once into memory and
    hashed, then sent with ContentMD5 and IfNoneMatch='*' (s3watch does the same for files up
    to 16 MiB, which every file here is). It writes the object s3watch writes, with the same
    Content-Type and user metadata (md5, image id, which bytes), because the store's work
    for those headers is part of the limit.
    """
    client = raw_client(env, workers)
    warm_up(client, bucket)
    settle(env)

    def upload(number: int, photo: Photo) -> None:
        with open(data.root / photo.path, "rb") as handle:
            content = handle.read()
        digest = hashlib.md5(content)
        client.put_object(  # type: ignore[attr-defined]
            Bucket=bucket, Key=photo.path, Body=content, ContentLength=len(content),
            ContentMD5=base64.b64encode(digest.digest()).decode("ascii"), IfNoneMatch="*",
            ContentType=mimetypes.guess_type(photo.path)[0] or "application/octet-stream",
            Metadata={"md5": digest.hexdigest(), "piwigo-image-id": str(number), "s3watch-bytes": "as-uploaded"},
        )

    client_cpu = time.process_time()
    client_read = read_bytes_read("self")
    server_cpu = server_cpu_seconds(env)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(upload, range(1, len(data.photos) + 1), data.photos):
            pass
    seconds = time.perf_counter() - started
    return Throughput(files=len(data.photos), bytes=data.total_bytes, seconds=seconds,
                      client_cpu_seconds=time.process_time() - client_cpu, server_cpu_seconds=server_cpu_seconds(env) - server_cpu,
                      bytes_read=read_bytes_read("self") - client_read)


def batch_rclone(env: Environment, data: DataSet, bucket: str, workers: int, name: str) -> Throughput:
    """Copy a data set with `rclone copy` (--transfers and --checkers set to `workers`).

    rclone reads each file for its md5 and sends Content-MD5 on single-part uploads (all files
    here are below its 200 MiB multipart cutoff).
    """
    folder = env.work / "rclone" / name
    folder.mkdir(parents=True)
    config = folder / "rclone.conf"
    config.write_text(
        "[bench]\n"
        "type = s3\n"
        "provider = SeaweedFS\n"
        f"access_key_id = {env.seaweed.access_key}\n"
        f"secret_access_key = {env.seaweed.secret_key}\n"
        f"endpoint = {env.seaweed.endpoint_url}\n"
        "region = us-east-1\n"
    )
    config.chmod(0o600)
    command = [
        "rclone", "--config", str(config), "copy", str(data.root / data.subtree), f"bench:{bucket}/{data.subtree}",
        "--transfers", str(workers), "--checkers", str(workers), "--no-check-dest", "--s3-no-check-bucket",
    ]
    warm_up(env.client(), bucket)
    settle(env)
    client_cpu = _children_cpu_seconds()
    server_cpu = server_cpu_seconds(env)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=_rclone_environment())
    seconds = time.perf_counter() - started
    client_cpu = _children_cpu_seconds() - client_cpu
    server_cpu = server_cpu_seconds(env) - server_cpu
    if result.returncode != 0:
        raise BenchError(f"rclone copy exited with status {result.returncode}: {result.stderr.strip()[-500:]}")

    listed = 0
    paginator = env.client().get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{data.subtree}/"):
        listed += page.get("KeyCount", 0)
    if listed != len(data.photos):
        raise BenchError(f"rclone copy left {listed} objects in the bucket, expected {len(data.photos)}")
    return Throughput(files=len(data.photos), bytes=data.total_bytes, seconds=seconds,
                      client_cpu_seconds=client_cpu, server_cpu_seconds=server_cpu)


def _rclone_environment() -> dict[str, str]:
    """Return this process's environment without the AWS_* variables, for rclone.

    rclone 1.60 fails at start ("unable to load custom CA bundle") when AWS_CA_BUNDLE is set,
    even though the store here speaks plain HTTP. Its config file sets everything it needs.
    """
    return {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}


def _children_cpu_seconds() -> float:
    """Return the CPU seconds of this process's finished and waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# 2. Latency ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencySamples:
    """Seconds from the images row's INSERT to the `uploaded` record, and to the `queued` record, per photo."""

    uploaded: list[float]
    queued: list[float]


def latency(env: Environment, root: Path, pool: list[Photo], paced: int, burst: int, workers: int, run: int) -> tuple[LatencySamples, LatencySamples]:
    """Add photos the way Piwigo does while the agent monitors, paced (one a second) and then in a burst.

    Each photo is linked from `pool` into upload/buffer/ before the agent starts (so writing
    it costs nothing during the measurement), renamed into today's day folder, and then its
    row is inserted. The clock starts right after the INSERT committed. It stops at the time
    stamp of the photo's `uploaded` record in the journal. The agent appends that record as
    soon as put_object has returned, so the object exists in the bucket by then.
    Returns the samples of the paced and the burst scenario.
    """
    if paced + burst > len(pool):
        raise BenchError(f"the latency pool has {len(pool)} photos, {paced + burst} needed")
    bucket = env.create_bucket(f"bench-r{run}-latency")
    try:
        config_path = env.write_agent_config(f"r{run}-latency", root, bucket, monitor=True, workers=workers)
        today = datetime.now()
        day_folder = root / "upload" / f"{today:%Y}" / f"{today:%m}" / f"{today:%d}"
        day_folder.mkdir(parents=True, exist_ok=True)
        buffer = root / "upload" / "buffer"
        buffer.mkdir(parents=True, exist_ok=True)
        staged = []
        for index, photo in enumerate(pool[: paced + burst]):
            part = buffer / f"{photo.md5}-r{run}.part"
            os.link(photo.path, part)
            name = f"{today:%Y%m%d%H%M%S}-{photo.md5[:4]}{run:02x}{index:02x}.jpg"
            staged.append((part, day_folder / name, photo))

        agent = env.agent(config_path)
        agent.start(("watching", "store_ready"))
        connection = _KeptOpen(env.database.connect())
        try:
            piwigo = PiwigoImitation(root, lambda: connection, mark="%s")
            journal = load_config(config_path).journal_path
            paced_samples = _add_and_wait(agent, journal, piwigo, root, staged[:paced], interval=1.0)
            burst_samples = _add_and_wait(agent, journal, piwigo, root, staged[paced:], interval=0.0)
        finally:
            connection.connection.close()
            agent.stop()
    finally:
        env.delete_bucket(bucket)
    return paced_samples, burst_samples


class _KeptOpen:
    """A database connection that PiwigoImitation may `close` after each INSERT without closing it.

    Opening a PyMySQL connection to the local MariaDB took about 45 ms on the benchmark
    machine, which would pace a burst at some 20 photos a second, so every INSERT shares one.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def cursor(self) -> Any:
        return self.connection.cursor()

    def commit(self) -> None:
        self.connection.commit()

    def close(self) -> None:
        pass


def _add_and_wait(agent: AgentProcess, journal: Path, piwigo: PiwigoImitation, root: Path,
                  staged: list[tuple[Path, Path, Photo]], interval: float) -> LatencySamples:
    inserted: dict[str, float] = {}
    started = time.monotonic()
    for number, (part, target, photo) in enumerate(staged):
        pause = started + number * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        os.replace(part, target)
        path = str(target.relative_to(root))
        piwigo.insert_row(path, photo.md5, photo.size, file=f"IMG_{number:04d}.jpg")
        inserted[path] = time.time()

    paths = list(inserted)
    total_bytes = sum(photo.size for _part, _target, photo in staged)
    tail, state = wait_for_uploads(agent, journal, paths, upload_timeout(len(paths), total_bytes))
    return LatencySamples(
        uploaded=[parse_iso(state.uploads[path].ts) - inserted[path] for path in paths],
        queued=[parse_iso(tail.first_ts[(path, "queued")]) - inserted[path] for path in paths],
    )


# 3. Journal ---------------------------------------------------------------------------------


def journal_commit_rate(folder: Path, every: int, seconds: float) -> float:
    """Append records through s3watch's Journal with a commit (write and fsync) every `every` records.

    Records alternate between `queued` and `uploaded`, with the fields the agent gives them.
    Runs for at least `seconds` and returns durable records per second.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"commit-every-{every}.jsonl"
    path.unlink(missing_ok=True)
    journal = Journal(path)
    records = 0
    md5 = "0123456789abcdef0123456789abcdef"
    started = time.perf_counter()
    try:
        while True:
            for _ in range(every):
                number = records // 2
                photo = f"upload/2024/05/14/20240514093000-{number:08x}.jpg"
                if records % 2 == 0:
                    journal.append("queued", photo, image_id=number + 1, row_md5=md5, source="batch")
                else:
                    journal.append("uploaded", photo, key=photo, bucket="gallery-originals", md5=md5, bytes=4_000_000, attempts=1,
                                   original="as_uploaded", etag=md5)
                records += 1
            journal.commit()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
    finally:
        journal.close()
        path.unlink(missing_ok=True)
    return records / elapsed


class _TimeStamps:
    """Journal time stamps (ISO 8601 UTC with milliseconds) for a clock that advances in milliseconds."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.second = -1
        self.prefix = ""

    def at(self, milliseconds: int) -> str:
        second, millisecond = divmod(milliseconds, 1000)
        if second != self.second:
            self.second = second
            self.prefix = (self.start + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self.prefix}.{millisecond:03d}Z"


def write_replay_journal(path: Path, uploads: int, seed: int) -> int:
    """Write a journal of `uploads` finished uploads in the agent's format and return its record count.

    Like the agent working through a list, it writes the `queued` records of 500 photos (one
    chunk of a list), then their `uploaded` records, with the fields the agent gives them and
    the JSON encoding of Journal.append (compact separators, UTF-8).
    """
    generator = random.Random(seed)
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    stamps = _TimeStamps(datetime(2025, 1, 1, tzinfo=timezone.utc))
    clock = 0  # milliseconds
    records = 0
    chunk = 500
    first_day = datetime(2015, 1, 1)
    with open(path, "wb") as handle:
        header = [{"ts": stamps.at(clock), "event": "journal", "version": JOURNAL_VERSION},
                  {"ts": stamps.at(clock), "event": "cursor", "image_id": 0}]
        handle.write("".join(encode(record) + "\n" for record in header).encode("utf-8"))
        records += len(header)
        for start in range(0, uploads, chunk):
            batch = []
            lines = []
            for number in range(start, min(start + chunk, uploads)):
                # 300 photos a day, taken 37 s apart from 08:00 on.
                moment = first_day + timedelta(days=number // 300, seconds=8 * 3600 + number % 300 * 37)
                md5 = f"{generator.getrandbits(128):032x}"
                photo = f"upload/{moment:%Y/%m/%d}/{moment:%Y%m%d%H%M%S}-{md5[:8]}.jpg"
                batch.append((number, photo, md5, generator.randint(2_000_000, 6_000_000)))
            for number, photo, md5, _size in batch:
                clock += 1
                lines.append(encode({"ts": stamps.at(clock), "event": "queued", "path": photo, "image_id": number + 1, "row_md5": md5, "source": "batch"}))
            for _number, photo, md5, size in batch:
                clock += 40
                lines.append(encode({"ts": stamps.at(clock), "event": "uploaded", "path": photo, "key": photo, "bucket": "gallery-originals",
                                     "md5": md5, "bytes": size, "attempts": 1, "original": "as_uploaded", "etag": md5}))
            records += len(lines)
            handle.write(("\n".join(lines) + "\n").encode("utf-8"))
    return records


@dataclass(frozen=True)
class Replay:
    """One start of the agent's journal in a fresh process: every record replayed, or read from the snapshot."""

    seconds: float  # reading the journal alone, without the interpreter's start
    peak_bytes: int  # the process's peak resident memory (VmHWM) after reading it
    snapshot_seconds: float | None = None  # writing the snapshot afterwards, as a clean stop does
    snapshot_bytes: int | None = None


def replay(path: Path, expected_uploads: int, from_snapshot: bool = False, behind: int = 0) -> Replay:
    """Read a journal as the agent does at start, in a child process, and return its time and peak memory.

    Without `from_snapshot`, every record is replayed, and the child then writes the snapshot
    a clean stop writes; with it, the child starts from the snapshot, which must leave exactly
    `behind` records to replay. Raises BenchError when the child fails, when the snapshot
    covers another part of the journal, or when the child finds another number of uploaded
    photos, which would mean the journal was not written in the agent's format.
    """
    command = [sys.executable, str(REPLAY_CHILD), str(path), *(["--from-snapshot"] if from_snapshot else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"the journal replay exited with status {result.returncode}: {result.stderr.strip()[-500:]}")
    figures = json.loads(result.stdout)
    if figures["uploaded"] != expected_uploads:
        raise BenchError(f"the replay found {figures['uploaded']} uploaded photos, expected {expected_uploads}")
    if from_snapshot and figures["records"] - figures["snapshot_records"] != behind:
        raise BenchError(f"the snapshot left {figures['records'] - figures['snapshot_records']:,} records to replay, expected {behind:,}")
    return Replay(seconds=figures["seconds"], peak_bytes=figures["peak_bytes"], snapshot_seconds=figures.get("snapshot_seconds"),
                  snapshot_bytes=figures.get("snapshot_bytes"))


def write_journal_behind_snapshot(source: Path, target: Path, behind: int) -> None:
    """Copy the journal at `source` to `target`, with a snapshot of all but its last `behind` records.

    That is the most a running agent leaves to replay after a crash: it writes a snapshot once
    that many records have been appended since the last one. Raises BenchError.
    """
    with open(source, "rb") as lines:
        total = sum(1 for _ in lines)
    if not 0 < behind < total:
        raise BenchError(f"the journal has {total:,} records, too few to leave {behind:,} behind its snapshot")
    with open(source, "rb") as lines, open(target, "wb") as out:
        out.writelines(itertools.islice(lines, total - behind))

    # The child replays what is there and writes its snapshot, as the agent does at that point.
    result = subprocess.run([sys.executable, str(REPLAY_CHILD), str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"the snapshot of the journal's first records could not be written: {result.stderr.strip()[-500:]}")
    with open(source, "rb") as lines, open(target, "ab") as out:
        out.writelines(itertools.islice(lines, total - behind, None))


# 4. Idle cost -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdleCost:
    """An agent watching a quiet gallery: its CPU and memory, and what its start took."""

    cpu_seconds_per_minute: float  # over the whole window
    settled_cpu_seconds_per_minute: float  # over the window without its first `settle_seconds`
    settle_seconds: float
    resident_bytes: int
    start_seconds: float  # from starting the process until it logged `watching` and `store_ready`
    start_cpu_seconds: float


def idle(env: Environment, root: Path, seconds: float, workers: int, run: int) -> IdleCost:
    """Start an agent on a gallery where nothing happens and measure its CPU use and resident memory.

    CPU is utime + stime from /proc/PID/stat over `seconds` after the agent has logged
    `watching` (and `store_ready`, so the bucket check at start is not counted), scaled to one
    minute. The same without the first third of the window (at most 10 s) shows the cost once
    the start's aftermath is over. Memory is VmRSS at the end of the window.
    """
    settle = min(10.0, seconds / 3)
    bucket = env.create_bucket(f"bench-r{run}-idle")
    try:
        agent = env.agent(env.write_agent_config(f"r{run}-idle", root, bucket, monitor=True, workers=workers))
        start_seconds = agent.start(("watching", "store_ready"), timeout=600)
        try:
            before = read_cpu_seconds(agent.pid)
            time.sleep(settle)
            settled = read_cpu_seconds(agent.pid)
            time.sleep(seconds - settle)
            after = read_cpu_seconds(agent.pid)
            resident = read_resident_bytes(agent.pid)
            if not agent.running():
                raise BenchError(f"the agent exited during the idle measurement:\n{agent.log_tail()}")
        finally:
            agent.stop()
    finally:
        env.delete_bucket(bucket)
    return IdleCost(cpu_seconds_per_minute=(after - before) * 60 / seconds,
                    settled_cpu_seconds_per_minute=(after - settled) * 60 / (seconds - settle), settle_seconds=settle,
                    resident_bytes=resident,
                    start_seconds=start_seconds, start_cpu_seconds=before)


def rclone_available() -> bool:
    """Tell whether `rclone` is on PATH."""
    return shutil.which("rclone") is not None
