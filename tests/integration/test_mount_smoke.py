"""The smallest end-to-end check: a file written through the mount is ciphertext behind it."""

from __future__ import annotations

import os

from tests.integration.conftest import Mount, backing_of


def test_write_read_and_ciphertext_behind(vol: Mount) -> None:
    (vol.mnt / "hello.txt").write_text("PLAINTEXT-MARKER-1234\n")
    assert (vol.mnt / "hello.txt").read_text() == "PLAINTEXT-MARKER-1234\n"
    assert "hello.txt" not in os.listdir(vol.backing)  # the name is encrypted too
    backing = backing_of(vol, vol.mnt / "hello.txt").read_bytes()
    assert b"PLAINTEXT-MARKER" not in backing
    assert backing.startswith(b"\x89envfs\r\n")
    vol.remount()
    assert (vol.mnt / "hello.txt").read_text() == "PLAINTEXT-MARKER-1234\n"
