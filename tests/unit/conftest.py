"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from envfs.kms.store import KeyStore


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One freshly initialised store of region local-1, to copy for each test (init costs
    several fsyncs)."""
    directory = tmp_path_factory.mktemp("template") / "local-1"
    KeyStore.init(directory, "local-1").close()
    return directory
