"""Every test of :mod:`tests.unit.test_core_vfs` that does not reach into the backing folder
by name, run again over a volume with encrypted names (what ``envfs init`` makes): the
namespace behaves the same whichever way its names are stored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from envfs.files.vfs import Vfs
from envfs.files.volume import Volume
from tests.unit import test_core_vfs


@pytest.fixture
def volume(names_volume: Volume) -> Volume:
    return names_volume


@pytest.fixture
def vfs(names_vfs: Vfs) -> Iterator[Vfs]:
    yield names_vfs


# These look at or change backing entries by their plaintext names; their encrypted-names
# counterparts are in test_core_names.py.
BY_BACKING_NAME = frozenset(
    {
        "test_a_damaged_block_is_eio_at_its_read_and_the_rest_is_served",
        "test_a_damaged_header_or_final_block_serves_nothing",
        "test_a_file_the_daemon_may_only_read_refuses_writers_at_the_open",
        "test_a_header_of_another_volume_under_the_same_key_does_not_unwrap",
        "test_a_multi_user_view_gives_new_nodes_to_their_creator",
        "test_a_plaintext_file_dropped_into_the_backing_folder_is_eio",
        "test_a_user_the_key_refuses_cannot_authenticate_the_volume",
        "test_a_write_far_past_the_end_leaves_a_hole_that_reads_as_zeros",
        "test_contents_survive_a_new_view_of_the_volume",
        "test_create_by_a_user_the_key_refuses_leaves_nothing",
        "test_create_makes_the_data_key_for_the_caller",
        "test_envfs_s_own_names_are_out_of_the_view",
        "test_hard_links_are_one_node",
        "test_link_errors",
        "test_lookup_finds_a_new_file_with_its_plaintext_size",
        "test_mkdir_and_rmdir",
        "test_mknod_makes_fifos_and_encrypted_files_and_devices_for_root_only",
        "test_no_call_makes_or_moves_envfs_s_own_names",
        "test_private_and_foreign_xattrs_are_refused",
        "test_readdir_lists_sorted_names_from_any_offset",
        "test_readdir_registers_nodes_without_a_lookup",
        "test_rename_errors_are_those_of_the_backing_folder",
        "test_rename_exchange_swaps_names_and_nodes",
        "test_rename_moves_the_node_to_its_new_name",
        "test_setattr_changes_mode_and_times_in_the_backing_folder",
        "test_setattr_gives_a_node_to_another_user",
        "test_symlinks_are_stored_as_they_are",
        "test_truncate_by_a_user_the_key_refuses_changes_nothing",
        "test_truncate_down_and_up_is_a_decision_noted_as_such",
        "test_user_xattrs_are_the_backing_entry_s",
    }
)

globals().update(
    {
        name: test
        for name, test in vars(test_core_vfs).items()
        if name.startswith("test_") and name not in BY_BACKING_NAME
    }
)
