"""Pieces the command-line modules share: argument types, output options, daemon logging."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from typing import Any

from envfs.arn import parse_key_arn, validate_region
from envfs.cli.output import OUTPUT_FORMATS, Query, QueryError, compile_query, render
from envfs.errors import KMSError, ValidationException


def region_type(text: str) -> str:
    """argparse type of ``--region``."""
    try:
        return validate_region(text)
    except ValidationException as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def key_arn_type(text: str) -> str:
    """argparse type of ``--key-arn``: the ARN of one key."""
    try:
        parse_key_arn(text)
    except KMSError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def query_type(text: str) -> Query:
    """argparse type of ``--query``: a JMESPath expression, compiled."""
    try:
        return compile_query(text)
    except QueryError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--output`` and ``--query``, as aws-cli has them; :func:`print_answer` uses them."""
    group = parser.add_argument_group("output options")
    group.add_argument(
        "--output",
        choices=OUTPUT_FORMATS,
        help="json (the default; bytes as base64, dates as ISO 8601 UTC), text (tab-separated"
        " rows) or table (boxes), laid out as aws-cli lays them out",
    )
    group.add_argument(
        "--query",
        metavar="EXPR",
        type=query_type,
        help="a JMESPath expression, as aws-cli's --query: print only what it selects from"
        " the answer (e.g. Keys[*].KeyId, length(Aliases),"
        " \"Aliases[?starts_with(AliasName, 'alias/app')].TargetKeyId\")",
    )


def print_answer(args: argparse.Namespace, answer: Any, title: str) -> None:
    """Print ``answer`` as ``--output`` and ``--query`` ask; ``title`` heads a table.

    Raises:
        QueryError: the query fails on this answer.
    """
    render(answer, output=args.output or "json", query=args.query, stream=sys.stdout, title=title)


def configure_logging(*, log_file: str | None = None, to_stderr: bool = True) -> None:
    """Log for a daemon: to ``log_file``, else to stderr, else to syslog (or nowhere).

    When stderr is the journal (:func:`stderr_is_journal`) lines carry no timestamp (the
    journal adds its own) and start with their syslog priority (``<3>`` error, ``<4>``
    warning, ``<6>`` info, ``<7>`` debug), which journald strips and records as the
    entry's priority. ``ENVFS_DEBUG=1`` logs debug lines too.
    """
    to_journal = stderr_is_journal()
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler: logging.Handler
    formatter: logging.Formatter
    if log_file:
        handler = logging.FileHandler(log_file)
        formatter = logging.Formatter("%(asctime)s " + fmt)
    elif to_journal:
        handler = logging.StreamHandler(sys.stderr)
        formatter = _JournalFormatter(fmt)
    elif to_stderr:
        handler = logging.StreamHandler(sys.stderr)
        formatter = logging.Formatter("%(asctime)s " + fmt)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        formatter = logging.Formatter("envfs[%(process)d]: " + fmt)
    else:
        handler = logging.NullHandler()
        formatter = logging.Formatter(fmt)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if os.environ.get("ENVFS_DEBUG") == "1" else logging.INFO)


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal stream.

    systemd sets ``$JOURNAL_STREAM`` to the ``DEVICE:INODE`` of the stream it connects to
    the journal; as systemd.exec(5) advises, it counts only if stderr is still that
    stream (not, say, redirected to a file by a shell script the service runs).
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


# sd-daemon(3) priority prefixes, from syslog(3): LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_INFO,
# LOG_DEBUG.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


class _JournalFormatter(logging.Formatter):
    """Every line (a traceback's too) prefixed with the record's syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        priority = next(
            (prio for level, prio in _PRIORITIES if record.levelno >= level), _DEBUG_PRIORITY
        )
        prefix = f"<{priority}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())
