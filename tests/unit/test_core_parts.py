"""The parts of the filesystem core, each alone: the inode table, the volume file, and the
pool of data keys made in advance (run under trio as the mount runs it), over a fake key
service."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from envfs.errors import AccessDeniedException, NotFoundException, VolumeError
from envfs.files import fileformat
from envfs.files.inodes import ROOT_INODE, InodeTable
from envfs.files.keypool import DataKeyPool
from envfs.files.vfs import Vfs
from envfs.files.volume import VOLUME_FILE, Volume
from envfs.identity import Caller
from tests.unit.fakekeys import KEY_USER, ROOT, STRANGER, FakeKeyProvider

ROOT_PATH = b"/backing"


def stale(call: Callable[[], object]) -> bool:
    try:
        call()
    except OSError as exc:
        return exc.errno == errno.ESTALE
    return False


# --- the inode table ---------------------------------------------------------------------


@pytest.fixture
def table() -> InodeTable:
    return InodeTable(ROOT_PATH, (1, 100))


def test_the_root_is_inode_1_and_has_no_name(table: InodeTable) -> None:
    root = table.node(ROOT_INODE)
    assert (root.key, root.lookups) == ((1, 100), 1)
    assert (table.path(ROOT_INODE), table.names(ROOT_INODE)) == (ROOT_PATH, [])
    assert stale(lambda: table.entry(ROOT_INODE))
    table.forget(ROOT_INODE, 5)
    assert table.node(ROOT_INODE) is root  # never dropped


def test_a_backing_file_is_one_node_under_all_its_names(table: InodeTable) -> None:
    folder = table.remember(ROOT_INODE, b"d", (1, 101), 1)
    a = table.remember(ROOT_INODE, b"a", (1, 102), 1)
    b = table.remember(folder.ino, b"b", (1, 102), 2)  # a hard link of a
    assert b is a
    assert (folder.ino, a.ino, a.lookups) == (2, 3, 3)
    assert list(a.links) == [(ROOT_INODE, b"a"), (folder.ino, b"b")]
    assert table.path(a.ino) == b"/backing/a"
    assert stale(lambda: table.node(4))


def test_forgetting_every_lookup_drops_a_node_and_its_number_is_not_reused(
    table: InodeTable,
) -> None:
    node = table.remember(ROOT_INODE, b"f", (1, 102), 2)
    table.forget(node.ino, 1)
    assert table.node(node.ino) is node
    table.forget(node.ino, 1)
    assert stale(lambda: table.node(node.ino))
    again = table.remember(ROOT_INODE, b"f", (1, 102), 1)
    assert again.ino == node.ino + 1
    assert table.unlink_name(ROOT_INODE, b"f") is again  # the old node named it no longer
    table.forget(12345, 1)  # unknown: nothing to do


def test_an_open_node_outlives_its_lookups(table: InodeTable) -> None:
    node = table.remember(ROOT_INODE, b"f", (1, 102), 1)
    node.opens = 1
    table.forget(node.ino, 1)
    assert table.node(node.ino) is node
    node.opens = 0
    table.drop_if_unused(node)  # at the last release
    assert stale(lambda: table.node(node.ino))


def test_paths_follow_a_renamed_folder(table: InodeTable) -> None:
    folder = table.remember(ROOT_INODE, b"d", (1, 101), 1)
    sub = table.remember(folder.ino, b"sub", (1, 102), 1)
    deep = table.remember(sub.ino, b"f", (1, 103), 1)
    assert table.path(deep.ino) == b"/backing/d/sub/f"
    assert table.unlink_name(ROOT_INODE, b"d") is folder
    table.link(folder, ROOT_INODE, b"moved")
    assert table.names(deep.ino) == [b"moved", b"sub", b"f"]


def test_a_name_given_to_another_node_is_taken_from_the_first(table: InodeTable) -> None:
    first = table.remember(ROOT_INODE, b"n", (1, 101), 1)
    second = table.remember(ROOT_INODE, b"other", (1, 102), 1)
    table.link(second, ROOT_INODE, b"n")  # a rename over n
    assert list(first.links) == []
    assert stale(lambda: table.entry(first.ino))
    assert table.unlink_name(ROOT_INODE, b"n") is second
    assert table.unlink_name(ROOT_INODE, b"n") is None
    assert table.entry(second.ino) == (ROOT_INODE, b"other")


def test_a_link_in_a_forgotten_folder_is_skipped(table: InodeTable) -> None:
    p1 = table.remember(ROOT_INODE, b"p1", (1, 101), 1)
    p2 = table.remember(ROOT_INODE, b"p2", (1, 102), 1)
    file = table.remember(p1.ino, b"a", (1, 103), 1)
    table.remember(p2.ino, b"b", (1, 103), 1)
    assert table.entry(file.ino) == (p1.ino, b"a")
    table.forget(p1.ino, 1)  # the kernel keeps the file through p2
    assert table.entry(file.ino) == (p2.ino, b"b")
    assert table.path(file.ino) == b"/backing/p2/b"


# --- the volume file ---------------------------------------------------------------------


def edit(volume: Volume, **fields: Any) -> None:
    """Change fields of the volume file, as whoever may write the backing folder can."""
    path = volume.backing / VOLUME_FILE
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


def test_a_new_volume_loads_and_verifies(
    volume: Volume, fake_keys: FakeKeyProvider, tmp_path: Path
) -> None:
    assert volume.backing == tmp_path / "backing"
    loaded = Volume.load(volume.backing)
    assert loaded == volume
    assert (loaded.region, loaded.block_shift) == ("local-1", fileformat.DEFAULT_BLOCK_SHIFT)
    assert fake_keys.read_wrapped(loaded.auth_key) is not None
    loaded.verify(fake_keys, KEY_USER)
    assert [(c.operation, c.key, c.uid, c.note) for c in fake_keys.calls] == [
        ("GenerateDataKey", volume.key_arn, ROOT.uid, f"envfs init {volume.backing}"),
        ("Decrypt", volume.key_arn, KEY_USER.uid, f"envfs mount {volume.backing}"),
    ]
    assert os.stat(volume.backing).st_mode & 0o777 == 0o700


def test_the_file_context_names_the_volume_and_the_file(volume: Volume) -> None:
    file_id = bytes(range(16))
    assert volume.file_context(file_id) == {
        "envfs:volume": volume.volume_id,
        "envfs:file": "000102030405060708090a0b0c0d0e0f",
    }
    assert volume.accepts_key(volume.key_arn)
    assert not volume.accepts_key(volume.key_arn.replace("local-1", "local-2"))


def test_create_refuses_anything_but_an_empty_folder(
    fake_keys: FakeKeyProvider, tmp_path: Path
) -> None:
    key = fake_keys.create_key([ROOT.uid])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "plain.txt").write_text("plaintext")
    (tmp_path / "file").write_text("")
    refusals = {
        tmp_path / "full": r"^'.*/full' is not empty: a volume starts from an empty folder",
        tmp_path / "file": r"^'.*/file' is not a directory$",
    }
    for backing, message in refusals.items():
        with pytest.raises(VolumeError, match=message):
            Volume.create(backing, key, fake_keys, ROOT)
    with pytest.raises(VolumeError, match=r"^block size 2048 is not allowed"):
        Volume.create(tmp_path / "new", key, fake_keys, ROOT, block_shift=11)
    assert fake_keys.calls == []  # refused before the key service is asked
    Volume.create(tmp_path / "new", key, fake_keys, ROOT)
    with pytest.raises(VolumeError, match=r"is already an envfs volume$"):
        Volume.create(tmp_path / "new", key, fake_keys, ROOT)


def test_a_refused_key_leaves_no_folder_behind(fake_keys: FakeKeyProvider, tmp_path: Path) -> None:
    key = fake_keys.create_key([ROOT.uid])
    with pytest.raises(AccessDeniedException):
        Volume.create(tmp_path / "new", key, fake_keys, STRANGER)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"envfs_volume": 2}, r"has volume file version 2; this envfs reads version 1$"),
        ({"surprise": 1}, r"is malformed: unknown fields \['surprise'\], missing fields \[\]$"),
        ({"features": ["colours"]}, r"needs features this envfs does not have: \['colours'\]$"),
        (
            {"features": ["names", "names"], "format_version": 2},
            r"is malformed: a feature is named twice$",
        ),
        ({"features": ["names"], "format_version": 1}, r"is malformed: names need file format 2$"),
        ({"block_shift": 30}, r"has an invalid block shift 30$"),
        ({"format_version": 3}, r"uses file format 3; this envfs reads formats 1 and 2$"),
        ({"block_shift": "14"}, r"is malformed: field 'block_shift' must be of type int$"),
        ({"key_arn": "my-key"}, r"names a key that is not a key ARN$"),
        ({"previous_key_arns": []}, r"is malformed: bad previous_key_arns$"),
        ({"mac": "not base64!"}, r"is malformed: "),
    ],
)
def test_load_refuses_a_malformed_volume_file(
    volume: Volume, fields: dict[str, Any], message: str
) -> None:
    edit(volume, **fields)
    with pytest.raises(VolumeError, match=message):
        Volume.load(volume.backing)


def test_load_refuses_what_is_not_a_volume(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"is not an envfs volume \(no \.envfs-volume\.json"):
        Volume.load(tmp_path)
    (tmp_path / VOLUME_FILE).write_text("{")
    with pytest.raises(VolumeError, match=r"is not valid JSON$"):
        Volume.load(tmp_path)
    with pytest.raises(VolumeError, match=r"is not a directory$"):
        Volume.load(tmp_path / "missing")


def test_an_edited_volume_file_is_not_authentic(volume: Volume, fake_keys: FakeKeyProvider) -> None:
    edit(volume, block_shift=12)  # well-formed, and smaller blocks for every new file
    edited = Volume.load(volume.backing)
    with pytest.raises(VolumeError, match=r"is not authentic: it was altered$"):
        edited.verify(fake_keys, KEY_USER)


def test_a_key_of_another_region_is_refused(volume: Volume, fake_keys: FakeKeyProvider) -> None:
    elsewhere = volume.key_arn.replace(":local-1:", ":eu-west-1:")
    edit(volume, key_arn=elsewhere)
    with pytest.raises(
        VolumeError,
        match=r"is not consistent: its region is 'local-1' but its key '.*' is in region"
        r" 'eu-west-1'$",
    ):
        Volume.load(volume.backing)
    edit(volume, region="eu-west-1")  # consistent now, but not this key service's region
    moved = Volume.load(volume.backing)
    asked = len(fake_keys.calls)
    with pytest.raises(VolumeError, match=r"the key service serves region 'local-1'$"):
        moved.verify(fake_keys, KEY_USER)
    assert len(fake_keys.calls) == asked


def test_a_volume_file_naming_another_key_is_refused_without_asking(
    volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    other = fake_keys.create_key([ROOT.uid, KEY_USER.uid])
    edit(volume, key_arn=other)
    swapped = Volume.load(volume.backing)
    asked = len(fake_keys.calls)
    with pytest.raises(VolumeError, match=r"names key '.*' but was made under another key$"):
        swapped.verify(fake_keys, KEY_USER)
    assert len(fake_keys.calls) == asked


def test_the_authentication_of_another_volume_does_not_verify(
    volume: Volume, fake_keys: FakeKeyProvider, tmp_path: Path
) -> None:
    other = Volume.create(tmp_path / "other", volume.key_arn, fake_keys, ROOT)
    theirs = json.loads((other.backing / VOLUME_FILE).read_text())
    edit(volume, auth_key=theirs["auth_key"], mac=theirs["mac"])  # under the same key
    with pytest.raises(VolumeError, match=r"is not authentic: the ciphertext blob is not valid$"):
        Volume.load(volume.backing).verify(fake_keys, KEY_USER)
    assert fake_keys.decisions()[-1] == ("Decrypt", KEY_USER.uid, "InvalidCiphertextException")


def test_verify_says_what_the_key_service_said(volume: Volume, fake_keys: FakeKeyProvider) -> None:
    with pytest.raises(AccessDeniedException):
        volume.verify(fake_keys, STRANGER)
    del fake_keys.keys[fake_keys.key(volume.key_arn).key_id]  # deleted
    with pytest.raises(NotFoundException, match=r"^volume '.*/backing' cannot be used: key "):
        volume.verify(fake_keys, KEY_USER)


# --- data keys made in advance -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def refill(pool: DataKeyPool, provider: FakeKeyProvider, caller: Caller) -> None:
    """Ask for ``caller``'s keys and run the pool until its refill has asked for all of
    them; the refill completes as the pool is cancelled."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        asked = len(provider.calls)
        assert pool.take(caller) is None  # nothing ready: asks for a refill
        with trio.fail_after(5):
            while len(provider.calls) < asked + pool.size:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(volume: Volume, fake_keys: FakeKeyProvider, clock: Clock) -> DataKeyPool:
    return DataKeyPool(volume, fake_keys, size=3, max_age=30.0, clock=clock)


async def test_a_refill_makes_keys_for_the_user_off_the_request_path(
    pool: DataKeyPool, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    await refill(pool, fake_keys, KEY_USER)
    made = fake_keys.calls[-3:]
    assert [(c.operation, c.uid, c.outcome) for c in made] == [
        ("GenerateDataKey", KEY_USER.uid, "ok")
    ] * 3
    assert made[0].note == f"envfs: made in advance for a file of {volume.backing}"
    taken = [pool.take(KEY_USER) for _ in range(4)]
    assert taken[3] is None
    file_ids = set()
    for entry in taken[:3]:
        assert entry is not None
        file_id, data_key = entry
        file_ids.add(file_id)
        context = volume.file_context(file_id)  # made for this file id, in this volume
        unwrapped = fake_keys.decrypt(data_key.wrapped, volume.key_arn, context, KEY_USER, "")
        assert unwrapped == data_key.plaintext
    assert len(file_ids) == 3


async def test_keys_made_for_one_user_are_not_given_to_another(
    pool: DataKeyPool, fake_keys: FakeKeyProvider
) -> None:
    await refill(pool, fake_keys, KEY_USER)
    assert pool.take(ROOT) is None
    assert pool.take(Caller(KEY_USER.uid, 0)) is None  # another group: another user
    assert pool.take(KEY_USER) is not None


async def test_keys_expire_unused_after_max_age(
    pool: DataKeyPool, fake_keys: FakeKeyProvider, clock: Clock
) -> None:
    await refill(pool, fake_keys, KEY_USER)
    assert pool.take(KEY_USER) is not None
    clock.now += 30.0
    assert pool.take(KEY_USER) is None


async def test_expired_keys_of_an_idle_user_are_dropped_at_anyones_next_create(
    pool: DataKeyPool, fake_keys: FakeKeyProvider, clock: Clock
) -> None:
    await refill(pool, fake_keys, KEY_USER)
    assert (KEY_USER.uid, KEY_USER.gid) in pool._ready
    clock.now += 30.0
    assert pool.take(ROOT) is None
    assert (KEY_USER.uid, KEY_USER.gid) not in pool._ready  # their plaintext keys forgotten


async def test_clear_drops_every_ready_key(pool: DataKeyPool, fake_keys: FakeKeyProvider) -> None:
    await refill(pool, fake_keys, KEY_USER)
    pool.clear()
    assert pool.take(KEY_USER) is None


async def test_a_refused_user_gets_no_keys_and_one_refusal(
    pool: DataKeyPool, fake_keys: FakeKeyProvider
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        asked = len(fake_keys.calls)
        assert pool.take(STRANGER) is None
        with trio.fail_after(5):
            while len(fake_keys.calls) == asked:
                await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked(cushion=0.02)  # time to ask again, if it would
        nursery.cancel_scope.cancel()
    assert fake_keys.decisions()[asked:] == [
        ("GenerateDataKey", STRANGER.uid, "AccessDeniedException")
    ]
    assert pool.take(STRANGER) is None


async def test_create_takes_a_key_made_in_advance(
    pool: DataKeyPool, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    await refill(pool, fake_keys, KEY_USER)
    vfs = Vfs(volume, fake_keys, chown_new=False, key_pool=pool)
    try:
        vfs.verify_volume(KEY_USER)
        asked = len(fake_keys.calls)
        fh, st = vfs.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, KEY_USER)
        vfs.write(fh, 0, b"under a pooled key")
        vfs.release(fh)
        assert len(fake_keys.calls) == asked  # nothing asked on the request path
        fh = vfs.open(st.ino, os.O_RDONLY, KEY_USER)
        assert vfs.read(fh, 0, 100) == b"under a pooled key"
        vfs.release(fh)
    finally:
        vfs.close()
