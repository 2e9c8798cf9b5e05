"""``envfs BACKING MOUNTPOINT -o OPTIONS`` (what mount.fuse3 runs) to ``envfs mount``."""

from __future__ import annotations

import argparse
import copy

import pytest

from envfs import cli
from envfs.cli import fstab
from envfs.errors import UsageError

COMMANDS = ["init", "mount", "umount", "inspect", "info", "kms"]


@pytest.fixture
def mount_parser() -> argparse.ArgumentParser:
    return cli._commands(cli.build_parser())["mount"]


def translate(parser: argparse.ArgumentParser, options: str) -> list[str]:
    return fstab.translate(["/srv/data.envfs", "/srv/data", "-o", options], parser)


@pytest.mark.parametrize(
    "argv",
    [
        ["/srv/data.envfs", "/srv/data"],
        ["/srv/data.envfs", "/srv/data", "-o", "rw"],
        ["rel/backing", "mnt", "-o", "rw", "-o", "noatime"],
    ],
)
def test_helper_form_is_recognised(argv: list[str]) -> None:
    assert fstab.is_helper_form(argv, COMMANDS)


@pytest.mark.parametrize(
    "argv",
    [
        ["mount", "/srv/data.envfs", "/srv/data"],  # a command, even with a path's shape
        ["init", "/srv/data.envfs"],
        ["kms", "list-keys"],
        ["--version"],
        ["/srv/data.envfs"],
        ["/srv/data.envfs", "--foreground"],
        ["/srv/data.envfs", "/srv/data", "-o"],
        ["/srv/data.envfs", "/srv/data", "--allow-other"],
        ["/srv/data.envfs", "/srv/data", "-o", "rw", "extra"],
        ["mout", "/srv/data"],  # a mistyped command (no such path): argparse says so
    ],
)
def test_other_command_lines_are_left_to_the_parser(argv: list[str]) -> None:
    assert not fstab.is_helper_form(argv, COMMANDS)


def test_what_mount_fuse3_passes_for_the_recommended_line(
    mount_parser: argparse.ArgumentParser,
) -> None:
    # mount(8) put rw first and dropped x-systemd.*; mount.fuse3 dropped _netdev and
    # appended dev,suid.
    options = "rw,allow_other,kms=unix:/run/envfs/kms-eu-west-1.sock,dev,suid"
    assert translate(mount_parser, options) == [
        "mount",
        "/srv/data.envfs",
        "/srv/data",
        "--allow-other",
        "--kms=unix:/run/envfs/kms-eu-west-1.sock",
    ]


def test_long_options_map_with_dashes_or_underscores(
    mount_parser: argparse.ArgumentParser,
) -> None:
    options = "key_cache_seconds=60,key-pool-size=2,region=eu-west-1,log_file=/var/log/e.log"
    assert translate(mount_parser, options)[3:] == [
        "--key-cache-seconds=60",
        "--key-pool-size=2",
        "--region=eu-west-1",
        "--log-file=/var/log/e.log",
    ]


def test_a_new_mount_option_is_mapped_without_change(
    mount_parser: argparse.ArgumentParser,
) -> None:
    parser = copy.deepcopy(mount_parser)
    parser.add_argument("--read-ahead-files", metavar="N", type=int)
    parser.add_argument("--read-only-cache", action="store_true")
    assert translate(parser, "read_ahead_files=50,read-only-cache")[3:] == [
        "--read-ahead-files=50",
        "--read-only-cache",
    ]


def test_busy_poll_on_an_fstab_line(mount_parser: argparse.ArgumentParser) -> None:
    assert translate(mount_parser, "rw,busy_poll=0")[3:] == ["--busy-poll=0"]


def test_fuse_options_are_passed_on_and_mount_options_dropped(
    mount_parser: argparse.ArgumentParser,
) -> None:
    options = (
        "defaults,auto,noauto,nofail,_netdev,user,users,nouser,user=alice,x-systemd.after=a,"
        "x-mount.mkdir,comment=systemd.automount,,ro,noatime,noexec,nonempty,dev,suid"
    )
    assert translate(mount_parser, options)[3:] == ["-o", "ro,noatime,noexec,nonempty"]


@pytest.mark.parametrize(
    ("options", "fuse"),
    [
        ("rw,dev,suid", None),  # both appended by mount.fuse3
        ("rw,nodev,suid", "nodev"),  # only suid appended
        ("rw,nosuid,dev", "nosuid"),  # only dev appended
        ("rw,nodev,nosuid", "nodev,nosuid"),
        ("rw,dev,dev,suid", "dev"),  # the line's own dev, then mount.fuse3's
        ("rw,suid,dev,suid", "suid"),
    ],
)
def test_mount_fuse3s_dev_and_suid_are_not_a_request(
    mount_parser: argparse.ArgumentParser, options: str, fuse: str | None
) -> None:
    command = translate(mount_parser, options)
    assert command[3:] == ([] if fuse is None else ["-o", fuse])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            "rw,bogus",
            r"^mount option 'bogus' is neither an envfs option \(allow_other, busy_poll=, "
            r"key_arn=, key_cache_seconds=, .*region=\) nor a FUSE mount option \(see fuse\(8\)\)$",
        ),
        ("allow_other=yes", r"^mount option 'allow_other' takes no value, got 'allow_other=yes'$"),
        ("kms", r"^mount option 'kms' needs a value: kms=\.\.\.$"),
        ("region=", r"^mount option 'region' needs a value: region=\.\.\.$"),
        ("foreground", r"^mount option 'foreground' cannot be used here: mount\(8\) waits"),
        ("config=data", r"^mount option 'config' cannot be used here: an fstab line names"),
        ("ready_fd=3", r"^mount option 'ready_fd=3' is neither"),  # hidden options stay hidden
        ("fd=3", r"^mount option 'fd=3' is neither"),  # libfuse's own
        ("max_read", r"^mount option 'max_read' is neither"),
    ],
)
def test_bad_options_are_usage_errors(
    mount_parser: argparse.ArgumentParser, options: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        translate(mount_parser, options)


def test_drop_privileges_is_refused(mount_parser: argparse.ArgumentParser) -> None:
    # mount.fuse3 mounts itself and passes /dev/fd/N as the mount point.
    with pytest.raises(UsageError, match=r"^mount option 'drop_privileges' is not supported"):
        fstab.translate(["/srv/data.envfs", "/dev/fd/5", "-o", "rw"], mount_parser)


def test_main_reports_a_bad_option_with_exit_code_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["/srv/data.envfs", "/srv/data", "-o", "rw,bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("envfs: error: mount option 'bogus' is neither an envfs option")
    assert "Traceback" not in err


def test_main_runs_envfs_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []

    def fake_mount(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(cli.volume, "_mount", fake_mount)
    options = "rw,allow_other,key_cache_seconds=5,noatime,dev,suid"
    assert cli.main(["/srv/data.envfs", "/srv/data", "-o", options]) == 0
    [args] = seen
    assert (args.backing, args.mountpoint) == ("/srv/data.envfs", "/srv/data")
    assert args.allow_other and args.key_cache_seconds == 5.0
    assert args.o == ["noatime"] and not args.foreground
