"""Measure how much of a small upload's CPU time boto3's client layer takes, on one thread against a local SeaweedFS.

    .venv/bin/python bench/put_cost.py [--puts N] [--size BYTES] [--runs N]

It sends the same PUT two ways, in turns, and prints the client CPU time per PUT of each:

- `boto3`: `put_object` on a client made by s3watch's `make_client`, as s3watch sends it.
- `signed urllib3`: the same request (headers, Content-MD5, If-None-Match, user metadata),
  built as a botocore `AWSRequest`, signed with botocore's `S3SigV4Auth` and sent through a
  urllib3 connection pool, without boto3's client machinery (events, endpoint rules,
  serializer, response parser).

The difference is what a hand-built request path could save per upload. s3watch does not take
that path. Its own code would then have to get right what boto3 does across AWS and the
S3-compatible stores: addressing styles and endpoints, proxies, TLS and CA bundles, refreshing
credentials, connection errors and S3's error responses. This script only measures the path,
against its own server. Sizes stay below 2 MiB, from where s3watch's client adds Expect: 100-continue,
which the urllib3 way does not send. A default run writes about 1.1 GB of objects into the
temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import botocore.exceptions
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from s3watch.config import S3Config
from s3watch.seaweed import SeaweedError, SeaweedFS
from s3watch.uploader import EXPECT_CONTINUE_THRESHOLD, make_client

BUCKET = "put-cost"
REGION = "us-east-1"


class PutFailed(Exception):
    """The store rejected a PUT sent the signed urllib3 way."""


def main() -> int:
    parser = argparse.ArgumentParser(description="Client CPU per PUT: boto3's put_object against a signed urllib3 request.")
    parser.add_argument("--puts", type=positive_int, default=1500, help="PUTs per way in each run (default 1500)")
    parser.add_argument("--size", type=positive_int, default=120_000,
                        help=f"object size in bytes, below {EXPECT_CONTINUE_THRESHOLD} (default 120000, a small file of the batch benchmark)")
    parser.add_argument("--runs", type=positive_int, default=3, help="runs of each way, in turns (default 3)")
    arguments = parser.parse_args()
    if arguments.size >= EXPECT_CONTINUE_THRESHOLD:
        parser.error(f"argument --size: {arguments.size} is not below {EXPECT_CONTINUE_THRESHOLD}, from where the two ways send different requests")

    # SIGTERM ends the script through the finally blocks below, as Ctrl-C does, so the server stops and its folder is removed.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="s3watch-put-cost-") as work:
        server = SeaweedFS(Path(work))
        try:
            server.start()
            per_put = measure(server, os.urandom(arguments.size), arguments.puts, arguments.runs)
        except (SeaweedError, PutFailed, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                urllib3.exceptions.HTTPError) as error:
            print(f"put_cost.py: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("put_cost.py: interrupted", file=sys.stderr)
            return 130
        finally:
            server.stop()

    boto3_ms = statistics.median(per_put["boto3"])
    signed_ms = statistics.median(per_put["signed urllib3"])
    print(f"\nmedians of {arguments.runs} run(s), {arguments.puts} PUTs of {arguments.size:,} bytes each, one thread:")
    print(f"  boto3 put_object      {boto3_ms:.3f} CPU-ms per PUT")
    print(f"  signed urllib3 PUT    {signed_ms:.3f} CPU-ms per PUT ({signed_ms / boto3_ms:.0%} of boto3's)")
    return 0


def positive_int(text: str) -> int:
    """Parse a command-line count or size. Raises argparse.ArgumentTypeError unless it is a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give a whole number of at least 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1: give a whole number of at least 1")
    return value


def measure(server: SeaweedFS, body: bytes, puts: int, runs: int) -> dict[str, list[float]]:
    """Send `puts` PUTs of `body` each way, `runs` times in turns, and return each way's CPU-ms per PUT of every run."""
    server.create_bucket(BUCKET)
    ways = make_ways(server, body)
    per_put: dict[str, list[float]] = {name: [] for name in ways}
    for name, put in ways.items():
        put(f"warm-up-{name}", 50)

    for run in range(1, runs + 1):
        for name, put in ways.items():
            started = time.process_time()
            put(f"run{run}-{name}", puts)
            per_put[name].append((time.process_time() - started) * 1000 / puts)
            print(f"run {run}/{runs}  {name:15s} {per_put[name][-1]:.3f} CPU-ms per PUT", flush=True)
    return per_put


def make_ways(server: SeaweedFS, body: bytes) -> dict[str, Callable[[str, int], None]]:
    """Return the two ways of sending `body`, each a function (key prefix, count) that PUTs `count` objects."""
    s3 = S3Config(
        bucket=BUCKET, prefix="", key_template="{path}", region=REGION, endpoint_url=server.endpoint_url,
        access_key_id=server.access_key, secret_access_key=server.secret_key, addressing_style="auto",
        conditional_writes="auto", flexible_checksums=False, connect_timeout=5, read_timeout=30,
    )
    client = make_client(s3, workers=1)
    md5 = hashlib.md5(body)
    content_md5 = base64.b64encode(md5.digest()).decode("ascii")
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.ports["s3"], maxsize=1, retries=False,
                                      timeout=urllib3.Timeout(connect=5, read=30))
    credentials = Credentials(server.access_key, server.secret_key)

    def put_with_boto3(prefix: str, count: int) -> None:
        for number in range(count):
            client.put_object(
                Bucket=BUCKET, Key=f"{prefix}/{number}.jpg", Body=body, ContentLength=len(body), ContentMD5=content_md5,
                ContentType="image/jpeg", Metadata={"md5": md5.hexdigest(), "piwigo-image-id": str(number)}, IfNoneMatch="*",
            )

    def put_with_signed_urllib3(prefix: str, count: int) -> None:
        for number in range(count):
            path = f"/{BUCKET}/{quote(f'{prefix}/{number}.jpg', safe='/~')}"
            request = AWSRequest(method="PUT", url=server.endpoint_url + path, data=body, headers={
                "Content-MD5": content_md5, "Content-Type": "image/jpeg", "Content-Length": str(len(body)), "If-None-Match": "*",
                "x-amz-meta-md5": md5.hexdigest(), "x-amz-meta-piwigo-image-id": str(number),
                # The payload is not signed, as in s3watch's client, because the signed Content-MD5 protects it.
                "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
            })
            S3SigV4Auth(credentials, "s3", REGION).add_auth(request)
            response = pool.urlopen("PUT", path, body=body, headers=dict(request.headers.items()))
            if response.status != 200:
                raise PutFailed(f"PUT {path} returned HTTP {response.status}: {response.data[:300]!r}")

    return {"boto3": put_with_boto3, "signed urllib3": put_with_signed_urllib3}


if __name__ == "__main__":
    sys.exit(main())
