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

    Under systemd (``$JOURNAL_STREAM``) stderr lines carry no timestamp: the journal adds
    its own. ``ENVFS_DEBUG=1`` logs debug lines too.
    """
    under_systemd = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s " + fmt
    elif to_stderr or under_systemd:
        handler = logging.StreamHandler(sys.stderr)
        if not under_systemd:
            fmt = "%(asctime)s " + fmt
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        fmt = "envfs[%(process)d]: %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if os.environ.get("ENVFS_DEBUG") == "1" else logging.INFO)
