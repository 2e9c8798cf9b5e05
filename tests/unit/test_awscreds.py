"""Credential mapping files of AWS KMS mounts: what is read, who matches, every refusal
(ownership and permissions included), and the key-service choices that use them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from envfs.errors import ConfigError
from envfs.identity import Caller
from envfs.keys.awscreds import load_mapping
from envfs.keys.choice import KeyServiceChoice

CREDS = "[alice]\naws_access_key_id = AKIAALICE\naws_secret_access_key = sekrit\n\n[team]\n"
CREDS += "aws_access_key_id = AKIATEAM\naws_secret_access_key = sekrit2\naws_session_token = t\n"
ALICE = Caller(5001, 5001, frozenset({5001, 6000}), "alice", frozenset({"alice", "staff"}))
BOB = Caller(5002, 6000, frozenset({6000}), "bob", frozenset({"staff"}))
CAROL = Caller(5003, 5003, frozenset({5003}), None, frozenset())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    creds = directory / "credentials"
    creds.write_text(CREDS)
    creds.chmod(0o600)
    return directory


def mapping_file(folder: Path, body: str, *, header: bool = True) -> Path:
    path = folder / "users.toml"
    text = f'shared_credentials_file = "{folder / "credentials"}"\n' if header else ""
    path.write_text(text + body)
    path.chmod(0o600)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_mapping(path)
    return info.value.message.replace(str(path.parent), "DIR")


def test_a_mapping_and_who_matches(folder: Path) -> None:
    path = mapping_file(
        folder,
        '[[map]]\nprincipal = "gid:6000"\nprofile = "team"\n'
        '[[map]]\nprincipal = "group:staff"\nprofile = "alice"\n'
        '[[map]]\nprincipal = "uid:5001"\nprofile = "alice"\n'
        'role_arn = "arn:aws:iam::111122223333:role/envfs-alice"\n',
    )
    mapping = load_mapping(path)
    assert [e.principal for e in mapping.entries] == ["gid:6000", "group:staff", "uid:5001"]
    alice = mapping.source_for(ALICE)
    assert alice is not None and (alice.index, alice.role_arn) == (
        2,
        "arn:aws:iam::111122223333:role/envfs-alice",
    )
    assert alice.role_session_name == "envfs"
    bob = mapping.source_for(BOB)  # two group entries match: the first in the file
    assert bob is not None and bob.index == 0
    assert mapping.source_for(CAROL) is None
    keys = mapping.static_keys(bob)
    assert (keys.access_key, keys.secret_key, keys.token) == ("AKIATEAM", "sekrit2", "t")
    assert "sekrit" not in repr(keys)


def test_profiles_from_a_config_file(folder: Path) -> None:
    config = folder / "config"
    config.write_text(
        "[profile alice]\naws_access_key_id = AKIAC\naws_secret_access_key = s\nregion = x\n"
    )
    config.chmod(0o600)
    path = mapping_file(
        folder,
        f'shared_config_file = "{config}"\n[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n',
        header=False,
    )
    mapping = load_mapping(path)
    assert mapping.static_keys(mapping.entries[0]).access_key == "AKIAC"
    config.chmod(0o644)  # holding keys, it is held to a credentials file's rules
    assert refusal(path) == (
        "DIR/config: holds secret keys but is readable by others than its owner (mode 0644);"
        " chmod go-r it"
    )
    config.write_text("[profile bob]\nregion = x\n")  # without keys, it may be read by all
    (folder / "credentials").chmod(0o600)
    path = mapping_file(
        folder,
        f'shared_config_file = "{config}"\n[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n',
    )
    assert load_mapping(path).static_keys(mapping.entries[0]).access_key == "AKIAALICE"


REFUSALS = [
    pytest.param(
        '[[map]]\nprincipal = "*"\nprofile = "alice"\n',
        "DIR/users.toml: key 'map[0].principal': expected 'user:NAME', 'uid:N', 'group:NAME'"
        " or 'gid:N' (no '*': map a group to map many users), got '*'",
        id="everyone",
    ),
    pytest.param(
        '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\nregion = "x"\n',
        "DIR/users.toml: key 'map[0].region': unknown key (known: principal, profile,"
        " role_arn, role_session_name)",
        id="unknown-entry-key",
    ),
    pytest.param(
        'endpoint = "x"\n[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n',
        "DIR/users.toml: key 'endpoint': unknown key (known: shared_credentials_file,"
        " shared_config_file, sts_endpoint_url, map)",
        id="unknown-top-key",
    ),
    pytest.param(
        '[[map]]\nprincipal = "user:alice"\nprofile = 3\n',
        "DIR/users.toml: key 'map[0].profile': expected a profile name, got the number 3",
        id="profile-not-a-string",
    ),
    pytest.param(
        '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\nrole_arn = "arn:aws:s3:::b"\n',
        "DIR/users.toml: key 'map[0].role_arn': expected an IAM role ARN, got 'arn:aws:s3:::b'",
        id="not-a-role",
    ),
    pytest.param(
        '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\nrole_session_name = "s1"\n',
        "DIR/users.toml: key 'map[0].role_session_name': applies only with role_arn",
        id="session-without-role",
    ),
    pytest.param(
        '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n'
        '[[map]]\nprincipal = "user:alice"\nprofile = "team"\n',
        "DIR/users.toml: key 'map.principal': 'user:alice' is mapped twice",
        id="twice",
    ),
    pytest.param(
        '[[map]]\nprincipal = "user:bob"\nprofile = "bob"\n',
        "DIR/users.toml: mapping 'user:bob' (profile 'bob'): no such profile in DIR/credentials",
        id="no-such-profile",
    ),
    pytest.param("", "DIR/users.toml: key 'map': expected one or more [[map]] tables", id="empty"),
    pytest.param(
        "map = 'x'\n", "DIR/users.toml: key 'map': expected one or more [[map]] tables", id="map"
    ),
    pytest.param(
        'sts_endpoint_url = "ftp://x"\n[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n',
        "DIR/users.toml: key 'sts_endpoint_url': expected an http(s) URL, got 'ftp://x'",
        id="sts-url",
    ),
    pytest.param(
        'sts_endpoint_url = "http://sts.example.org"\n[[map]]\nprincipal = "user:alice"\n'
        'profile = "alice"\n',
        "DIR/users.toml: key 'sts_endpoint_url': 'http://sts.example.org': plain http only on"
        " loopback (the answers carry data keys or credentials); use https://",
        id="sts-plain-http",
    ),
    pytest.param(
        'sts_endpoint_url = "https://sts.example.org/x?y"\n[[map]]\nprincipal = "user:a"\n'
        'profile = "alice"\n',
        "DIR/users.toml: key 'sts_endpoint_url': 'https://sts.example.org/x?y': expected"
        " https://HOST[:PORT], without user, query or path",
        id="sts-path",
    ),
    pytest.param("[[map]\n", None, id="not-toml"),
]


@pytest.mark.parametrize(("body", "message"), REFUSALS)
def test_refusal(folder: Path, body: str, message: str | None) -> None:
    got = refusal(mapping_file(folder, body))
    if message is None:
        assert got.startswith("DIR/users.toml: not valid TOML: ")
    else:
        assert got == message


def test_no_credentials_file_named(folder: Path) -> None:
    path = mapping_file(folder, '[[map]]\nprincipal = "user:a"\nprofile = "a"\n', header=False)
    assert refusal(path) == (
        "DIR/users.toml: key 'shared_credentials_file': missing (where the profiles' keys are)"
    )


OK = '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n'


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_mapping_others_may_write_is_refused(folder: Path, mode: int) -> None:
    path = mapping_file(folder, OK)
    path.chmod(mode)
    assert refusal(path) == (
        "DIR/users.toml: not trusted: it must belong to root (or you) and be writable by no one"
        f" else (owner uid {os.geteuid()}, mode {mode:04o})"
    )


def test_a_mapping_of_another_user_is_refused(folder: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = mapping_file(folder, OK)
    os.chown(path, 4321, 4321)
    assert refusal(path) == (
        "DIR/users.toml: not trusted: it must belong to root (or you) and be writable by no one"
        " else (owner uid 4321, mode 0600)"
    )


def test_a_mapping_in_an_open_folder_is_refused(folder: Path) -> None:
    path = mapping_file(folder, OK)
    folder.chmod(0o777)
    assert refusal(path) == (
        "DIR/users.toml: not trusted: the folder 'DIR' on its way must belong to root (or"
        " you) and be writable by no one else"
    )


def test_a_mapping_below_an_open_folder_is_refused(folder: Path) -> None:
    # Whoever may write a folder on the way may rename ours and put theirs in its place.
    path = mapping_file(folder, OK)
    above = folder.parent
    above.chmod(0o777)
    try:
        with pytest.raises(ConfigError) as info:
            load_mapping(path)
        assert info.value.message == (
            f"{path}: not trusted: the folder {str(above)!r} on its way must belong to root"
            " (or you) and be writable by no one else"
        )
        above.chmod(0o1777)  # sticky, as /tmp: others may not move our folder
        load_mapping(path)
    finally:
        above.chmod(0o755)


def test_a_mapping_reached_through_a_symlinked_folder_is_checked_where_it_is(
    folder: Path, tmp_path: Path
) -> None:
    path = mapping_file(folder, OK)
    link = tmp_path / "via"
    link.symlink_to(folder)
    assert load_mapping(link / path.name).source_for is not None
    folder.chmod(0o777)
    with pytest.raises(ConfigError, match=r"the folder '.*/etc' on its way"):
        load_mapping(link / path.name)


def test_a_symlink_on_the_way_is_trusted_only_where_no_one_else_may_change_it(
    folder: Path, tmp_path: Path
) -> None:
    """A symlink on the way decides where the mapping is read from: whoever may change it
    (it is in a folder they may write, or it is theirs in a sticky folder) could point it at
    another folder holding a mapping of their choosing."""
    path = mapping_file(folder, OK)
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    (open_folder / "via").symlink_to(folder)
    load_mapping(open_folder / "via" / path.name)
    open_folder.chmod(0o777)
    with pytest.raises(ConfigError, match=r"the folder '.*/open' on its way must belong"):
        load_mapping(open_folder / "via" / path.name)
    open_folder.chmod(0o1777)  # sticky: the link may not be changed by others...
    load_mapping(open_folder / "via" / path.name)
    if os.geteuid() == 0:  # ...unless it is theirs
        os.lchown(open_folder / "via", 4321, 4321)
        with pytest.raises(ConfigError, match=r"the symlink '.*/open/via' on its way must"):
            load_mapping(open_folder / "via" / path.name)
        os.lchown(open_folder / "via", 0, 0)
    open_folder.chmod(0o755)
    (tmp_path / "up").symlink_to("open/../open/via/..")  # relative, through ".."
    assert load_mapping(tmp_path / "up" / "etc" / path.name).entries
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(ConfigError, match=r"loop/users.toml: cannot read: too many levels of"):
        load_mapping(tmp_path / "loop" / path.name)


def test_a_symlinked_mapping_is_refused(folder: Path) -> None:
    real = mapping_file(folder, OK)
    link = folder / "link.toml"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match=r"link.toml: cannot read: Too many levels of symbolic"):
        load_mapping(link)


def test_a_world_readable_credentials_file_is_refused(folder: Path) -> None:
    path = mapping_file(folder, OK)
    (folder / "credentials").chmod(0o644)
    assert refusal(path) == (
        "DIR/credentials: holds secret keys but is readable by others than its owner (mode"
        " 0644); chmod go-r it"
    )
    (folder / "credentials").chmod(0o640)  # its group's members would be every mapped user
    assert refusal(path) == (
        "DIR/credentials: holds secret keys but is readable by others than its owner (mode"
        " 0640); chmod go-r it"
    )
    (folder / "credentials").chmod(0o660)  # group-writable: anyone in it could swap keys
    assert refusal(path).startswith("DIR/credentials: not trusted: it must belong to root")


def test_a_relative_mapping_path_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"^credential mapping 'users.toml': expected an absolute"
    ):
        load_mapping("users.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("aws", KeyServiceChoice(aws=True)),
        ("https://kms.example.org", KeyServiceChoice(aws=True, endpoint="https://kms.example.org")),
        (
            "https://KMS.example.org:8443/",
            KeyServiceChoice(aws=True, endpoint="https://kms.example.org:8443"),
        ),
        ("http://127.0.0.1:5000", KeyServiceChoice(aws=True, endpoint="http://127.0.0.1:5000")),
        ("http://[::1]:5000", KeyServiceChoice(aws=True, endpoint="http://[::1]:5000")),
        ("http://localhost:5000", KeyServiceChoice(aws=True, endpoint="http://localhost:5000")),
    ],
)
def test_aws_choices(text: str, expected: KeyServiceChoice) -> None:
    choice = KeyServiceChoice.parse(text)
    assert choice == expected and choice.remote and not choice.daemon


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://10.0.0.1:5000", "plain http only on loopback"),
        ("https://user:pw@kms.example.org", "without user, query or path"),
        ("https://kms.example.org/x", "without user, query or path"),
        ("https://kms.example.org:99999", "is not a valid URL"),
        ("https://", "without user, query or path"),
        ("AWS", "is none of"),
    ],
)
def test_bad_aws_choices(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        KeyServiceChoice.parse(text)


def test_nothing_of_the_mapping_may_come_from_the_backing_folder(folder: Path) -> None:
    path = mapping_file(folder, OK)
    assert load_mapping(path, backing=folder.parent / "elsewhere").entries
    assert refusal_outside(path, folder) == (
        "DIR/users.toml: not trusted: it is in the volume's backing folder 'DIR', which"
        " whoever writes the backing store controls"
    )
    backing = folder / "backing"
    backing.mkdir()
    (folder / "credentials").rename(backing / "credentials")
    moved = folder / "moved.toml"
    moved.write_text(f'shared_credentials_file = "{folder}/./backing/credentials"\n{OK}')
    moved.chmod(0o600)
    with pytest.raises(ConfigError, match=r"credentials: not trusted: it is in the volume's"):
        load_mapping(moved, backing=backing)


@pytest.mark.skipif(os.geteuid() != 0, reason="a bind mount needs root")
def test_the_backing_folder_is_known_by_another_path_too(folder: Path, tmp_path: Path) -> None:
    """A bind mount gives the backing folder a second name: compared by identity, not by
    name, the mapping is refused there as well."""
    mapping_file(folder, OK)
    other = tmp_path / "other-name"
    other.mkdir(mode=0o755)
    subprocess.run(["mount", "--bind", str(folder), str(other)], check=True)
    try:
        with pytest.raises(ConfigError) as info:
            load_mapping(other / "users.toml", backing=folder)
        assert info.value.message == (
            f"{other}/users.toml: not trusted: it is in the volume's backing folder"
            f" {str(folder)!r}, which whoever writes the backing store controls"
        )
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_nothing_of_the_mapping_may_come_from_under_the_mount_point(folder: Path) -> None:
    """Read after mounting (at each entry's first use), a file under the mount point would
    be read through the mount itself."""
    path = mapping_file(folder, OK)
    with pytest.raises(ConfigError) as info:
        load_mapping(path, mountpoint=folder)
    assert info.value.message == (
        f"{path}: not trusted: it is under the mount point {str(folder)!r}, which the mount"
        " would have to read through itself"
    )
    elsewhere = folder.parent / "mnt"
    elsewhere.mkdir()
    assert load_mapping(path, backing=elsewhere, mountpoint=elsewhere).entries


def refusal_outside(path: Path, outside: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_mapping(path, backing=outside)
    return info.value.message.replace(str(path.parent), "DIR")


def test_the_ca_bundle_is_trusted_as_the_mapping_is(folder: Path, tmp_path: Path) -> None:
    """Whoever could change the CA bundle could stand in for the endpoint and read every
    data key it hands out: it is checked as the mapping is, and read once."""
    from envfs.keys.choice import connect
    from tests.tlscert import make_certificate

    mapping = mapping_file(folder, OK)
    cert, _key = make_certificate(folder)
    cert.chmod(0o644)
    choice = KeyServiceChoice.parse("https://127.0.0.1:1")

    def opened(ca_bundle: Path, backing: Path | None = None) -> None:
        def no_store() -> Any:
            raise AssertionError("no store for an AWS KMS API")

        with connect(
            choice, "eu-west-1", open_store=no_store, credentials=mapping,
            ca_bundle=ca_bundle, backing=backing,
        ):  # fmt: skip
            pass

    opened(cert)
    cert.chmod(0o666)
    with pytest.raises(ConfigError, match=r"tls.crt: not trusted: it must belong to root"):
        opened(cert)
    cert.chmod(0o644)
    backing = folder / "backing"
    backing.mkdir(mode=0o755)
    (backing / "ca.pem").write_bytes(cert.read_bytes())
    with pytest.raises(ConfigError, match=r"ca.pem: not trusted: it is in the volume's backing"):
        opened(backing / "ca.pem", backing=backing)
    (folder / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"ca.pem: not a bundle of PEM certificates$"):
        opened(folder / "ca.pem")
    (folder / "link.pem").symlink_to(cert)
    with pytest.raises(ConfigError, match=r"link.pem: cannot read: "):
        opened(folder / "link.pem")
    with pytest.raises(ConfigError, match=r"^CA bundle 'ca.pem': expected an absolute path$"):
        opened(Path("ca.pem"))


def test_a_relative_path_is_checked_from_the_working_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from envfs.keys.awscreds import check_trusted

    path = mapping_file(folder, OK)
    monkeypatch.chdir(folder)
    assert check_trusted(Path(path.name), secret=True) == path.read_bytes()
    folder.chmod(0o777)
    with pytest.raises(ConfigError, match=r"^users.toml: not trusted: the folder '.*/etc' on"):
        check_trusted(Path(path.name), secret=True)
