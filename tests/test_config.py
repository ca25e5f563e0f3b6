"""Daemon configuration: TOML file, then RESD_* variables, then flags; bad values refused (SPEC §6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from resd.config import DEFAULT_OVERSUB, Config, ConfigError, load
from tests.conftest import subprocess_env


@pytest.fixture(autouse=True)
def no_default_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep a real ~/.config/resd/resd.toml or RESD_* in the test runner's env out of the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "resd.toml"
    path.write_text(text)
    return path


FILE = """
fsync = "batch"
max_frame = 2097152
default_priority = 3
host_pool = false
admin_group = "resd-admins"
log_format = "json"

[oversub]
cpu = 8.0
net = 1.5
"""


def test_defaults_without_file_or_env() -> None:
    cfg = load(None, env={})
    assert cfg == Config()
    assert cfg.fsync == "always"
    assert cfg.max_frame == 1 << 20
    assert cfg.default_priority == 1
    assert cfg.host_pool is True
    assert (
        cfg.oversub
        == DEFAULT_OVERSUB
        == {
            "cpu": 4.0,
            "memory": 1.0,
            "disk": 1.0,
            "net": 2.0,
            "disk_io": 2.0,
        }
    )


def test_toml_file(tmp_path: Path) -> None:
    cfg = load(toml(tmp_path, FILE), env={})
    assert cfg.fsync == "batch"
    assert cfg.max_frame == 2 << 20
    assert cfg.default_priority == 3
    assert cfg.host_pool is False
    assert cfg.admin_group == "resd-admins"
    assert cfg.log_format == "json"
    assert cfg.oversub == {**DEFAULT_OVERSUB, "cpu": 8.0, "net": 1.5}


def test_default_file_is_read_when_present(tmp_path: Path) -> None:
    (tmp_path / "xdg-config" / "resd").mkdir(parents=True)
    (tmp_path / "xdg-config" / "resd" / "resd.toml").write_text('fsync = "never"\n')
    assert load(None, env={}).fsync == "never"


def test_env_overrides() -> None:
    cfg = load(
        None,
        env={
            "RESD_FSYNC": "never",
            "RESD_OVERSUB_CPU": "2",
            "RESD_OVERSUB_LICENSES": "1.5",
            "RESD_MAX_PENDING": "10",
            "RESD_HOST_POOL": "false",
            "RESD_SOCKET": "/tmp/x.sock",
            "HOME_FSYNC": "batch",
        },
    )
    assert cfg.fsync == "never"
    assert cfg.oversub == {**DEFAULT_OVERSUB, "cpu": 2.0, "licenses": 1.5}
    assert cfg.max_pending == 10
    assert cfg.host_pool is False
    assert cfg.socket_path == Path("/tmp/x.sock")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_env_bools(raw: str, expected: bool) -> None:
    assert load(None, env={"RESD_HOST_POOL": raw}).host_pool is expected


def test_precedence_overrides_then_env_then_file(tmp_path: Path) -> None:
    path = toml(tmp_path, 'fsync = "batch"\ndefault_priority = 3\n[oversub]\ncpu = 8.0\n')
    env = {"RESD_FSYNC": "never", "RESD_OVERSUB_CPU": "2"}
    assert load(path, env={}).fsync == "batch"
    from_env = load(path, env=env)
    assert from_env.fsync == "never"
    assert from_env.oversub["cpu"] == 2.0
    assert from_env.default_priority == 3  # untouched by env: the file's value stays
    flagged = load(path, env=env, overrides={"fsync": "always", "socket": None})
    assert flagged.fsync == "always"
    assert flagged.socket == ""  # None means "flag not given"


def test_connection_limits_and_timeouts(tmp_path: Path) -> None:
    """Issue 10's keys: defaults, from the file (ints accepted for seconds), from env."""
    cfg = load(None, env={})
    assert (cfg.max_connections_per_uid, cfg.admin_reserved_connections) == (256, 16)
    assert (cfg.handshake_timeout, cfg.read_timeout) == (5.0, 30.0)
    path = toml(
        tmp_path,
        "max_connections = 100\nmax_connections_per_uid = 10\n"
        "admin_reserved_connections = 0\nhandshake_timeout = 2\nread_timeout = 0.5\n",
    )
    cfg = load(path, env={})
    assert (cfg.max_connections_per_uid, cfg.admin_reserved_connections) == (10, 0)
    assert (cfg.handshake_timeout, cfg.read_timeout) == (2.0, 0.5)
    assert isinstance(cfg.handshake_timeout, float)
    cfg = load(path, env={"RESD_HANDSHAKE_TIMEOUT": "1.5", "RESD_ADMIN_RESERVED_CONNECTIONS": "99"})
    assert (
        load(None, env={"RESD_REATTACH_GRACE": "0"}).reattach_grace,
        Config().reattach_grace,
    ) == (
        0.0,
        60.0,
    )
    assert (cfg.handshake_timeout, cfg.admin_reserved_connections) == (1.5, 99)


def test_variables_of_other_tools_are_ignored() -> None:
    # resctl run sets these in its child's environment; a daemon started there must not care
    cfg = load(None, env={"RESD_RESERVATION_ID": "r-0123456789ab", "RESD_GPUS": "0,1"})
    assert cfg == Config()


def config_error(tmp_path: Path, text: str | None = None, **kwargs: Any) -> str:
    path = toml(tmp_path, text) if text is not None else None
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load(path, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("bogus = 1\n", ["bogus", "unknown key", "fsync"]),
        ('fsync = "sometimes"\n', ["fsync", "sometimes", "always", "batch", "never"]),
        ("max_frame = 10\n", ["max_frame", "10"]),
        ("max_frame = 1073741824\n", ["max_frame"]),
        ("default_priority = 11\n", ["default_priority", "11"]),
        ("default_priority = 0\n", ["default_priority"]),
        ("default_priority = 5.7\n", ["default_priority"]),
        ('default_priority = "high"\n', ["default_priority", "high"]),
        ("max_pending = 0\n", ["max_pending"]),
        ("max_connections = -5\n", ["max_connections"]),
        ("max_pending = true\n", ["max_pending"]),
        ("max_connections_per_uid = 0\n", ["max_connections_per_uid", "at least 1"]),
        ("admin_reserved_connections = -1\n", ["admin_reserved_connections", "-1", "0 to"]),
        (
            "max_connections = 10\nadmin_reserved_connections = 10\n",
            ["admin_reserved_connections", "max_connections - 1 = 9"],
        ),
        ("handshake_timeout = 0\n", ["handshake_timeout", "out of range"]),
        ("handshake_timeout = 3601\n", ["handshake_timeout", "3600"]),
        ('handshake_timeout = "5s"\n', ["handshake_timeout", "5s"]),
        ("read_timeout = -1.0\n", ["read_timeout", "-1"]),
        ("read_timeout = 86401\n", ["read_timeout", "86400"]),
        ("read_timeout = nan\n", ["read_timeout", "nan"]),
        ("reattach_grace = -1\n", ["reattach_grace", "-1", "0 to 86400"]),
        ("reattach_grace = 90000\n", ["reattach_grace", "90000"]),
        ("reattach_grace = inf\n", ["reattach_grace", "inf"]),
        ('reattach_grace = "1m"\n', ["reattach_grace", "1m"]),
        ("fsync = 1\n", ["fsync"]),
        ('host_pool = "yes"\n', ["host_pool"]),
        ('log_level = "loud"\n', ["log_level", "loud"]),
        ('log_format = "xml"\n', ["log_format"]),
        ('socket_mode = "999"\n', ["socket_mode"]),
        ('disk_io_limit = "fast"\n', ["disk_io_limit"]),
        ("[oversub]\ncpu = -1\n", ["oversub.cpu", "-1"]),
        ("[oversub]\ncpu = 0\n", ["oversub.cpu"]),
        ("[oversub]\ncpu = 1001\n", ["oversub.cpu"]),
        ('[oversub]\ncpu = "lots"\n', ["oversub.cpu", "lots"]),
        ("[oversub]\nCPU = 2.0\n", ["oversub.CPU"]),
        ("oversub = 4.0\n", ["oversub", "table"]),
        ("fsync = \n", ["cannot read config"]),
    ],
)
def test_bad_file_values(tmp_path: Path, text: str, words: list[str]) -> None:
    message = config_error(tmp_path, text)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"RESD_FSYNC": "sometimes"}, ["fsync", "sometimes"]),
        ({"RESD_HOST_POOL": "maybe"}, ["host_pool", "maybe"]),
        ({"RESD_MAX_PENDING": "ten"}, ["max_pending", "ten"]),
        ({"RESD_MAX_FRAME": "1.5"}, ["max_frame"]),
        ({"RESD_DEFAULT_PRIORITY": "11"}, ["default_priority", "11"]),
        ({"RESD_OVERSUB_CPU": "-2"}, ["oversub.cpu"]),
        ({"RESD_OVERSUB_CPU": "nan"}, ["oversub.cpu"]),
        ({"RESD_OVERSUB_CPU": "two"}, ["oversub.cpu", "two"]),
        ({"RESD_HANDSHAKE_TIMEOUT": "inf"}, ["handshake_timeout", "inf"]),
        ({"RESD_READ_TIMEOUT": "soon"}, ["read_timeout", "soon"]),
        ({"RESD_MAX_CONNECTIONS_PER_UID": "1.5"}, ["max_connections_per_uid"]),
        ({"RESD_ADMIN_RESERVED_CONNECTIONS": "2000"}, ["admin_reserved_connections", "2000"]),
    ],
)
def test_bad_env_values(tmp_path: Path, env: dict[str, str], words: list[str]) -> None:
    message = config_error(tmp_path, env=env)
    for word in words:
        assert word in message, message


def test_env_error_beats_a_good_file(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'fsync = "batch"\n', env={"RESD_FSYNC": "bogus"})
    assert "fsync" in message and "bogus" in message


def test_bad_override_values(tmp_path: Path) -> None:
    assert "fsync" in config_error(tmp_path, overrides={"fsync": "sometimes"})
    assert "max_pending" in config_error(tmp_path, overrides={"max_pending": "x"})


def test_unknown_override_key_is_a_config_error(tmp_path: Path) -> None:
    assert "bogus" in config_error(tmp_path, overrides={"bogus": 1})


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "absent.toml", env={})


# ----------------------------------------------------------------- the real command


def run_resd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = subprocess_env()
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "resd", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_bad_fsync_flag_exits_2(tmp_path: Path) -> None:
    result = run_resd(
        "--fsync", "sometimes", "--socket", str(tmp_path / "s"), "--state-dir", str(tmp_path / "st")
    )
    assert result.returncode == 2
    assert "fsync" in result.stderr
    assert not (tmp_path / "s").exists()


def test_bad_fsync_env_exits_2_naming_fsync(tmp_path: Path) -> None:
    result = run_resd(
        "--socket",
        str(tmp_path / "s"),
        "--state-dir",
        str(tmp_path / "st"),
        "--no-host-pool",
        env={"RESD_FSYNC": "bogus"},
    )
    assert result.returncode == 2, result.stderr
    assert "fsync" in result.stderr and "bogus" in result.stderr
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "st").exists()


def test_bad_config_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = toml(tmp_path, "max_frame = 10\n")
    result = run_resd(
        "--config", str(path), "--socket", str(tmp_path / "s"), "--state-dir", str(tmp_path / "st")
    )
    assert result.returncode == 2, result.stderr
    assert "max_frame" in result.stderr
