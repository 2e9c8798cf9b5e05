"""The fstab line docs/mount.md recommends, as systemd turns it into a mount unit.

``systemd-fstab-generator`` is run on a temporary fstab (``$SYSTEMD_FSTAB``) into a
temporary folder, and the unit it writes is checked; then ``systemd-analyze verify``
(offline, ``--root`` as in ``test_systemd_units.py``) loads that unit beside ours and the
machine's, and must find no ordering cycle. Without ``_netdev`` it finds one: a
``fuse.envfs`` mount is otherwise a local file system, ordered before
``local-fs.target``, which comes before ``sysinit.target``, which every socket unit
(the key service's too) comes after. No systemd needs to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_systemd_units import offline_root

GENERATOR = Path("/lib/systemd/system-generators/systemd-fstab-generator")
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
UNITS = Path(__file__).resolve().parents[2] / "systemd"
ENVFS = Path(sys.executable).with_name("envfs")

DOCS = Path(__file__).resolve().parents[2] / "docs"
RECOMMENDED = (
    "/srv/data.envfs /srv/data fuse.envfs"
    " allow_other,kms=unix:/run/envfs/kms-eu-west-1.sock,_netdev,"
    "x-systemd.after=envfs-kms@eu-west-1.socket,x-systemd.after=envfs-kms@eu-west-1.service"
    " 0 0\n"
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not GENERATOR.exists(), reason=f"needs {GENERATOR}"),
]


def generate(tmp_path: Path, line: str) -> Path:
    fstab, out = tmp_path / "fstab", tmp_path / "generated"
    fstab.write_text("# test fstab\n" + line)
    out.mkdir()
    env = dict(os.environ, SYSTEMD_FSTAB=str(fstab), SYSTEMD_LOG_LEVEL="err")
    result = subprocess.run(
        [str(GENERATOR), str(out), str(out), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return out


def unit_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and line[0] not in "#"]


def test_the_recommended_line(tmp_path: Path) -> None:
    out = generate(tmp_path, RECOMMENDED)
    assert unit_lines(out / "srv-data.mount") == [
        "[Unit]",
        "Documentation=man:fstab(5) man:systemd-fstab-generator(8)",
        f"SourcePath={tmp_path / 'fstab'}",
        "After=envfs-kms@eu-west-1.socket envfs-kms@eu-west-1.service",
        "Before=remote-fs.target",
        "[Mount]",
        "What=/srv/data.envfs",
        "Where=/srv/data",
        "Type=fuse.envfs",
        "Options=allow_other,kms=unix:/run/envfs/kms-eu-west-1.sock,_netdev,"
        "x-systemd.after=envfs-kms@eu-west-1.socket,x-systemd.after=envfs-kms@eu-west-1.service",
    ]
    # Mounted at boot as part of remote-fs.target (nofail would make it Wants=).
    wanted = out / "remote-fs.target.requires/srv-data.mount"
    assert wanted.is_symlink() and os.readlink(wanted) == "../srv-data.mount"
    assert not (out / "local-fs.target.requires/srv-data.mount").exists()


def test_the_docs_recommend_this_line() -> None:
    line = RECOMMENDED.strip()
    assert line in (DOCS / "mount.md").read_text()
    assert f"echo '{line}' >> /etc/fstab" in (DOCS / "systemd.md").read_text()


def test_requires_would_stop_the_volume_with_the_socket(tmp_path: Path) -> None:
    """x-systemd.requires= is Requires= and After=: a stop or restart of the socket would
    stop or restart the volume, which the recommended line avoids."""
    line = RECOMMENDED.replace("x-systemd.after=", "x-systemd.requires=")
    lines = unit_lines(generate(tmp_path, line) / "srv-data.mount")
    assert "Requires=envfs-kms@eu-west-1.socket envfs-kms@eu-west-1.service" in lines
    assert "After=envfs-kms@eu-west-1.socket envfs-kms@eu-west-1.service" in lines


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir():
        pytest.skip("needs systemd-analyze and the machine's units")
    return offline_root(tmp_path / "root")


def boot(root: Path, generated: Path) -> subprocess.CompletedProcess[str]:
    """Verify ``multi-user.target`` (which pulls in the boot's targets, the generated
    mount and, as ``systemctl enable`` made it, the region's socket) in ``root``."""
    etc = root / "etc/systemd/system"
    for entry in generated.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, etc / entry.name, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy(entry, etc)
    wants = etc / "sockets.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "envfs-kms@eu-west-1.socket").symlink_to("/etc/systemd/system/envfs-kms@.socket")
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", "multi-user.target"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def cycles(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of verify's ordering-cycle reports (the machine's own units may add
    other warnings, which are not this test's business)."""
    assert result.returncode == 0, result.stderr
    return [line for line in result.stderr.splitlines() if "cycle" in line or "Found dep" in line]


def test_the_recommended_line_has_no_ordering_cycle(tmp_path: Path, root: Path) -> None:
    assert cycles(boot(root, generate(tmp_path, RECOMMENDED))) == []


def test_without_netdev_the_mount_is_in_an_ordering_cycle(tmp_path: Path, root: Path) -> None:
    found = cycles(boot(root, generate(tmp_path, RECOMMENDED.replace("_netdev,", ""))))
    assert any("Found ordering cycle" in line for line in found)
    in_cycle = {line.rsplit(" ", 1)[-1] for line in found if " on " in line}
    assert {"srv-data.mount/start", "envfs-kms@eu-west-1.socket/start"} <= in_cycle
