"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.files.vfs import Vfs
from envfs.files.volume import Volume
from envfs.kms.store import KeyStore
from tests.unit.fakekeys import KEY_USER, ROOT, FakeKeyProvider


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One freshly initialised store of region local-1, to copy for each test (init costs
    several fsyncs)."""
    directory = tmp_path_factory.mktemp("template") / "local-1"
    KeyStore.init(directory, "local-1").close()
    return directory


@pytest.fixture
def fake_keys() -> FakeKeyProvider:
    """An in-memory key service of region local-1, with no key yet."""
    return FakeKeyProvider("local-1")


@pytest.fixture
def volume(fake_keys: FakeKeyProvider, tmp_path: Path) -> Volume:
    """A new volume in ``tmp_path / "backing"``, made by root under a key of its own that
    root and ``KEY_USER`` may use (and ``STRANGER`` may not). Of file format version 1, with
    plaintext names, so that tests reach its backing files by name (``volume_v2``: format
    version 2; ``names_volume``: encrypted names, what ``envfs init`` makes)."""
    key = fake_keys.create_key([ROOT.uid, KEY_USER.uid])
    return Volume.create(
        tmp_path / "backing", key, fake_keys, ROOT, format_version=1, encrypted_names=False
    )


@pytest.fixture
def names_volume(fake_keys: FakeKeyProvider, tmp_path: Path) -> Volume:
    """As ``volume``, with encrypted names (what ``envfs init`` makes)."""
    key = fake_keys.create_key([ROOT.uid, KEY_USER.uid])
    return Volume.create(tmp_path / "backing", key, fake_keys, ROOT)


@pytest.fixture
def vfs(volume: Volume, fake_keys: FakeKeyProvider) -> Iterator[Vfs]:
    """The volume's plaintext view, served as a mount serves it (umask 0: the modes of new
    nodes are decided before the backing call); closed afterwards."""
    old_umask = os.umask(0)
    view = Vfs(volume, fake_keys, chown_new=False)
    try:
        yield view
    finally:
        view.close()
        os.umask(old_umask)


@pytest.fixture
def names_vfs(names_volume: Volume, fake_keys: FakeKeyProvider) -> Iterator[Vfs]:
    """As ``vfs``, over ``names_volume``; its names unlocked by root, as a mount does."""
    old_umask = os.umask(0)
    view = Vfs(names_volume, fake_keys, chown_new=False)
    try:
        view.verify_volume(ROOT)
        yield view
    finally:
        view.close()
        os.umask(old_umask)


@pytest.fixture
def volume_v2(fake_keys: FakeKeyProvider, tmp_path: Path) -> Volume:
    """As ``volume``, of file format version 2 (with plaintext names)."""
    key = fake_keys.create_key([ROOT.uid, KEY_USER.uid])
    return Volume.create(
        tmp_path / "backing", key, fake_keys, ROOT, format_version=2, encrypted_names=False
    )


@pytest.fixture
def vfs_v2(volume_v2: Volume, fake_keys: FakeKeyProvider) -> Iterator[Vfs]:
    """The plaintext view of ``volume_v2``, as ``vfs`` is of ``volume``."""
    old_umask = os.umask(0)
    view = Vfs(volume_v2, fake_keys, chown_new=False)
    try:
        yield view
    finally:
        view.close()
        os.umask(old_umask)
