"""Everything about talking to S3: keys, the never-overwrite upload, error codes, retries and links."""

from __future__ import annotations

import base64
import hashlib
import io
import mimetypes
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Collection
from urllib.parse import quote

import boto3
import botocore.exceptions
import botocore.utils
import structlog
from botocore.config import Config as BotoConfig
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_when_event_set, wait_random_exponential

from .config import LinksConfig, S3Config, UploadsConfig

log = structlog.get_logger("s3watch.uploader")

MAX_KEY_BYTES = 1024
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
READ_SIZE = 1024 * 1024
# A file up to this size, below the multipart threshold, is read into memory once, hashed and
# sent from there: each byte is read from disk once, and the bytes sent are the bytes hashed.
# A larger one is read twice (to hash, then to send), so a worker keeps at most this much in memory.
IN_MEMORY_LIMIT = 16 * 1024 * 1024
# Bodies from this size on are sent with Expect: 100-continue (see expect_continue_only_for_large_bodies).
EXPECT_CONTINUE_THRESHOLD = 2 * 1024 * 1024

# The body of an upload: the content in memory, or the open file.
Body = bytes | BinaryIO

# Error codes (S3's `Code` element) that mean the store is busy or the request may succeed if sent again.
TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
     "RequestTimeTooSkewed", "BadDigest", "ConditionalRequestConflict", "OperationAborted", "XAmzContentSHA256Mismatch"}
)
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})



def printable(text: str) -> str:
    """Return `text` with its control characters (a line break, a terminal's escape) written as escapes such as \\n, for a report line."""
    return CONTROL_CHARACTERS.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)

class UploadFailed(Exception):
    """An attempt failed. `status` is the HTTP status, or 0 when the endpoint was not reached."""

    def __init__(self, status: int, message: str, transient: bool) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.transient = transient

    @property
    def code(self) -> str:
        """The status code shown in status and the journal, e.g. `failed_code_403`."""
        return f"failed_code_{self.status}"


# The meaning of an `already_present` upload and its fix, for the log, status, url and verify.
ALREADY_PRESENT_HINT = ("another object was already at the key and was left untouched, so this photo has no copy in the bucket: "
                        "look at that object first, because it may be an earlier file of this photo; to send the photo, "
                        "move the object elsewhere, then run 's3watch verify --requeue'")


class FileGone(Exception):
    """The file is no longer there, or is no longer a regular file inside the gallery."""


# A file that changed while it was read, or changed a moment ago and does not match its row:
# it may still be being written, so it is not uploaded yet.
FILE_BUSY_CODE = "failed_file_busy"
SETTLE_SECONDS = 2.0


class FileBusy(Exception):
    """The file is still changing; the message describes the change."""


@dataclass(frozen=True)
class UploadRequest:
    """One photo to upload: its gallery path, image id, object key and the row's md5sum."""

    path: str  # relative to the gallery root
    image_id: int | None
    key: str
    row_md5: str | None
    capture: Path | None = None  # a copy taken on arrival, sent instead of the file when its md5 is the row's
    format_id: int | None = None  # set for a photo's extra format
    original_note: str | None = None  # why no copy on arrival can be sent, when one was expected


@dataclass(frozen=True)
class Outcome:
    """The end of one upload: an event name for the journal and its fields."""

    path: str
    event: str  # uploaded, already_present, duplicate, failed, gone
    key: str | None = None
    md5: str | None = None
    bytes: int | None = None
    etag: str | None = None
    code: str | None = None
    error: str | None = None
    transient: bool = False
    attempts: int = 1
    ms: int = 0
    duplicate_of: str | None = None
    original: str | None = None  # "as_uploaded" when the bytes' md5 is the row's md5sum, else "as_stored"
    original_note: str | None = None
    existing: bool = False  # the object was already at the key, this photo's copy: nothing was sent
    bucket: str | None = None  # the bucket the request went to


# Renaming the file would break its images row, so the advice for a name that makes no valid key is the template.
_TEMPLATE_ADVICE = "set s3.key_template to one without the file's name, such as {prefix}{image_id}-{md5}.{ext}, and reload"


def object_key(template: str, prefix: str, path: str, image_id: int | None, md5: str | None) -> str:
    """Build an object key from the configured template and a photo's fields.

    `path` is images.path without './'. Raises ValueError when the result is not a valid key
    (empty, over 1024 bytes in UTF-8, or with control characters or undecodable bytes).
    """
    name = path.rstrip("/").rpartition("/")[2]
    stem, dot, ext = name.rpartition(".")
    key = template.format(
        prefix=prefix, path=path, image_id=image_id if image_id is not None else "", md5=md5 or "",
        file=name, name=stem if dot else name, ext=ext if dot else "",
    )
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"key {key!r} contains bytes that are not UTF-8: {_TEMPLATE_ADVICE}") from None
    if not key:
        raise ValueError("the key template gave an empty key")
    if size > MAX_KEY_BYTES:
        raise ValueError(f"key is {size} bytes, over S3's limit of {MAX_KEY_BYTES}: shorten s3.prefix or the file name")
    if CONTROL_CHARACTERS.search(key):
        raise ValueError(f"key {key!r} contains control characters, which S3 listings cannot return: {_TEMPLATE_ADVICE}")
    return key


def classify_error(error: Exception) -> UploadFailed:
    """Map a botocore exception to an UploadFailed with its status and whether a retry may help."""
    if isinstance(error, UploadFailed):
        return error
    if isinstance(error, botocore.exceptions.ClientError):
        response = error.response
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(response.get("Error", {}).get("Code", ""))
        message = str(response.get("Error", {}).get("Message", "")) or code
        if code == "NoSuchBucket":
            return UploadFailed(404, f"bucket not found ({code}): check s3.bucket and s3.region", transient=False)
        if status == 404 and error.operation_name == "HeadBucket":
            # A response to HEAD has no body, so a server that is not S3 at all looks the same.
            return UploadFailed(404, f"bucket not found ({code}): check s3.bucket and s3.region, and that s3.endpoint_url is the S3 service",
                                transient=False)
        if status == 403:
            return UploadFailed(403, f"access denied ({code}: {message}): check the S3 access key, secret and bucket policy", transient=False)
        if status == 301 or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
            return UploadFailed(status or 400, f"wrong region for the bucket ({code}): check s3.region", transient=False)
        transient = status >= 500 or status in TRANSIENT_STATUSES or code in TRANSIENT_CODES
        return UploadFailed(status, f"{code or 'error'}: {message}", transient=transient)
    if isinstance(error, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return UploadFailed(403, "no S3 credentials found: set s3.access_key_id and s3.secret_access_key, or pass them as systemd credentials "
                                 "(s3_access_key_id and s3_secret_access_key in $CREDENTIALS_DIRECTORY; by hand: "
                                 "sudo CREDENTIALS_DIRECTORY=/etc/s3watch/credentials s3watch ...)", transient=False)
    if isinstance(error, botocore.exceptions.SSLError):
        return UploadFailed(0, f"TLS with the S3 endpoint failed ({error}): use https:// in s3.endpoint_url only for an endpoint that "
                               "speaks TLS, with a certificate this machine trusts", transient=True)
    if isinstance(error, botocore.exceptions.EndpointConnectionError):
        return UploadFailed(0, f"could not connect to the S3 endpoint ({error.kwargs.get('endpoint_url', '')}): is it running and is s3.endpoint_url right?", transient=True)
    if isinstance(error, (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError)):
        return UploadFailed(0, f"timed out talking to the S3 endpoint: {error}", transient=True)
    if isinstance(error, botocore.exceptions.HTTPClientError):
        return UploadFailed(0, f"connection to the S3 endpoint failed: {error}", transient=True)
    if isinstance(error, botocore.exceptions.BotoCoreError):
        return UploadFailed(0, f"S3 request failed: {error}", transient=True)
    raise error


def open_original(root: Path, path: str, allowed: Collection[str] | None = None) -> tuple[BinaryIO, int]:
    """Open a photo for reading, refusing anything but a regular file inside the gallery.

    `allowed` lists the folders, with their symbolic links resolved, that the file may really
    be in: by default the root alone. Returns the open file and its size. Raises FileGone when
    the file is missing, is not a regular file, or resolves (through '..' or symbolic links)
    to a place outside them.
    """
    if allowed is None:
        allowed = (os.path.realpath(root),)
    absolute = os.path.join(root, path)
    try:
        fd = os.open(absolute, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not hang
    except FileNotFoundError:
        raise FileGone(f"{path} is missing: deleted or renamed, or not written yet") from None
    except OSError as error:
        raise FileGone(f"{path} could not be opened ({error.strerror})") from None

    # The place of the file is checked after opening it, so that no link can be swapped in
    # between the check and the open. /proc/self/fd names the opened file in one system
    # call; realpath, which walks every folder of the path, is the fallback without /proc.
    try:
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = os.path.realpath(absolute)
        if not any(real.startswith(folder.rstrip(os.sep) + os.sep) for folder in allowed):
            raise FileGone(f"{path} resolves to {real}, outside the gallery {' and '.join(allowed)}")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileGone(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), info.st_size


def _read_body(handle: BinaryIO, path: str | Path, in_memory_limit: int) -> tuple[Body, str, int, os.stat_result]:
    """Read an open file from its start for its md5 and size, and return what to send.

    Returns (body, md5, size, the file's status after the read). A file of at most
    `in_memory_limit` bytes is read into memory and closed, and the body is its content as
    bytes. A larger file is the body itself, rewound. The file is also closed on error.
    Raises FileBusy when the file changed while it was read, and OSError.
    """
    try:
        before = os.fstat(handle.fileno())
        body: Body
        if before.st_size <= in_memory_limit:
            # One byte more than expected: a file that grew meanwhile shows as a size mismatch.
            body = handle.read(before.st_size + 1)
            md5, size = hashlib.md5(body).hexdigest(), len(body)
        else:
            digest = hashlib.md5()
            size = 0
            while chunk := handle.read(READ_SIZE):
                digest.update(chunk)
                size += len(chunk)
            handle.seek(0)
            body, md5 = handle, digest.hexdigest()
        after = os.fstat(handle.fileno())
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or size != after.st_size:
            raise FileBusy(f"{path} changed while it was read")
    except BaseException:
        handle.close()
        raise

    if body is not handle:
        handle.close()
    return body, md5, size, after


def _close(body: Body) -> None:
    """Close `body` if it is an open file; content in memory needs nothing."""
    if not isinstance(body, bytes):
        body.close()


def _content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


class DuplicateIndex:
    """The md5 index of uploaded content, shared by the workers, with the md5s being uploaded right now.

    `uploaded` is the journal's index (md5 -> key); the agent adds to it as uploads are recorded.
    """

    def __init__(self, uploaded: dict[str, str]) -> None:
        self.uploaded = uploaded
        self._in_flight: dict[str, str] = {}
        self._released = threading.Condition()

    def claim(self, md5: str, key: str, stop: threading.Event) -> str | None:
        """Claim `md5` for an upload to `key`. Returns the key that already has this content, if any.

        When the same content is being uploaded to another key right now, this waits for that
        upload to end: only content that went up counts, because the other upload may still fail
        or find another object at its key. Raises UploadFailed (transient) when `stop` is set meanwhile.
        """
        with self._released:
            while self._in_flight.get(md5, key) != key and md5 not in self.uploaded:
                if stop.is_set():
                    raise UploadFailed(0, "stopped while the same content was being uploaded to another key", transient=True)
                self._released.wait(timeout=1.0)

            existing = self.uploaded.get(md5)
            if existing is not None and existing != key:
                return existing
            self._in_flight[md5] = key
            return None

    def release(self, md5: str, key: str, uploaded: bool) -> None:
        """Release a claim; on success the content is in the index from now on."""
        with self._released:
            if self._in_flight.get(md5) == key:
                del self._in_flight[md5]
            if uploaded:
                self.uploaded.setdefault(md5, key)
            self._released.notify_all()


def make_client(s3: S3Config, workers: int) -> Any:
    """Create the boto3 S3 client; botocore's own retries are off because tenacity retries."""
    style = s3.addressing_style
    if style == "auto":
        style = "path" if s3.endpoint_url else "virtual"
    checksums = "when_supported" if s3.flexible_checksums else "when_required"
    config = BotoConfig(
        region_name=s3.region,
        signature_version="s3v4",
        # Over plain HTTP botocore would otherwise read every file a third time, to sign its
        # SHA-256. The signed Content-MD5 header, which the store checks, protects the body.
        s3={"addressing_style": style, "payload_signing_enabled": False},
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        max_pool_connections=workers + 4,
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
        user_agent_extra="s3watch",
        # s3watch builds every request's parameters itself, and the tests send each kind to a
        # real store. Checking them against the API model again costs about 4% of the CPU
        # time of a small file's upload.
        parameter_validation=False,
    )
    session = boto3.session.Session()
    client = session.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        config=config,
    )
    # Last, so that it runs after botocore's own handler that adds the header.
    client.meta.events.register_last("before-call.s3", expect_continue_only_for_large_bodies)
    return client


def expect_continue_only_for_large_bodies(params: dict[str, Any], **_kwargs: Any) -> None:
    """Remove the Expect: 100-continue header that botocore adds to every PutObject and UploadPart, if the body is under 2 MiB.

    With the header, the body waits for the store's 100 Continue, a round trip per upload. That
    only pays off when the store may reject the request before a large body has been sent for
    nothing. The AWS SDKs for Go (which rclone uses) and Kotlin send the header from 2 MiB on
    too. A botocore `before-call` handler: it changes `params` in place.
    """
    headers = params.get("headers", {})
    if headers.get("Expect") != "100-continue":
        return

    length = headers.get("Content-Length")
    if length is None:
        length = botocore.utils.determine_content_length(params.get("body"))
    if length is not None and int(length) < EXPECT_CONTINUE_THRESHOLD:
        del headers["Expect"]


class Uploader:
    """Uploads photos to the bucket, never overwriting an object, and builds their download links.

    Thread-safe: the workers share one instance.
    """

    def __init__(self, s3: S3Config, uploads: UploadsConfig, links: LinksConfig, root: Path, stop: threading.Event | None = None,
                 upload_dir: str = "upload") -> None:
        self.s3 = s3
        self.uploads = uploads
        self.links = links
        self.root = root
        # The upload directory may be a link to another disk, as batch mode allows.
        self.allowed = sorted({os.path.realpath(root), os.path.realpath(root / upload_dir)})
        self.client = make_client(s3, uploads.workers)
        self.conditional_writes = s3.conditional_writes != "never"
        self._stop = stop or threading.Event()
        self._store_checked = False
        self._store_lock = threading.Lock()
        # One Retrying serves every worker: tenacity keeps a call's state and statistics per thread.
        self._retrying = Retrying(
            stop=stop_after_attempt(uploads.attempts) | stop_when_event_set(self._stop),
            wait=wait_random_exponential(multiplier=0.5, max=30),
            retry=retry_if_exception(_worth_retrying),
            before_sleep=_log_retry,
            sleep=self._sleep,
            reraise=True,
        )

    def _sleep(self, seconds: float) -> None:
        """Wait `seconds` between two attempts of an upload, or less when the agent stops (tenacity's sleep)."""
        self._stop.wait(seconds)

    # Checks -------------------------------------------------------------------------------

    def check_bucket(self) -> None:
        """Check that the bucket exists and the credentials are accepted. Raises UploadFailed."""
        try:
            self.client.head_bucket(Bucket=self.s3.bucket)
        except Exception as error:  # noqa: BLE001 - classify_error re-raises what it does not know
            raise classify_error(error) from None

    @property
    def probe_key(self) -> str:
        """The key of the small object that the conditional-write probe writes."""
        return f"{self.s3.prefix}.s3watch/conditional-write-probe"

    def probe_conditional_writes(self) -> bool:
        """Test whether the store honours `If-None-Match: *`, and remember the result.

        Writes the small object `<prefix>.s3watch/conditional-write-probe` with the condition,
        twice. Later probes find it there already. A store that accepts the second write ignores
        the condition. Returns whether conditional writes are used. Raises UploadFailed
        when the store cannot be reached or refuses the request.
        """
        if self.s3.conditional_writes == "never":
            self.conditional_writes = False
            return False
        key = self.probe_key
        body = b"s3watch checks that this store refuses to overwrite an object sent with If-None-Match: *\n"
        for _write in (1, 2):
            try:
                self.client.put_object(Bucket=self.s3.bucket, Key=key, Body=body, ContentMD5=_content_md5(body), IfNoneMatch="*")
            except botocore.exceptions.ClientError as error:
                failure = classify_error(error)
                if failure.status == 412:
                    self.conditional_writes = True
                    return True
                if failure.status == 501 or (failure.status == 400 and not failure.transient):
                    break  # the store rejects the header: it does not implement conditional writes
                raise failure from None
            except Exception as error:  # noqa: BLE001 - classify_error re-raises what it does not know
                raise classify_error(error) from None
        self.conditional_writes = False
        return False

    def ensure_store_ready(self) -> None:
        """Check the bucket and the store's conditional writes once, before the first upload.

        The bucket check keeps a store that creates buckets on first write (SeaweedFS, some
        MinIO setups) from creating a mistyped bucket. After a failure that concerns the whole
        store the check runs again. Raises UploadFailed.
        """
        with self._store_lock:
            if self._store_checked:
                return
            self.check_bucket()
            supported = self.probe_conditional_writes()
            if not supported:
                log.warning("conditional_writes_unsupported", bucket=self.s3.bucket,
                            hint="this store ignores If-None-Match; checking for an existing object with HEAD before each upload")
            self._store_checked = True

    # Uploading ----------------------------------------------------------------------------

    def upload(self, request: UploadRequest, duplicates: DuplicateIndex | None) -> Outcome:
        """Upload one photo, retrying transient failures with exponential backoff and jitter.

        Returns the outcome; failures are returned as an outcome with event `failed`, never raised.
        """
        started = time.monotonic()
        try:
            outcome = self._retrying(self._attempt, request, duplicates)
        except UploadFailed as failure:
            outcome = Outcome(path=request.path, event="failed", key=request.key, code=failure.code, error=failure.message,
                              transient=failure.transient)
        except FileGone as gone:
            outcome = Outcome(path=request.path, event="gone", key=request.key, error=str(gone))
        except FileBusy as busy:
            outcome = Outcome(path=request.path, event="failed", key=request.key, code=FILE_BUSY_CODE, error=str(busy), transient=True)
        # tenacity keeps the statistics of each thread's latest call.
        return Outcome(**{**outcome.__dict__, "attempts": self._retrying.statistics["attempt_number"], "ms": _ms_since(started),
                          "bucket": self.s3.bucket})

    def _attempt(self, request: UploadRequest, duplicates: DuplicateIndex | None) -> Outcome:
        try:
            self.ensure_store_ready()
            return self._attempt_upload(request, duplicates)
        except UploadFailed as failure:
            if failure.status in (0, 403, 404) or failure.status >= 500:
                self._store_checked = False
            raise

    def _attempt_upload(self, request: UploadRequest, duplicates: DuplicateIndex | None) -> Outcome:
        body, md5, size, note = self._open_source(request)
        try:
            original = None
            if request.format_id is None and request.row_md5:
                original = "as_uploaded" if md5 == request.row_md5 else "as_stored"
            if original == "as_stored" and note is None and request.original_note is not None:
                note = request.original_note

            claimed = False
            if duplicates is not None:
                existing = duplicates.claim(md5, request.key, self._stop)
                if existing is not None:
                    return Outcome(path=request.path, event="duplicate", key=request.key, md5=md5, bytes=size, duplicate_of=existing)
                claimed = True

            uploaded = False
            try:
                outcome = self._send(request, body, md5, size, original)
                uploaded = outcome.event == "uploaded" and outcome.md5 == md5
                if outcome.existing and outcome.md5 != md5:
                    return outcome  # the bytes as uploaded, while the file on disk differs
                return Outcome(**{**outcome.__dict__, "original": original, "original_note": note if original == "as_stored" else None})
            finally:
                if claimed:
                    duplicates.release(md5, request.key, uploaded)  # type: ignore[union-attr]
        finally:
            _close(body)

    def _open_source(self, request: UploadRequest) -> tuple[Body, str, int, str | None]:
        """Open what to send: the copy taken on arrival when it is proven original, else the file.

        Returns what to send (the content as bytes, or the open file at its start), its md5
        and size, and a note when a copy on arrival was there but is not the original. Raises
        FileGone, FileBusy when the file changed while it was read, and OSError.
        """
        in_memory_limit = min(IN_MEMORY_LIMIT, self.uploads.multipart_threshold - 1)
        if request.capture is not None:
            try:
                body, md5, size, _after = _read_body(open(request.capture, "rb"), request.capture, in_memory_limit)
            except FileNotFoundError:
                note = "the copy taken on arrival is missing"
            except (OSError, FileBusy) as error:
                note = f"the copy taken on arrival could not be read: {error}"
            else:
                if md5 == request.row_md5:
                    return body, md5, size, None
                _close(body)
                note = "the copy taken on arrival does not match the images row's md5sum: the file was rewritten before it could be copied"
        else:
            note = None

        handle, _size = open_original(self.root, request.path, self.allowed)
        body, md5, size, after = _read_body(handle, request.path, in_memory_limit)
        if request.row_md5 and md5 != request.row_md5 and time.time() - after.st_mtime < SETTLE_SECONDS:
            _close(body)
            raise FileBusy(f"{request.path} changed less than {SETTLE_SECONDS:g} s ago and does not match its images row")
        return body, md5, size, note

    def _send(self, request: UploadRequest, body: Body, md5: str, size: int, original: str | None) -> Outcome:
        """Send the file unless an object is already at the key. Raises UploadFailed."""
        metadata = {"md5": md5}
        if request.image_id is not None:
            metadata["piwigo-image-id"] = str(request.image_id)
        if request.format_id is not None:
            metadata["piwigo-format-id"] = str(request.format_id)
        if original is not None:
            metadata["s3watch-bytes"] = original.replace("_", "-")
        content_type = mimetypes.guess_type(request.path)[0] or "application/octet-stream"

        if not self.conditional_writes:
            # NOTE: without conditional writes another writer can slip in between this check and
            # the write; only stores that ignore If-None-Match take this path.
            existing = self._head(request.key)
            if existing is not None:
                return self._existing_outcome(request, existing, md5, size)

        try:
            if size >= self.uploads.multipart_threshold:
                etag = self._put_multipart(request.key, io.BytesIO(body) if isinstance(body, bytes) else body, md5, size, metadata, content_type)
            else:
                response = self.client.put_object(
                    Bucket=self.s3.bucket, Key=request.key, Body=body, ContentLength=size,
                    ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode("ascii"),
                    ContentType=content_type, Metadata=metadata,
                    **({"IfNoneMatch": "*"} if self.conditional_writes else {}),
                )
                etag = str(response.get("ETag", "")).strip('"')
        except botocore.exceptions.ClientError as error:
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status == 412:
                existing = self._head(request.key)
                if existing is None:
                    raise UploadFailed(412, "the object at the key vanished after a failed conditional write", transient=True) from None
                return self._existing_outcome(request, existing, md5, size)
            raise classify_error(error) from None
        except (botocore.exceptions.BotoCoreError, OSError) as error:
            if isinstance(error, OSError) and not isinstance(error, botocore.exceptions.BotoCoreError):
                raise UploadFailed(0, f"reading {request.path} failed: {error}", transient=True) from None
            raise classify_error(error) from None
        return Outcome(path=request.path, event="uploaded", key=request.key, md5=md5, bytes=size, etag=etag)

    def _existing_outcome(self, request: UploadRequest, head: dict[str, Any], md5: str, size: int) -> Outcome:
        """Tell an object with this photo's content from someone else's object at the key.

        An object with the photo's md5 in its metadata is our own earlier upload (say, cut short
        by a crash before its journal record). One whose ETag is the photo's md5 contains the same
        bytes, put there by another tool; a multipart ETag, with a '-', is no md5. Either way the
        photo's bytes are in the bucket, and it counts as uploaded. So does an object with the
        images row's md5, the bytes as uploaded, when the file on disk differs (`_original_at_key`).
        """
        metadata = {name.lower(): value for name, value in head.get("Metadata", {}).items()}
        etag = str(head.get("ETag", "")).strip('"')
        length = int(head.get("ContentLength", -1))
        same_content = metadata.get("md5") == md5 or etag == md5
        if same_content and length == size:
            return Outcome(path=request.path, event="uploaded", key=request.key, md5=md5, bytes=size, etag=etag, existing=True)

        earlier = self._original_at_key(request, metadata, length, etag)
        if earlier is not None:
            return earlier
        return Outcome(path=request.path, event="already_present", key=request.key, md5=md5, bytes=size, etag=etag)

    def _original_at_key(self, request: UploadRequest, metadata: dict[str, str], length: int, etag: str) -> Outcome | None:
        """Recognise an object that contains the photo's bytes as uploaded, while the file on disk differs.

        After a lost journal, a photo whose file Piwigo resized was sent from the copy taken on
        arrival, and the object's md5 is the images row's md5sum, not the file's. That object is
        the photo's original. Returns its `uploaded` outcome, with the object's md5 and size, or None.

        An object of other content is left to the caller, even when its metadata names this
        photo's image id. It may be the first file of a photo replaced in Piwigo since, or
        another gallery's photo under the same id. Only a person can tell.
        """
        row_md5 = request.row_md5
        if request.format_id is not None or not row_md5 or row_md5 not in (metadata.get("md5"), etag):
            return None
        return Outcome(path=request.path, event="uploaded", key=request.key, md5=row_md5, bytes=length, etag=etag, existing=True,
                       original="as_uploaded")

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.head_object(Bucket=self.s3.bucket, Key=key))
        except botocore.exceptions.ClientError as error:
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status == 404 and error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise classify_error(error) from None
        except botocore.exceptions.BotoCoreError as error:
            raise classify_error(error) from None

    def _put_multipart(self, key: str, body: BinaryIO, md5: str, size: int, metadata: dict[str, str], content_type: str) -> str:
        """Upload in parts, each with its own Content-MD5, and complete only if the whole md5 still matches."""
        created = self.client.create_multipart_upload(Bucket=self.s3.bucket, Key=key, Metadata=metadata, ContentType=content_type)
        upload_id = created["UploadId"]
        try:
            parts = []
            whole = hashlib.md5()
            number = 1
            while chunk := body.read(self.uploads.part_size):
                whole.update(chunk)
                response = self.client.upload_part(
                    Bucket=self.s3.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk, ContentMD5=_content_md5(chunk)
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"]})
                number += 1
                if self._stop.is_set():
                    raise UploadFailed(0, "stopped before the upload finished", transient=True)
            if whole.hexdigest() != md5:
                raise UploadFailed(400, "the file changed while it was being uploaded", transient=True)
            completed = self.client.complete_multipart_upload(
                Bucket=self.s3.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
                **({"IfNoneMatch": "*"} if self.conditional_writes else {}),
            )
            return str(completed.get("ETag", "")).strip('"')
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.s3.bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the store removes abandoned parts by its lifecycle rules
                pass
            raise

    # Links --------------------------------------------------------------------------------

    def download_url(self, key: str, bucket: str | None = None) -> str:
        """Return the object's download link: public (or under links.base_url) or presigned.

        `bucket` is the bucket the object went to, when it may differ from the configured one.
        Raises UploadFailed when a presigned link cannot be signed, for want of credentials.
        """
        bucket = bucket or self.s3.bucket
        if self.links.mode == "presigned":
            try:
                return str(self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.links.expires))
            except botocore.exceptions.BotoCoreError as error:
                raise classify_error(error) from None
        quoted = quote(key, safe="/~")
        if self.links.base_url:
            return f"{self.links.base_url}/{quoted}"
        if self.s3.endpoint_url:
            if self.s3.addressing_style == "virtual":
                scheme, _, host = self.s3.endpoint_url.partition("://")
                return f"{scheme}://{bucket}.{host}/{quoted}"
            return f"{self.s3.endpoint_url}/{bucket}/{quoted}"
        return f"https://{bucket}.s3.{self.s3.region}.amazonaws.com/{quoted}"


def _worth_retrying(error: BaseException) -> bool:
    """Tell whether an attempt's error may pass if the upload is tried again."""
    return isinstance(error, FileBusy) or (isinstance(error, UploadFailed) and error.transient)


def _log_retry(state: RetryCallState) -> None:
    """Log a failed attempt that will be tried again.

    tenacity calls it before sleeping, with the upload's arguments (the request and the md5
    index) in `state.args`.
    """
    request: UploadRequest = state.args[0]
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0
    # A file still being written, or rewritten by Piwigo's resize, is expected to settle: no warning.
    level = log.info if isinstance(error, FileBusy) else log.warning
    level("upload_retry", path=request.path, key=request.key, attempt=state.attempt_number,
          code=getattr(error, "code", FILE_BUSY_CODE if isinstance(error, FileBusy) else None), error=str(error), wait_s=round(wait, 2))


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)

