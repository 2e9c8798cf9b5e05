"""Encrypted names in the namespace (``Vfs`` over a volume with the ``names`` feature), without
a mount: what the backing folder holds, long names, directory ids, what an attacker who may
write the backing folder can do to names, symlink targets, xattrs, and the name keys."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest

from envfs.errors import VolumeError
from envfs.files import info, names
from envfs.files.backing import TEMP_PREFIX
from envfs.files.inodes import ROOT_INODE
from envfs.files.vfs import RENAME_EXCHANGE, RENAME_NOREPLACE, Vfs
from envfs.files.volume import VOLUME_FILE, Volume
from tests.unit.fakekeys import KEY_USER, ROOT, STRANGER, FakeKeyProvider
from tests.unit.test_core_vfs import errno_of, listing, read_file, write_file

SECRET = b"secret-Name"


def backing(vfs: Vfs, ino: int) -> Path:
    """A node's backing path."""
    return Path(os.fsdecode(vfs.path(ino)))


def everything_in(root: Path) -> list[bytes]:
    """Every backing name, symlink target, xattr name and value, and the contents of every
    file under ``root`` (to look for plaintext in)."""
    found: list[bytes] = []
    for path in [root, *root.rglob("*")]:
        found.append(os.fsencode(path.name))
        if path.is_symlink():
            found.append(os.fsencode(os.readlink(path)))
        for xattr in os.listxattr(path, follow_symlinks=False):
            found.append(os.fsencode(xattr))
            found.append(os.getxattr(path, xattr, follow_symlinks=False))
        if path.is_file() and not path.is_symlink():
            found.append(path.read_bytes())
    return found


# --- what the backing folder holds --------------------------------------------------------


def test_no_plaintext_name_target_or_xattr_reaches_the_backing_folder(names_vfs: Vfs) -> None:
    vfs = names_vfs
    folder = vfs.mkdir(ROOT_INODE, SECRET + b"-folder", 0o755, ROOT).ino
    ino = write_file(vfs, SECRET + b"-file.txt", b"contents", parent=folder)
    vfs.symlink(folder, SECRET + b"-link", b"../" + SECRET + b"-target", ROOT)
    vfs.mknod(folder, SECRET + b"-fifo", stat.S_IFIFO | 0o644, 0, ROOT)
    vfs.setxattr(ino, b"user." + SECRET + b"-attr", SECRET + b"-value", ROOT)
    vfs.link(ino, ROOT_INODE, SECRET + b"-hardlink")
    write_file(vfs, SECRET + b"-long-" + b"x" * 200, b"")
    seen = everything_in(names_vfs.volume.backing)
    assert not [s for s in seen if b"secret" in s.lower()]
    assert sorted(listing(vfs, folder)) == [
        SECRET + b"-fifo",
        SECRET + b"-file.txt",
        SECRET + b"-link",
    ]
    assert vfs.readlink(vfs.lookup(folder, SECRET + b"-link").ino) == b"../" + SECRET + b"-target"
    assert vfs.getxattr(ino, b"user." + SECRET + b"-attr") == SECRET + b"-value"
    assert vfs.listxattr(ino) == [b"user." + SECRET + b"-attr"]


def test_every_directory_has_its_id_file_and_envfs_s_files_are_hidden(names_vfs: Vfs) -> None:
    vfs = names_vfs
    root = vfs.volume.backing
    assert (root / ".envfs-dir").stat().st_size == names.DIR_FILE_SIZE
    sub = vfs.mkdir(ROOT_INODE, b"sub", 0o700, ROOT).ino
    assert (backing(vfs, sub) / ".envfs-dir").exists()
    assert listing(vfs) == [b"sub"] and listing(vfs, sub) == []
    for own in (b".envfs-dir", VOLUME_FILE.encode()):
        assert errno_of(lambda own=own: vfs.lookup(ROOT_INODE, own)) == errno.ENOENT
    # The view's own names may start with a dot or look like envfs's: they are encrypted.
    for name in (b".envfs-dir", b".hidden", TEMP_PREFIX + b"x", VOLUME_FILE.encode()):
        write_file(vfs, name, name)
        assert read_file(vfs, vfs.lookup(ROOT_INODE, name).ino) == name
    assert (root / ".envfs-dir").stat().st_size == names.DIR_FILE_SIZE


@pytest.mark.parametrize("length", [1, 31, 32, 33, 127, 159, 160, 161, 191, 192, 200, 254, 255])
def test_names_of_every_length_up_to_255_bytes_work(names_vfs: Vfs, length: int) -> None:
    vfs = names_vfs
    name = bytes((i % 250) + 1 if (i % 250) + 1 != ord("/") else 0xFF for i in range(length))
    ino = write_file(vfs, name, b"data")
    assert listing(vfs) == [name]
    assert read_file(vfs, vfs.lookup(ROOT_INODE, name).ino) == b"data"
    stored = os.fsencode(backing(vfs, ino).name)
    is_long = names.is_long(stored)
    assert is_long == (length >= 160)  # padded to 192 bytes or more: over 255 encoded
    assert is_long or not stored.startswith(b".")
    if is_long:
        name_file = backing(vfs, ino).parent / os.fsdecode(names.name_file(stored))
        assert name_file.exists()
    vfs.unlink(ROOT_INODE, name)
    assert sorted(os.listdir(vfs.volume.backing)) == [".envfs-dir", VOLUME_FILE]


def test_a_name_over_255_bytes_is_too_long_and_bad_names_are_invalid(names_vfs: Vfs) -> None:
    vfs = names_vfs
    assert errno_of(lambda: write_file(vfs, b"n" * 256, b"")) == errno.ENAMETOOLONG
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"n" * 256)) == errno.ENAMETOOLONG
    for bad in (b"", b"a/b", b"a\0b"):
        assert errno_of(lambda bad=bad: vfs.lookup(ROOT_INODE, bad)) == errno.EINVAL


def test_names_are_case_sensitive_and_any_byte_but_slash_and_nul(names_vfs: Vfs) -> None:
    vfs = names_vfs
    every = bytes(b for b in range(1, 256) if b != ord("/"))
    for name in (b"Readme", b"README", b"readme", every[:200], b"\xff\xfe", b" "):
        write_file(vfs, name, name)
    assert sorted(listing(vfs)) == sorted(
        [b"Readme", b"README", b"readme", every[:200], b"\xff\xfe", b" "]
    )
    assert read_file(vfs, vfs.lookup(ROOT_INODE, b"README").ino) == b"README"


def test_long_names_follow_renames_links_and_exchanges(names_vfs: Vfs) -> None:
    vfs = names_vfs
    long_a, long_b, long_c = b"a" * 240, b"b" * 250, b"c" * 255
    sub = vfs.mkdir(ROOT_INODE, b"d" * 230, 0o755, ROOT).ino
    ino = write_file(vfs, long_a, b"A")
    vfs.rename(ROOT_INODE, long_a, sub, long_b, 0)
    vfs.link(ino, ROOT_INODE, long_c)
    write_file(vfs, b"short", b"S")
    vfs.rename(ROOT_INODE, long_c, ROOT_INODE, b"short", RENAME_EXCHANGE)
    assert sorted(listing(vfs)) == sorted([b"d" * 230, long_c, b"short"])
    assert listing(vfs, sub) == [long_b]
    assert read_file(vfs, vfs.lookup(ROOT_INODE, long_c).ino) == b"S"
    assert read_file(vfs, vfs.lookup(ROOT_INODE, b"short").ino) == b"A"
    # A rename onto another name of the same file does nothing; both names stay whole.
    vfs.rename(ROOT_INODE, b"short", sub, long_b, 0)
    assert listing(vfs, sub) == [long_b] and b"short" in listing(vfs)
    assert errno_of(lambda: vfs.rename(sub, long_b, ROOT_INODE, long_c, RENAME_NOREPLACE)) == (
        errno.EEXIST
    )
    vfs.unlink(ROOT_INODE, b"short")
    vfs.unlink(sub, long_b)
    vfs.unlink(ROOT_INODE, long_c)
    vfs.rmdir(ROOT_INODE, b"d" * 230)
    assert sorted(os.listdir(vfs.volume.backing)) == [".envfs-dir", VOLUME_FILE]


# --- directories ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o000, 0o500, 0o555, 0o700, 0o1777, 0o2750, 0o751])
def test_directory_modes_are_kept_exactly(names_vfs: Vfs, mode: int) -> None:
    vfs = names_vfs
    st = vfs.mkdir(ROOT_INODE, b"d", mode, ROOT)
    made = mode & 0o1777  # as mkdir(2) makes it (set-group-ID comes from the parent only)
    assert stat.S_IMODE(st.mode) == made
    assert stat.S_IMODE(os.lstat(backing(vfs, st.ino)).st_mode) == made
    if mode != made:  # then chmod(2) sets it, as `mkdir -m 2750` does
        vfs.setattr(st.ino, ROOT, mode=mode)
    assert stat.S_IMODE(os.lstat(backing(vfs, st.ino)).st_mode) == mode
    assert (backing(vfs, st.ino) / ".envfs-dir").exists()
    vfs.rmdir(ROOT_INODE, b"d")
    assert sorted(os.listdir(vfs.volume.backing)) == [".envfs-dir", VOLUME_FILE]


def test_rmdir_of_a_folder_with_entries_is_enotempty_and_keeps_its_id(names_vfs: Vfs) -> None:
    vfs = names_vfs
    sub = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    write_file(vfs, b"f", b"x", parent=sub)
    assert errno_of(lambda: vfs.rmdir(ROOT_INODE, b"d")) == errno.ENOTEMPTY
    assert listing(vfs, sub) == [b"f"]
    assert errno_of(lambda: vfs.rmdir(ROOT_INODE, b"missing")) == errno.ENOENT
    write_file(vfs, b"plain", b"")
    assert errno_of(lambda: vfs.rmdir(ROOT_INODE, b"plain")) == errno.ENOTDIR
    assert errno_of(lambda: vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT)) == errno.EEXIST
    assert [n for n in os.listdir(vfs.volume.backing) if n.startswith(".envfs-tmp")] == []


def test_a_crash_s_leftovers_are_removed_at_the_next_mount(
    names_volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    vfs = Vfs(names_volume, fake_keys, chown_new=False)
    vfs.verify_volume(ROOT)
    write_file(vfs, b"k" * 250, b"kept")
    vfs.close()
    root = names_volume.backing
    half_made = root / ".envfs-tmp-0123456789abcdef"
    half_made.mkdir()
    (half_made / ".envfs-dir").write_bytes(b"x" * names.DIR_FILE_SIZE)
    orphan = root / ".envfs-LAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.name"
    orphan.write_bytes(b"whatever")
    again = Vfs(names_volume, fake_keys, chown_new=False)
    try:
        again.verify_volume(ROOT)
        assert not half_made.exists() and not orphan.exists()
        assert listing(again) == [b"k" * 250]
    finally:
        again.close()


# --- what someone who may write the backing folder can do ---------------------------------


def test_an_entry_moved_to_another_backing_directory_does_not_decrypt_there(
    names_vfs: Vfs, caplog: pytest.LogCaptureFixture
) -> None:
    vfs = names_vfs
    one = vfs.mkdir(ROOT_INODE, b"one", 0o755, ROOT).ino
    two = vfs.mkdir(ROOT_INODE, b"two", 0o755, ROOT).ino
    ino = write_file(vfs, b"f", b"data", parent=one)
    moved = backing(vfs, two) / backing(vfs, ino).name
    os.rename(backing(vfs, ino), moved)
    with caplog.at_level(logging.WARNING):
        assert listing(vfs, two) == []
    assert "not listed" in caplog.text
    assert errno_of(lambda: vfs.lookup(two, b"f")) == errno.ENOENT
    assert errno_of(lambda: vfs.lookup(one, b"f")) == errno.ENOENT


def test_a_damaged_or_missing_directory_id_file_is_eio(names_vfs: Vfs) -> None:
    vfs = names_vfs
    sub = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    write_file(vfs, b"f", b"x", parent=sub)
    dir_file = backing(vfs, sub) / ".envfs-dir"
    good = dir_file.read_bytes()
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), good[:20], b""):
        fresh = Vfs(vfs.volume, vfs.access.provider, chown_new=False)
        try:
            fresh.verify_volume(ROOT)
            sub_ino = fresh.lookup(ROOT_INODE, b"d").ino
            dir_file.chmod(0o600)
            dir_file.write_bytes(bad)
            assert errno_of(lambda f=fresh, i=sub_ino: f.lookup(i, b"f")) == errno.EIO
            assert errno_of(lambda f=fresh, i=sub_ino: listing(f, i)) == errno.EIO
        finally:
            fresh.close()
            dir_file.write_bytes(good)
    dir_file.unlink()
    fresh = Vfs(vfs.volume, vfs.access.provider, chown_new=False)
    try:
        fresh.verify_volume(ROOT)
        sub_ino = fresh.lookup(ROOT_INODE, b"d").ino
        assert errno_of(lambda: fresh.lookup(sub_ino, b"f")) == errno.EIO
    finally:
        fresh.close()


def test_another_directory_s_id_file_copied_over_hides_the_victim_s_names(
    names_vfs: Vfs,
) -> None:
    vfs = names_vfs
    victim = vfs.mkdir(ROOT_INODE, b"victim", 0o755, ROOT).ino
    other = vfs.mkdir(ROOT_INODE, b"other", 0o755, ROOT).ino
    write_file(vfs, b"f", b"x", parent=victim)
    shutil.copyfile(backing(vfs, other) / ".envfs-dir", backing(vfs, victim) / ".envfs-dir")
    fresh = Vfs(vfs.volume, vfs.access.provider, chown_new=False)
    try:
        fresh.verify_volume(ROOT)
        sub = fresh.lookup(ROOT_INODE, b"victim").ino
        assert listing(fresh, sub) == []
        assert errno_of(lambda: fresh.lookup(sub, b"f")) == errno.ENOENT
    finally:
        fresh.close()


def test_a_long_name_s_name_file_swapped_or_edited_is_not_listed(
    names_vfs: Vfs, caplog: pytest.LogCaptureFixture
) -> None:
    vfs = names_vfs
    first = write_file(vfs, b"1" * 240, b"one")
    second = write_file(vfs, b"2" * 240, b"two")
    one, two = backing(vfs, first), backing(vfs, second)
    one_name = one.with_name(one.name + ".name")
    two_name = two.with_name(two.name + ".name")
    one_text = one_name.read_bytes()
    one_name.chmod(0o600)
    two_name.chmod(0o600)
    one_name.write_bytes(two_name.read_bytes())
    fresh = Vfs(vfs.volume, vfs.access.provider, chown_new=False)
    try:
        fresh.verify_volume(ROOT)
        with caplog.at_level(logging.WARNING):
            assert listing(fresh) == [b"2" * 240]
        assert "does not belong to it" in caplog.text
        one_name.write_bytes(one_text[:-1] + (b"B" if one_text.endswith(b"A") else b"A"))
        assert listing(fresh) == [b"2" * 240]
        one_name.unlink()
        assert listing(fresh) == [b"2" * 240]
        # The entry itself is still found by its name: lookups need no name file.
        assert read_file(fresh, fresh.lookup(ROOT_INODE, b"1" * 240).ino) == b"one"
    finally:
        fresh.close()


def test_a_planted_entry_with_a_made_up_name_is_not_listed(names_vfs: Vfs) -> None:
    root = names_vfs.volume.backing
    (root / "not-an-encrypted-name").write_bytes(b"")
    (root / "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").mkdir()
    assert listing(names_vfs) == []


# --- symlinks and xattrs -------------------------------------------------------------------


def test_symlink_targets_are_encrypted_and_their_size_is_the_plaintext_s(names_vfs: Vfs) -> None:
    vfs = names_vfs
    target = b"../some/where/" + b"t" * 300
    st = vfs.symlink(ROOT_INODE, b"l", target, ROOT)
    assert st.size == len(target) and vfs.getattr(st.ino).size == len(target)
    stored = os.readlink(backing(vfs, st.ino))
    assert b"some" not in os.fsencode(stored) and len(stored) > len(target)
    assert vfs.readlink(st.ino) == target
    path = backing(vfs, st.ino)
    path.unlink()
    os.symlink(b"../some/where", path)  # planted: not one envfs wrote
    fresh = Vfs(vfs.volume, vfs.access.provider, chown_new=False)
    try:
        fresh.verify_volume(ROOT)
        ino = fresh.lookup(ROOT_INODE, b"l").ino
        assert errno_of(lambda: fresh.readlink(ino)) == errno.EIO
    finally:
        fresh.close()


def test_xattrs_are_encrypted_bound_to_their_name_and_long_ones_refused(names_vfs: Vfs) -> None:
    vfs = names_vfs
    ino = write_file(vfs, b"f", b"")
    vfs.setxattr(ino, b"user.a", b"alpha", ROOT)
    vfs.setxattr(ino, b"user.b", b"beta", ROOT)
    vfs.setxattr(ino, b"user." + b"n" * 159, b"", ROOT)
    assert sorted(vfs.listxattr(ino)) == sorted([b"user." + b"n" * 159, b"user.a", b"user.b"])
    assert vfs.getxattr(ino, b"user.a") == b"alpha"
    assert errno_of(lambda: vfs.setxattr(ino, b"user." + b"n" * 160, b"", ROOT)) == errno.ERANGE
    path = backing(vfs, ino)
    stored = [os.fsencode(n) for n in os.listxattr(path)]
    assert all(n.startswith(names.XATTR_PREFIX) for n in stored)
    by_name = {vfs.names.xattr_name(n): n for n in (b"user.a", b"user.b")}  # type: ignore[union-attr]
    a_stored = next(s for s, n in by_name.items() if n == b"user.a")
    b_stored = next(s for s, n in by_name.items() if n == b"user.b")
    os.setxattr(path, a_stored, os.getxattr(path, b_stored))  # b's value moved to a
    assert errno_of(lambda: vfs.getxattr(ino, b"user.a")) == errno.EIO
    os.setxattr(path, b"user.planted", b"plaintext")
    assert b"user.planted" not in vfs.listxattr(ino)
    assert errno_of(lambda: vfs.getxattr(ino, b"user.planted")) == errno.ENODATA
    vfs.removexattr(ino, b"user.b")
    assert errno_of(lambda: vfs.getxattr(ino, b"user.b")) == errno.ENODATA


# --- name keys -----------------------------------------------------------------------------


def test_names_stay_locked_until_a_key_user_makes_a_request(
    names_volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    setup = Vfs(names_volume, fake_keys, chown_new=False)
    setup.verify_volume(ROOT)
    write_file(setup, b"f", b"x")
    setup.close()
    vfs = Vfs(Volume.load(names_volume.backing), fake_keys, chown_new=False)
    try:
        assert not vfs.names.ready
        assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"f")) == errno.EACCES
        assert errno_of(lambda: vfs.unlock_names(STRANGER)) == errno.EACCES
        assert not vfs.names.ready
        vfs.unlock_names(KEY_USER)
        assert vfs.names.ready and listing(vfs) == [b"f"]
    finally:
        vfs.close()


def test_the_names_of_a_volume_survive_a_new_view_and_are_the_volume_s_own(
    names_vfs: Vfs, fake_keys: FakeKeyProvider, tmp_path: Path
) -> None:
    write_file(names_vfs, b"f", b"x")
    other = Volume.create(tmp_path / "other", names_vfs.volume.key_arn, fake_keys, ROOT)
    # The same name in another volume (same key, other secret) is stored otherwise.
    view = Vfs(other, fake_keys, chown_new=False)
    try:
        view.verify_volume(ROOT)
        write_file(view, b"f", b"x")
        assert os.listdir(other.backing) != os.listdir(names_vfs.volume.backing)
    finally:
        view.close()
    again = Vfs(Volume.load(names_vfs.volume.backing), fake_keys, chown_new=False)
    try:
        again.verify_volume(KEY_USER)
        assert listing(again) == [b"f"]
    finally:
        again.close()


def test_a_volume_with_encrypted_names_refuses_a_key_change_that_would_lose_them(
    names_volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    new_key = fake_keys.create_key([ROOT.uid])
    with pytest.raises(VolumeError, match="cannot be changed this way"):
        names_volume.begin_key_change(new_key, fake_keys, ROOT)


def test_info_counts_a_volume_with_encrypted_names_without_envfs_s_own_files(
    names_vfs: Vfs,
) -> None:
    vfs = names_vfs
    sub = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    write_file(vfs, b"f", b"x" * 10, parent=sub)
    write_file(vfs, b"l" * 250, b"y")
    summary = info.summarize(vfs.volume.backing, vfs.access.provider.read_wrapped)
    assert summary.problems == []
    assert (summary.files, summary.directories, summary.unreadable_files) == (2, 1, 0)
    assert summary.plaintext_size == 11


def test_a_directory_renamed_onto_an_empty_one_replaces_it(names_vfs: Vfs) -> None:
    vfs = names_vfs
    moved = vfs.mkdir(ROOT_INODE, b"moved", 0o755, ROOT).ino
    write_file(vfs, b"inside", b"x", parent=moved)
    empty = vfs.mkdir(ROOT_INODE, b"empty", 0o555, ROOT).ino
    full = vfs.mkdir(ROOT_INODE, b"full", 0o755, ROOT).ino
    write_file(vfs, b"f", b"", parent=full)
    assert errno_of(lambda: vfs.rename(ROOT_INODE, b"moved", ROOT_INODE, b"full", 0)) == (
        errno.ENOTEMPTY
    )
    assert listing(vfs, full) == [b"f"]
    plain = write_file(vfs, b"plain", b"")
    assert errno_of(lambda: vfs.rename(ROOT_INODE, b"plain", ROOT_INODE, b"empty", 0)) == (
        errno.EISDIR
    )
    assert (backing(vfs, empty) / ".envfs-dir").exists() and plain
    vfs.rename(ROOT_INODE, b"moved", ROOT_INODE, b"empty", 0)
    assert sorted(listing(vfs)) == sorted([b"empty", b"full", b"plain"])
    now = vfs.lookup(ROOT_INODE, b"empty").ino
    assert listing(vfs, now) == [b"inside"]
    assert read_file(vfs, vfs.lookup(now, b"inside").ino) == b"x"
    vfs.rename(ROOT_INODE, b"empty", ROOT_INODE, b"full", RENAME_EXCHANGE)
    assert listing(vfs, vfs.lookup(ROOT_INODE, b"full").ino) == [b"inside"]


def test_symlink_targets_of_up_to_3039_bytes_work_and_longer_ones_are_too_long(
    names_vfs: Vfs,
) -> None:
    vfs = names_vfs
    target = b"t" * 3039
    st = vfs.symlink(ROOT_INODE, b"longest", target, ROOT)
    assert vfs.readlink(st.ino) == target and st.size == 3039
    too_long = b"t" * 3040
    assert errno_of(lambda: vfs.symlink(ROOT_INODE, b"over", too_long, ROOT)) == (
        errno.ENAMETOOLONG
    )
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"over")) == errno.ENOENT


def test_mkdir_takes_set_group_id_from_the_parent_only_as_ext4_does(names_vfs: Vfs) -> None:
    vfs = names_vfs
    plain = vfs.mkdir(ROOT_INODE, b"asked", 0o2755 | 0o4000, ROOT)
    assert stat.S_IMODE(plain.mode) == 0o755
    parent = vfs.mkdir(ROOT_INODE, b"parent", 0o755, ROOT).ino
    vfs.setattr(parent, ROOT, mode=0o2755)
    child = vfs.mkdir(parent, b"child", 0o750, ROOT)
    assert stat.S_IMODE(child.mode) == 0o2750


def test_files_opened_in_the_view_s_name_order_are_read_ahead(names_vfs: Vfs) -> None:
    vfs = names_vfs
    inos = [write_file(vfs, b"f%02d" % i, b"x") for i in range(12)]
    view = Vfs(vfs.volume, vfs.access.provider, chown_new=False)
    try:
        view.verify_volume(ROOT)
        for i in range(12):
            view.lookup(ROOT_INODE, b"f%02d" % i)
        for i in (0, 1):
            view.release(view.open(view.lookup(ROOT_INODE, b"f%02d" % i).ino, os.O_RDONLY, ROOT))
        held = set(view.read_ahead._held)
        wanted = {os.fsencode(backing(vfs, ino).name) for ino in inos[2:10]}
        assert held == wanted
    finally:
        view.close()


def test_with_encrypted_names_no_user_xattr_name_is_reserved(names_vfs: Vfs) -> None:
    vfs = names_vfs
    ino = write_file(vfs, b"f", b"")
    for name in (b"user.envfs.acl_access", b"user.envfs.x.abc"):
        vfs.setxattr(ino, name, b"mine", ROOT)
        assert vfs.getxattr(ino, name) == b"mine"
    assert sorted(vfs.listxattr(ino)) == [b"user.envfs.acl_access", b"user.envfs.x.abc"]
    vfs.removexattr(ino, b"user.envfs.x.abc")
    assert vfs.listxattr(ino) == [b"user.envfs.acl_access"]
    stored = [os.fsencode(n) for n in os.listxattr(backing(vfs, ino))]
    assert len(stored) == 1 and stored[0].startswith(names.XATTR_PREFIX)
