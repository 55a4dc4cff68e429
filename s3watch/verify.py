"""`s3watch verify`: check the bucket against the journal, and queue missing objects again."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import botocore.exceptions

from .config import Config
from .journal import JournalError, Upload, read_journal
from .spool import REQUEUE_HEADER, SpoolError, write_list
from .uploader import Uploader, UploadFailed, classify_error

EXIT_OK = 0
EXIT_DIFFERENT = 1


@dataclass(frozen=True)
class Finding:
    """One uploaded photo whose object is not as the journal recorded it."""

    upload: Upload
    problem: str  # "missing" or "different"
    detail: str


def check_object(uploader: Uploader, upload: Upload) -> Finding | None:
    """Compare one object with its journal record: present, same size, same md5.

    The md5 is read from the object's metadata, or from its ETag when that is a plain md5 (not a
    multipart ETag). Returns a Finding, or None when the object is as recorded. Raises UploadFailed
    when the store cannot be reached or rejects the request.
    """
    bucket = upload.bucket or uploader.s3.bucket
    try:
        head = uploader.client.head_object(Bucket=bucket, Key=upload.key)
    except botocore.exceptions.ClientError as error:
        if int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) == 404:
            return Finding(upload, "missing", f"no object at {upload.key} in bucket {bucket}")
        raise classify_error(error) from None
    except botocore.exceptions.BotoCoreError as error:
        raise classify_error(error) from None

    problems = []
    size = int(head.get("ContentLength", -1))
    if upload.bytes is not None and size != upload.bytes:
        problems.append(f"size {size}, recorded {upload.bytes}")
    metadata = {name.lower(): value for name, value in head.get("Metadata", {}).items()}
    etag = str(head.get("ETag", "")).strip('"')
    stored_md5 = metadata.get("md5") or (etag if "-" not in etag else None)
    if upload.md5 and stored_md5 is None:
        problems.append("no md5 in its metadata and a multipart ETag")
    elif upload.md5 and stored_md5 != upload.md5:
        problems.append(f"md5 {stored_md5}, recorded {upload.md5}")
    if problems:
        return Finding(upload, "different", "; ".join(problems))
    return None


def verify(config: Config, requeue: bool) -> int:
    """Check every upload the journal records as uploaded; print what is missing or different.

    Returns 0 when all objects are as recorded, 1 otherwise (or when the store cannot be
    reached). With `requeue`, missing objects are written to a spool list that makes the
    agent upload them again.
    """
    try:
        state, _ = read_journal(config.journal_path)
    except JournalError as error:
        print(f"s3watch: error: {error}", file=sys.stderr)
        return EXIT_DIFFERENT
    uploads = [upload for upload in state.uploads.values() if upload.status == "uploaded" and upload.key]
    uploader = Uploader(config.s3, config.uploads, config.links, config.piwigo.root)

    try:
        with ThreadPoolExecutor(max_workers=max(4, config.uploads.workers * 2)) as pool:
            results = list(pool.map(lambda upload: check_object(uploader, upload), uploads))
    except UploadFailed as failure:
        print(f"s3watch: error: the bucket could not be checked: {failure.code}: {failure.message}", file=sys.stderr)
        return EXIT_DIFFERENT

    findings = [finding for finding in results if finding is not None]
    missing = [finding for finding in findings if finding.problem == "missing"]
    for finding in sorted(findings, key=lambda finding: finding.upload.path):
        print(f"{finding.problem:<9} {finding.upload.path}  image {finding.upload.image_id}  key {finding.upload.key}: {finding.detail}")
    objects = "object" if len(uploads) == 1 else "objects"
    print(f"checked {len(uploads)} uploaded {objects}: {len(uploads) - len(findings)} as recorded, {len(missing)} missing, {len(findings) - len(missing)} different")

    if requeue and missing:
        try:
            path, count = write_list(config.spool_dir, (finding.upload.path for finding in missing), header=REQUEUE_HEADER)
        except SpoolError as error:
            print(f"s3watch: error: {error}", file=sys.stderr)
            return EXIT_DIFFERENT
        print(f"queued {count} missing {'object' if count == 1 else 'objects'} again through {path}; the agent uploads them at its next look at the spool")
    elif missing:
        print("run 's3watch verify --requeue' to upload the missing ones again")
    return EXIT_DIFFERENT if findings else EXIT_OK
