"""Configuration parsing and validation, and reading Piwigo's database.inc.php."""

from __future__ import annotations

from pathlib import Path

import pytest

from s3watch.config import ConfigError, load_config, parse_config
from s3watch.piwigo import is_original, parse_database_url, read_database_inc

from .conftest import run_cli

MINIMAL = "piwigo:\n  root: /srv/piwigo\ns3:\n  bucket: my-gallery\n"


def parse(text: str):  # noqa: ANN201 - the return type is Config
    return parse_config(text, Path("s3watch.yaml"))


def test_upload_dir_in_piwigo_form_is_accepted() -> None:
    assert parse(MINIMAL.replace("/srv/piwigo", "/srv/piwigo\n  upload_dir: ./upload2/")).piwigo.upload_dir == "upload2"


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse(MINIMAL)
    assert config.piwigo.upload_dir == "upload"
    assert config.piwigo.database is None
    assert config.monitor.enabled is True
    assert config.s3.key_template == "{prefix}{path}"
    assert config.s3.region == "us-east-1"
    assert config.uploads.workers == 4
    assert config.uploads.prevent_duplicates is False
    assert config.uploads.multipart_threshold == 64 * 1024 * 1024
    assert config.state_dir == Path("/var/lib/s3watch")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("piwigo: [", "could not parse YAML"),
        # The mistake is on line 6, and YAML notices it on line 7: the message points above too.
        (MINIMAL + "uploads:\n    workers: 2\n  attempts: 5\n", "line 7: could not parse YAML (expected <block end>, but found '<block mapping start>'): "
                                                           "fix the syntax there or in the lines above, indentation included"),
        ("- a\n- b\n", "the top level must be a mapping"),
        (MINIMAL + "s3x: {}\n", "unknown key 's3x' (did you mean 's3'?)"),
        (MINIMAL.replace("bucket:", "buckt: x\n  bucket:"), "unknown key 's3.buckt' (did you mean 's3.bucket'?)"),
        ("piwigo:\n  root: /srv\n", "missing key 's3.bucket': add it ('s3watch config generate' prints every key with its default)"),
        ("piwigo:\n  root: /srv\ns3:\n  region: x\n", "missing key 's3.bucket'"),
        (MINIMAL + "uploads:\n  workers: four\n", "uploads.workers must be a whole number from 1 to 64, got 'four'"),
        (MINIMAL + "monitor:\n  enabled: yes please\n", "monitor.enabled must be true or false"),
        (MINIMAL.replace("my-gallery", "My_Gallery!"), "is not a valid bucket name"),
        (MINIMAL + "  endpoint_url: minio.local:9000\n", "s3.endpoint_url must be a URL starting with http:// or https://"),
        (MINIMAL + "  key_template: '{prefix}{album}'\n", "unknown placeholder {album}"),
        (MINIMAL + "  key_template: 'fixed'\n", "must contain {path}"),
        (MINIMAL + "  access_key_id: AKIA\n", "set both s3.access_key_id and s3.secret_access_key"),
        ("piwigo:\n  root: /srv\n  database:\n    url: postgres://x/y\ns3:\n  bucket: abc\n", "must start with mysql:// or sqlite:///"),
        ("piwigo:\n  root: /srv\n  database:\n    url: mysql://u:pw@db:abc/x\ns3:\n  bucket: abc\n", "has an invalid port in host 'db:abc'"),
        (MINIMAL + "  endpoint_url: http://AKIA:hunter2@127.0.0.1:9000\n", "must not contain credentials"),
        (MINIMAL + "  access_key_id: AKIA\n  secret_access_key: 987654321987\n", "s3.secret_access_key must be a string: put the value in quotes"),
        (MINIMAL.replace("/srv/piwigo", "/srv/piwigo\n  upload_dir: ../../etc"), "piwigo.upload_dir must be a folder inside piwigo.root"),
        (MINIMAL.replace("/srv/piwigo", "/srv/piwigo\n  upload_dir: /var/upload"), "piwigo.upload_dir must be a folder inside piwigo.root"),
    ],
)
def test_invalid_config_is_rejected_with_key_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    for secret in ("987654321987", "hunter2", "pw@"):
        assert secret not in str(caught.value)


def test_load_config_checks_gallery_root(tmp_path: Path) -> None:
    path = tmp_path / "s3watch.yaml"
    path.write_text(MINIMAL.replace("/srv/piwigo", str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config(path)


def test_cli_exits_2_on_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "s3watch.yaml"
    path.write_text(MINIMAL + "uploads:\n  wokers: 2\n")
    result = run_cli("--config", str(path), "check")
    assert result.returncode == 2
    assert result.stderr.strip() == f"s3watch: error: {path}: unknown key 'uploads.wokers' (did you mean 'uploads.workers'?)"


def test_cli_exits_2_on_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "none.yaml"), "status")
    assert result.returncode == 2
    assert "not found" in result.stderr


@pytest.mark.parametrize(("arguments", "message"), [
    (["--confg", "c.yaml", "check"], "s3watch: error: unknown option --confg (did you mean --config?)"),
    (["-x", "status"], "s3watch: error: unknown option -x (see s3watch --help)"),
])
def test_cli_names_a_mistyped_option(arguments: list[str], message: str) -> None:
    # argparse alone would take c.yaml for the command: "invalid choice: 'c.yaml'".
    result = run_cli(*arguments)
    assert result.returncode == 2
    assert result.stderr.strip() == message


def test_cli_takes_an_abbreviated_option(tmp_path: Path) -> None:
    result = run_cli("--conf", str(tmp_path / "none.yaml"), "status")
    assert result.returncode == 2
    assert "none.yaml not found" in result.stderr


DATABASE_INC = """<?php
$conf['dblayer'] = 'mysqli';
$conf['db_base'] = 'piwigo';
$conf['db_user'] = 'piwigo';
$conf['db_password'] = 'it\\'s "secret"';
$conf['db_host'] = '127.0.0.1:3307';

$prefixeTable = 'pwg_';

define('PHPWG_INSTALLED', true);
define('PWG_CHARSET', 'utf-8');
define('DB_CHARSET', 'utf8');
define('DB_COLLATE', '');

?>"""


def test_database_inc_is_read_like_piwigo(tmp_path: Path) -> None:
    (tmp_path / "local" / "config").mkdir(parents=True)
    (tmp_path / "local" / "config" / "database.inc.php").write_text(DATABASE_INC)
    settings = read_database_inc(tmp_path)
    assert settings.kind == "mysql"
    assert (settings.host, settings.port, settings.unix_socket) == ("127.0.0.1", 3307, None)
    assert (settings.user, settings.password, settings.database) == ("piwigo", 'it\'s "secret"', "piwigo")
    assert settings.table_prefix == "pwg_"
    assert "secret" not in repr(settings)


@pytest.mark.parametrize(
    ("db_host", "expected"),
    [("db.example:3310", ("db.example", 3310, None)), ("/run/mysql.sock", (None, 3306, "/run/mysql.sock")), ("db.example", ("db.example", 3306, None))],
)
def test_database_inc_host_forms(tmp_path: Path, db_host: str, expected: tuple) -> None:
    (tmp_path / "local" / "config").mkdir(parents=True)
    (tmp_path / "local" / "config" / "database.inc.php").write_text(DATABASE_INC.replace("127.0.0.1:3307", db_host))
    settings = read_database_inc(tmp_path)
    assert (settings.host, settings.port, settings.unix_socket) == expected


def test_database_inc_missing_or_unparseable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="database.inc.php not found"):
        read_database_inc(tmp_path)
    (tmp_path / "local" / "config").mkdir(parents=True)
    (tmp_path / "local" / "config" / "database.inc.php").write_text("<?php // nothing here\n")
    with pytest.raises(ConfigError, match=r"could not be parsed: missing db_base, db_user, db_host, \$prefixeTable"):
        read_database_inc(tmp_path)


def test_database_inc_expression_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "local" / "config").mkdir(parents=True)
    (tmp_path / "local" / "config" / "database.inc.php").write_text(DATABASE_INC.replace("'it\\'s \"secret\"'", "getenv('DB_PASSWORD')"))
    with pytest.raises(ConfigError, match="db_password is not a plain PHP string"):
        read_database_inc(tmp_path)


def test_database_urls() -> None:
    mysql = parse_database_url("mysql://piwigo:p%40ss@db:3307/gallery", "piwigo_")
    assert (mysql.host, mysql.port, mysql.user, mysql.password, mysql.database) == ("db", 3307, "piwigo", "p@ss", "gallery")
    assert "p@ss" not in mysql.describe()
    assert parse_database_url("sqlite:///var/lib/piwigo.db", "").sqlite_path == Path("/var/lib/piwigo.db")
    assert parse_database_url("sqlite:////var/lib/piwigo.db", "").sqlite_path == Path("/var/lib/piwigo.db")
    with pytest.raises(ConfigError, match="no database name"):
        parse_database_url("mysql://piwigo:x@db", "")


@pytest.mark.parametrize(
    ("path", "original"),
    [
        ("upload/2026/12/04/20261204193815-f12a555d.jpg", True),
        ("upload/2026/12/04/holiday photo.JPG", True),
        ("upload/buffer/0b5f049e74fdffceeaf48f4072d90d95", False),
        ("upload/buffer/abc-u1-001of003.chunk", False),
        ("upload/2026/12/04/index.htm", False),
        ("upload/2026/12/04/pwg_representative/x.jpg", False),
        ("upload/2026/12/04/pwg_format/x.cr2", False),
        ("upload/2026/12/04/.x.jpg", False),
        ("upload/2026/12/04/x.jpg.part", False),
        ("upload/2026/12/04/x.jpg.tmp", False),
        ("galleries/album/x.jpg", False),
        ("upload", False),
    ],
)
def test_is_original(path: str, original: bool) -> None:
    assert is_original(path, "upload") is original


def test_example_config_is_valid_and_lists_every_key() -> None:
    example = Path(__file__).parent.parent / "s3watch.yaml.example"
    config = parse_config(example.read_text(), example)
    assert config == parse_config(MINIMAL.replace("/srv/piwigo", "/var/www/piwigo").replace("my-gallery", "my-gallery-originals"), example)

    from s3watch.config import SCHEMA

    text = example.read_text()
    for section, keys in SCHEMA.items():
        assert f"{section}:" in text
        if isinstance(keys, dict):
            for key in keys:
                assert f"{key}:" in text, f"{section}.{key} is missing from s3watch.yaml.example"
