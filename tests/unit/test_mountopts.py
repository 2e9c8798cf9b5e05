"""The one list of ``-o`` options: envfs's own, FUSE's, and everything else refused."""

from __future__ import annotations

import pytest

from envfs.cli import main
from envfs.errors import UsageError
from envfs.files import mountopts


@pytest.mark.parametrize(
    "groups",
    [["nonempty"], ["noatime,nonempty", "ro"], ["acl"], ["noacl,nodev"], ["max_read=131072"],
     ["allow_other"], ["default_permissions,auto_unmount"], []],
)  # fmt: skip
def test_known_options_pass(groups: list[str]) -> None:
    mountopts.check(groups)


@pytest.mark.parametrize(
    "item",
    ["bogus", "max_read", "max_read=", "nonempty=1", "fsname=other", "subtype=x", "fd=3",
     "user_id=0", "rootmode=40000", "allow_other=1", "kernel_cache"],
)  # fmt: skip
def test_other_options_are_refused_by_name(item: str) -> None:
    with pytest.raises(UsageError, match=f"unknown mount option {item!r}"):
        mountopts.check([f"noatime,{item}"])


def test_items_split_comma_lists() -> None:
    assert mountopts.items(["a,b", "", "c,,d"]) == ["a", "b", "c", "d"]


def test_envfs_mount_refuses_an_unknown_option_before_starting_a_daemon(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It used to start the daemon, which died with libfuse's "fuse_session_new() failed"
    on a stderr nobody reads, and exit 61."""
    assert main(["mount", "/nonexistent/backing", "/nonexistent/mnt", "-o", "ro,bogus"]) == 2
    assert "unknown mount option 'bogus'" in capsys.readouterr().err
