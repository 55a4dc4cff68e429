"""`s3watch status`: what is pending or failed, what was uploaded, with links, read from the journal."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from .config import Config
from .journal import JournalState, Upload, epoch_of, read_journal
from .uploader import ALREADY_PRESENT_HINT, Uploader, UploadFailed, printable

LIST_LENGTH = 10
# Seconds past monitor.match_timeout before a file waiting for its row gets a note. The agent looks
# the row up with a backoff of up to 1 s, so it records the give-up a little after the timeout.
STALL_SLACK = 5.0
# The error of an upload that waits, untried, while the store fails others (set by the agent).
WAITING_FOR_STORE = "waiting: the store failed another upload with this code"


def upload_status(upload: Upload) -> str:
    """Return the status word shown for an upload: its failure code while it is pending after a failure."""
    if upload.status == "pending":
        return upload.code or "pending"
    if upload.status == "detected":
        return "waiting_for_row"
    return upload.status


def build_status(config: Config, state: JournalState | None = None) -> dict[str, Any]:
    """Build the status report from the journal (read without disturbing a running agent).

    Returns a dict with `counts`, `pending` (the most recent pending or failed uploads, and files
    waiting for their row), `uploaded` (the most recent uploads, with key and download link) and
    `problems` (files that will not be uploaded: another object at the key, unmatched or gone).
    Raises JournalError.
    """
    if state is None:
        state, _ = read_journal(config.journal_path)
    unfinished = state.uploads.unfinished()
    counts = Counter(upload_status(u) for u in unfinished) + state.uploads.finished_counts()

    pending = sorted(unfinished, key=lambda u: u.ts, reverse=True)
    done = state.uploads.latest_finished(("uploaded", "duplicate"), LIST_LENGTH)
    problems = state.uploads.latest_finished(("already_present", "unmatched", "gone"), LIST_LENGTH)

    now = time.time()
    uploader = Uploader(config.s3, config.uploads, config.links, config.piwigo.root)
    link_errors: list[str] = []
    uploaded = [_uploaded_item(u, uploader, link_errors) for u in done]
    return {
        "bucket": config.s3.bucket,
        "counts": {
            "pending": sum(1 for u in unfinished if u.status == "pending"),
            "waiting_for_row": counts.get("waiting_for_row", 0),
            "failed": sum(1 for u in unfinished if u.status == "pending" and u.code),
            "uploaded": counts.get("uploaded", 0),
            "already_present": counts.get("already_present", 0),
            "duplicate": counts.get("duplicate", 0),
            "unmatched": counts.get("unmatched", 0),
            "gone": counts.get("gone", 0),
        },
        # Uploads to a bucket configured before, when s3.bucket was changed since.
        "uploaded_elsewhere": {bucket: count for bucket, count in sorted(state.uploads.uploaded_buckets().items(), key=lambda item: str(item[0]))
                               if bucket is not None and bucket != config.s3.bucket},
        "pending": [_pending_item(u, config.monitor.match_timeout, now) for u in pending[:LIST_LENGTH]],
        "uploaded": uploaded,
        "links_error": link_errors[0] if link_errors else None,
        "problems": [_problem_item(u) for u in problems],
    }


def _pending_item(upload: Upload, match_timeout: float, now: float) -> dict[str, Any]:
    """Describe one unfinished upload. A file that waits for its row past the match timeout gets a note.

    The agent gives up on a row after the timeout, except while the database fails, so a longer
    wait means that it cannot read the table or is not running. Its log shows which.
    """
    note = None
    waited = now - epoch_of(upload.detected_ts or upload.ts)
    if upload.status == "detected" and waited > match_timeout + STALL_SLACK:
        note = (f"waiting for its row for {waited:.0f} s, longer than monitor.match_timeout ({match_timeout:g} s): the agent cannot read "
                "the database or is not running; see journalctl -u s3watch -p warning")
    return {
        "path": upload.path,
        "image_id": upload.image_id,
        "status": upload_status(upload),
        "error": upload.error if upload.code else None,
        "attempts": upload.attempts,
        "last_try": upload.ts if upload.code and upload.attempts else None,
        "source": upload.source,
        "since": upload.detected_ts or upload.ts,
        "note": note,
    }


def _uploaded_item(upload: Upload, uploader: Uploader, link_errors: list[str]) -> dict[str, Any]:
    """Describe one finished upload; a link that cannot be made is None, and the reason goes to `link_errors`."""
    linked_key = upload.duplicate_of if upload.status == "duplicate" else upload.key
    try:
        url = uploader.download_url(linked_key, upload.bucket) if linked_key else None
    except UploadFailed as failure:  # a presigned link needs credentials this user may lack
        url = None
        link_errors.append(failure.message)
    return {
        "path": upload.path,
        "image_id": upload.image_id,
        "status": upload.status,
        "key": upload.key,
        "bucket": upload.bucket,
        "url": url,
        "kind": upload.kind or "photo",
        "original": upload.original,
        "original_note": upload.original_note,
        "bytes": upload.bytes,
        "md5": upload.md5,
        "duplicate_of": upload.duplicate_of,
        "time": upload.ts,
    }


def _problem_item(upload: Upload) -> dict[str, Any]:
    error = ALREADY_PRESENT_HINT if upload.status == "already_present" else upload.error
    return {"path": upload.path, "image_id": upload.image_id, "status": upload.status, "key": upload.key, "error": error, "time": upload.ts}


def render_json(report: dict[str, Any]) -> str:
    """Render the report as one JSON object."""
    return json.dumps(report, ensure_ascii=False, indent=2)


def render_text(report: dict[str, Any]) -> str:
    """Render the report for a person at a terminal."""
    counts = report["counts"]
    lines = [
        f"bucket {report['bucket']}: {counts['uploaded']} uploaded, {counts['pending']} pending "
        f"({counts['failed']} failed), {counts['waiting_for_row']} waiting for their row, "
        f"{counts['already_present']} with another object at their key, {counts['duplicate']} duplicates, "
        f"{counts['unmatched']} unmatched, {counts['gone']} gone",
    ]
    lines += [f"  of the uploaded, {count} went to bucket {bucket}, the bucket configured before" for bucket, count in report["uploaded_elsewhere"].items()]
    lines += [
        "",
        "Pending: none" if not report["pending"] else f"Pending ({len(report['pending'])} most recent):",
    ]
    for item in report["pending"]:
        detail = f"  {item['status']:<18} {item['path']}  image {item['image_id'] if item['image_id'] is not None else '-'}"
        if item["attempts"]:
            detail += f"  attempts {item['attempts']}  last try {item['last_try']}"
        elif item["error"] == WAITING_FOR_STORE:
            detail += "  not tried yet: waiting while the store fails other uploads"
        lines.append(detail)
        if item["note"]:
            lines.append(f"  {'':<18} {item['note']}")
        if item["error"] and item["error"] != WAITING_FOR_STORE:
            lines.append(f"  {'':<18} {item['error']}")

    lines += ["", "Uploaded: none" if not report["uploaded"] else f"Uploaded ({len(report['uploaded'])} most recent):"]
    if report["links_error"]:
        lines.append(f"  no download links: {report['links_error']}")
    for item in report["uploaded"]:
        kind = "  (extra format)" if item["kind"] == "format" else ""
        lines.append(f"  {item['time']}  {item['path']}  image {item['image_id']}{kind}  -> {item['key']}")
        if item["original"] == "as_uploaded":
            lines.append("      bytes as uploaded (their md5 was the images row's md5sum when the upload was recorded)")
        elif item["original"] == "as_stored":
            lines.append(f"      bytes as stored, not as uploaded{': ' + item['original_note'] if item['original_note'] else ''}")
        if item["status"] == "duplicate":
            lines.append(f"      same content as {item['duplicate_of']}; not uploaded again")
        if item["url"]:
            lines.append(f"      {item['url']}")

    if report["problems"]:
        lines += ["", f"Not uploaded ({len(report['problems'])} most recent):"]
        for item in report["problems"]:
            lines.append(f"  {item['status']:<15} {item['path']}  {item['error'] or ''}")
    # A file name may hold a line break or a terminal's escape character: each report line stays one line.
    return "\n".join(printable(line) for line in lines)

