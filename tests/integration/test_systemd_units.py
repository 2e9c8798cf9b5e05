"""The units in ``systemd/``: ``systemd-analyze verify`` is silent, the key service is hardened.

PID 1 is not necessarily systemd where the tests run, so only offline commands are used,
against a throw-away root directory (``--root``):

- ``ROOT/usr/lib/systemd/system`` is a copy of the machine's units (``sockets.target``,
  ``sysinit.target``... that ours depend on; a symlink would not do: ``--root`` resolves
  the units' own absolute symlinks inside the root);
- ``ROOT/etc/systemd/system`` holds our units, and the drop-in the docs tell every volume
  to have (``envfs@data.service.d/kms.conf``, taken from ``docs/systemd.md``);
- ``ROOT/usr/local/bin/envfs`` is a small script that runs this checkout's ``envfs``:
  verify checks that ``ExecStart=``'s executable exists, and it looks for it inside the
  root, so the test never touches the machine's ``/usr/local/bin``.

Templates are verified through instances (``envfs-kms@local-1.service``), which is how
systemd loads them. Any line on stderr is a failure: verify reports unknown keys and bad
values as warnings and still exits 0.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
ENVFS = Path(sys.executable).with_name("envfs")
INSTANCES = [
    "envfs-kms@local-1.socket",
    "envfs-kms@local-1.service",
    "envfs-kms@eu-west-1.socket",
    "envfs-kms@eu-west-1.service",
    "envfs@data.service",
]
DOCS = UNITS.parent / "docs/systemd.md"
DROP_IN_PATH = "/etc/systemd/system/envfs@data.service.d/kms.conf"
MAX_EXPOSURE = 2.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"),
    pytest.mark.skipif(not SYSTEM_UNITS.is_dir(), reason=f"needs {SYSTEM_UNITS}"),
]


def offline_root(root: Path) -> Path:
    """``root`` made a machine for ``systemd-analyze verify --root``: the machine's units,
    ours in /etc/systemd/system, and /usr/local/bin/envfs running this checkout's."""
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".socket"):
            shutil.copy(unit, etc)
    binary = root / "usr/local/bin/envfs"
    binary.parent.mkdir(parents=True)
    binary.write_text(f'#!/bin/sh\nexec {ENVFS} "$@"\n')
    binary.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = offline_root(tmp_path_factory.mktemp("systemd-root"))
    etc = root / "etc/systemd/system"
    (etc / "envfs@data.service.d").mkdir()
    (etc / "envfs@data.service.d/kms.conf").write_text(drop_in())
    return root


def drop_in() -> str:
    """The volume's drop-in, as docs/systemd.md §3 gives it."""
    match = re.search(
        rf"^<!-- container-test: file {re.escape(DROP_IN_PATH)} -->\n```ini\n(.*?)^```$",
        DOCS.read_text(),
        re.M | re.S,
    )
    assert match, f"docs/systemd.md has no marked block for {DROP_IN_PATH}"
    return match[1]


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit or drop-in: every value of each key, in order."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if re.match(r"^\w+=", line):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)?", value)
    assert match, value
    return float(match[1]) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[match[2]]


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args, f"--root={root}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_units_are_these() -> None:
    files = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".socket"))
    assert files == ["envfs-kms@.service", "envfs-kms@.socket", "envfs@.service"]


@pytest.mark.parametrize("unit", INSTANCES)
def test_verify_is_silent(root: Path, unit: str) -> None:
    result = analyze(root, "verify", "--man=no", unit)
    assert (result.returncode, result.stderr) == (0, "")


def test_verify_would_report_a_bad_unit(root: Path) -> None:
    """The check above can fail: a warning alone (exit 0) shows up on stderr."""
    broken = root / "etc/systemd/system/envfs@broken.service.d"
    broken.mkdir()
    (broken / "bad.conf").write_text("[Service]\nProtectSytem=strict\n")
    try:
        result = analyze(root, "verify", "--man=no", "envfs@broken.service")
    finally:
        shutil.rmtree(broken)
    assert result.returncode == 0
    assert "Unknown key 'ProtectSytem' in section [Service]" in result.stderr


def exposure(root: Path, unit: str) -> float:
    result = analyze(root, "security", "--offline=true", unit)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


@pytest.mark.parametrize("unit", ["envfs-kms@local-1.service", "envfs-kms@eu-west-1.service"])
def test_key_service_is_hardened(root: Path, unit: str) -> None:
    assert exposure(root, unit) <= MAX_EXPOSURE


def test_mount_service_keeps_the_mount_visible() -> None:
    """No option that gives the mount daemon a mount namespace of its own."""
    text = (UNITS / "envfs@.service").read_text()
    settings = [line.split("=", 1)[0] for line in text.splitlines() if re.match(r"^\w+=", line)]
    private = {
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "PrivateNetwork",
        "PrivateIPC",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "BindReadOnlyPaths",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "ProtectHostname",
        "RootDirectory",
        "MountAPIVFS",
    }
    assert sorted(private.intersection(settings)) == []
    assert "ExecStart=/usr/local/bin/envfs mount --config %i --foreground" in text


def test_mount_service_is_stopped_by_sigterm_to_the_daemon() -> None:
    """No ExecStop=: ``envfs umount`` refuses a busy mount and the unit would end failed;
    the daemon's SIGTERM handling flushes, unmounts (lazily if busy) and exits 0."""
    unit = unit_settings((UNITS / "envfs@.service").read_text())
    assert "ExecStop" not in unit
    assert unit["KillMode"] == ["mixed"]
    assert unit["Restart"] == ["on-failure"]


@pytest.mark.parametrize("name", ["envfs@.service", "envfs-kms@.service"])
def test_restarts_never_reach_the_start_limit(name: str) -> None:
    """A failing unit is started again every RestartSec=; the start limit refuses the
    (Burst+1)th start within IntervalSec=. Burst+1 starts take Burst * RestartSec, so
    that must be longer than the interval, or the unit (and a key service's socket) ends
    failed for good. Pinned in the units, since system.conf may change the defaults."""
    unit = unit_settings((UNITS / name).read_text())
    restart = seconds(unit["RestartSec"][0])
    interval = seconds(unit["StartLimitIntervalSec"][0])
    burst = int(unit["StartLimitBurst"][0])
    assert burst * restart > interval
    if name.startswith("envfs-kms"):
        assert restart >= 10  # time to read the journal and fix a credential


def test_mount_service_wants_its_regions_socket_and_is_ordered_after_the_service(
    root: Path,
) -> None:
    """The docs' drop-in: Wants= the socket (stopping or restarting the key service or its
    socket must leave the volume mounted), After= both. No Requires=/BindsTo=/PartOf=."""
    drop = unit_settings(drop_in())
    assert drop["Wants"] == ["envfs-kms@eu-west-1.socket"]
    assert drop["After"] == ["envfs-kms@eu-west-1.socket envfs-kms@eu-west-1.service"]
    assert not {"Requires", "BindsTo", "PartOf", "Requisite"}.intersection(drop)
    result = analyze(root, "verify", "--man=no", "envfs@data.service")
    assert (result.returncode, result.stderr) == (0, "")
