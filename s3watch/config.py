"""Configuration: the YAML schema, its defaults, and validation into typed settings."""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import yaml

DEFAULT_CONFIG_PATH = Path("/etc/s3watch/s3watch.yaml")

# Every placeholder a key template may use; see `uploader.object_key`.
KEY_TEMPLATE_FIELDS = ("prefix", "path", "image_id", "md5", "file", "name", "ext")


class ConfigError(Exception):
    """A configuration problem, with a one-line message that names the file or key and the fix."""


@dataclass(frozen=True)
class DatabaseConfig:
    """The `piwigo.database` section: where the images table is, when not read from Piwigo."""

    url: str
    table_prefix: str


@dataclass(frozen=True)
class PiwigoConfig:
    """The `piwigo` section: the gallery on disk and, optionally, its database."""

    root: Path
    upload_dir: str
    database: DatabaseConfig | None

    @property
    def upload_path(self) -> Path:
        """The absolute path of the upload directory."""
        return self.root / self.upload_dir


@dataclass(frozen=True)
class MonitorConfig:
    """The `monitor` section: active monitoring of new photos."""

    enabled: bool
    poll_interval: float
    match_timeout: float


@dataclass(frozen=True)
class S3Config:
    """The `s3` section: the bucket and how to reach it."""

    bucket: str
    prefix: str
    key_template: str
    region: str
    endpoint_url: str | None
    access_key_id: str | None
    secret_access_key: str | None
    addressing_style: str
    conditional_writes: str
    flexible_checksums: bool
    connect_timeout: float
    read_timeout: float


@dataclass(frozen=True)
class UploadsConfig:
    """The `uploads` section: parallelism, duplicates and retries."""

    workers: int
    prevent_duplicates: bool
    multipart_threshold: int
    part_size: int
    attempts: int
    retry_interval: float
    originals: str
    originals_cap: int
    formats: bool


@dataclass(frozen=True)
class LinksConfig:
    """The `links` section: how status builds a download link for an uploaded object."""

    mode: str
    base_url: str | None
    expires: int


@dataclass(frozen=True)
class BatchConfig:
    """The `batch` section: queueing photos from Piwigo's Batch Manager through a tag."""

    tag: str | None
    tag_poll_interval: float


@dataclass(frozen=True)
class MetricsConfig:
    """The `metrics` section: the optional Prometheus endpoint."""

    listen: str | None


@dataclass(frozen=True)
class LogConfig:
    """The `log` section: format and level of the agent's log lines."""

    format: str
    level: str


@dataclass(frozen=True)
class Config:
    """The whole validated configuration, and the file it came from."""

    piwigo: PiwigoConfig
    monitor: MonitorConfig
    s3: S3Config
    uploads: UploadsConfig
    links: LinksConfig
    batch: BatchConfig
    metrics: MetricsConfig
    log: LogConfig
    state_dir: Path
    spool_dir: Path
    source: Path

    @property
    def journal_path(self) -> Path:
        """The journal file inside the state directory."""
        return self.state_dir / "journal.jsonl"


# A field's checker takes the dotted key and the raw YAML value and returns the typed value,
# or raises ConfigError naming the key.
Checker = Callable[[str, Any], Any]

_REQUIRED = object()
MiB = 1024 * 1024


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {_describe(value)}")
    return value


def _nonempty_string(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text.strip():
        raise ConfigError(f"{key} must not be empty")
    return text


def _upload_dir(key: str, value: Any) -> str:
    """Piwigo's upload folder, relative to its root; Piwigo's own form './upload' is accepted."""
    text = _nonempty_string(key, value).strip()
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if text.startswith("/") or ".." in parts or not parts:
        raise ConfigError(f"{key} must be a folder inside piwigo.root, such as upload (Piwigo's $conf['upload_dir']), got {text!r}")
    return "/".join(parts)


def _optional_string(key: str, value: Any) -> str | None:
    if value is None:
        return None
    return _nonempty_string(key, value)


def _optional_secret(key: str, value: Any) -> str | None:
    """Check a secret without ever putting its value in a message."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string: put the value in quotes")
    if not value.strip():
        raise ConfigError(f"{key} must not be empty")
    return value


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
    return value


def _integer(low: int, high: int) -> Checker:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{key} must be a whole number from {low} to {high}, got {_describe(value)}")
        return value

    return check


def _seconds(low: float, high: float) -> Checker:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(f"{key} must be a number of seconds from {low:g} to {high:g}, got {_describe(value)}")
        return float(value)

    return check


def _mebibytes(low: int, high: int) -> Checker:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{key} must be a whole number of MiB from {low} to {high}, got {_describe(value)}")
        return value * MiB

    return check


def _choice(*choices: str) -> Checker:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            allowed = ", ".join(choices)
            raise ConfigError(f"{key} must be one of {allowed}, got {_describe(value)}")
        return value

    return check


def _endpoint_url(key: str, value: Any) -> str | None:
    if value is None:
        return None
    text = _nonempty_string(key, value)
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{key} must not contain credentials: set s3.access_key_id and s3.secret_access_key instead")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key} must be a URL starting with http:// or https://, got {text!r}")
    return text.rstrip("/")


def _listen_address(key: str, value: Any) -> str | None:
    if value is None:
        return None
    text = _nonempty_string(key, value)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} must be HOST:PORT, for example 127.0.0.1:9464, got {text!r}")
    return text


def _bucket(key: str, value: Any) -> str:
    text = _nonempty_string(key, value)
    # Wider than AWS's rule (3 to 63 characters, no '_'), like botocore's own check, because
    # S3-compatible stores such as Ceph with relaxed bucket names accept more. The store rejects the rest.
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,253}[a-z0-9]", text):
        raise ConfigError(f"{key} {text!r} is not a valid bucket name: use 3 to 255 lower-case letters, digits, '.', '-' or '_'")
    return text


def _key_template(key: str, value: Any) -> str:
    text = _nonempty_string(key, value)
    fields = {name: "x" for name in KEY_TEMPLATE_FIELDS}
    try:
        text.format(**fields)
    except KeyError as error:
        allowed = ", ".join("{" + name + "}" for name in KEY_TEMPLATE_FIELDS)
        raise ConfigError(f"{key} uses unknown placeholder {{{error.args[0]}}}: use {allowed}") from None
    except (ValueError, IndexError) as error:
        raise ConfigError(f"{key} is not a valid template ({error}): write placeholders as {{path}}") from None
    if "{path}" not in text and "{image_id}" not in text and "{md5}" not in text:
        raise ConfigError(f"{key} must contain {{path}}, {{image_id}} or {{md5}}, or every photo would get the same key")
    return text


def _database_url(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a URL such as mysql://piwigo:PASSWORD@127.0.0.1:3306/piwigo")
    scheme = value.split(":", 1)[0].lower()
    if scheme not in ("mysql", "mariadb", "sqlite") or "://" not in value:
        raise ConfigError(f"{key} must start with mysql:// or sqlite:/// (for example mysql://piwigo:PASSWORD@127.0.0.1:3306/piwigo)")
    from .piwigo import parse_database_url

    parse_database_url(value, "")  # raises ConfigError naming the problem, never the password
    return value


# The schema: section -> key -> (checker, default). A section whose value is a dict of this form
# nests; `_REQUIRED` marks a key without a default.
SCHEMA: dict[str, Any] = {
    "piwigo": {
        "root": (_nonempty_string, _REQUIRED),
        "upload_dir": (_upload_dir, "upload"),
        "database": {
            "url": (_database_url, _REQUIRED),
            "table_prefix": (_string, "piwigo_"),
        },
    },
    "monitor": {
        "enabled": (_boolean, True),
        "poll_interval": (_seconds(0.1, 3600), 10.0),
        "match_timeout": (_seconds(1, 7 * 86400), 600.0),
    },
    "s3": {
        "bucket": (_bucket, _REQUIRED),
        "prefix": (_string, ""),
        "key_template": (_key_template, "{prefix}{path}"),
        "region": (_nonempty_string, "us-east-1"),
        "endpoint_url": (_endpoint_url, None),
        "access_key_id": (_optional_string, None),
        "secret_access_key": (_optional_secret, None),
        "addressing_style": (_choice("auto", "path", "virtual"), "auto"),
        "conditional_writes": (_choice("auto", "never"), "auto"),
        "flexible_checksums": (_boolean, False),
        "connect_timeout": (_seconds(1, 600), 10.0),
        "read_timeout": (_seconds(1, 3600), 60.0),
    },
    "uploads": {
        "workers": (_integer(1, 64), 4),
        "prevent_duplicates": (_boolean, False),
        "multipart_threshold_mb": (_mebibytes(5, 5 * 1024), 64),
        "part_size_mb": (_mebibytes(5, 5 * 1024), 16),
        "attempts": (_integer(1, 100), 5),
        "retry_interval": (_seconds(1, 86400), 300.0),
        "originals": (_choice("as_uploaded", "as_stored"), "as_uploaded"),
        "originals_cap_mb": (_mebibytes(0, 1024 * 1024), 2048),
        "formats": (_boolean, True),
    },
    "links": {
        "mode": (_choice("public", "presigned"), "public"),
        "base_url": (_endpoint_url, None),
        "expires": (_integer(1, 7 * 86400), 7 * 86400),
    },
    "batch": {
        "tag": (_optional_string, None),
        "tag_poll_interval": (_seconds(1, 86400), 60.0),
    },
    "metrics": {
        "listen": (_listen_address, None),
    },
    "log": {
        "format": (_choice("console", "json"), "console"),
        "level": (_choice("debug", "info", "warning", "error"), "info"),
    },
    "state_dir": (_nonempty_string, "/var/lib/s3watch"),
    "spool_dir": (_nonempty_string, "/var/spool/s3watch"),
}


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _apply_schema(schema: dict[str, Any], data: Any, where: str, file: Path) -> dict[str, Any]:
    """Check `data` against one level of the schema and return it with defaults filled in.

    Raises ConfigError for an unknown key (suggesting the nearest known one), a missing required
    key or a value of the wrong type.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        name = where.rstrip(".") or "the top level"
        raise ConfigError(f"{file}: {name} must be a mapping of keys to values, got {_describe(data)}")

    for name in data:
        if name not in schema:
            known = list(schema)
            nearest = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean '{where}{nearest[0]}'?)" if nearest else f" (known keys here: {', '.join(known)})"
            raise ConfigError(f"{file}: unknown key '{where}{name}'{hint}")

    result: dict[str, Any] = {}
    for name, rule in schema.items():
        key = where + name
        if isinstance(rule, dict):
            if name == "database" and data.get(name) is None:
                result[name] = None
                continue
            result[name] = _apply_schema(rule, data.get(name), key + ".", file)
            continue

        check, default = rule
        if name not in data:
            if default is _REQUIRED:
                raise ConfigError(f"{file}: missing key '{key}': add it ('s3watch config generate' prints every key with its default)")
            # Defaults go through the checker too, which converts units (MiB to bytes).
            result[name] = check(key, default) if default is not None else None
            continue
        try:
            result[name] = check(key, data[name])
        except ConfigError as error:
            raise ConfigError(f"{file}: {error}") from None
    return result


def parse_config(text: str, source: Path, credentials: bool = True) -> Config:
    """Parse and validate configuration text; `source` names the file in messages.

    Returns the typed configuration with every default filled in, and the S3 keys taken from
    systemd credentials where present (see `apply_credentials`). With `credentials` False,
    systemd credentials are left out, and so is the check that both S3 keys are given, which
    may be half in the YAML file and half in a credential. Raises ConfigError for
    unparseable YAML and for any invalid, unknown or missing key. Folders are not checked
    here (see `check_folders`), so a configuration can be validated on another machine.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        # YAML notices a wrong indentation only at the next key, so the line given may be below the mistake.
        raise ConfigError(f"{source}{line}: could not parse YAML ({problem}): fix the syntax there or in the lines above, "
                          "indentation included") from None

    values = _apply_schema(SCHEMA, data, "", source)

    piwigo = values["piwigo"]
    database = DatabaseConfig(**piwigo["database"]) if piwigo["database"] else None
    uploads = values["uploads"]
    if uploads["part_size_mb"] > uploads["multipart_threshold_mb"]:
        raise ConfigError(f"{source}: uploads.part_size_mb must not be larger than uploads.multipart_threshold_mb")
    s3 = values["s3"]

    config = Config(
        piwigo=PiwigoConfig(root=Path(piwigo["root"]), upload_dir=piwigo["upload_dir"], database=database),
        monitor=MonitorConfig(**values["monitor"]),
        s3=S3Config(**s3),
        uploads=UploadsConfig(
            workers=uploads["workers"],
            prevent_duplicates=uploads["prevent_duplicates"],
            multipart_threshold=uploads["multipart_threshold_mb"],
            part_size=uploads["part_size_mb"],
            attempts=uploads["attempts"],
            retry_interval=uploads["retry_interval"],
            originals=uploads["originals"],
            originals_cap=uploads["originals_cap_mb"],
            formats=uploads["formats"],
        ),
        links=LinksConfig(**values["links"]),
        batch=BatchConfig(**values["batch"]),
        metrics=MetricsConfig(**values["metrics"]),
        log=LogConfig(**values["log"]),
        state_dir=Path(values["state_dir"]),
        spool_dir=Path(values["spool_dir"]),
        source=source,
    )
    if not credentials:
        return config
    config = apply_credentials(config)
    if (config.s3.access_key_id is None) != (config.s3.secret_access_key is None):
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        where = f" (with the credentials in {directory}: s3_access_key_id and s3_secret_access_key)" if directory else ""
        raise ConfigError(f"{source}: set both s3.access_key_id and s3.secret_access_key{where}, or neither to use boto3's credential chain")
    return config


def load_config(path: Path, credentials: bool = True) -> Config:
    """Read, parse and validate the configuration file at `path`.

    Returns the typed configuration, without systemd credentials when `credentials` is False
    (see `parse_config`). Raises ConfigError when the file is missing, unreadable or invalid,
    or when the gallery folders it names cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found: create it with 's3watch config generate --output {path}' or pass --config PATH") from None
    except PermissionError:
        raise ConfigError(f"configuration file {path} is not readable by this user: fix its permissions or run as its owner") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration file {path} is a directory: pass the YAML file with --config PATH") from None
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {path} is not UTF-8 text: save it as UTF-8") from None

    config = parse_config(text, path, credentials)
    check_folders(config)
    return config


def exposed_secret_warning(config: Config, text_has_secret: bool) -> str | None:
    """Return a warning when the configuration file contains a secret and other users may read it."""
    try:
        mode = config.source.stat().st_mode
    except OSError:
        return None
    if text_has_secret and mode & 0o004:
        return (f"{config.source} contains a secret and is readable by every user: "
                f"run chmod 640 {config.source} (and chgrp it to the service's group)")
    return None


def holds_secret(config: Config) -> bool:
    """Tell whether the YAML itself (not a systemd credential) contains the S3 secret or a database password."""
    from urllib.parse import urlsplit

    if read_credential("s3_secret_access_key") is None and config.s3.secret_access_key:
        return True
    database = config.piwigo.database
    return database is not None and bool(urlsplit(database.url).password)


# systemd credentials (LoadCredential=) s3watch reads from $CREDENTIALS_DIRECTORY, so that no
# secret needs to sit in the YAML file.
CREDENTIAL_NAMES = ("s3_access_key_id", "s3_secret_access_key", "db_password")


def read_credential(name: str) -> str | None:
    """Return a systemd credential's value (trailing newline removed), or None when there is none.

    Raises ConfigError when the credential file exists but cannot be read.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        folder = stat.S_ISDIR(os.stat(directory).st_mode)
    except FileNotFoundError:
        folder = False
    except OSError as error:
        raise ConfigError(f"CREDENTIALS_DIRECTORY {directory} could not be read ({error.strerror}): "
                          "run this command as root or as the service's user, or unset it") from None
    if not folder:
        raise ConfigError(f"CREDENTIALS_DIRECTORY {directory} is not a folder: set it to the folder holding the credential files, or unset it")
    path = Path(directory) / name
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8"
        raise ConfigError(f"credential {path} could not be read ({reason}): run this command as root, "
                          "or check the file and LoadCredential= in the unit") from None


def apply_credentials(config: Config) -> Config:
    """Return the configuration with the S3 keys taken from systemd credentials, where present."""
    access_key = read_credential("s3_access_key_id")
    secret_key = read_credential("s3_secret_access_key")
    if access_key is None and secret_key is None:
        return config
    s3 = replace(config.s3, access_key_id=access_key or config.s3.access_key_id, secret_access_key=secret_key or config.s3.secret_access_key)
    return replace(config, s3=s3)


def check_folders(config: Config) -> None:
    """Check that the gallery root exists and can be read.

    The upload directory may be missing, because Piwigo creates it at the first upload.
    Raises ConfigError naming the folder otherwise.
    """
    root = config.piwigo.root
    if not root.is_absolute():
        raise ConfigError(f"{config.source}: piwigo.root must be an absolute path, got {str(root)!r}")
    if not root.is_dir():
        raise ConfigError(f"{config.source}: piwigo.root {root} is not a directory: set it to the gallery's root folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ConfigError(f"{config.source}: piwigo.root {root} is not readable by this user: add the user to the web server's group")

    upload = config.piwigo.upload_path
    if upload.exists() and not os.access(upload, os.R_OK | os.X_OK):
        raise ConfigError(f"{config.source}: upload directory {upload} is not readable by this user: add the user to the web server's group")
    for name in ("state_dir", "spool_dir"):
        folder = getattr(config, name)
        if not folder.is_absolute():
            raise ConfigError(f"{config.source}: {name} must be an absolute path, got {str(folder)!r}")
