"""s3watch as a systemd service: the notify protocol, journald fields, credentials, metrics and the unit file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from s3watch.agent import STATUS_INTERVAL
from s3watch.demo import PiwigoImitation, sample_photo
from s3watch.seaweed import free_ports

from .conftest import AgentProcess, Setup, run_cli, wait_for
from .test_systemd_protocol import bind_datagram_socket, receive_entry, unix_socket_path

ROOT = Path(__file__).parent.parent


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket, keeping every message received."""

    def __init__(self, path: str) -> None:
        self.server = bind_datagram_socket(path)
        self.server.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def receive(self) -> None:
        try:
            while True:
                datagram = self.server.recv(65536)
                self.messages.append(dict(line.split("=", 1) for line in datagram.decode().splitlines()))
        except (socket.timeout, BlockingIOError):
            pass

    def last_status(self) -> str:
        """Return the latest STATUS= received, or an empty string when none came yet."""
        self.receive()
        statuses = [message["STATUS"] for message in self.messages if "STATUS" in message]
        return statuses[-1] if statuses else ""

    def has(self, key: str, value: str | None = None, after: int = 0) -> int | None:
        """Return the index of the first message from `after` on that sets `key` (to `value`), or None."""
        self.receive()
        for index, message in enumerate(self.messages[after:], start=after):
            if key in message and (value is None or message[key] == value):
                return index
        return None


@pytest.fixture
def notify(tmp_path: Path, agent: AgentProcess) -> NotifyListener:
    listener = NotifyListener(unix_socket_path(tmp_path, "notify"))
    agent.environment.update({"NOTIFY_SOCKET": listener.server.getsockname(), "WATCHDOG_USEC": "1000000"})
    return listener


def test_notify_ready_status_watchdog_reload_stop(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, notify: NotifyListener) -> None:
    # A journal with a pending upload: READY=1 must come after it is replayed.
    agent.start()
    wait_for(lambda: notify.has("READY", "1") is not None, what="READY=1")
    assert "watching" in agent.log()
    wait_for(lambda: agent.logged("ready"), what="the ready event in the log")  # lines are written once a loop turn
    first_ready = notify.has("READY", "1")
    assert first_ready is not None
    assert "pending" in notify.messages[first_ready]["STATUS"]

    # Watchdog pings every half WATCHDOG_USEC, from the loop.
    wait_for(lambda: sum(1 for m in (notify.receive() or notify.messages) if m.get("WATCHDOG") == "1") >= 3, what="three WATCHDOG=1")

    # STATUS follows the work.
    _, path = piwigo.add_photo(sample_photo(1))
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")
    wait_for(lambda: any("last upload 2" in m.get("STATUS", "") for m in (notify.receive() or notify.messages)), what="STATUS with the last upload")

    # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    before = len(notify.messages)
    agent.signal(signal.SIGHUP)
    wait_for(lambda: notify.has("RELOADING", "1", after=before) is not None, what="RELOADING=1")
    reloading = notify.has("RELOADING", "1", after=before)
    assert reloading is not None
    assert int(notify.messages[reloading]["MONOTONIC_USEC"]) > 0
    wait_for(lambda: notify.has("READY", "1", after=reloading + 1) is not None, what="READY=1 after the reload")

    # SIGTERM: STOPPING=1 and a clean exit.
    before = len(notify.messages)
    assert agent.stop() == 0
    assert notify.has("STOPPING", "1", after=before) is not None

    # After a restart the status names the last upload, read from the journal.
    before = len(notify.messages)
    agent.start()
    wait_for(lambda: notify.has("READY", "1", after=before) is not None, what="READY=1 after the restart")
    ready = notify.has("READY", "1", after=before)
    assert ready is not None
    assert "last upload 2" in notify.messages[ready]["STATUS"]


def test_status_sent_once_a_second(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, notify: NotifyListener) -> None:
    # Without the watchdog's pings the loop turns only for work and deadlines, such as the one
    # the rate limit sets for a status held back.
    agent.environment.pop("WATCHDOG_USEC")
    agent.start()
    wait_for(lambda: notify.has("READY", "1") is not None, what="READY=1")
    before = len(notify.messages)
    started = time.monotonic()

    paths = [piwigo.add_photo(sample_photo(n))[1] for n in range(30)]
    wait_for(lambda: all(setup.upload_status(p) == "uploaded" for p in paths), what="30 uploads")
    wait_for(lambda: notify.last_status().startswith("0 pending; last upload 2"), what="the status after the last upload")
    elapsed = time.monotonic() - started

    sent = [message for message in notify.messages[before:] if "STATUS" in message]
    assert len(sent) >= 2
    assert len(sent) <= elapsed / STATUS_INTERVAL + 2


def test_ready_waits_for_journal_replay(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, notify: NotifyListener) -> None:
    setup.update("s3", secret_access_key="wrong-secret")
    agent.start()
    paths = [piwigo.add_photo(sample_photo(n))[1] for n in range(3)]
    wait_for(lambda: all(setup.upload_status(p) == "pending" for p in paths), what="three pending uploads")
    agent.stop()
    notify.messages.clear()
    notify.receive()
    notify.messages.clear()

    agent.start()
    wait_for(lambda: notify.has("READY", "1") is not None, what="READY=1 after the restart")
    index = notify.has("READY", "1")
    assert index is not None
    assert notify.messages[index]["STATUS"].startswith("3 pending")


def test_sigterm_with_uploads_in_flight_keeps_journal_consistent(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, notify: NotifyListener) -> None:
    setup.update("uploads", workers=4, multipart_threshold_mb=5, part_size_mb=5)
    agent.start()
    paths = [piwigo.add_photo(sample_photo(n, size=8 * 1024 * 1024))[1] for n in range(6)]
    wait_for(lambda: "queued" in agent.log() and any(setup.upload_status(p) == "pending" for p in paths), what="queued uploads")
    assert agent.stop() == 0
    assert "stopping" in agent.log()
    assert "stopped" in agent.log()

    statuses = {setup.upload_status(p) for p in paths}
    # None: a photo the agent had not seen yet when it stopped. The table poll finds it after the restart.
    assert statuses <= {"uploaded", "pending", "detected", None}
    agent.start()
    for path in paths:
        wait_for(lambda: setup.upload_status(path) == "uploaded", timeout=120, what=f"{path} after the restart")


def test_journald_fields_from_the_agent(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation, tmp_path: Path) -> None:
    journal = bind_datagram_socket(unix_socket_path(tmp_path, "journal"))
    log_file = tmp_path / "agent.log"
    log_file.touch()
    info = os.stat(log_file)
    # The agent's stdout is this file, so JOURNAL_STREAM naming it makes the agent believe it runs under systemd.
    agent.environment.update({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}", "S3WATCH_JOURNAL_SOCKET": journal.getsockname()})
    agent.start(wait_for_log=False)
    entries = []

    def received_event(name: str) -> dict[str, str] | None:
        try:
            while True:
                entry = receive_entry(journal)
                entries.append({key: value.decode() for key, value in entry.values.items()})
        except (socket.timeout, BlockingIOError):
            pass
        return next((entry for entry in entries if entry.get("S3WATCH_EVENT") == name), None)

    journal.settimeout(0.2)
    wait_for(lambda: received_event("watching"), what="the watching event")
    image_id, path = piwigo.add_photo(sample_photo(1))
    uploaded = wait_for(lambda: received_event("uploaded"), what="the uploaded event")
    assert uploaded["PRIORITY"] == "6"
    assert uploaded["SYSLOG_IDENTIFIER"] == "s3watch"
    assert uploaded["S3WATCH_PATH"] == path
    assert uploaded["S3WATCH_IMAGE_ID"] == str(image_id)
    assert uploaded["S3WATCH_KEY"] == path
    assert uploaded["MESSAGE"].startswith(f"uploaded path={path} image_id={image_id}")
    assert "uploaded path=" not in agent.log()  # sent to journald, not printed as well
    journal.close()


def test_credentials_directory_supplies_secret(setup: Setup, tmp_path: Path) -> None:
    secret = setup.values["s3"].pop("secret_access_key")
    setup.values["s3"]["secret_access_key"] = None
    setup.write()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "s3_secret_access_key").write_text(secret + "\n")
    result = subprocess.run([sys.executable, "-m", "s3watch", "--config", str(setup.path), "check"], capture_output=True, text=True,
                            env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert secret not in result.stdout + result.stderr

    without = run_cli("--config", str(setup.path), "check")
    assert without.returncode == 2
    assert "set both s3.access_key_id and s3.secret_access_key, or neither" in without.stderr

    # The admin's mistakes name the credentials folder.
    (credentials / "s3_secret_access_key").rename(credentials / "s3_secret_key")
    missing = run_cli("--config", str(setup.path), "check", env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert missing.returncode == 2
    assert f"s3.secret_access_key (with the credentials in {credentials}: s3_access_key_id and s3_secret_access_key)" in missing.stderr
    # A db_password credential takes precedence, and a rejected login names where the password came from.
    (credentials / "s3_secret_access_key").write_text(secret)
    (credentials / "db_password").write_text("not-the-password")
    refused = run_cli("--config", str(setup.path), "check", env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert refused.returncode == 1
    assert "check the user and password (the password is from the db_password credential in $CREDENTIALS_DIRECTORY" in refused.stdout
    nowhere = run_cli("--config", str(setup.path), "check", env={"CREDENTIALS_DIRECTORY": str(tmp_path / "nowhere")})
    assert nowhere.returncode == 2
    assert f"CREDENTIALS_DIRECTORY {tmp_path / 'nowhere'} is not a folder" in nowhere.stderr

    # The unit's reload runs check --offline, which reads no credential, because systemd may
    # give ExecReload= the variable but not the folder. The access key id may stay in the YAML file.
    offline = run_cli("--config", str(setup.path), "check", "--offline", env={"CREDENTIALS_DIRECTORY": str(tmp_path / "nowhere")})
    assert offline.returncode == 0, offline.stderr


def test_metrics_endpoint_is_scraped(setup: Setup, agent: AgentProcess, piwigo: PiwigoImitation) -> None:
    port = free_ports(1)[0]
    setup.update("metrics", listen=f"127.0.0.1:{port}")
    agent.start()
    _, path = piwigo.add_photo(sample_photo(1, size=50_000))
    wait_for(lambda: setup.upload_status(path) == "uploaded", what="the upload")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    def scraped_after_upload() -> str | None:
        page = scrape()
        return page if "s3watch_journal_bytes " in page and 's3watch_uploads_total{outcome="uploaded"} 1.0' in page else None

    text = wait_for(scraped_after_upload, what="the metrics after the upload")
    assert re.search(r"^s3watch_uploaded_bytes_total [1-9]", text, re.M)
    assert re.search(r"^s3watch_last_success_timestamp_seconds [1-9]", text, re.M)
    assert re.search(r"^s3watch_queue_length 0\.0", text, re.M)
    assert re.search(r"^s3watch_oldest_pending_age_seconds 0\.0", text, re.M)
    assert re.search(r"^s3watch_journal_bytes [1-9]", text, re.M)
    assert "# TYPE s3watch_upload_failures_total counter" in text

    # After a restart the last success is the journal's, not zero.
    last_success = re.search(r"^s3watch_last_success_timestamp_seconds (\S+)", text, re.M).group(1)  # type: ignore[union-attr]
    agent.stop()
    agent.start()
    restarted = wait_for(lambda: scrape() if "ready" in agent.log() else None, what="the metrics after a restart")
    restored = float(re.search(r"^s3watch_last_success_timestamp_seconds (\S+)", restarted, re.M).group(1))  # type: ignore[union-attr]
    assert abs(restored - float(last_success)) < 1.0  # the journal's time stamp has milliseconds


def test_check_offline_fails_on_broken_config(setup: Setup) -> None:
    good = run_cli("--config", str(setup.path), "check", "--offline")
    assert good.returncode == 0, good.stderr
    setup.values["piwigo"]["database"]["url"] = "mysql://u:pw@127.0.0.1:notaport/x"
    setup.write()
    broken = run_cli("--config", str(setup.path), "check", "--offline")
    assert broken.returncode == 2
    assert "invalid port" in broken.stderr


def test_run_broken_config_error_priority(setup: Setup, tmp_path: Path) -> None:
    # The unit has no ExecStartPre= check, whose failure systemd would restart every RestartSec
    # forever: RestartPreventExitStatus= applies only to the main process. run checks the
    # configuration itself and exits 2.
    unit = (ROOT / "systemd" / "s3watch.service").read_text()
    directives = [line.split("=", 1)[0] for line in unit.splitlines() if line and not line.startswith("#")]
    assert "ExecStartPre" not in directives
    assert "RestartPreventExitStatus=2" in unit.splitlines()

    setup.values["piwigo"]["database"]["url"] = "mysql://u:pw@127.0.0.1:notaport/x"
    setup.write()
    errors = tmp_path / "stderr"
    with open(errors, "w") as stream:
        # As systemd connects it: $JOURNAL_STREAM names standard error's device and inode.
        identity = os.fstat(stream.fileno())
        result = subprocess.run([sys.executable, "-m", "s3watch", "--config", str(setup.path), "run"], stdout=subprocess.DEVNULL, stderr=stream,
                                env={**os.environ, "JOURNAL_STREAM": f"{identity.st_dev}:{identity.st_ino}"}, timeout=120)
    assert result.returncode == 2
    # journald takes <3> as the line's priority, so `journalctl -p warning` shows why the start failed.
    assert errors.read_text().startswith("<3>s3watch: error: ")
    assert "invalid port" in errors.read_text()

    plain = run_cli("--config", str(setup.path), "run")
    assert plain.returncode == 2
    assert plain.stderr.startswith("s3watch: error: ")


def test_config_generate_matches_example(tmp_path: Path) -> None:
    example = (ROOT / "s3watch.yaml.example").read_text()
    assert (ROOT / "s3watch" / "s3watch.yaml.example").read_text() == example
    printed = run_cli("config", "generate")
    assert printed.returncode == 0
    assert printed.stdout == example
    target = tmp_path / "s3watch.yaml"
    written = run_cli("config", "generate", "--output", str(target))
    assert written.returncode == 0
    assert target.read_text() == example
    again = run_cli("config", "generate", "--output", str(target))
    assert again.returncode == 2
    assert "exists already" in again.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    # verify wants ExecStart's program to exist: point the unit at this environment's s3watch.
    program = Path(sys.executable).parent / "s3watch"
    unit = tmp_path / "s3watch.service"
    unit.write_text((ROOT / "systemd" / "s3watch.service").read_text().replace("/usr/local/bin/s3watch", str(program)))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "s3watch.service" not in verify.stderr

    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for s3watch\.service: ([0-9.]+)", security.stdout)
    assert exposure is not None, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 3.0
