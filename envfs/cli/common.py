"""Pieces the command-line modules share: argument types and daemon logging."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys

from envfs.errors import ValidationException
from envfs.kms.model import validate_region


def region_type(text: str) -> str:
    """argparse type of ``--region``."""
    try:
        return validate_region(text)
    except ValidationException as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


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
