"""The `s3watch` command line: run, check, status, journal repair and demo."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .logs import print_problem

if TYPE_CHECKING:
    from .uploader import Uploader

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s3watch", description="Copy every photo added to a Piwigo gallery to an S3 bucket, exactly once.")
    parser.add_argument("--version", action="version", version=f"s3watch {__version__}")
    parser.add_argument("--config", type=Path, default=None, metavar="PATH", help=f"configuration file (default: $S3WATCH_CONFIG or {DEFAULT_CONFIG_PATH})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    commands.add_parser("run", help="run the agent in the foreground, as systemd does")
    check = commands.add_parser("check", help="validate the configuration and connect to the database and the bucket; exit 0 only when all is well")
    check.add_argument("--offline", action="store_true", help="check the configuration, Piwigo's database settings and the folders only, without connecting (the unit runs it before a reload)")

    config = commands.add_parser("config", help="configuration helpers")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION")
    config_commands.required = True
    generate = config_commands.add_parser("generate", help="print a commented sample configuration (every key with its default)")
    generate.add_argument("--output", "-o", type=Path, default=None, metavar="FILE", help="write it to FILE instead of standard output (fails if FILE exists)")
    status = commands.add_parser("status", help="show pending and failed uploads and the most recent uploads with their links")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    enqueue = commands.add_parser("enqueue", help="queue photos by path or id:N (writes a list into the spool directory)")
    enqueue.add_argument("entries", nargs="*", metavar="ENTRY", help="a photo's path as Piwigo stores it, an absolute path inside the gallery, or id:1234")
    enqueue.add_argument("--from", dest="from_file", metavar="FILE", help="read entries from FILE, one a line ('-' for standard input)")

    backfill = commands.add_parser("backfill", help="queue photos already in the gallery, selected from the images table")
    backfill.add_argument("--all", action="store_true", help="every photo")
    backfill.add_argument("--since", metavar="DATE", help="photos added on or after DATE (YYYY-MM-DD or YYYY-MM-DD HH:MM:SS)")
    backfill.add_argument("--album", type=int, metavar="ID", help="photos in the album with this id")
    backfill.add_argument("--recursive", action="store_true", help="with --album: its sub-albums too")
    backfill.add_argument("--ids", metavar="FIRST-LAST", help="photos with an image id in this range, for example 100-250")
    backfill.add_argument("--dry-run", action="store_true", help="print the count and the first entries instead of queueing")

    url = commands.add_parser("url", help="print the download link of an uploaded photo, or why it is not uploaded")
    url.add_argument("entry", metavar="ENTRY", help="a photo's path as Piwigo stores it, an absolute path inside the gallery, or id:1234")

    verify = commands.add_parser("verify", help="check that every uploaded photo is in the bucket with its recorded size and md5; exit 1 if not")
    verify.add_argument("--requeue", action="store_true", help="queue the missing ones again (through the spool directory)")

    journal = commands.add_parser("journal", help="journal maintenance")
    journal_commands = journal.add_subparsers(dest="journal_command", metavar="ACTION")
    journal_commands.required = True
    journal_commands.add_parser("repair", help="rewrite the journal keeping every valid record (stop the agent first); the original is kept beside it")

    demo = commands.add_parser("demo", help="run s3watch against a local SeaweedFS and a sample gallery, then show the status")
    demo.add_argument("--dir", type=Path, default=None, help="working folder for the demo (default: a new temporary folder)")
    demo.add_argument("--photos", type=int, default=5, help="how many photos to add (default: 5)")
    return parser


# The options _parser accepts before the command. argparse would take a mistyped one's value for
# the command and report that instead: "invalid choice: 'c.yaml'".
_GLOBAL_OPTIONS = ("--config", "--help", "--version", "-h")


def _unknown_global_option(argv: list[str]) -> str | None:
    """Return an error message for an option before the command that s3watch does not have, or None.

    An option argparse would take as an abbreviation (--conf for --config) is not unknown. What
    follows the command is left to the command's own parser.
    """
    expects_value = False
    for token in argv:
        if expects_value:
            expects_value = False
            continue
        if not token.startswith("-") or token == "-":
            return None  # the command
        name, equals, _value = token.partition("=")
        if not any(option.startswith(name) for option in _GLOBAL_OPTIONS):
            guess = difflib.get_close_matches(name, _GLOBAL_OPTIONS, n=1)
            hint = f"did you mean {guess[0]}?" if guess else "see s3watch --help"
            return f"unknown option {name} ({hint})"
        # --config, or an abbreviation of it, takes the next token as its value unless it has "=".
        expects_value = name != "--" and "--config".startswith(name) and not equals
    return None


def _config_path(arguments: argparse.Namespace) -> Path:
    if arguments.config is not None:
        return Path(arguments.config)
    return Path(os.environ.get("S3WATCH_CONFIG", DEFAULT_CONFIG_PATH))


def _error(message: str) -> None:
    print_problem("error", message)


def _warn(message: str) -> None:
    print_problem("warning", message)


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Returns the exit status: 0 done, 1 failed, 2 bad configuration or usage."""
    problem = _unknown_global_option(sys.argv[1:] if argv is None else argv)
    if problem is not None:
        _error(problem)
        return EXIT_CONFIG
    arguments = _parser().parse_args(argv)
    try:
        if arguments.command == "demo":
            from .demo import run_demo

            return run_demo(arguments.dir, arguments.photos)
        if arguments.command == "config":
            return _generate(arguments.output)
        offline = arguments.command == "check" and arguments.offline
        if offline:
            # check --offline needs no secret. In a unit with its own mount namespace, systemd
            # gives ExecReload= commands $CREDENTIALS_DIRECTORY but not the folder (seen with 252;
            # github.com/systemd/systemd/issues/35227), so reading it would fail every reload.
            os.environ.pop("CREDENTIALS_DIRECTORY", None)
        config = load_config(_config_path(arguments), credentials=not offline)
        from .config import exposed_secret_warning, holds_secret

        warning = exposed_secret_warning(config, holds_secret(config))
        if warning:
            _warn(warning)
        if arguments.command in ("status", "verify", "url") and _journal_missing(config):
            # Without a journal these report nothing, which would look like an empty queue.
            _warn(f"no journal at {config.journal_path}: the agent has not run with this state_dir yet, or state_dir is wrong")
        if arguments.command == "run":
            return _run(config)
        if arguments.command == "check":
            return _check_offline(config) if offline else _check(config)
        if arguments.command == "status":
            return _status(config, arguments.json)
        if arguments.command == "journal":
            return _repair(config)
        if arguments.command == "enqueue":
            from .commands import enqueue

            return enqueue(config, arguments.entries, arguments.from_file)
        if arguments.command == "backfill":
            from .commands import backfill

            return backfill(config, arguments)
        if arguments.command == "verify":
            from .verify import verify

            return verify(config, arguments.requeue)
        if arguments.command == "url":
            from .commands import url

            return url(config, arguments.entry)
    except ConfigError as error:
        _error(str(error))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`s3watch status | head`), so there is nothing more to print.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    raise AssertionError(f"unhandled command {arguments.command}")


def _run(config: Config) -> int:
    from .agent import Agent, AgentError
    from .database import DatabaseError
    from .journal import JournalCorrupt, JournalError
    from .logs import configure_logging, flush_logs

    configure_logging(config.log.format, config.log.level, buffered=True)
    try:
        agent = Agent(config)
        status = agent.run()
        if agent.abandoned:
            # The threads of uploads abandoned at the stop deadline may wait on their sockets
            # until s3.read_timeout, and the interpreter would wait for them before exiting. The
            # journal is saved and closed by now.
            flush_logs()
            sys.stdout.flush()
            os._exit(status)
        return status
    except DatabaseError as error:
        flush_logs()  # the agent's lines come before the error that ended it
        _error(str(error))
        return EXIT_CONFIG
    except JournalCorrupt as error:
        # A restart cannot fix it either, so it gets status 2, which the unit does not restart on.
        flush_logs()
        _error(str(error))
        return EXIT_CONFIG
    except (AgentError, JournalError) as error:
        flush_logs()
        _error(str(error))
        return EXIT_FAILED
    finally:
        flush_logs()


def _check(config: Config) -> int:
    """Check every setting against the real database, folders and bucket; print one line each."""
    from .database import DatabaseError, ImagesTable
    from .piwigo import database_settings
    from .uploader import Uploader, UploadFailed

    problems = 0
    settings = database_settings(config)  # a ConfigError here is a configuration error: exit 2
    print(f"configuration {config.source}: ok")

    newest_path = None
    try:
        table = ImagesTable(settings)
        table.connect()
        newest = table.max_id()
        row = table.find_by_ids([newest]).get(newest) if newest else None
        newest_path = row.path if row is not None else None
        table.close()
        print(f"database {settings.describe()}: ok (table {table.table}, newest image id {newest})")
    except DatabaseError as error:
        print(f"database: FAILED: {error}")
        problems += 1

    # A mistyped upload_dir would watch a folder Piwigo never writes to, and every photo would be skipped.
    upload = config.piwigo.upload_path
    outside = newest_path is not None and not newest_path.startswith(config.piwigo.upload_dir + "/")
    if upload.is_dir() and outside:
        print(f"upload directory {upload}: ok, but the newest photo ({newest_path}) is outside it and is not watched: "
              "if Piwigo's $conf['upload_dir'] is another folder, set piwigo.upload_dir to it")
    elif upload.is_dir():
        print(f"upload directory {upload}: ok")
    elif newest_path is not None:
        print(f"upload directory {upload}: FAILED: it does not exist, but the images table has photos (the newest is {newest_path}): "
              "set piwigo.upload_dir to Piwigo's upload folder")
        problems += 1
    else:
        print(f"upload directory {upload}: not created yet (Piwigo creates it at the first upload)")

    for name, folder in (("state directory", config.state_dir), ("spool directory", config.spool_dir)):
        line, failed = _folder_line(name, folder)
        print(line)
        problems += failed

    bucket = f"bucket {config.s3.bucket} at {config.s3.endpoint_url or 'AWS S3'}"
    try:
        uploader = Uploader(config.s3, config.uploads, config.links, config.piwigo.root)
        uploader.check_bucket()
        # The probe writes the same small object as the agent at its start: keys that may only
        # read and list pass the bucket check, and would fail every upload.
        if config.s3.conditional_writes == "never":
            print(f"{bucket}: ok (write access not tested, because s3.conditional_writes is never)")
        else:
            try:
                conditional = uploader.probe_conditional_writes()
            except UploadFailed as failure:
                if failure.status == 403:
                    raise UploadFailed(403, "the keys may list the bucket but not write to it: grant s3:PutObject on the bucket",
                                       transient=False) from None
                raise
            if conditional:
                print(f"{bucket}: ok (writable, refuses overwrites)")
            else:
                print(f"{bucket}: ok (writable; the store ignores If-None-Match, "
                      "so s3watch checks for an existing object before each upload)")
            if config.links.mode == "public" and not config.links.base_url:
                print(_public_link_line(uploader, config.s3.connect_timeout))
    except UploadFailed as failure:
        print(f"{bucket}: FAILED: {failure.code}: {failure.message}")
        problems += 1

    if problems:
        print(f"{problems} {'problem' if problems == 1 else 'problems'} found")
        return EXIT_FAILED
    print("all checks passed")
    return EXIT_OK


def _public_link_line(uploader: Uploader, timeout: float) -> str:
    """Open the public link of the probe object without credentials, and return check's line on the links.

    Most buckets for backups are private, and their public links, which status and url print
    by default, are refused. That is no failure of the backup, so the line is a note.
    """
    import urllib.error
    import urllib.request

    url = uploader.download_url(uploader.probe_key)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return "links: public links open without credentials: ok"
    except urllib.error.HTTPError as error:
        return (f"links: note: the store refuses a public link without credentials (HTTP {error.code}), so the links that status "
                "and url print do not open: set links.mode: presigned for a private bucket, or links.base_url for a CDN")
    except (urllib.error.URLError, OSError) as error:
        return f"links: note: a public link could not be opened ({getattr(error, 'reason', error)}): check links.mode and links.base_url"


def _check_offline(config: Config) -> int:
    """Check what can be checked without a network: the configuration, Piwigo's database settings, the folders."""
    from .piwigo import database_settings

    settings = database_settings(config)  # a ConfigError here exits 2 with the reason
    print(f"configuration {config.source}: ok (database {settings.describe()}, bucket {config.s3.bucket})")
    for name, folder in (("state directory", config.state_dir), ("spool directory", config.spool_dir)):
        if folder.exists():
            line, failed = _folder_line(name, folder)
            if failed:
                print(line)
                return EXIT_FAILED
    return EXIT_OK


def _folder_line(name: str, folder: Path) -> tuple[str, bool]:
    """Check that the agent can write to `folder`; return check's line for it and whether that is a failure.

    A folder that belongs to another user is that user's to write: a member of the service's
    group checks the setup of a folder owned by the service user. That is a note, not a failure.
    """
    if folder.exists() and not folder.is_dir():
        key = name.replace(" directory", "_dir")
        return f"{name} {folder}: FAILED: it is a file, not a folder: set {key} to a folder, or move the file away", True
    if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
        return f"{name} {folder}: ok", False
    if folder.is_dir() and folder.stat().st_uid != os.geteuid():
        owner = _user_name(folder.stat().st_uid)
        return f"{name} {folder}: ok for its owner {owner}, who must be the user that runs the agent (this user may not write to it)", False
    if not folder.exists() and os.access(_existing_parent(folder), os.W_OK | os.X_OK):
        return f"{name} {folder}: ok (created at the first run)", False
    return f"{name} {folder}: FAILED: not writable by this user; create it and give the user that runs the agent write access", True


def _user_name(uid: int) -> str:
    """Return the name of the user with `uid`, or the number when it has none."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _generate(output: Path | None) -> int:
    """Print or write the commented sample configuration shipped with s3watch."""
    from importlib.resources import files

    text = files("s3watch").joinpath("s3watch.yaml.example").read_text(encoding="utf-8")
    if output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        # Mode 0640: the file will hold secrets once filled in.
        with os.fdopen(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), "w", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        _error(f"{output} exists already: choose another file or remove it first")
        return EXIT_CONFIG
    except OSError as error:
        _error(f"{output} could not be written ({error.strerror})")
        return EXIT_FAILED
    print(f"wrote {output}; set piwigo.root and s3.bucket, then run: s3watch --config {output} check")
    return EXIT_OK


def _journal_missing(config: Config) -> bool:
    """Tell whether the state directory has no journal. One that cannot be looked at counts as there: reading it reports why."""
    try:
        return not config.journal_path.exists()
    except OSError:
        return False


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _status(config: Config, as_json: bool) -> int:
    from .journal import JournalError
    from .status import build_status, render_json, render_text

    try:
        report = build_status(config)
    except JournalError as error:
        _error(str(error))
        return EXIT_FAILED
    print(render_json(report) if as_json else render_text(report))
    return EXIT_OK


def _repair(config: Config) -> int:
    from .agent import AgentError, acquire_lock
    from .journal import JournalError, repair_journal

    try:
        lock = acquire_lock(config.state_dir)
    except AgentError as error:
        _error(str(error))
        return EXIT_FAILED
    try:
        kept, dropped, backup = repair_journal(config.journal_path)
    except JournalError as error:
        _error(str(error))
        return EXIT_FAILED
    finally:
        os.close(lock)
    if backup is None:
        print(f"journal {config.journal_path}: all {kept} records are valid; left unchanged")
    else:
        lines = "corrupt line" if dropped == 1 else "corrupt lines"
        print(f"journal {config.journal_path}: kept {kept} records, dropped {dropped} {lines}; the original is kept as {backup}")
    return EXIT_OK
