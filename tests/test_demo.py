"""The README's first command: the demo runs end to end."""

from __future__ import annotations

from pathlib import Path

from s3watch.seaweed import GRPC_OFFSET, SeaweedFS

from .conftest import run_cli


def test_demo_uploads_every_photo(tmp_path: Path) -> None:
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), "--photos", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 3 photos are in the bucket" in result.stdout
    assert result.stdout.count("X-Amz-Signature=") == 3
    log = (tmp_path / "demo" / "agent.log").read_text()
    assert log.count("source=monitor") == 3  # found through inotify, not only by the table poll


def test_demo_rejects_bad_photo_count(tmp_path: Path) -> None:
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), "--photos", "0")
    assert result.returncode == 2
    assert "--photos must be a whole number from 1 to 1000" in result.stderr


def test_seaweedfs_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    server = SeaweedFS(tmp_path / "seaweedfs")
    server.start()
    sockets = [Path(f"/tmp/seaweedfs-{service}-grpc-{port + GRPC_OFFSET}.sock") for service, port in server.ports.items()]
    assert any(socket.exists() for socket in sockets)  # the names weed gives them

    server.stop()

    assert [socket for socket in sockets if socket.exists()] == []
    assert list((tmp_path / "seaweedfs").glob("weed.*INFO*")) != []  # its log files are in its own folder
