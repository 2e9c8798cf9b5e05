"""The ``envfs`` command line: the only part of envfs that prints for the user or exits.

Every failure ends the same way: one ``envfs: error: ...`` line on stderr (``<AwsName>: ``
first for key-service errors), sometimes an ``envfs: hint: ...`` line, and the error's
documented exit code (``docs/kms.md``): 2 for usage errors, 1 for internal errors, 130
after Ctrl-C. A traceback is printed only for internal errors and only with
``ENVFS_DEBUG=1``. When stderr is the journal, both lines start with their syslog
priority (``<3>`` error, ``<5>`` hint), as the daemons' log lines do.

``envfs BACKING MOUNTPOINT -o OPTIONS`` (no command: what ``mount -t fuse.envfs`` and
``/etc/fstab`` run, see :mod:`envfs.cli.fstab`) is ``envfs mount`` with the options
translated.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn

from envfs import __version__
from envfs.cli import fstab, kms, volume
from envfs.cli.common import stderr_is_journal
from envfs.cli.params import ArgumentError
from envfs.errors import EnvfsError, KMSError, KMSUnavailableException, UsageError
from envfs.kms.httpclient import EndpointUnavailableException

PROG = "envfs"


class _ParseError(UsageError):
    """argparse's complaint, raised instead of printed so main() reports it in its voice."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # "invalid choice: 'x' (choose from <every verb>)": the hint's --help lists them better.
        if "invalid choice" in message:
            message = message.split(" (choose from ", 1)[0]
        raise _ParseError(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROG,
        description="envfs: an encrypted folder with per-file data keys, and the regional key"
        " service that holds its master keys.",
        epilog="'envfs BACKING MOUNTPOINT -o OPTION,...' (no command) is 'envfs mount' in the"
        " form mount(8) and /etc/fstab use: 'mount -t fuse.envfs' (docs/mount.md).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    volume.add_parsers(commands)
    kms.add_parser(commands)
    return parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The command parsers by name (``init``, ``mount``, ..., ``kms``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no commands")


def _say(kind: str, message: str) -> None:
    # Under systemd, with the syslog priority first (as the daemons' log lines have it), so
    # that ``journalctl -p err`` shows why a unit failed: error 3, hint 5 (notice).
    prefix = ("<3>" if kind == "error" else "<5>") if stderr_is_journal() else ""
    sys.stderr.write(f"{prefix}{PROG}: {kind}: {message}\n")


def _hint(error: EnvfsError) -> str | None:
    if isinstance(error, _ParseError):
        return f"see '{error.prog} --help'"
    if isinstance(error, ArgumentError):
        return error.hint
    if isinstance(error, EndpointUnavailableException):
        return error.hint
    if isinstance(error, KMSUnavailableException):
        return (
            "start the daemon with 'envfs kms serve', or pass --embedded to use the store directly"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    try:
        parser = build_parser()
        if argv is None:
            argv = sys.argv[1:]
        commands = _commands(parser)
        if fstab.is_helper_form(argv, list(commands)):
            argv = fstab.translate(argv, commands["mount"])
        try:
            args, extras = parser.parse_known_args(argv)
        except SystemExit as done:  # --help and --version
            return done.code if isinstance(done.code, int) else 0
        if extras:
            words = [PROG, getattr(args, "command", None), getattr(args, "verb", None)]
            prog = " ".join(word for word in words if word)
            raise _ParseError(f"unrecognized arguments: {' '.join(extras)}", prog)
        code: int = args.handler(args)
        sys.stdout.flush()
        return code
    except EnvfsError as e:
        name = f"{e.aws_name}: " if isinstance(e, KMSError) else ""
        _say("error", name + e.message)
        hint = _hint(e)
        if hint:
            _say("hint", hint)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``); stop quietly, and keep Python's final flush of
        # stdout from complaining again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as e:
        if os.environ.get("ENVFS_DEBUG") == "1":
            traceback.print_exc()
        _say("error", f"internal error: {e!r}")
        return 1
