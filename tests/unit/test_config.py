"""Volume configuration files: what is read, and every refusal with its pinned message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from envfs.cli import config, main
from envfs.cli.config import VolumeConfig
from envfs.errors import ConfigError

MINIMAL = 'backing = "/srv/data.envfs"\nmountpoint = "/srv/data"\n'
# required with service = "aws" or a URL
PIN = "key_arn = 'arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab'\n"


def write(directory: Path, text: str, name: str = "data") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def refusal(tmp_path: Path, text: str, name: str = "data") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        config.load(name, tmp_path)
    return info.value.message.replace(str(path), "FILE")


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert config.load("data", tmp_path) == VolumeConfig(
        name="data",
        source=path,
        backing=Path("/srv/data.envfs"),
        mountpoint=Path("/srv/data"),
        region=None,
        kms="embedded",
        kms_dir=None,
        passphrase_file=None,
        allow_other=False,
        options=(),
        log_file=None,
        busy_poll=None,
    )


def test_every_key(tmp_path: Path) -> None:
    write(
        tmp_path,
        MINIMAL
        + 'allow_other = true\noptions = ["noatime", "max_read=131072"]\n'
        + 'log_file = "/var/log/envfs-data.log"\nbusy_poll = 0\n'
        + '[kms]\nregion = "eu-west-1"\nservice = "embedded"\ndir = "/var/lib/envfs/kms"\n'
        + 'passphrase_file = "/etc/envfs/data.pass"\n',
    )
    cfg = config.load("data", tmp_path)
    assert cfg.allow_other is True
    assert cfg.options == ("noatime", "max_read=131072")
    assert cfg.log_file == Path("/var/log/envfs-data.log")
    assert cfg.busy_poll == 0
    assert cfg.region == "eu-west-1"
    assert cfg.kms == "embedded" and cfg.kms_socket is None
    assert cfg.kms_dir == Path("/var/lib/envfs/kms")
    assert cfg.passphrase_file == Path("/etc/envfs/data.pass")


def test_daemon_socket(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + '[kms]\nservice = "unix:/run/envfs/kms-eu-west-1.sock"\n')
    cfg = config.load("data", tmp_path)
    assert cfg.kms == "unix:/run/envfs/kms-eu-west-1.sock"
    assert cfg.kms_socket == Path("/run/envfs/kms-eu-west-1.sock")


def test_aws_and_https_services(tmp_path: Path) -> None:
    write(
        tmp_path,
        MINIMAL + '[kms]\nservice = "aws"\ncredentials = "/etc/envfs/aws-users.toml"\n' + PIN,
    )
    cfg = config.load("data", tmp_path)
    assert (cfg.kms, cfg.kms_socket) == ("aws", None)
    assert cfg.kms_credentials == Path("/etc/envfs/aws-users.toml")
    assert cfg.kms_ca_bundle is None
    write(
        tmp_path,
        MINIMAL + '[kms]\nservice = "https://kms.example.org:8443"\n'
        'credentials = "/etc/envfs/aws-users.toml"\nca_bundle = "/etc/envfs/ca.pem"\n' + PIN,
    )
    cfg = config.load("data", tmp_path)
    assert cfg.kms == "https://kms.example.org:8443"
    assert cfg.kms_ca_bundle == Path("/etc/envfs/ca.pem")
    write(
        tmp_path,
        MINIMAL + '[kms]\nservice = "http://127.0.0.1:5000"\ncredentials = "/etc/u.toml"\n' + PIN,
    )
    assert config.load("data", tmp_path).kms == "http://127.0.0.1:5000"


def test_config_is_frozen(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL)
    cfg = config.load("data", tmp_path)
    with pytest.raises(AttributeError):
        cfg.backing = Path("/elsewhere")  # type: ignore[misc]


def test_directory_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.setenv("ENVFS_CONFIG_DIR", str(tmp_path))
    assert config.config_dir() == tmp_path
    assert config.load("data").mountpoint == Path("/srv/data")
    assert config.config_dir("/other") == Path("/other")
    monkeypatch.delenv("ENVFS_CONFIG_DIR")
    assert config.config_dir() == Path("/etc/envfs/volumes")


def test_error_is_an_envfs_error_with_its_own_code() -> None:
    assert ConfigError.exit_code == 62
    assert ConfigError.errno == 22  # EINVAL


# --- refusals: one per way a file can be wrong, messages pinned ---------------------------

REFUSALS = [
    pytest.param(
        'backing = "/srv/data.envfs"\nmountpoint = "mnt"\n',
        "FILE: key 'mountpoint': expected an absolute path, got 'mnt'",
        id="relative-mountpoint",
    ),
    pytest.param(
        'backing = "srv"\nmountpoint = "/srv/data"\n',
        "FILE: key 'backing': expected an absolute path, got 'srv'",
        id="relative-backing",
    ),
    pytest.param(
        'mountpoint = "/srv/data"\n',
        "FILE: key 'backing': missing (an absolute path is required)",
        id="missing-backing",
    ),
    pytest.param(
        'backing = "/srv/data.envfs"\n',
        "FILE: key 'mountpoint': missing (an absolute path is required)",
        id="missing-mountpoint",
    ),
    pytest.param(
        'backing = 5\nmountpoint = "/srv/data"\n',
        "FILE: key 'backing': expected an absolute path, got the number 5",
        id="backing-not-a-string",
    ),
    pytest.param(
        MINIMAL + "mount_point = '/x'\n",
        "FILE: key 'mount_point': unknown key (known: backing, mountpoint, allow_other,"
        " options, log_file, busy_poll, kms)",
        id="unknown-key",
    ),
    pytest.param(
        MINIMAL + "[kms]\nsocket = '/x'\n",
        "FILE: key 'kms.socket': unknown key (known: region, service, dir, passphrase_file,"
        " credentials, ca_bundle, key_arn)",
        id="unknown-kms-key",
    ),
    pytest.param(
        MINIMAL + "kms = 'embedded'\n",
        "FILE: key 'kms': expected a table, got 'embedded'",
        id="kms-not-a-table",
    ),
    pytest.param(
        MINIMAL + "allow_other = 'yes'\n",
        "FILE: key 'allow_other': expected true or false, got 'yes'",
        id="allow-other-not-bool",
    ),
    pytest.param(
        MINIMAL + "options = 'noatime'\n",
        "FILE: key 'options': expected a list of FUSE options like [\"noatime\"], one option"
        " per string, got 'noatime'",
        id="options-not-a-list",
    ),
    pytest.param(
        MINIMAL + "options = ['noatime,ro']\n",
        "FILE: key 'options': expected a list of FUSE options like [\"noatime\"], one option"
        " per string, got a list",
        id="options-with-comma",
    ),
    pytest.param(
        MINIMAL + "options = [1]\n",
        "FILE: key 'options': expected a list of FUSE options like [\"noatime\"], one option"
        " per string, got a list",
        id="options-not-strings",
    ),
    pytest.param(
        MINIMAL + "log_file = 'envfs.log'\n",
        "FILE: key 'log_file': expected an absolute path, got 'envfs.log'",
        id="relative-log-file",
    ),
    pytest.param(
        MINIMAL + "busy_poll = -1\n",
        "FILE: key 'busy_poll': expected 0 to 10000 microseconds, got -1",
        id="busy-poll-negative",
    ),
    pytest.param(
        MINIMAL + "busy_poll = 10001\n",
        "FILE: key 'busy_poll': expected 0 to 10000 microseconds, got 10001",
        id="busy-poll-too-long",
    ),
    pytest.param(
        MINIMAL + "busy_poll = '50'\n",
        "FILE: key 'busy_poll': expected a whole number of microseconds, got '50'",
        id="busy-poll-a-string",
    ),
    pytest.param(
        MINIMAL + "busy_poll = 2.5\n",
        "FILE: key 'busy_poll': expected a whole number of microseconds, got the number 2.5",
        id="busy-poll-not-whole",
    ),
    pytest.param(
        MINIMAL + "busy_poll = true\n",
        "FILE: key 'busy_poll': expected a whole number of microseconds, got true",
        id="busy-poll-a-boolean",
    ),
    pytest.param(
        MINIMAL + "[kms]\nregion = 'EU_West'\n",
        "FILE: key 'kms.region': expected lowercase letters, digits and dashes, starting with"
        " a letter, like 'eu-west-1', got 'EU_West'",
        id="bad-region",
    ),
    pytest.param(
        MINIMAL + "[kms]\nregion = 1\n",
        "FILE: key 'kms.region': expected a non-empty string, got the number 1",
        id="region-not-a-string",
    ),
    pytest.param(
        MINIMAL + "[kms]\nregion = ''\n",
        "FILE: key 'kms.region': expected a non-empty string, got ''",
        id="empty-region",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'daemon'\n",
        "FILE: key 'kms.service': expected 'embedded', 'unix:' and an absolute socket path,"
        " 'aws' or 'https://HOST[:PORT]', got 'daemon'",
        id="kms-neither-form",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'unix:kms.sock'\n",
        "FILE: key 'kms.service': expected 'embedded', 'unix:' and an absolute socket path,"
        " 'aws' or 'https://HOST[:PORT]', got 'unix:kms.sock'",
        id="kms-relative-socket",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = true\n",
        "FILE: key 'kms.service': expected a non-empty string, got true",
        id="kms-not-a-string",
    ),
    pytest.param(
        MINIMAL + "[kms]\ndir = 'kms'\n",
        "FILE: key 'kms.dir': expected an absolute path, got 'kms'",
        id="relative-kms-dir",
    ),
    pytest.param(
        MINIMAL + "[kms]\npassphrase_file = ['x']\n",
        "FILE: key 'kms.passphrase_file': expected an absolute path, got a list",
        id="passphrase-file-not-a-string",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'unix:/run/envfs/kms-local-1.sock'\ndir = '/var/lib/x'\n",
        "FILE: key 'kms.dir': applies only to service = 'embedded'",
        id="kms-dir-with-daemon",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'unix:/run/envfs/kms-local-1.sock'\n"
        "passphrase_file = '/etc/p'\n",
        "FILE: key 'kms.passphrase_file': applies only to service = 'embedded'",
        id="passphrase-with-daemon",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'aws'\n",
        "FILE: key 'kms.credentials': missing: service = 'aws' needs a credential mapping file",
        id="aws-without-credentials",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'aws'\ncredentials = '/etc/u.toml'\n",
        "FILE: key 'kms.key_arn': missing: service = 'aws' needs it: the volume file is"
        " authenticated by the key it names, and with keys in AWS KMS or on a key server,"
        " whoever may write the backing folder may have some key of their own to name; give"
        " the key `envfs init` printed (`envfs info BACKING` shows it)",
        id="aws-without-key-arn",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'https://kms.example.org'\ncredentials = 'users.toml'\n",
        "FILE: key 'kms.credentials': expected an absolute path, got 'users.toml'",
        id="aws-relative-credentials",
    ),
    pytest.param(
        MINIMAL + "[kms]\ncredentials = '/etc/envfs/users.toml'\n",
        "FILE: key 'kms.credentials': applies only to service = 'aws' or an https URL",
        id="credentials-with-embedded",
    ),
    pytest.param(
        MINIMAL
        + "[kms]\nservice = 'aws'\ncredentials = '/etc/u.toml'\nca_bundle = '/etc/ca'\n"
        + PIN,
        "FILE: key 'kms.ca_bundle': applies only to service = an https URL",
        id="ca-bundle-with-aws",
    ),
    pytest.param(
        MINIMAL + "[kms]\nkey_arn = 'arn:aws:kms:eu-west-1:111122223333:alias/data'\n",
        "FILE: key 'kms.key_arn': ARN 'arn:aws:kms:eu-west-1:111122223333:alias/data' names"
        " an alias, not a key",
        id="key-arn-alias",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'http://kms.example.org:8443'\n",
        "FILE: key 'kms.service': expected 'embedded', 'unix:' and an absolute socket path,"
        " 'aws' or 'https://HOST[:PORT]', got 'http://kms.example.org:8443'",
        id="plain-http-off-loopback",
    ),
    pytest.param(
        MINIMAL + "[kms]\nservice = 'https://kms.example.org/kms?x=1'\n",
        "FILE: key 'kms.service': expected 'embedded', 'unix:' and an absolute socket path,"
        " 'aws' or 'https://HOST[:PORT]', got 'https://kms.example.org/kms?x=1'",
        id="url-with-path",
    ),
]


@pytest.mark.parametrize(("text", "message"), REFUSALS)
def test_refusal(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(tmp_path, text) == message


def test_refusal_names_the_real_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'backing = "/srv/data.envfs"\nmountpoint = "mnt"\n')
    expected = f"{path}: key 'mountpoint': expected an absolute path, got 'mnt'"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        config.load("data", tmp_path)


def test_not_toml(tmp_path: Path) -> None:
    message = refusal(tmp_path, "backing = /srv\n")
    assert message.startswith("FILE: not valid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    expected = f"{tmp_path / 'nope.toml'}: no such volume configuration"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        config.load("nope", tmp_path)


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    expected = f"{tmp_path / 'dir.toml'}: not a regular file"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        config.load("dir", tmp_path)


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "a/b", "", ".", "..", ".hidden", "-x", "da ta", "é", "x" * 129]
)
def test_unsafe_names(tmp_path: Path, name: str) -> None:
    expected = (
        f"volume name {name!r} is not valid: expected 1-128 letters, digits, '_', '.' or '-',"
        " not starting with '.' or '-'"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        config.load(name, tmp_path)


@pytest.mark.parametrize("name", ["data", "Data_2.backup-x", "_x", "9", "x" * 128])
def test_safe_names(name: str) -> None:
    assert config.validate_name(name) == name


# --- the command line ---------------------------------------------------------------------


def test_cli_refuses_config_with_positionals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, MINIMAL)
    code = main(["mount", "--config", "data", "--config-dir", str(tmp_path), "/a", "/b"])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "envfs: error: --config NAME replaces BACKING MOUNTPOINT: give one or the other"
    )
    assert main(["umount", "--config", "data", "--config-dir", str(tmp_path), "/b"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "envfs: error: --config NAME replaces MOUNTPOINT: give one or the other"
    )


def test_cli_needs_config_or_positionals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mount", "/only-backing"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "envfs: error: give BACKING MOUNTPOINT, or --config NAME"
    )
    assert main(["umount"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "envfs: error: give MOUNTPOINT, or --config NAME"
    )


def test_cli_reports_config_error_with_exit_62(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'backing = "/srv/data.envfs"\nmountpoint = "mnt"\n')
    assert main(["mount", "--config", "data", "--config-dir", str(tmp_path)]) == 62
    assert capsys.readouterr().err == (
        f"envfs: error: {path}: key 'mountpoint': expected an absolute path, got 'mnt'\n"
    )


@pytest.mark.parametrize("value", ["10001", "-1", "50us", "", "2.5", "\u00b2", "1234567"])
def test_cli_refuses_a_bad_busy_poll_as_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["mount", "/a", "/b", "--busy-poll", value]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"envfs: error: argument --busy-poll: {value!r} is not a number of microseconds"
        " from 0 to 10000"
    )


def test_a_volume_file_naming_another_key_than_key_arn_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The volume file is authenticated by the key it names: one replaced by a volume file
    under someone else's key (any AWS account can make one its users may use) would
    authenticate too. ``key_arn`` fixes the key outside the backing folder."""
    from envfs.files.volume import Volume

    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    theirs = "arn:aws:kms:eu-west-1:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    backing, mountpoint = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mountpoint.mkdir()
    Volume(backing, "0b0c7b4e-8f1e-4f43-9a57-3e1f6e0d2c11", "eu-west-1", theirs, auth_key=b"a",
           mac=b"m")._write()  # fmt: skip
    write(
        tmp_path,
        f'backing = "{backing}"\nmountpoint = "{mountpoint}"\n[kms]\nkey_arn = "{key}"\n',
    )
    assert config.load("data", tmp_path).kms_key_arn == key
    monkeypatch.setattr("envfs.cli.volume.configure_logging", lambda **_: None)
    code = main(["mount", "--config", "data", "--config-dir", str(tmp_path), "--foreground"])
    assert code == 60
    assert capsys.readouterr().err == (
        f"envfs: error: the volume file of {str(backing)!r} names key {theirs!r}, not"
        f" {key!r} (--key-arn): refused, it may have been replaced\n"
    )
    code = main(["mount", str(backing), str(mountpoint), "--foreground", "--key-arn", key])
    assert code == 60 and "it may have been replaced" in capsys.readouterr().err
    alias = "arn:aws:kms:eu-west-1:111122223333:alias/data"
    assert main(["mount", str(backing), str(mountpoint), "--key-arn", alias]) == 2
    assert "names an alias, not a key" in capsys.readouterr().err


def test_a_configuration_others_may_change_is_refused(tmp_path: Path) -> None:
    """A volume configuration names the key service trusted with every data key, the
    credentials and the key the volume file must name: whoever could change it could send
    the mount to an endpoint of theirs."""
    folder = tmp_path / "volumes"
    folder.mkdir(mode=0o755)
    path = write(folder, MINIMAL)
    assert config.load("data", folder).backing == Path("/srv/data.envfs")
    path.chmod(0o666)
    with pytest.raises(ConfigError, match=r"data.toml: not trusted: it must belong to root"):
        config.load("data", folder)
    path.chmod(0o644)
    folder.chmod(0o777)
    with pytest.raises(ConfigError, match=r"data.toml: not trusted: the folder '.*/volumes' on"):
        config.load("data", folder)
    folder.chmod(0o755)
    (folder / "link.toml").symlink_to(path)
    with pytest.raises(ConfigError, match=r"link.toml: cannot read: "):
        config.load("link", folder)
