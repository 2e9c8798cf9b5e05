"""CallerCache: a user's groups are reused exactly as long as a key decision could be."""

from __future__ import annotations

from pathlib import Path

import pytest

from envfs.files import callers
from envfs.files.callers import CallerCache, GroupDatabase
from envfs.identity import Caller


class Builds:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, uid: int, gid: int) -> Caller:
        self.count += 1
        return Caller(uid, gid, frozenset({gid, 1000 + self.count}))


def test_with_a_key_cache_groups_live_as_long_as_its_entries() -> None:
    now = [100.0]
    builds = Builds()
    cache = CallerCache(5.0, clock=lambda: now[0], build=builds, state=lambda: None)
    first = cache.get(1, 1)
    assert cache.get(1, 1) is first and builds.count == 1
    assert cache.get(2, 2) is not first and builds.count == 2
    now[0] += 5.0
    assert cache.get(1, 1) is not first and builds.count == 3


def test_without_a_key_cache_groups_live_while_the_databases_are_unchanged() -> None:
    state = [("group", 1)]
    builds = Builds()
    cache = CallerCache(0.0, build=builds, state=lambda: tuple(state))  # type: ignore[arg-type]
    first = cache.get(1, 1)
    assert cache.get(1, 1) is first and builds.count == 1
    state[0] = ("group", 2)  # gpasswd -d: /etc/group rewritten
    assert cache.get(1, 1) is not first and builds.count == 2


def test_without_a_key_cache_and_other_sources_every_call_reads_the_database() -> None:
    builds = Builds()
    cache = CallerCache(0.0, build=builds, state=lambda: None)
    cache.get(1, 1)
    cache.get(1, 1)
    assert builds.count == 2


@pytest.mark.parametrize("inotify", [True, False])
def test_group_database_state_follows_files_and_nsswitch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inotify: bool
) -> None:
    if not inotify:
        monkeypatch.setattr(callers, "_Watch", refused)
    nsswitch = tmp_path / "nsswitch.conf"
    group = tmp_path / "group"
    userdb = tmp_path / "userdb"
    group.write_text("users:x:100:alice\n")
    nsswitch.write_text("passwd: files systemd\ngroup: files [SUCCESS=merge] systemd\n")
    db = GroupDatabase(str(nsswitch), (str(group),), (str(userdb),))
    before = db.state()
    assert before is not None and db.state() == before
    group.write_text("users:x:100:\n")  # alice removed, in place
    after = db.state()
    assert after != before and db.state() == after
    replacement = tmp_path / "group.new"
    replacement.write_text("users:x:100:bob\n")
    replacement.rename(group)  # as gpasswd and usermod do
    assert db.state() != after
    after = db.state()
    (tmp_path / "unrelated").write_text("x")
    if inotify:
        assert db.state() == after  # other files in the folder do not count
    userdb.mkdir()  # a userdb folder appears: it counts, and so does what is put in it
    assert db.state() != after
    after = db.state()
    (userdb / "alice.group").write_text("{}")
    assert db.state() != after
    nsswitch.write_text("passwd: files\ngroup: files sss\n")
    assert db.state() is None  # SSSD: no file tells when it changes
    nsswitch.unlink()
    assert db.state() is not None  # glibc's default: files
    db.close()


def refused(*args: object) -> None:
    raise OSError(24, "Too many open files")
