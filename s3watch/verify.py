"""`s3watch verify`: check the bucket against the journal, and queue missing objects again."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import botocore.exceptions

from .config import Config
from .journal import JournalError, Upload, read_journal
from .logs import print_problem
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
    bucket = _bucket_of(uploader, upload)
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
    # An already_present record contains the size and md5 of the file when it was tried, not of an upload.
    ours = "the file's when tried" if occupied else "recorded"
    size = int(head.get("ContentLength", -1))
    if upload.bytes is not None and size != upload.bytes:
        problems.append(f"size {size}, {ours} {upload.bytes}")
    metadata = {name.lower(): value for name, value in head.get("Metadata", {}).items()}
    etag = str(head.get("ETag", "")).strip('"')
    stored_md5 = metadata.get("md5") or (etag if "-" not in etag else None)
    if upload.md5 and stored_md5 is None:
        problems.append("no md5 in its metadata and a multipart ETag")
    elif upload.md5 and stored_md5 != upload.md5:
        problems.append(f"md5 {stored_md5}, {ours} {upload.md5}")
    if occupied and problems:
        return Finding(upload, "occupied", f"{ALREADY_PRESENT_HINT} (that object: {'; '.join(problems)})", requeue=False)
    if occupied:
        return Finding(upload, "occupied", "the object at the key now holds this photo's content; run 's3watch verify --requeue' to record it as uploaded",
                       requeue=True)
    if problems:
        return Finding(upload, "different", "; ".join(problems), requeue=False)
    return None


def _bucket_of(uploader: Uploader, upload: Upload) -> str:
    """Return the bucket an upload went to: the one recorded, or the configured one for records without it."""
    return upload.bucket or uploader.s3.bucket


def listed_objects(uploader: Uploader, uploads: list[Upload]) -> dict[tuple[str, str], tuple[int, str]]:
    """List the objects of the uploads' buckets under the keys' common prefix, and return (size, ETag) by (bucket, key).

    Only the keys of `uploads` are kept. One listing request returns up to 1,000 objects,
    where checking them one by one takes a HEAD request each: 100,000 objects took 2 min 21 s
    that way in a test, and their listing 8 to 10 s. Returns what it listed so far when the
    listing fails: the objects left out are then checked one by one.
    """
    keys_by_bucket: dict[str, set[str]] = {}
    for upload in uploads:
        if upload.key:
            keys_by_bucket.setdefault(_bucket_of(uploader, upload), set()).add(upload.key)

    listed: dict[tuple[str, str], tuple[int, str]] = {}
    for bucket, keys in keys_by_bucket.items():
        try:
            pages = uploader.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=os.path.commonprefix(list(keys)))
            for page in pages:
                for listed_object in page.get("Contents", []):
                    key = listed_object["Key"]
                    if key in keys:
                        listed[(bucket, key)] = (int(listed_object["Size"]), str(listed_object.get("ETag", "")).strip('"'))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            # A store or a policy that rejects listings: the objects not listed get a HEAD each.
            failure = classify_error(error)
            print_problem("warning", f"bucket {bucket} could not be listed ({failure.code}: {failure.message}): checking each object with a HEAD request instead")
    return listed


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
        print_problem("error", str(error))
        return EXIT_DIFFERENT
    uploads = [upload for upload in state.uploads.values() if upload.status in ("uploaded", "already_present") and upload.key]
    uploader = Uploader(config.s3, config.uploads, config.links, config.piwigo.root)
    listed = listed_objects(uploader, uploads)

    def check(upload: Upload) -> Finding | None:
        # An uploaded photo whose listed size and plain ETag match the journal is as recorded.
        # Anything else gets check_object's HEAD, which also reads the md5 from the metadata.
        found = listed.get((_bucket_of(uploader, upload), upload.key or ""))
        if found is not None and upload.status == "uploaded" and upload.md5 and found == (upload.bytes, upload.md5):
            return None
        return check_object(uploader, upload)

    try:
        with ThreadPoolExecutor(max_workers=max(4, config.uploads.workers * 2)) as pool:
            results = list(pool.map(check, uploads))
    except UploadFailed as failure:
        print_problem("error", f"the bucket could not be checked: {failure.code}: {failure.message}")
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
            print_problem("error", str(error))
            return EXIT_DIFFERENT
        print(f"queued {_photos(count)} again through {path}; the agent uploads them at its next look at the spool")
    elif requeued:
        print(f"run 's3watch verify --requeue' to queue again the {_photos(len(requeued))} that a new upload can fix")
    return EXIT_DIFFERENT if findings else EXIT_OK


def _photos(count: int) -> str:
    return f"{count} {'photo' if count == 1 else 'photos'}"
