"""Daemon configuration: embedded defaults, then a TOML file, then ``RESD_*`` variables,
then command-line flags. Every key is checked once, here, with a message that says
what was wrong and what is allowed.

Environment names are the key upper-cased with ``RESD_`` in front (``RESD_FSYNC``,
``RESD_SOCKET``); oversubscription ratios are ``RESD_OVERSUB_<RESOURCE>``
(``RESD_OVERSUB_CPU=2``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from resd_client.paths import SYSTEM_SOCKET, SYSTEM_STATE, user_socket, user_state_dir
from resd_client.quantity import check_resource_name, parse_quantity

#: hypeman's defaults for a discovered host.
DEFAULT_OVERSUB: Final[dict[str, float]] = {
    "cpu": 4.0,
    "memory": 1.0,
    "disk": 1.0,
    "net": 2.0,
    "disk_io": 2.0,
}
FSYNC_MODES: Final = ("always", "batch", "never")
LOG_FORMATS: Final = ("auto", "json", "console")


class ConfigError(Exception):
    """A configuration value is wrong; the message names the key and what is allowed."""


@attrs.frozen
class Config:
    system: bool = False
    socket: str = ""
    socket_mode: str = ""
    state_dir: str = ""
    fsync: str = "always"
    max_frame: int = 1 << 20
    max_connections: int = 1024
    #: connections one non-admin uid may hold at once
    max_connections_per_uid: int = 256
    #: the last of ``max_connections`` that only admins may take; 0: none
    admin_reserved_connections: int = 16
    #: seconds a new connection has to say ``hello``
    handshake_timeout: float = 5.0
    #: seconds the rest of a frame has to arrive once its first bytes did
    read_timeout: float = 30.0
    max_pending: int = 64
    #: priority of tenants created on first use: the lowest, so that the power to
    #: preempt others always comes from an admin (SPEC §7)
    default_priority: int = 1
    admin_group: str = ""
    history_limit: int = 100_000
    snapshot_every: int = 100_000
    #: seconds that session leases and waiters are kept for their clients to re-attach
    #: after a restart (or after their connection was closed for not reading); 0: none
    reattach_grace: float = 60.0
    #: seconds after which a tenant's past usage counts half in fair-share ordering
    fair_share_half_life: float = 3600.0
    host_pool: bool = True
    disk_io_limit: str = "1GB/s"
    disk_limit: str = ""  # "" = statvfs of the state directory
    network_limit: str = ""  # "" = speed of the uplink NIC
    gpus_file: str = ""  # "" = ask NVML
    #: seconds between looks at what the GPUs and lease processes really use
    #: (SPEC §10); 0: never look
    gpu_sample_interval: float = 2.0
    #: GPU memory (a size: "512M") kept free on each sampled GPU beyond what the
    #: ledger and foreign use take, when admitting VRAM slices
    gpu_memory_margin: str = "0"
    #: where Prometheus metrics are served over HTTP, "HOST:PORT" ("127.0.0.1:9464",
    #: "[::1]:9464"); "": not served (``resctl metrics`` gives the same text)
    metrics_listen: str = ""
    #: the cgroup v2 directory delegated to resd for ``resctl run``'s limits: ""
    #: resd's own cgroup (systemd ``Delegate=``), "off": no cgroup limits
    cgroup_root: str = ""
    log_format: str = "auto"
    log_level: str = "info"
    oversub: dict[str, float] = attrs.Factory(lambda: dict(DEFAULT_OVERSUB))

    @property
    def socket_path(self) -> Path:
        if self.socket:
            return Path(self.socket)
        return SYSTEM_SOCKET if self.system else user_socket()

    @property
    def socket_permissions(self) -> int:
        """0600 in user mode, 0660 in system mode, unless ``socket_mode`` says otherwise."""
        if self.socket_mode:
            return int(self.socket_mode, 8)
        return 0o660 if self.system else 0o600

    @property
    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        return SYSTEM_STATE if self.system else user_state_dir()


_FIELDS: Final = {f.name: f for f in attrs.fields(Config)}


def _coerce(key: str, raw: Any, from_env: bool) -> Any:
    kind = _FIELDS[key].type
    try:
        if kind in ("bool", bool):
            if isinstance(raw, bool):
                return raw
            if from_env and str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if from_env and str(raw).lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind in ("int", int):
            if isinstance(raw, bool) or (not from_env and not isinstance(raw, int)):
                raise ValueError
            return int(raw)
        if kind in ("float", float):
            if isinstance(raw, bool) or (not from_env and not isinstance(raw, int | float)):
                raise ValueError
            return float(raw)
        if kind in ("str", str):
            if not isinstance(raw, str):
                raise ValueError
            return raw
    except ValueError:
        raise ConfigError(f"{key}: {raw!r} is not a valid {kind}") from None
    raise ConfigError(f"{key}: cannot be set this way")  # pragma: no cover


def _ratio(resource: str, raw: Any) -> float:
    try:
        check_resource_name(resource)
        value = float(raw)
    except Exception:
        raise ConfigError(f"oversub.{resource}: {raw!r} is not a ratio (a number > 0)") from None
    if not 0 < value <= 1000:
        raise ConfigError(f"oversub.{resource}: {value:g} is out of range (> 0 and <= 1000)")
    return value


def _validate(cfg: Config) -> Config:
    if cfg.fsync not in FSYNC_MODES:
        raise ConfigError(
            f"fsync: {cfg.fsync!r} is not allowed; use one of {', '.join(FSYNC_MODES)}"
        )
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError(
            f"log_format: {cfg.log_format!r} is not allowed; use one of {', '.join(LOG_FORMATS)}"
        )
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log_level: {cfg.log_level!r} is not allowed; use debug, info, warning or error"
        )
    if not 1024 <= cfg.max_frame <= 64 << 20:
        raise ConfigError(f"max_frame: {cfg.max_frame} is out of range (1024 to {64 << 20} bytes)")
    for key in (
        "max_connections",
        "max_connections_per_uid",
        "max_pending",
        "history_limit",
        "snapshot_every",
    ):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.admin_reserved_connections < cfg.max_connections:
        raise ConfigError(
            f"admin_reserved_connections: {cfg.admin_reserved_connections} is out of range "
            f"(0 to max_connections - 1 = {cfg.max_connections - 1}); lower it with "
            "max_connections, or 0 for no reserve"
        )
    for key, top in (("handshake_timeout", 3600), ("read_timeout", 86_400)):
        value = getattr(cfg, key)
        if not 0 < value <= top:  # NaN too
            raise ConfigError(
                f"{key}: {value:g} is out of range (more than 0, at most {top} seconds)"
            )
    if not 0 <= cfg.reattach_grace <= 86_400:
        raise ConfigError(
            f"reattach_grace: {cfg.reattach_grace:g} is out of range (0 to 86400 seconds)"
        )
    if not (cfg.gpu_sample_interval == 0 or 0.1 <= cfg.gpu_sample_interval <= 3600):
        raise ConfigError(
            f"gpu_sample_interval: {cfg.gpu_sample_interval:g} is out of range "
            "(0 to turn sampling off, or 0.1 to 3600 seconds)"
        )
    if gpu_margin(cfg) < 0:  # pragma: no cover - parse_quantity refuses negatives
        raise ConfigError("gpu_memory_margin: must not be negative")
    if not 1 <= cfg.fair_share_half_life <= 365 * 86_400:
        raise ConfigError(
            f"fair_share_half_life: {cfg.fair_share_half_life:g} is out of range "
            "(1 second to 365 days)"
        )
    if not 1 <= cfg.default_priority <= 10:
        raise ConfigError(f"default_priority: {cfg.default_priority} is out of range (1 to 10)")
    if cfg.socket_mode:
        try:
            mode = int(cfg.socket_mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            raise ConfigError(
                f"socket_mode: {cfg.socket_mode!r} is not an octal file mode like 0660"
            )
    try:
        parse_quantity("disk_io", cfg.disk_io_limit)
    except Exception as exc:
        raise ConfigError(f"disk_io_limit: {exc}") from None
    for key, resource in (("disk_limit", "disk"), ("network_limit", "net")):
        check_limit(key, resource, getattr(cfg, key))
    if cfg.metrics_listen:
        metrics_address(cfg)
    if cfg.cgroup_root not in ("", "off") and not Path(cfg.cgroup_root).is_absolute():
        raise ConfigError(
            f"cgroup_root: {cfg.cgroup_root!r} is not an absolute path; give a cgroup v2"
            ' directory delegated to resd, "off", or leave it empty for resd\'s own cgroup'
        )
    if cfg.gpus_file:
        from resd.nvml import load_gpus_file  # the GPU file format lives with NVML

        try:
            load_gpus_file(Path(cfg.gpus_file))
        except ValueError as exc:
            raise ConfigError(f"gpus_file: {exc}") from None
    return cfg


def gpu_margin(cfg: Config) -> int:
    """``gpu_memory_margin`` in bytes; raises ConfigError naming the key."""
    text = cfg.gpu_memory_margin.strip()
    if text in ("", "0"):
        return 0
    try:
        return parse_quantity("vram", text)
    except Exception as exc:
        detail = str(exc).removeprefix("vram: ")
        raise ConfigError(
            f"gpu_memory_margin: {detail}; use a size like 512M or 1G, or 0"
        ) from None


def metrics_address(cfg: Config) -> tuple[str, int] | None:
    """``metrics_listen`` as (host, port); None when metrics are not served. An IPv6
    host is written in brackets; port 0 lets the kernel pick one.

    Raises ConfigError naming the key, the value and the form expected.
    """
    text = cfg.metrics_listen.strip()
    if not text:
        return None
    form = 'use HOST:PORT like "127.0.0.1:9464" or "[::1]:9464", or "" for no HTTP endpoint'
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        bad_host = not host or ":" not in host
    else:
        bad_host = not host or ":" in host or "[" in host or "]" in host
    if not sep or bad_host or any(c.isspace() for c in host):
        raise ConfigError(f"metrics_listen: {cfg.metrics_listen!r} has no valid host; {form}")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"metrics_listen: {cfg.metrics_listen!r} has no valid port (0 to 65535); {form}"
        )
    return host, int(port_text)


def check_limit(key: str, resource: str, text: str) -> int | None:
    """Parse a capacity override such as ``disk_limit = "500G"``; ``""`` means auto (None).

    Raises ConfigError naming the key, the value and what is accepted.
    """
    if not text.strip():
        return None
    try:
        return parse_quantity(resource, text)
    except Exception as exc:
        detail = str(exc).removeprefix(f"{resource}: ")
        raise ConfigError(f"{key}: {detail}; or leave it empty to detect") from None


def default_config_file(system: bool) -> Path:
    if system:
        return Path("/etc/resd/resd.toml")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "resd" / "resd.toml"


def load(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config; ``path`` None means the default file if it exists.

    Raises ConfigError for unknown keys, wrong types and out-of-range values.
    """
    env = os.environ if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    values: dict[str, Any] = {}
    oversub = dict(DEFAULT_OVERSUB)
    system = bool(overrides.get("system", False))
    file = path or default_config_file(system)
    if path is not None or file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {file}: {exc}") from None
        for key, raw in data.items():
            if key == "oversub":
                if not isinstance(raw, dict):
                    raise ConfigError("oversub: must be a table like [oversub] cpu = 4.0")
                oversub.update({k: _ratio(k, v) for k, v in raw.items()})
            elif key in _FIELDS:
                values[key] = _coerce(key, raw, from_env=False)
            else:
                allowed = ", ".join(sorted(_FIELDS))
                raise ConfigError(f"{file}: unknown key {key!r}; allowed: {allowed}")
    for name, raw in env.items():
        if not name.startswith("RESD_"):
            continue
        key = name[5:].lower()
        if key.startswith("oversub_"):
            oversub[key[8:]] = _ratio(key[8:], raw)
        elif key in _FIELDS and key != "oversub":
            values[key] = _coerce(key, raw, from_env=True)
    for key, raw in overrides.items():
        if key not in _FIELDS or key == "oversub":
            raise ConfigError(f"unknown setting {key!r}; allowed: {', '.join(sorted(_FIELDS))}")
        values[key] = _coerce(key, raw, from_env=False)
    values["oversub"] = oversub
    return _validate(Config(**values))
