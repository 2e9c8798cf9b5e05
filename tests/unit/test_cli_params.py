"""Files given as parameters (``file://``, ``fileb://``, ``--passphrase-file``): read up to
the largest request the key service takes, refused beyond it before any call."""

from __future__ import annotations

from pathlib import Path

import pytest

from envfs import cli
from envfs.cli.params import MAX_FILE_BYTES, ArgumentError, read_file_bytes


def test_a_file_up_to_the_bound_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"\x01" * MAX_FILE_BYTES)
    assert read_file_bytes("--plaintext", str(path)) == b"\x01" * MAX_FILE_BYTES


def test_a_file_over_the_bound_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"\x01" * (MAX_FILE_BYTES + 1))
    with pytest.raises(
        ArgumentError,
        match=r"^argument --plaintext: '.*/blob' is larger than 1048576 bytes, more than any"
        r" request to the key service may carry$",
    ):
        read_file_bytes("--plaintext", str(path))


def test_an_endless_file_is_refused_at_once_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    socket = tmp_path / "no-daemon.sock"  # nothing listens: a call would fail otherwise
    argv = ["encrypt", "--socket", str(socket), "--key-id", "alias/k"]
    code = cli.main(["kms", *argv, "--plaintext", "fileb:///dev/zero"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith(
        "envfs: error: argument --plaintext: '/dev/zero' is larger than 1048576 bytes"
    )
