"""`s3watch verify`: check the bucket against the journal, and queue missing objects again."""

from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import botocore.exceptions

from .config import Config
from .journal import JournalError, Upload, read_journal
from .spool import REQUEUE_HEADER, SpoolError, write_list
from .uploader import ALREADY_PRESENT_HINT, Uploader, UploadFailed, classify_error

EXIT_OK = 0
EXIT_DIFFERENT = 1


@dataclass(frozen=True)
class Finding:
    """One photo whose object is not as the journal recorded it, or that has no copy because another object is at its key."""

    upload: Upload
    problem: str  # "missing", "different" or "occupied"
    detail: str
    requeue: bool  # whether `verify --requeue` queues it again, which can fix it


def check_object(uploader: Uploader, upload: Upload) -> Finding | None:
    """Compare one object with its journal record: present, same size, same md5.

    The md5 is read from the object's metadata, or from its ETag when that is a plain md5 (not a
    multipart ETag). An `already_present` upload found another object at its key. It gets an
    `occupied` Finding while that object lacks the photo's content. Once the object is gone,
    or holds the photo's content, its Finding is one that `--requeue` fixes. Returns a Finding,
    or None when the object is as recorded. Raises UploadFailed when the store cannot be
    reached or rejects the request.
    """
    bucket = upload.bucket or uploader.s3.bucket
    occupied = upload.status == "already_present"
    try:
        head = uploader.client.head_object(Bucket=bucket, Key=upload.key)
    except botocore.exceptions.ClientError as error:
        if int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) == 404:
            freed = " any more: the other object that was there is gone" if occupied else ""
            return Finding(upload, "missing", f"no object at {upload.key} in bucket {bucket}{freed}", requeue=True)
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
    if occupied and problems:
        return Finding(upload, "occupied", f"{ALREADY_PRESENT_HINT} (that object: {'; '.join(problems)})", requeue=False)
    if occupied:
        return Finding(upload, "occupied", "the object at the key now holds this photo's content; run 's3watch verify --requeue' to record it as uploaded",
                       requeue=True)
    if problems:
        return Finding(upload, "different", "; ".join(problems), requeue=False)
    return None


def verify(config: Config, requeue: bool) -> int:
    """Check every upload the journal records as uploaded; print what is missing or different.

    Returns 0 when all objects are as recorded, 1 otherwise (or when the store cannot be
    reached). An upload that found another object at its key counts as a finding until it is
    fixed. With `requeue`, the photos whose finding a new upload can fix (a missing object, an
    object now holding the photo's content) are written to a spool list that makes the agent
    upload them again.
    """
    try:
        state, _ = read_journal(config.journal_path)
    except JournalError as error:
        print(f"s3watch: error: {error}", file=sys.stderr)
        return EXIT_DIFFERENT
    uploads = [upload for upload in state.uploads.values() if upload.status in ("uploaded", "already_present") and upload.key]
    uploader = Uploader(config.s3, config.uploads, config.links, config.piwigo.root)

    try:
        with ThreadPoolExecutor(max_workers=max(4, config.uploads.workers * 2)) as pool:
            results = list(pool.map(lambda upload: check_object(uploader, upload), uploads))
    except UploadFailed as failure:
        print(f"s3watch: error: the bucket could not be checked: {failure.code}: {failure.message}", file=sys.stderr)
        return EXIT_DIFFERENT

    findings = [finding for finding in results if finding is not None]
    for finding in sorted(findings, key=lambda finding: finding.upload.path):
        print(f"{finding.problem:<9} {finding.upload.path}  image {finding.upload.image_id}  key {finding.upload.key}: {finding.detail}")
    uploaded = sum(1 for upload in uploads if upload.status == "uploaded")
    counts = Counter(finding.problem for finding in findings if finding.upload.status == "uploaded")
    summary = (f"checked {uploaded} uploaded {'object' if uploaded == 1 else 'objects'}: {uploaded - sum(counts.values())} as recorded, "
               f"{counts['missing']} missing, {counts['different']} different")
    occupied = len(uploads) - uploaded
    if occupied:
        freed = sum(1 for finding in findings if finding.upload.status == "already_present" and finding.requeue)
        summary += (f"; {_photos(occupied)} found another object at {'its' if occupied == 1 else 'their'} key when uploaded, "
                    f"{freed} of them can be sent now")
    print(summary)
    if counts["different"]:
        print("a different object is never overwritten: move or delete it, then run 's3watch verify --requeue' to upload the photo again")

    requeued = [finding for finding in findings if finding.requeue]
    if requeue and requeued:
        try:
            path, count = write_list(config.spool_dir, (finding.upload.path for finding in requeued), header=REQUEUE_HEADER)
        except SpoolError as error:
            print(f"s3watch: error: {error}", file=sys.stderr)
            return EXIT_DIFFERENT
        print(f"queued {_photos(count)} again through {path}; the agent uploads them at its next look at the spool")
    elif requeued:
        print(f"run 's3watch verify --requeue' to queue again the {_photos(len(requeued))} that a new upload can fix")
    return EXIT_DIFFERENT if findings else EXIT_OK


def _photos(count: int) -> str:
    return f"{count} {'photo' if count == 1 else 'photos'}"
