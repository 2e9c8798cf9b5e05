"""POSIX ACL values: the xattr form checked strictly, and ext4's mode rules.

The expected values are what Linux gives on ext4 for the same commands (``setfacl``,
``chmod``, ``mkdir`` under a default ACL), worked out by hand from ``fs/posix_acl.c``'s
rules and checked against an ext4 folder once; the mount tests compare with ext4 live.
"""

from __future__ import annotations

import struct

import pytest

from envfs.files.acl import (
    GROUP,
    GROUP_OBJ,
    MASK,
    MAX_ENTRIES,
    OTHER,
    UNDEFINED_ID,
    USER,
    USER_OBJ,
    Acl,
    Entry,
    MalformedAcl,
    inherit,
)

NOBODY = 65534


def raw(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


def acl(*entries: tuple[int, int] | tuple[int, int, int]) -> Acl:
    return Acl(tuple(Entry(*e) for e in entries))


U = UNDEFINED_ID
MINIMAL = raw((USER_OBJ, 6, U), (GROUP_OBJ, 4, U), (OTHER, 4, U))
# What the kernel sends for `setfacl -m u:nobody:r` on a 0644 file (captured from ext4).
NAMED = bytes.fromhex(
    "0200000001000600ffffffff02000400feff000004000400ffffffff10000400ffffffff20000400ffffffff"
)


def test_a_valid_acl_round_trips() -> None:
    parsed = Acl.parse(NAMED)
    assert parsed == acl((USER_OBJ, 6), (USER, 4, NOBODY), (GROUP_OBJ, 4), (MASK, 4), (OTHER, 4))
    assert parsed.to_bytes() == NAMED
    assert not parsed.is_minimal and parsed.mode_bits() == 0o644
    assert Acl.parse(MINIMAL).is_minimal


def test_the_largest_acl_the_kernel_sends_is_accepted() -> None:
    named = [(USER, 7, 1000 + i) for i in range(MAX_ENTRIES - 4)]
    big = raw((USER_OBJ, 7, U), *named, (GROUP_OBJ, 5, U), (MASK, 7, U), (OTHER, 0, U))
    assert len(big) <= 4096
    assert len(Acl.parse(big).entries) == MAX_ENTRIES


UO, UN, GO, GN, M, OT = USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER
HUGE = [(UN, 7, i) for i in range(MAX_ENTRIES)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"", r"^impossible ACL size 0$"),
        (b"\x02\x00\x00", r"^impossible ACL size 3$"),
        (MINIMAL + b"\x00", r"^impossible ACL size 29$"),
        (raw((UO, 6, U), (GO, 4, U), (OT, 4, U), version=1), r"^unsupported ACL version 1$"),
        (
            raw((UO, 7, U), *HUGE, (GO, 5, U), (M, 7, U), (OT, 0, U)),
            r"^too many ACL entries \(515, at most 511\)$",
        ),
        (raw((UO, 6, U), (0x40, 4, U), (OT, 4, U)), r"^unknown ACL tag 0x40$"),
        (
            raw((UO, 0o10, U), (GO, 4, U), (OT, 4, U)),
            r"^ACL permissions 0x8 beyond read, write, execute$",
        ),
        (raw((UO, 6, 0), (GO, 4, U), (OT, 4, U)), r"^ACL entry 0x1 with id 0x0$"),
        (
            raw((UO, 6, U), (UN, 4, U), (GO, 4, U), (M, 4, U), (OT, 4, U)),
            r"^ACL entry 0x2 with id 0xffffffff$",
        ),
        (raw((GO, 4, U), (UO, 6, U), (OT, 4, U)), r"^ACL entries out of order or repeated$"),
        (
            raw((UO, 6, U), (UN, 4, 7), (UN, 4, 5), (GO, 4, U), (M, 4, U), (OT, 4, U)),
            r"^ACL entries out of order or repeated$",
        ),
        (
            raw((UO, 6, U), (GO, 4, U), (GN, 4, 5), (GN, 4, 5), (M, 4, U), (OT, 4, U)),
            r"^ACL entries out of order or repeated$",
        ),
        (
            raw((UO, 6, U), (UO, 6, U), (GO, 4, U), (OT, 4, U)),
            r"^ACL entries out of order or repeated$",
        ),
        (
            raw((UO, 6, U), (GO, 4, U), (M, 4, U), (M, 4, U), (OT, 4, U)),
            r"^ACL entries out of order or repeated$",
        ),
        (raw((UO, 6, U), (OT, 4, U)), r"^ACL without exactly one entry of tag 0x4$"),
        (raw((GO, 6, U), (OT, 4, U)), r"^ACL without exactly one entry of tag 0x1$"),
        (raw((UO, 6, U), (GO, 4, U)), r"^ACL without exactly one entry of tag 0x20$"),
        (raw(), r"^ACL without exactly one entry of tag 0x1$"),
        (
            raw((UO, 6, U), (UN, 4, 5), (GO, 4, U), (OT, 4, U)),
            r"^ACL with named entries and no mask$",
        ),
        (
            raw((UO, 6, U), (GO, 4, U), (GN, 4, 5), (OT, 4, U)),
            r"^ACL with named entries and no mask$",
        ),
    ],
)
def test_malformed_acls_are_refused(value: bytes, message: str) -> None:
    with pytest.raises(MalformedAcl, match=message):
        Acl.parse(value)


def test_a_chmod_sets_owner_mask_and_other_as_on_ext4() -> None:
    with_mask = Acl.parse(NAMED)
    after = with_mask.with_mode(0o750)
    # The mask takes the group bits; the owning group keeps its own entry.
    assert after == acl((USER_OBJ, 7), (USER, 4, NOBODY), (GROUP_OBJ, 4), (MASK, 5), (OTHER, 0))
    assert after.mode_bits() == 0o750
    # Without a mask the owning group takes them.
    assert Acl.parse(MINIMAL).with_mode(0o751) == acl((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 1))


DEFAULT = acl((USER_OBJ, 7), (USER, 7, NOBODY), (GROUP_OBJ, 5), (MASK, 7), (OTHER, 5))


@pytest.mark.parametrize(
    ("mode", "access", "new_mode"),
    [
        # mkdir 0777 under the default: all of it, whatever the umask.
        (0o40777, DEFAULT, 0o40775),
        # touch (0666): execute goes from the owner, the mask and other.
        (0o100666, acl((UO, 6), (UN, 7, NOBODY), (GO, 5), (M, 6), (OT, 4)), 0o100664),
        # mkdir -m 700: the mask is emptied, the named entry kept (effective: nothing).
        (0o40700, acl((UO, 7), (UN, 7, NOBODY), (GO, 5), (M, 0), (OT, 0)), 0o40700),
        # set-id and sticky bits of the mode stay.
        (0o42777, DEFAULT, 0o42775),
    ],
)  # fmt: skip
def test_a_new_node_inherits_the_default_acl_as_on_ext4(
    mode: int, access: Acl, new_mode: int
) -> None:
    assert inherit(DEFAULT, mode) == (access, new_mode)


def test_a_minimal_default_acl_gives_a_mode_only() -> None:
    minimal = acl((USER_OBJ, 7), (GROUP_OBJ, 7), (OTHER, 0))
    assert inherit(minimal, 0o100666) == (None, 0o100660)
    assert inherit(minimal, 0o40755) == (None, 0o40750)
