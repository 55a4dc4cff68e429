"""Runs last (file names sort it there): no secret the suite used reached any output s3watch wrote."""

from __future__ import annotations


import pytest

from .conftest import CLI_OUTPUTS, TEST_DB_PASSWORD, TEST_S3_SECRET

# Deliberately wrong secrets some tests configure; they must not leak either.
WRONG_SECRETS = ["wrong-secret", "wrong-db-password", "not-the-secret", "wrong-password", "fault-secret-T4kW9p"]

# Files that hold secrets on purpose (the tests' configuration files, SeaweedFS's identities,
# systemd credentials) or that s3watch does not write (the S3 and database servers' own logs).
HOLDERS = {"s3watch.yaml", "s3.json", "s3_secret_access_key", "db_password", "weed.log", "mariadb.log", "error.log"}


def test_no_secret_in_any_output(tmp_path_factory: pytest.TempPathFactory) -> None:
    secrets = [TEST_DB_PASSWORD, TEST_S3_SECRET, *WRONG_SECRETS]
    base = tmp_path_factory.getbasetemp()
    checked = 0
    for path in base.rglob("*"):
        if not path.is_file() or path.is_symlink() or path.name in HOLDERS:
            continue
        if path.suffix not in (".log", ".jsonl", ".report", ".reason", ".list") and path.name not in ("journal.jsonl",):
            continue
        text = path.read_text(errors="replace")
        checked += 1
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {path}"
    for output in CLI_OUTPUTS:
        for secret in secrets:
            assert secret not in output, f"{secret!r} found in command output: {output[:300]}"
    assert checked > 0 or not CLI_OUTPUTS
