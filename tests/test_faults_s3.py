"""The agent against a real SeaweedFS through a fault-injecting proxy: errors, resets, stalls, an outage.

Each test adds photos the way Piwigo does and checks that every photo reaches the bucket
without any re-queueing, SIGHUP or restart, with its exact bytes and md5 metadata, and that no
object is ever partial or overwritten.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from s3watch.agent import FIRST_PROBE_DELAY
from s3watch.demo import PiwigoImitation, sample_photo
from s3watch.seaweed import SeaweedFS

from .conftest import AgentProcess, Setup, run_cli, wait_for
from .faultproxy import FaultProxy, RequestHead, connection_reset, error_response, hold, stall

ATTEMPTS = 2  # uploads.attempts in the `setup` fixture


@dataclass(frozen=True)
class Photo:
    path: str
    image_id: int
    data: bytes

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()


def photo_put(head: RequestHead) -> bool:
    """Match a photo's upload; the bucket check and the conditional-write probe go through untouched."""
    return head.method == "PUT" and "/upload/" in head.path


def conditional_write_probe(head: RequestHead) -> bool:
    """Match the agent's check that the store refuses overwrites (a PUT to <prefix>.s3watch/conditional-write-probe)."""
    return head.method == "PUT" and head.path.endswith("/.s3watch/conditional-write-probe")


def add_photos(piwigo: PiwigoImitation, count: int, size: int = 200_000, first: int = 0) -> dict[str, Photo]:
    photos = {}
    for number in range(first, first + count):
        data = sample_photo(number, size=size)
        image_id, path = piwigo.add_photo(data)
        photos[path] = Photo(path, image_id, data)
    return photos


def upload_codes(setup: Setup, photos: dict[str, Photo]) -> dict[str, str | None]:
    """Return each photo's state: its failure code while it waits after a failure, else its journal status."""
    uploads = setup.journal().uploads
    codes: dict[str, str | None] = {}
    for path in photos:
        upload = uploads.get(path)
        if upload is None:
            codes[path] = None
        elif upload.status == "pending" and upload.event == "failed":
            codes[path] = upload.code
        else:
            codes[path] = upload.status
    return codes


def all_waiting_with(setup: Setup, photos: dict[str, Photo], code: str) -> bool:
    return all(value == code for value in upload_codes(setup, photos).values())


def wait_until_uploaded(setup: Setup, photos: dict[str, Photo], timeout: float = 90.0) -> None:
    wait_for(lambda: all(value == "uploaded" for value in upload_codes(setup, photos).values()), timeout,
             f"all {len(photos)} photos uploaded (states now: {sorted(set(upload_codes(setup, photos).values()), key=str)})")


def assert_objects_intact(client: Any, bucket: str, photos: dict[str, Photo]) -> None:
    """Check that each photo's object contains exactly its bytes, with its md5 and image id in the metadata."""
    for photo in photos.values():
        response = client.get_object(Bucket=bucket, Key=photo.path)
        body = response["Body"].read()
        assert len(body) == len(photo.data), photo.path
        assert body == photo.data, photo.path
        assert response["Metadata"]["md5"] == photo.md5, photo.path
        assert response["Metadata"]["piwigo-image-id"] == str(photo.image_id), photo.path


def assert_uploaded_once(setup: Setup, photos: dict[str, Photo]) -> None:
    """Check that the journal records one `uploaded` per photo, each for the photo's md5."""
    records = [record for record in setup.records() if record["event"] == "uploaded" and record["path"] in photos]
    assert sorted(record["path"] for record in records) == sorted(photos)
    for record in records:
        assert record["md5"] == photos[record["path"]].md5, record["path"]


def failure_records(setup: Setup, photos: dict[str, Photo], code: str) -> list[dict[str, Any]]:
    """Return the journal's `failed` records of real attempts (not of uploads waiting behind another)."""
    return [
        record for record in setup.records()
        if record["event"] == "failed" and record["path"] in photos and record.get("code") == code
        and not str(record.get("error", "")).startswith("waiting:")
    ]


class ObjectWatcher:
    """Poll each photo's key directly on SeaweedFS, not through the proxy, in a thread.

    Every object seen at a key must be the photo's complete bytes with its md5 in the metadata.
    `wrong` lists each other sighting.
    """

    def __init__(self, client: Any, bucket: str, photos: dict[str, Photo]) -> None:
        self.client = client
        self.bucket = bucket
        self.photos = photos
        self.wrong: list[str] = []
        self.checked: dict[str, str] = {}  # key -> ETag of the complete object seen there
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="object-watcher", daemon=True)

    def start(self) -> "ObjectWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for photo in list(self.photos.values()):
                self._check(photo)

    def _check(self, photo: Photo) -> None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=photo.path)
        except botocore.exceptions.ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                self.wrong.append(f"{photo.path}: HEAD failed: {error}")
            return
        if self.checked.get(photo.path) == head["ETag"]:
            return
        if head["ContentLength"] != len(photo.data) or head["Metadata"].get("md5") != photo.md5:
            self.wrong.append(f"{photo.path}: {head['ContentLength']} bytes with md5 metadata {head['Metadata'].get('md5')}, "
                              f"expected {len(photo.data)} bytes with {photo.md5}")
            return
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=photo.path)["Body"].read()
        except botocore.exceptions.ClientError as error:
            self.wrong.append(f"{photo.path}: GET failed after HEAD found it: {error}")
            return
        if body != photo.data:
            self.wrong.append(f"{photo.path}: {len(body)} bytes that are not the photo's")
            return
        self.checked[photo.path] = head["ETag"]


@pytest.fixture
def start_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    """Start fault proxies in front of loopback S3 servers; all are stopped at the end of the test."""
    proxies: list[FaultProxy] = []

    def start(upstream_url: str) -> FaultProxy:
        proxy = FaultProxy(upstream_url).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def proxy(start_proxy: Callable[[str], FaultProxy], seaweed: SeaweedFS) -> FaultProxy:
    """A fault proxy in front of the session's SeaweedFS, healthy until the test injects faults."""
    return start_proxy(seaweed.endpoint_url)


@pytest.fixture
def proxied_setup(setup: Setup, proxy: FaultProxy) -> Setup:
    """The test's setup with the agent sending every S3 request through `proxy`.

    A test that lists this fixture before `agent` has the agent stopped before the proxy.
    """
    setup.update("s3", endpoint_url=proxy.endpoint_url, connect_timeout=2, read_timeout=10)
    return setup


ERROR_CASES = [
    pytest.param(500, "InternalError", None, None, id="500-every-request-until-healed"),
    pytest.param(503, "ServiceUnavailable", 12, None, id="503-first-12-requests"),
    pytest.param(503, "SlowDown", None, photo_put, id="slowdown-photo-puts-until-healed"),
    pytest.param(503, "SlowDown", 6, photo_put, id="slowdown-first-6-photo-puts"),
]


@pytest.mark.parametrize(("status", "code", "count", "match"), ERROR_CASES)
def test_error_responses_then_healthy_store(
    status: int, code: str, count: int | None, match: Callable[[RequestHead], bool] | None, proxy: FaultProxy,
    proxied_setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str,
) -> None:
    setup = proxied_setup
    failed_code = f"failed_code_{status}"
    proxy.inject(error_response(status, code, count=count, match=match))
    agent.start()
    photos = add_photos(piwigo, 5)

    if count is None:
        wait_for(lambda: all_waiting_with(setup, photos, failed_code), 60, f"every photo waiting with {failed_code}")
        proxy.heal()
    wait_until_uploaded(setup, photos)

    assert_objects_intact(seaweed.client(), bucket, photos)
    assert_uploaded_once(setup, photos)
    if count is not None:
        assert proxy.count("error") == count
    assert proxy.count("error") >= ATTEMPTS
    # With at least `attempts` errors on photos' requests, some photo used up its attempts.
    assert failure_records(setup, photos, failed_code) != []
    assert "uploads_paused" in agent.log()
    assert "uploads_resumed" in agent.log()
    assert "reloaded" not in agent.log()


RESET_CASES = [
    pytest.param("headers", None, None, id="after-headers-until-healed"),
    pytest.param("body", 10, None, id="mid-body-first-10-requests"),
    pytest.param("body", None, photo_put, id="mid-body-photo-puts-until-healed"),
    pytest.param("response", 5, photo_put, id="response-lost-first-5-photo-puts"),
]


@pytest.mark.parametrize(("stage", "count", "match"), RESET_CASES)
def test_connection_resets_then_healthy_store(
    stage: str, count: int | None, match: Callable[[RequestHead], bool] | None, proxy: FaultProxy, proxied_setup: Setup,
    agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str,
) -> None:
    setup = proxied_setup
    proxy.inject(connection_reset(stage, count=count, match=match))
    agent.start()
    photos = add_photos(piwigo, 5, size=600_000)
    watcher = ObjectWatcher(seaweed.client(), bucket, photos).start()
    try:
        if count is None:
            wait_for(lambda: all_waiting_with(setup, photos, "failed_code_0"), 60, "every photo waiting with failed_code_0")
            proxy.heal()
        wait_until_uploaded(setup, photos)
    finally:
        watcher.stop()

    assert watcher.wrong == []
    assert_objects_intact(seaweed.client(), bucket, photos)
    assert_uploaded_once(setup, photos)
    if count is not None:
        assert proxy.count("reset") == count
    assert "upload_retry" in agent.log()
    if stage == "response":
        # The first PUTs were stored though their response was lost. The retry finds s3watch's own
        # object (same md5 metadata and size) and records it as uploaded, with the stored ETag.
        client = seaweed.client()
        uploads = setup.journal().uploads
        for photo in photos.values():
            assert uploads[photo.path].etag == client.head_object(Bucket=bucket, Key=photo.path)["ETag"].strip('"'), photo.path
    else:
        assert failure_records(setup, photos, "failed_code_0") != []


STALL_CASES = [
    # The proxy drops the rest of the body: the agent waits for a response and hits s3.read_timeout.
    pytest.param(True, 800_000, 0.5, id="proxy-drops-the-rest"),
    # The proxy stops reading: the agent's send blocks once the socket buffers (a few MiB) are
    # full, and the socket timeout ends it.
    pytest.param(False, 12 * 1024 * 1024, 0.25, id="proxy-stops-reading"),
]


@pytest.mark.parametrize(("keep_reading", "size", "fraction"), STALL_CASES)
def test_stalled_body_leaves_no_partial_object(
    keep_reading: bool, size: int, fraction: float, proxy: FaultProxy, proxied_setup: Setup, agent: AgentProcess,
    piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str,
) -> None:
    setup = proxied_setup
    setup.update("s3", connect_timeout=2, read_timeout=2)
    client = seaweed.client()
    proxy.inject(stall(match=photo_put, fraction=fraction, keep_reading=keep_reading))
    agent.start()
    photos = add_photos(piwigo, 4, size=size)
    watcher = ObjectWatcher(client, bucket, photos).start()
    try:
        wait_for(lambda: proxy.held >= 1, 60, "an upload held mid-body by the proxy")
        stalled = {record.path for record in proxy.records("stall")}
        for path in stalled:
            key = path.removeprefix(f"/{bucket}/")
            with pytest.raises(botocore.exceptions.ClientError) as missing:
                client.head_object(Bucket=bucket, Key=key)
            assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404, key

        # The proxy never closes a held connection before the test heals it, so a failed photo
        # proves that the agent gave up on its own (socket timeout) and tried again.
        wait_for(lambda: failure_records(setup, photos, "failed_code_0"), 60, "a photo failed with failed_code_0 while the proxy held it")
        assert proxy.count("stall") >= ATTEMPTS
        if keep_reading:
            errors = [str(record.get("error")) for record in failure_records(setup, photos, "failed_code_0")]
            assert any("timed out" in error for error in errors), errors
        # While every photo's body stalls, no photo object may exist, not even a truncated one.
        assert client.list_objects_v2(Bucket=bucket, Prefix="upload/")["KeyCount"] == 0

        proxy.heal()
        wait_until_uploaded(setup, photos)
    finally:
        watcher.stop()

    assert watcher.wrong == []
    assert_objects_intact(client, bucket, photos)
    assert_uploaded_once(setup, photos)
    assert "upload_retry" in agent.log()


def part_upload(number: int) -> Callable[[RequestHead], bool]:
    """Match the upload of part `number` of a multipart upload."""
    return lambda head: head.method == "PUT" and f"partNumber={number}&" in f"{head.target}&"


def multipart_completion(head: RequestHead) -> bool:
    return head.method == "POST" and "uploadId=" in head.target


def test_multipart_upload_survives_faults(
    proxy: FaultProxy, proxied_setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str,
) -> None:
    setup = proxied_setup
    setup.update("s3", connect_timeout=2, read_timeout=2)
    setup.update("uploads", multipart_threshold_mb=5, part_size_mb=5)
    client = seaweed.client()
    # Each fault applies to the first request it matches, in this order.
    proxy.inject(
        connection_reset("body", count=1, match=part_upload(2)),
        stall(count=1, match=part_upload(3)),
        connection_reset("response", count=1, match=multipart_completion),
    )
    agent.start()
    photos = add_photos(piwigo, 1, size=12 * 1024 * 1024)
    watcher = ObjectWatcher(client, bucket, photos).start()
    try:
        wait_until_uploaded(setup, photos)
    finally:
        watcher.stop()

    assert watcher.wrong == []
    assert proxy.count("reset") == 2
    assert proxy.count("stall") == 1
    assert_objects_intact(client, bucket, photos)
    assert_uploaded_once(setup, photos)
    (photo,) = photos.values()
    assert client.head_object(Bucket=bucket, Key=photo.path)["ETag"].strip('"').endswith("-3")
    # Every multipart upload that failed was aborted, so no parts are left behind.
    assert client.list_multipart_uploads(Bucket=bucket, Prefix="upload/").get("Uploads", []) == []


OUTAGE_SECONDS = 45.0  # long enough for several probes at growing intervals, short enough for CI
OUTAGE_PHOTOS = 20
OUTAGE_ATTEMPTS = 5  # the default uploads.attempts
OUTAGE_RETRY_INTERVAL = 20.0  # maximum pause between probes, in seconds (the default is 300)
OUTAGE_WORKERS = 4


def max_probes(seconds: float) -> int:
    """Return the most probe uploads the agent may start in `seconds` of outage.

    Probes follow each other at intervals from FIRST_PROBE_DELAY, doubling up to uploads.retry_interval.
    """
    probes, elapsed, delay = 0, 0.0, FIRST_PROBE_DELAY
    while elapsed + delay <= seconds:
        elapsed += delay
        probes += 1
        delay = min(delay * 2, OUTAGE_RETRY_INTERVAL)
    return probes


@pytest.mark.slow
def test_store_outage_waits_without_retry_storm(
    start_proxy: Callable[[str], FaultProxy], setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, tmp_path: Path,
) -> None:
    store = SeaweedFS(tmp_path / "store", access_key="test-access", secret_key="test-secret-Kp3mN9")
    store.start()
    try:
        store.create_bucket("outage")
        proxy = start_proxy(store.endpoint_url)
        setup.update("s3", bucket="outage", endpoint_url=proxy.endpoint_url, connect_timeout=2, read_timeout=10)
        setup.update("uploads", workers=OUTAGE_WORKERS, attempts=OUTAGE_ATTEMPTS, retry_interval=OUTAGE_RETRY_INTERVAL)
        agent.start()
        first = add_photos(piwigo, 1)
        wait_until_uploaded(setup, first)

        store.stop()
        down_at = time.monotonic()
        connections_before = proxy.connections
        photos = add_photos(piwigo, OUTAGE_PHOTOS, first=1)
        wait_for(lambda: all_waiting_with(setup, photos, "failed_code_0"), OUTAGE_SECONDS, "every photo waiting with failed_code_0")
        # The fault must last: the store stays down for OUTAGE_SECONDS whatever the agent does.
        time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))
        up_at = time.monotonic()
        requests = proxy.count(since=down_at, until=up_at)
        connections = proxy.connections - connections_before
        store.start()

        wait_until_uploaded(setup, photos, timeout=OUTAGE_RETRY_INTERVAL + 90)
        assert_objects_intact(store.client(), "outage", photos)
        assert_uploaded_once(setup, photos)
    finally:
        agent.stop()
        store.stop()

    outage = up_at - down_at
    per_minute = requests * 60 / outage
    storm = OUTAGE_PHOTOS * OUTAGE_ATTEMPTS
    # The design: the uploads in flight when the store failed use up their own attempts, then one
    # probe upload at a time, each of at most `attempts` requests (the bucket check fails first).
    allowed = OUTAGE_WORKERS * OUTAGE_ATTEMPTS + OUTAGE_ATTEMPTS * max_probes(outage)
    print(f"\nstore down {outage:.0f} s with {OUTAGE_PHOTOS} photos pending: {requests} requests "
          f"({per_minute:.1f} per minute) on {connections} connections; allowed {allowed} requests; "
          f"a retry storm would be {storm} per minute")
    assert proxy.count("forwarded", since=down_at, until=up_at) == 0
    assert requests <= allowed
    assert per_minute < storm / 2


def test_foreign_object_survives_faults(
    proxy: FaultProxy, proxied_setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str,
) -> None:
    setup = proxied_setup
    client = seaweed.client()
    data = sample_photo(100, size=300_000)
    occupied_path = piwigo.place_file(data)
    foreign = b"another program's object at this key"
    client.put_object(Bucket=bucket, Key=occupied_path, Body=foreign)
    etag = client.head_object(Bucket=bucket, Key=occupied_path)["ETag"]

    def on_occupied_key(head: RequestHead) -> bool:
        return head.path == f"/{bucket}/{occupied_path}"

    proxy.inject(
        connection_reset("headers", count=3),
        error_response(503, "SlowDown", count=4, match=on_occupied_key),
        connection_reset("response", count=2, match=on_occupied_key),
    )
    agent.start()
    piwigo.insert_row(occupied_path, hashlib.md5(data).hexdigest(), len(data))
    others = add_photos(piwigo, 3, first=101)

    wait_for(lambda: setup.upload_status(occupied_path) == "already_present", 90, f"{occupied_path} recorded already_present")
    wait_until_uploaded(setup, others)

    assert proxy.count("reset") == 5
    assert proxy.count("error") == 4
    assert client.get_object(Bucket=bucket, Key=occupied_path)["Body"].read() == foreign
    assert client.head_object(Bucket=bucket, Key=occupied_path)["ETag"] == etag
    outcomes = [record["event"] for record in setup.records()
                if record.get("path") == occupied_path and record["event"] in ("uploaded", "already_present")]
    assert outcomes == ["already_present"]
    reported = {item["path"]: item["status"] for item in setup.status()["problems"]}
    assert reported[occupied_path] == "already_present"
    assert_objects_intact(client, bucket, others)
    assert_uploaded_once(setup, others)


def test_probe_delay_ignores_in_flight_failures(
    proxy: FaultProxy, proxied_setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, seaweed: SeaweedFS, bucket: str,
) -> None:
    setup = proxied_setup
    setup.update("s3", connect_timeout=2, read_timeout=2)
    setup.update("uploads", workers=4, retry_interval=300)
    proxy.inject(stall(match=photo_put))
    agent.start()
    photos = add_photos(piwigo, 4)

    # Four uploads held at once: each of the 4 workers is in flight when the store fails.
    wait_for(lambda: proxy.held == 4, 60, "4 uploads held by the proxy at once")
    wait_for(lambda: all(failure_records(setup, {path: photo}, "failed_code_0") for path, photo in photos.items()), 60,
             "each of the 4 uploads in flight failed with failed_code_0")
    assert agent.log().count("uploads_paused") == 1
    proxy.heal()

    # README: uploads pause, and one upload is tried again after 5 s, then at doubling intervals.
    wait_until_uploaded(setup, photos, timeout=FIRST_PROBE_DELAY + 10)
    assert_objects_intact(seaweed.client(), bucket, photos)


PROBE_ANSWERS = [
    pytest.param(None, id="probe-answered-normally"),
    pytest.param(error_response(400, "RequestTimeout", "Your socket connection to the server was not read from or written to "
                                "within the timeout period.", count=1, match=conditional_write_probe),
                 id="probe-answered-400-RequestTimeout"),
]


@pytest.mark.parametrize("probe_fault", PROBE_ANSWERS)
def test_object_written_during_upload_not_overwritten(
    probe_fault: Any, proxy: FaultProxy, proxied_setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation,
    seaweed: SeaweedFS, bucket: str,
) -> None:
    setup = proxied_setup
    client = seaweed.client()
    faults = [hold(count=1, match=photo_put)]
    if probe_fault is not None:
        faults.insert(0, probe_fault)
    proxy.inject(*faults)
    agent.start()
    # A store check that fails ends with store_unavailable; the upload then checks the store again.
    wait_for(lambda: "store_ready" in agent.log() or "store_unavailable" in agent.log(), 60, "the agent's store check")

    data = sample_photo(1, size=200_000)
    _, path = piwigo.add_photo(data)
    wait_for(lambda: proxy.held == 1, 60, "the photo's PUT held by the proxy")
    # Another program writes at the key while s3watch's upload is in flight.
    foreign = b"another program's object, written while s3watch was uploading"
    client.put_object(Bucket=bucket, Key=path, Body=foreign)
    proxy.heal()

    wait_for(lambda: setup.upload_status(path) in ("uploaded", "already_present"), 60, f"{path} finished")
    assert client.get_object(Bucket=bucket, Key=path)["Body"].read() == foreign
    assert setup.upload_status(path) == "already_present"
    assert "conditional_writes_unsupported" not in agent.log()


@pytest.mark.slow
def test_stop_abandons_hung_upload(proxy: FaultProxy, proxied_setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    setup = proxied_setup
    # Longer than the stop deadline, systemd's stop timeout and AgentProcess.stop's wait of 60 s.
    setup.update("s3", read_timeout=300)
    agent.start()
    wait_for(lambda: agent.logged("store_ready"), what="the store check")
    proxy.inject(hold(match=photo_put))
    (path,) = add_photos(piwigo, 1)
    wait_for(lambda: proxy.held == 1, what="the photo's upload to be held")

    assert agent.stop() == 0  # before the held request could time out
    assert proxy.held == 1
    assert agent.logged("stop_deadline_passed")
    assert agent.logged("journal_snapshot_written")
    assert agent.logged("stopped")
    assert setup.upload_status(path) == "pending"

    proxy.heal()
    agent.start()
    wait_for(lambda: setup.upload_status(path) in ("uploaded", "already_present"), what="the photo after the restart")


def test_bucket_change_during_upload(proxy: FaultProxy, proxied_setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation,
                                                    seaweed: SeaweedFS, bucket: str) -> None:
    # A reload that changes s3.bucket while an upload is in flight: the journal names the bucket
    # the object went to, not the one configured when the upload ended.
    setup = proxied_setup
    agent.start()
    wait_for(lambda: agent.logged("store_ready"), what="the store check")
    proxy.inject(hold(count=1, match=photo_put))
    _, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: proxy.held == 1, what="the photo's PUT held by the proxy")

    other = f"{bucket}-new"
    seaweed.create_bucket(other)
    setup.update("s3", bucket=other)
    agent.signal(signal.SIGHUP)
    wait_for(lambda: agent.logged("reloaded"), what="the reload")
    proxy.heal()
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")

    assert setup.journal().uploads[path].bucket == bucket
    seaweed.client().head_object(Bucket=bucket, Key=path)  # type: ignore[attr-defined]
    assert run_cli("--config", str(setup.path), "verify").returncode == 0


def test_duplicate_waits_for_upload_in_flight(proxy: FaultProxy, proxied_setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation,
                                              seaweed: SeaweedFS, bucket: str) -> None:
    # Two photos of the same content. The first one's upload finds another program's object at its
    # key, so the second cannot be its duplicate: it is uploaded itself.
    setup = proxied_setup
    setup.update("uploads", prevent_duplicates=True, workers=2)
    agent.start()
    wait_for(lambda: agent.logged("store_ready"), what="the store check")
    client = seaweed.client()
    data = sample_photo(1)

    proxy.inject(hold(count=1, match=photo_put))
    _, first = piwigo.add_photo(data)
    wait_for(lambda: proxy.held == 1, what="the first PUT held by the proxy")
    client.put_object(Bucket=bucket, Key=first, Body=b"another program's object")
    _, second = piwigo.add_photo(data)
    wait_for(lambda: setup.upload_status(second) == "pending" and agent.log().count("queued") >= 2, what="the second photo queued")
    proxy.heal()

    wait_for(lambda: setup.upload_status(first) == "already_present", what="the first photo's upload")
    wait_for(lambda: setup.upload_status(second) == "uploaded", what="the second photo uploaded itself")
    assert client.get_object(Bucket=bucket, Key=second)["Body"].read() == data
