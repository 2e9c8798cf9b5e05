"""``envfs info BACKING`` on the golden volumes and on hostile copies of one, without keys."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from envfs import cli
from envfs.errors import VolumeError
from envfs.files import fileformat, info
from envfs.keys.envfskms import read_wrapped

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
VOLUME_V1 = GOLDEN / "volume-v1"
BROKEN_V1 = GOLDEN / "broken-v1"


def run_info(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith("{") else out), err


def test_golden_volume(capsys: pytest.CaptureFixture[str]) -> None:
    expected = json.loads((VOLUME_V1 / "expected.json").read_text())
    backing = str(VOLUME_V1 / "backing")
    code, answer, err = run_info(capsys, "info", backing)
    assert (code, err) == (0, "")
    assert answer == {
        "Backing": backing,
        "VolumeId": expected["volume_id"],
        "Region": expected["region"],
        "KeyArn": expected["key_arn"],
        "KeyService": "envfs",
        "PreviousKeyArns": [],
        "FormatVersion": 1,
        "BlockSize": 16384,
        "Features": [],
        "FileNames": "plaintext",
        "CreationDate": "2026-11-29T01:11:57+00:00",
        "Files": len(expected["files"]),
        "Directories": len(expected["directories"]),
        "Symlinks": len(expected["symlinks"]),
        "SpecialFiles": 0,
        "PlaintextSize": sum(f["size"] for f in expected["files"].values()),
        "BackingSize": 77706,  # ls -l of the seven files
        "SparseFiles": 0,
        "KeyVersions": [{"KeyArn": expected["key_arn"], "KeyVersion": 1, "Files": 7}],
        "UnreadableFiles": 0,
        "UnreadableDirectories": 0,
        "Leftovers": 0,
        "Problems": [],
    }
    assert answer["PlaintextSize"] == 73814


def test_inspect_on_the_folder_is_info(capsys: pytest.CaptureFixture[str]) -> None:
    backing = str(VOLUME_V1 / "backing")
    assert run_info(capsys, "inspect", backing) == run_info(capsys, "info", backing)


def test_broken_volume(capsys: pytest.CaptureFixture[str]) -> None:
    """What can be seen without a key is listed; tampered content is not (it needs one)."""
    expected = json.loads((BROKEN_V1 / "expected.json").read_text())
    code, answer, _ = run_info(capsys, "info", str(BROKEN_V1 / "backing"))
    assert code == 0
    assert (answer["Files"], answer["Directories"], answer["UnreadableFiles"]) == (16, 1, 3)
    assert answer["Problems"] == [
        {
            "Path": "foreign-key.bin",
            "Problem": f"its header names key {expected['planter_key_arn']!r}, which the"
            " volume does not accept",
        },
        {"Path": "not-envfs.txt", "Problem": "not an envfs file (bad magic)"},
        {
            "Path": "truncated-at-boundary.bin",
            "Problem": "impossible backing size 33336 for 16384-byte blocks (truncated or corrupt)",
        },
    ]
    assert answer["KeyVersions"] == [
        {"KeyArn": expected["key_arn"], "KeyVersion": 1, "Files": 14},
        {"KeyArn": expected["planter_key_arn"], "KeyVersion": 1, "Files": 1},
    ]


def test_text_and_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    backing = str(VOLUME_V1 / "backing")
    code, text, _ = run_info(capsys, "info", backing, "--output", "text")
    assert code == 0
    assert text.splitlines()[1].startswith("KEYVERSIONS\t7\tarn:envfs:kms:local-1:")
    code, table, _ = run_info(capsys, "info", backing, "--output", "table")
    assert code == 0 and "|  PlaintextSize        |  73814" in table
    code, files, _ = run_info(capsys, "info", backing, "--query", "Files", "--output", "text")
    assert (code, files) == (0, "7\n")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), r"is not an envfs volume \(no \.envfs-volume\.json"),
        (lambda p: p.write_text("x"), r"is not a directory"),
        (lambda p: None, r"is not a directory"),
    ],
)
def test_not_a_volume(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make: Any, message: str
) -> None:
    path = tmp_path / "folder"
    make(path)
    code, _, err = run_info(capsys, "info", str(path))
    assert code == VolumeError.exit_code == 60
    assert err.startswith("envfs: error: ")
    assert re.search(message, err), err
    assert "Traceback" not in err


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A copy of the golden volume with what someone who may write the folder could add."""
    backing = tmp_path / "backing"
    shutil.copytree(VOLUME_V1 / "backing", backing, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(3):
        (outside / f"secret-{i}").write_bytes(b"x" * 1000)
    (backing / "link-to-outside").symlink_to(outside)  # a folder elsewhere: not entered
    (backing / "sub" / "link-to-secret").symlink_to(outside / "secret-0")
    os.mkfifo(backing / "fifo")  # opened, it would block the walk
    (backing / ".envfs-tmp-abc").write_bytes(b"")  # an interrupted create's leftover
    (backing / "sub" / "plain.txt").write_text("not encrypted\n")
    (backing / "short").write_bytes(fileformat.MAGIC + b"\x00\x01")  # a header cut short
    deep = backing
    for _ in range(50):
        deep = deep / "d"
    deep.mkdir(parents=True)
    shutil.copy(backing / "hello.txt", deep / "hello.txt")
    return backing


def test_hostile_folder(hostile: Path) -> None:
    summary = info.summarize(hostile, read_wrapped)
    assert (summary.files, summary.directories, summary.symlinks) == (10, 52, 4)
    assert (summary.special_files, summary.leftovers, summary.unreadable_files) == (1, 1, 2)
    assert summary.plaintext_size == 73814 + 39
    assert [(p.path, p.problem) for p in summary.problems] == [
        ("short", "truncated header: 10 of 512 bytes"),
        ("sub/plain.txt", "not an envfs file (bad magic)"),
    ]


def test_a_folder_swapped_while_listed_is_not_entered(
    hostile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sub`` replaced by a symlink to elsewhere between listing and opening."""
    real_listing = info._listing

    def listing(dir_fd: int) -> list[os.DirEntry[str]]:
        entries = real_listing(dir_fd)
        if any(e.name == "sub" for e in entries) and (hostile / "sub").is_dir():
            shutil.rmtree(hostile / "sub")
            (hostile / "sub").symlink_to(hostile.parent / "outside")
        return entries

    monkeypatch.setattr(info, "_listing", listing)
    summary = info.summarize(hostile, read_wrapped)
    assert summary.unreadable_directories == 1
    assert [p.problem for p in summary.problems if p.path == "sub"] == [
        "folder not read: Not a directory"
    ]
    assert not any(p.path.startswith("sub/") for p in summary.problems)


def test_problems_are_counted_past_the_listed_ones(tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    shutil.copytree(VOLUME_V1 / "backing", backing, symlinks=True)
    for i in range(info.MAX_PROBLEMS + 5):
        (backing / f"junk-{i:03}").write_bytes(b"junk")
    summary = info.summarize(backing, read_wrapped)
    assert summary.unreadable_files == info.MAX_PROBLEMS + 5
    assert len(summary.problems) == info.MAX_PROBLEMS


def test_a_file_of_another_format_version_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A header of format version 2 in a version 1 volume: listed, and inspected as such."""
    backing = tmp_path / "backing"
    shutil.copytree(VOLUME_V1 / "backing", backing, symlinks=True)
    path = backing / "hello.txt"
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"\x00\x02" + raw[10:])  # its MAC no longer verifies either
    summary = info.summarize(backing, read_wrapped)
    assert [(p.path, p.problem) for p in summary.problems] == [
        ("hello.txt", "its format version 2 is not the volume's 1")
    ]
    assert summary.unreadable_files == 1
    code, answer, _ = run_info(capsys, "inspect", str(path))
    assert (code, answer["FormatVersion"]) == (0, 2)
    code, answer, _ = run_info(capsys, "inspect", str(VOLUME_V1 / "backing" / "hello.txt"))
    assert (code, answer["FormatVersion"]) == (0, 1)


def test_the_journal_is_not_counted(tmp_path: Path) -> None:
    """``.envfs-journal`` at the root is envfs's own (records of changes in progress);
    a folder of that name deeper down is an ordinary folder."""
    backing = tmp_path / "backing"
    shutil.copytree(VOLUME_V1 / "backing", backing, symlinks=True)
    before = info.summarize(backing, read_wrapped)
    (backing / ".envfs-journal").mkdir()
    (backing / ".envfs-journal" / ("ab" * 16)).write_bytes(b"a record, not a file")
    (backing / "sub" / ".envfs-journal").mkdir()
    after = info.summarize(backing, read_wrapped)
    assert (after.files, after.unreadable_files, after.problems) == (
        before.files,
        before.unreadable_files,
        before.problems,
    )
    assert after.directories == before.directories + 1
