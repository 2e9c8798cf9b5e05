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
    root and ``KEY_USER`` may use (and ``STRANGER`` may not)."""
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
def volume_v2(volume: Volume, fake_keys: FakeKeyProvider) -> Volume:
    """The ``volume``, but of file format version 2: its volume file says so and is
    authenticated anew (under the same key), as a version 2 volume file would be."""
    volume.format_version = 2
    volume.begin_key_change(volume.key_arn, fake_keys, ROOT)  # a new MAC over format_version
    return volume


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
