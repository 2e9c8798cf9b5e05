"""The suite runs on the interpreter real users have (issue 10 §1).

On Debian that is ``/usr/bin/python3`` (3.11.2 on Debian 12), which the Makefile chooses
by default. The machines CI runs on have a newer ``python3`` earlier on PATH, under root's
home: a venv made from it worked for root, hid a Python 3.11.2 incompatibility of the
pyfuse3 build, and could not be run by the other Unix users a multi-user mount serves.
These tests fail if the suite runs on such an interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEBIAN_PYTHON = Path("/usr/bin/python3")


def base_interpreter() -> Path:
    """The interpreter the running venv was made from, symlinks resolved."""
    return Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="not a Debian-like system")
def test_the_venv_is_made_from_the_systems_own_python() -> None:
    assert base_interpreter() == DEBIAN_PYTHON.resolve(), (
        f"the tests run on {base_interpreter()}, not {DEBIAN_PYTHON.resolve()}:"
        " make the venv with 'make setup' (or PYTHON=/usr/bin/python3)"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another uid")
def test_every_user_may_run_the_interpreter() -> None:
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            str(base_interpreter()),
            "-I",
            "-c",
            "import sys; print('%d.%d' % sys.version_info[:2])",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == f"{sys.version_info.major}.{sys.version_info.minor}"
