"""scripts/build_pyfuse3.py and its patches (scripts/pyfuse3/), and the pyfuse3 it installed.

The patch files are read as text: which files each touches, whether each hunk's line counts
match its header. Applying them needs the pinned release, which ``make setup`` keeps in the
virtualenv (``share/envfs/``); no test downloads anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pyfuse3
import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCH_DIR = ROOT / "scripts" / "pyfuse3"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_pyfuse3", ROOT / "scripts/build_pyfuse3.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_script()

# Each patch, the files it may touch, and what it must add.
EXPECTED = {
    "0001-fallocate-handler.patch": (
        {"src/pyfuse3/handlers.pxi", "src/pyfuse3/internal.pxi"},
        ("_envfs_fallocate = 2", "fuse_ops.fallocate = fuse_fallocate"),
    ),
    "0002-single-worker-fast-path.patch": (
        {"src/pyfuse3/internal.pxi"},
        ("_envfs_fast_path = 2", "def _envfs_set_busy_poll(", "def _envfs_get_busy_poll("),
    ),
    "0003-acl-unmasked-create-modes.patch": (
        {"src/pyfuse3/handlers.pxi"},
        ("_envfs_acl = 1", "conn.want |= FUSE_CAP_DONT_MASK"),
    ),
}
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse(patch: Path) -> tuple[str, dict[str, list[str]]]:
    """The header (text before the first file) and each file's lines (``-``, ``+``, `` ``).

    Raises AssertionError if the two names of a file differ or a hunk's counts are wrong.
    """
    lines = patch.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("--- "))
    header, files = "\n".join(lines[:first]), {}
    i = first
    while i < len(lines):
        assert lines[i].startswith("--- a/"), f"{patch.name}:{i + 1}: {lines[i]!r}"
        assert lines[i + 1].startswith("+++ b/"), f"{patch.name}:{i + 2}: {lines[i + 1]!r}"
        name = lines[i][len("--- a/") :]
        assert lines[i + 1][len("+++ b/") :] == name
        body = files.setdefault(name, [])
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            match = HUNK.match(lines[i])
            assert match, f"{patch.name}:{i + 1}: not a hunk header: {lines[i]!r}"
            old, new = int(match[2] or 1), int(match[4] or 1)
            i += 1
            while old or new:
                line = lines[i]
                assert line[:1] in (" ", "-", "+", ""), f"{patch.name}:{i + 1}: {line!r}"
                old -= line[:1] != "+"
                new -= line[:1] != "-"
                assert old >= 0 and new >= 0, f"{patch.name}:{i + 1}: hunk longer than its header"
                body.append(line)
                i += 1
    return header, files


def test_patches_are_the_expected_ones_in_order() -> None:
    assert [p.name for p in build.patches()] == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_patch_touches_only_its_files_and_adds_its_markers(name: str) -> None:
    files, markers = EXPECTED[name]
    header, body = parse(PATCH_DIR / name)
    assert set(body) == files
    added = "\n".join(line[1:] for lines in body.values() for line in lines if line[:1] == "+")
    for marker in markers:
        assert marker in added
    assert header.startswith("From: envfs\nSubject: [PATCH ")
    assert len(header.splitlines()) > 5  # what and why, for the reader


def test_makefile_rebuilds_when_a_patch_changes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = makefile[makefile.index("$(VENV)/.installed:") :].split("\n\t", 1)[0]
    assert "scripts/build_pyfuse3.py" in rule and "scripts/pyfuse3/*.patch" in rule
    assert re.search(r"APT_PACKAGES :=[^\n]*(\\\n[^\n]*)*\bpatch\b", makefile)


# --- applying them --------------------------------------------------------------------------


def fake_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "pyfuse3-3.5.0"
    (tree / "src/pyfuse3").mkdir(parents=True)
    (tree / "src/pyfuse3/handlers.pxi").write_text("# not pyfuse3's\n")
    (tree / "src/pyfuse3/internal.pxi").write_text("# not pyfuse3's\n")
    return tree


def test_a_patch_that_does_not_apply_is_refused_by_name(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    with pytest.raises(build.BuildError, match=r"^0001-fallocate-handler\.patch does not apply"
                       r" to pyfuse3 3\.5\.0: .*FAILED"):  # fmt: skip
        build.apply_patches(tree)
    assert (tree / "src/pyfuse3/handlers.pxi").read_text() == "# not pyfuse3's\n"
    assert not list(tree.rglob("*.rej")) and not list(tree.rglob("*.orig"))


def test_missing_patch_program_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(build.BuildError, match=r"^the 'patch' program is missing \(apt-get"):
        build.apply_patches(fake_tree(tmp_path))


def pinned_sdist() -> Path:
    path = Path(sys.prefix) / "share" / "envfs" / build.SDIST
    if not path.is_file():
        pytest.skip(f"{path} is kept by scripts/build_pyfuse3.py in a virtualenv (make setup)")
    build.check_sdist(path)
    return path


def test_patches_apply_exactly_to_the_pinned_release(tmp_path: Path) -> None:
    tree = build.extract(pinned_sdist(), tmp_path)
    build.apply_patches(tree)
    internal = (tree / "src/pyfuse3/internal.pxi").read_text()
    handlers = (tree / "src/pyfuse3/handlers.pxi").read_text()
    assert "fuse_ops.fallocate = fuse_fallocate" in internal
    assert "if max_tasks == 1 and _envfs_request_waiting():" in internal
    assert "cdef void fuse_fallocate" in handlers
    assert "conn.want |= FUSE_CAP_DONT_MASK" in handlers
    assert not list(tree.rglob("*.rej")) and not list(tree.rglob("*.orig"))
    # Applied twice: refused (--forward), not reversed or doubled.
    with pytest.raises(build.BuildError, match=r"^0001-fallocate-handler\.patch does not apply"):
        build.apply_patches(tree)


def test_main_reports_a_patch_that_does_not_apply_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sdist = pinned_sdist()
    patches = tmp_path / "patches"
    patches.mkdir()
    shutil.copy(PATCH_DIR / "0001-fallocate-handler.patch", patches)
    broken = (PATCH_DIR / "0002-single-worker-fast-path.patch").read_text()
    broken = broken.replace(" @async_wrapper\n", " @a_wrapper_3.5.0_lacks\n", 1)
    (patches / "0002-single-worker-fast-path.patch").write_text(broken)
    monkeypatch.setattr(build, "PATCH_DIR", patches)
    monkeypatch.setattr(
        build, "download", lambda dest: Path(shutil.copy(sdist, dest / build.SDIST))
    )

    def no_build(tree: Path) -> None:
        raise AssertionError("built although a patch did not apply")

    monkeypatch.setattr(build, "build_and_install", no_build)
    monkeypatch.setattr(sys, "argv", ["build_pyfuse3.py", "--force"])
    assert build.main() == 1
    out = capsys.readouterr()
    assert out.err.startswith(
        "build_pyfuse3: error: 0002-single-worker-fast-path.patch does not apply to pyfuse3 3.5.0: "
    )
    assert "Traceback" not in out.err


# --- the pyfuse3 that make setup installed ---------------------------------------------------


def test_installed_pyfuse3_is_this_build() -> None:
    assert importlib.metadata.version("pyfuse3") == build.LOCAL_VERSION
    assert build.installed_has_handler()
    assert pyfuse3._envfs_fallocate == 2  # type: ignore[attr-defined]
    assert pyfuse3._envfs_fast_path == 2  # type: ignore[attr-defined]
    assert pyfuse3._envfs_acl == 1  # type: ignore[attr-defined]


def test_busy_poll_is_set_at_run_time_and_0_is_kept() -> None:
    set_busy_poll = pyfuse3._envfs_set_busy_poll  # type: ignore[attr-defined]
    get_busy_poll = pyfuse3._envfs_get_busy_poll  # type: ignore[attr-defined]
    before = get_busy_poll()
    try:
        set_busy_poll(75e-6)
        assert get_busy_poll() == 75e-6
        set_busy_poll(0)
        assert get_busy_poll() == 0.0
        for bad in (-1e-6, float("nan"), 1.5):
            with pytest.raises(ValueError, match=r"^busy poll time must be 0 to 1 seconds, got "):
                set_busy_poll(bad)
        assert get_busy_poll() == 0.0
    finally:
        set_busy_poll(before)
