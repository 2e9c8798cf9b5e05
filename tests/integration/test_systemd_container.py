"""The units under a real systemd: a container booted by systemd-nspawn (``container.py``).

The machine is installed by following ``docs/systemd.md`` as written: the blocks marked
``<!-- container-test: NAME -->`` are run as they are (``sh`` blocks with bash ``-e``), or
written to the file the marker names (``toml``, ``ini``), so the docs cannot drift from
what works. The only substitution is the checkout's path (``/path/to/envfs-checkout``):
a copy of this checkout at ``/usr/src/envfs`` inside.

Building pyfuse3 (``scripts/build_pyfuse3.py``, a step of the install) takes minutes on
CI's two cores. The container gets the build this checkout's ``make setup`` already made
instead: pyfuse3 and what it needs are copied from ``.venv`` into ``/opt/envfs`` right
after the virtualenv is made (by Debian's ``/usr/bin/python3``, as ``.venv`` is), and the
doc's build command then finds its build installed and does nothing, as it does on a
machine where it already ran. ``pip install .`` really installs envfs from the copy.

One boot for the whole module, in the order of the file (each test leaves the volume
mounted), and one reboot at the end: booting is ~3 s, so reuse saves little time but
keeps every scenario on the machine as the docs leave it. A key service whose credential
is wrong is set up early and checked late, so that its 15 s of retries overlap the rest.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.integration.container import CHECKOUT, Container, container, leftovers

pytestmark = pytest.mark.integration

DOC = CHECKOUT / "docs/systemd.md"
SOURCE = "/usr/src/envfs"  # the checkout's copy inside, for /path/to/envfs-checkout
SITE = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
VOLUME = "envfs@data.service"
FSTAB_UNIT = "srv-fs.mount"  # docs §3's fstab line, for a second volume on /srv/fs
SOCKET = "envfs-kms@eu-west-1.socket"
SERVICE = "envfs-kms@eu-west-1.service"
BROKEN = "eu-west-2"  # a region whose credential holds the wrong root key
BROKEN_WAIT = 15.0
ALICE = "alice"
HOST_ENVFS = (
    "/etc/envfs",
    "/var/lib/envfs",
    "/opt/envfs",
    "/usr/local/bin/envfs",
    "/srv/data",
    "/srv/data.envfs",
    "/srv/fs",
    "/srv/fs.envfs",
    "/etc/systemd/system/envfs*",
    "/etc/systemd/system/*.wants/envfs*",
)
MARKER = re.compile(r"^<!-- container-test: (.+?) -->\n```(\w+)\n(.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    name: str  # "install", ... or "file /etc/..."
    language: str
    text: str


def doc_blocks() -> dict[str, Block]:
    text = DOC.read_text()
    blocks = {m[1]: Block(m[1], m[2], m[3]) for m in MARKER.finditer(text)}
    assert len(blocks) == text.count("<!-- container-test:"), "a marker without its block"
    return blocks


def run_block(box: Container, block: Block) -> str:
    if block.name.startswith("file "):
        path = block.name.removeprefix("file ")
        box.run(f"cat > {path}", input=block.text)
        return ""
    assert block.language == "sh", block
    return box.out(block.text.replace("/path/to/envfs-checkout", SOURCE), timeout=180)


# --- the machine ---------------------------------------------------------------------------


def _distributions(name: str, seen: set[str]) -> None:
    """``name`` and what it requires (for this Python), recursively."""
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    for spec in metadata.requires(name) or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            _distributions(req.name, seen)


def seed_pyfuse3(box: Container) -> None:
    """Copy pyfuse3 (envfs's build) and its requirements from this venv into /opt/envfs."""
    base = Path(sys._base_executable).resolve()  # type: ignore[attr-defined]
    if base != Path("/usr/bin/python3").resolve():
        pytest.fail(f"the test venv is {base}'s: make setup with PYTHON=/usr/bin/python3")
    box.run("umask 022 && /usr/bin/python3 -m venv /opt/envfs")
    site = box.path(f"/opt/envfs/{SITE}")
    names: set[str] = set()
    _distributions("pyfuse3", names)
    for name in sorted(names):
        dist = metadata.distribution(name)
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file))).resolve()
            target = site / file
            if source.is_file() and site in target.resolve().parents:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


@pytest.fixture(scope="module")
def machine() -> Iterator[Container]:
    with container() as box:
        # The machine as a fresh one: whatever envfs the host has is not seen inside
        # (removing it inside only hides it in the upper layer).
        box.run(f"rm -rf {' '.join(HOST_ENVFS)} {SOURCE}")
        shutil.copytree(
            CHECKOUT,
            box.path(SOURCE),
            symlinks=True,  # as a checkout has them: golden volumes hold dangling ones
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", "build"
            ),
        )
        box.run(f"id -u {ALICE} >/dev/null 2>&1 || useradd --create-home {ALICE}")
        box.run(f"usermod --append --groups staff {ALICE}")
        seed_pyfuse3(box)
        yield box
    assert leftovers(box) == []


@pytest.fixture(scope="module")
def installed(machine: Container) -> Container:
    """§1 and §2 of the docs, up to (not including) the key service's first call."""
    blocks = doc_blocks()
    for name in ("install", "region", "credential"):
        run_block(machine, blocks[name])
    return machine


@pytest.fixture(scope="module")
def broken_region(installed: Container) -> float:
    """Region eu-west-2 whose credential holds another root key; its socket enabled and
    called once. The time of that call."""
    box = installed
    box.run(
        f"envfs kms init --region {BROKEN} >/dev/null 2>&1\n"
        "head -c 32 /dev/urandom | base64 > /root/wrong.key\n"
        f"systemd-creds encrypt --name=root-key /root/wrong.key /etc/envfs/kms-{BROKEN}.cred\n"
        f"rm /var/lib/envfs/kms/{BROKEN}/root.key /root/wrong.key\n"
        f"systemctl enable --now envfs-kms@{BROKEN}.socket"
    )
    connect = (
        "import socket; s = socket.socket(socket.AF_UNIX);"
        f" s.connect('/run/envfs/kms-{BROKEN}.sock')"
    )
    box.run(f'python3 -c "{connect}"')  # the socket starts the service
    return time.monotonic()


def state(box: Container, unit: str) -> str:
    return box.out(f"systemctl is-active {unit} || true")


def show(box: Container, unit: str, prop: str) -> str:
    return box.out(f"systemctl show --value -p {prop} {unit}")


def mounted(box: Container) -> bool:
    found = box.run("grep -q ' /srv/data fuse.envfs ' /proc/self/mounts", check=False)
    return found.returncode == 0


def as_alice(box: Container, script: str, **kw: object) -> str:
    return box.out(script, user=ALICE, **kw)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


WRITE = "import os, sys; data = os.urandom(int(sys.argv[2])); open(sys.argv[1], 'wb').write(data)"
SHA = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def sha_of(box: Container, path: str) -> str:
    return as_alice(box, f'python3 -c "{SHA}" {path}')


HOLD = """import hashlib, os, sys
f = open(sys.argv[1], "wb")
data = os.urandom(200000)
f.write(data)
f.flush()
print(hashlib.sha256(data).hexdigest(), flush=True)
sys.stdin.read()
"""


def hold_open(box: Container, path: str) -> subprocess.Popen[str]:
    """Alice writes 200 kB to ``path`` (into the mount, not closed) and keeps the file open
    until her stdin is closed. Read the data's digest with ``read_digest``."""
    return box.popen(f"exec python3 -c {shlex.quote(HOLD)} {path}", user=ALICE)


def read_digest(holder: subprocess.Popen[str]) -> str:
    assert holder.stdout is not None and holder.stderr is not None
    written = holder.stdout.readline().strip()
    if len(written) != 64:
        holder.kill()
        pytest.fail(f"writing the open file failed: {holder.communicate(timeout=10)[1]}")
    return written


# --- the tests, in order -------------------------------------------------------------------


def test_the_key_service_is_started_by_its_socket_at_the_first_call(
    installed: Container, broken_region: float
) -> None:
    box = installed
    assert state(box, SERVICE) == "inactive"
    out = run_block(box, doc_blocks()["key-service"])  # enables the socket, then calls
    assert '"Keys": []' in out
    assert (state(box, SOCKET), state(box, SERVICE)) == ("active", "active")
    assert box.out(f"systemctl is-enabled {SERVICE} || true") == "disabled"
    listening = int(show(box, SOCKET, "ActiveEnterTimestampMonotonic"))
    assert 0 < listening < int(show(box, SERVICE, "InactiveExitTimestampMonotonic"))
    journal = box.out(f"journalctl -u {SERVICE} --no-pager -o cat")
    assert "(socket from systemd)" in journal


def test_the_volume_is_made_and_mounted_as_the_docs_say(installed: Container) -> None:
    box = installed
    blocks = doc_blocks()
    for name in ("volume", "file /etc/envfs/volumes/data.toml"):
        run_block(box, blocks[name])
    run_block(box, blocks["file /etc/systemd/system/envfs@data.service.d/kms.conf"])
    out = run_block(box, blocks["start"])
    assert out.splitlines()[-1] == "hello"
    assert state(box, VOLUME) == "active"
    assert mounted(box)


def test_key_users_read_and_write_and_root_may_not(installed: Container) -> None:
    box = installed
    as_alice(box, f'python3 -c "{WRITE}" /srv/data/big.bin 3000000')
    first = sha_of(box, "/srv/data/big.bin")
    assert sha_of(box, "/srv/data/big.bin") == first
    assert as_alice(box, "stat -c %s /srv/data/big.bin") == "3000000"
    # Root is the key's administrator, not a user: it sees the names, which belong to the
    # mount once a key user unlocked them, but not the contents.
    assert box.out("ls /srv/data").split() == ["big.bin", "hello.txt"]
    refused = box.run("cat /srv/data/hello.txt", check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    # Ciphertext in the backing folder, under encrypted names: neither a name nor a
    # content of the view in it (the store is the key service's: not read from here).
    backing = box.path("/srv/data.envfs")
    behind = [p for p in backing.rglob("*") if p.name not in (".envfs-volume.json", ".envfs-dir")]
    assert len(behind) == 2 and all(p.is_file() and not p.is_symlink() for p in behind)
    for path in behind:
        assert "hello" not in path.name and "." not in path.name
        raw = path.read_bytes()
        assert raw.startswith(b"\x89envfs\r\n") and b"hello" not in raw
    assert sorted(p.stat().st_size for p in behind)[1] > 3_000_000  # big.bin


def test_stop_unmounts_and_start_mounts_again(installed: Container) -> None:
    box = installed
    box.run(f"systemctl stop {VOLUME}")
    assert state(box, VOLUME) == "inactive"
    assert not mounted(box)
    box.run(f"systemctl start {VOLUME}")
    assert mounted(box)
    # A fresh mount: its names are locked for root until a key user's first request.
    locked = box.run("ls /srv/data", check=False)
    assert locked.returncode != 0 and "Permission denied" in locked.stderr
    assert as_alice(box, "cat /srv/data/hello.txt") == "hello"
    assert "hello.txt" in box.out("ls /srv/data").split()


def test_stop_with_a_file_open_flushes_it_and_ends_inactive_not_failed(
    installed: Container,
) -> None:
    box = installed
    holder = hold_open(box, "/srv/data/open.bin")
    try:
        written = read_digest(holder)
        stop = box.run(f"systemctl stop {VOLUME}", check=False)
        assert stop.returncode == 0, stop.stderr
        assert state(box, VOLUME) == "inactive"
        assert show(box, VOLUME, "Result") == "success"
        assert not mounted(box)
    finally:
        holder.communicate(timeout=15)  # stdin closed: it exits
    box.run(f"systemctl start {VOLUME}")
    assert sha_of(box, "/srv/data/open.bin") == written


def test_a_killed_mount_comes_back_by_itself(installed: Container) -> None:
    box = installed
    pid = show(box, VOLUME, "MainPID")
    assert pid != "0"
    box.run(f"kill -9 {pid}")
    try:
        box.wait_for(
            f'test "$(systemctl show --value -p MainPID {VOLUME})" != {pid}'
            f" && systemctl is-active {VOLUME}"
            " && grep -q ' /srv/data fuse.envfs ' /proc/self/mounts",
            timeout=20,
            what="the volume mounted again after kill -9",
        )
        assert as_alice(box, "cat /srv/data/hello.txt") == "hello"
    finally:
        if state(box, VOLUME) != "active" or not mounted(box):  # for the tests after
            box.run(
                f"systemctl stop {VOLUME}; umount -l /srv/data || true;"
                f" systemctl reset-failed {VOLUME}; systemctl start {VOLUME}",
                check=False,
            )


@pytest.mark.parametrize("unit", [SOCKET, SERVICE])
def test_restarting_the_key_service_leaves_the_volume_mounted(
    installed: Container, unit: str
) -> None:
    box = installed
    pid = show(box, VOLUME, "MainPID")
    box.run(f"systemctl restart {unit}")
    assert state(box, VOLUME) == "active"
    assert show(box, VOLUME, "MainPID") == pid
    name = f"/srv/data/after-{unit.rsplit('.', 1)[1]}.txt"
    box.wait_for(
        f"runuser -u {ALICE} -- sh -c 'echo new > {name} && cat {name} /srv/data/hello.txt'",
        timeout=15,
        what=f"a new file after restarting {unit}",
    )


def fstab_mounted(box: Container) -> str:
    """The options of /srv/fs's mount-table line ("" if not mounted)."""
    return box.out('awk \'$2 == "/srv/fs" && $3 == "fuse.envfs" {print $4}\' /proc/self/mounts')


def test_a_volume_in_fstab_is_mounted_by_systemd_and_a_busy_stop_detaches_it(
    installed: Container,
) -> None:
    """docs §3, "Or: a line in /etc/fstab", for a second volume (/srv/data is taken)."""
    box = installed
    box.run(
        f"install -d -m 0700 -o {ALICE} /srv/fs.envfs\n"
        f"runuser -u {ALICE} -- envfs init /srv/fs.envfs --key-id alias/data"
        " --region eu-west-1 --kms unix:/run/envfs/kms-eu-west-1.sock >/dev/null\n"
        "chown -R root:root /srv/fs.envfs && mkdir -p /srv/fs"
    )
    block = doc_blocks()["fstab"]
    text = block.text.replace("/srv/data", "/srv/fs").replace("srv-data.mount", FSTAB_UNIT)
    run_block(box, Block(block.name, block.language, text))
    assert state(box, FSTAB_UNIT) == "active"
    options = fstab_mounted(box).split(",")
    assert {"nosuid", "nodev", "allow_other"} <= set(options), options
    after = show(box, FSTAB_UNIT, "After").split()
    assert {SOCKET, SERVICE} <= set(after), after
    assert show(box, FSTAB_UNIT, "Requires").split().count(SOCKET) == 0
    as_alice(box, "echo fstab > /srv/fs/hello.txt")
    assert as_alice(box, "cat /srv/fs/hello.txt") == "fstab"
    # A restart of the key service leaves it mounted (After=, not Requires=).
    box.run(f"systemctl restart {SOCKET}")
    assert state(box, FSTAB_UNIT) == "active" and fstab_mounted(box)
    box.wait_for(
        f"runuser -u {ALICE} -- sh -c 'echo again > /srv/fs/again.txt'",
        timeout=15,
        what="a new file on the fstab volume after restarting the key socket",
    )
    # Stopped with a file open: detached (LazyUnmount=yes), not "target is busy".
    holder = hold_open(box, "/srv/fs/open.bin")
    try:
        written = read_digest(holder)
        stop = box.run(f"systemctl stop {FSTAB_UNIT}", check=False)
        assert stop.returncode == 0, stop.stderr
        assert state(box, FSTAB_UNIT) == "inactive"
        assert fstab_mounted(box) == ""
    finally:
        holder.communicate(timeout=15)
    box.run(f"systemctl start {FSTAB_UNIT}")
    assert sha_of(box, "/srv/fs/open.bin") == written
    assert as_alice(box, "cat /srv/fs/hello.txt /srv/fs/again.txt") == "fstab\nagain"


def test_socket_activation_can_be_tried_without_units(installed: Container) -> None:
    out = run_block(installed, doc_blocks()["socket-activate"])
    assert '"Plaintext": ' in out


def test_a_key_service_with_a_wrong_credential_is_retried_slowly(
    installed: Container, broken_region: float
) -> None:
    box = installed
    time.sleep(max(0.0, broken_region + BROKEN_WAIT - time.monotonic()))
    unit = f"envfs-kms@{BROKEN}"
    assert state(box, f"{unit}.socket") == "active"  # not failed: no start limit hit
    assert state(box, f"{unit}.service") in ("activating", "failed")
    assert show(box, f"{unit}.service", "Result") != "start-limit-hit"
    assert int(show(box, f"{unit}.service", "NRestarts")) <= 2
    errors = box.out(f"journalctl -u {unit}.service -p err --no-pager -o cat")
    assert "envfs: error: the root key given does not open the key store" in errors
    assert "start-limit" not in box.out(f"journalctl -u {unit}.socket --no-pager -o cat")


def test_after_a_reboot_with_a_file_open_the_volume_is_mounted_again_with_its_data(
    installed: Container,
) -> None:
    box = installed
    before = {path: sha_of(box, path) for path in ("/srv/data/big.bin", "/srv/data/open.bin")}
    run_block(box, doc_blocks()["rotation"])  # docs §5: the key service at boot too
    holder = hold_open(box, "/srv/data/at-shutdown.bin")  # the shutdown stops a busy volume
    try:
        written = read_digest(holder)
        assert box.reboot() == 133  # the container asked for a reboot
    finally:
        holder.communicate(timeout=15)
    assert state(box, VOLUME) == "active"
    assert mounted(box)
    before["/srv/data/at-shutdown.bin"] = written
    assert {path: sha_of(box, path) for path in before} == before
    assert as_alice(box, "cat /srv/data/hello.txt") == "hello"
    # The stop at shutdown was clean (the journal is kept across boots). The daemon was
    # told by SIGTERM, or saw its mount go first: systemd also unmounts every mount it
    # finds at shutdown (srv-data.mount), which succeeds once the open file's program is
    # stopped. Either way the file was flushed (checked above).
    # The journal orders lines as it reads them: the daemon's own "unmounted" (its stderr
    # stream) may come before or after systemd's "Stopping" (PID 1's), so both are looked
    # for after the daemon's last "mounted ... on" of that boot.
    last_boot = box.out(f"journalctl -b -1 -u {VOLUME} --no-pager -o cat").splitlines()
    started_at = max(n for n, line in enumerate(last_boot) if line.endswith(" on /srv/data"))
    shutdown = "\n".join(last_boot[started_at + 1 :])
    assert "unmounted /srv/data" in shutdown, shutdown
    assert "Stopping envfs@data.service" in shutdown, shutdown
    assert "Deactivated successfully" in shutdown, shutdown
    assert "Failed" not in shutdown, shutdown
    # Ordered after its key service at boot (the drop-in's After=).
    started = int(show(box, VOLUME, "InactiveExitTimestampMonotonic"))
    assert 0 < int(show(box, SOCKET, "ActiveEnterTimestampMonotonic")) < started
    assert 0 < int(show(box, SERVICE, "ActiveEnterTimestampMonotonic")) < started
    assert box.out("systemctl list-units --failed --no-legend --plain 'envfs*'") == ""
    # The fstab volume too: mounted at boot after its key socket, its data intact.
    assert state(box, FSTAB_UNIT) == "active" and fstab_mounted(box)
    mounted_at = int(show(box, FSTAB_UNIT, "ActiveEnterTimestampMonotonic"))
    assert 0 < int(show(box, SOCKET, "ActiveEnterTimestampMonotonic")) < mounted_at
    assert as_alice(box, "cat /srv/fs/hello.txt") == "fstab"


LIST_KEYS = """import sys, boto3
kms = boto3.client("kms", endpoint_url="https://127.0.0.1:8443", region_name="eu-west-1",
                   aws_access_key_id=sys.argv[1], aws_secret_access_key=sys.argv[2],
                   verify="/etc/envfs/tls/kms.crt")
print(len(kms.list_keys()["Keys"]), len(kms.generate_random(NumberOfBytes=8)["Plaintext"]))
"""


def test_the_key_service_serves_https_to_alice_with_the_docs_drop_in(
    installed: Container,
) -> None:
    box = installed
    blocks = doc_blocks()
    run_block(box, blocks["tls"])
    run_block(box, blocks["file /etc/systemd/system/envfs-kms@eu-west-1.service.d/http.conf"])
    access_key_id, secret = run_block(box, blocks["http"]).split()[-2:]
    assert state(box, SERVICE) == "active"
    journal = box.out(f"journalctl -u {SERVICE} --no-pager -o cat")
    assert "HTTP endpoint listening on https://0.0.0.0:8443" in journal
    assert secret not in journal
    # Alice, who may use the volume's key (group staff), lists it over HTTPS.
    out = as_alice(
        box,
        f"/opt/envfs/bin/python -c {shlex.quote(LIST_KEYS)} {access_key_id} {secret}",
    )
    assert out.split() == ["1", "8"]
    audit = box.out("envfs kms audit --region eu-west-1 --output json")
    signed = [r for r in json.loads(audit)["Records"] if "signed_with" in r]
    assert {r["caller"]["user"] for r in signed} == {ALICE}
    assert {r["operation"] for r in signed} == {"ListKeys", "GenerateRandom"}


def test_every_marked_block_of_the_docs_is_run() -> None:
    """No container needed: the blocks the tests above run are all the marked ones."""
    run = {
        "install",
        "region",
        "credential",
        "key-service",
        "volume",
        "file /etc/envfs/volumes/data.toml",
        "file /etc/systemd/system/envfs@data.service.d/kms.conf",
        "start",
        "rotation",
        "socket-activate",
        "fstab",
        "tls",
        "file /etc/systemd/system/envfs-kms@eu-west-1.service.d/http.conf",
        "http",
    }
    assert set(doc_blocks()) == run
