"""Host discovery over a fake /proc tree and fake links: exact figures, configured
overrides, bad limits, hypeman's bandwidth parsing, and the ``host`` pool."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog.testing
import trio

from resd.config import DEFAULT_OVERSUB, Config, ConfigError, load
from resd.daemon import Daemon
from resd.discovery import LinkStat, describe, discover, host_pool_resources
from resd.inventory import Figure, GpuDevice, HostInventory
from resd.nvml import StaticBackend, device_to_json
from resd_client.errors import InvalidError
from resd_client.quantity import parse_bandwidth
from tests.conftest import make_config
from tests.wire import WireClient

GiB = 1024**3
H100S = [
    GpuDevice(i, f"GPU-{i}", "NVIDIA H100 80GB HBM3", 80 * GiB, i // 4, f"0000:{i + 16:02x}:00.0")
    for i in range(8)
]
ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"


@attrs.frozen
class Link:
    isup: bool
    speed: int  # Mbit/s
    flags: str = "up,broadcast,running,multicast"


def fake_proc(
    root: Path,
    *,
    cpus: int = 12,
    mem_kb: int = 65_843_212,
    routes: list[tuple[str, str, int, int]] | None = None,
) -> Path:
    """A /proc with ``cpus`` processors, ``mem_kb`` MemTotal and routes
    (iface, destination, flags, metric)."""
    root.mkdir(parents=True, exist_ok=True)
    blocks = [
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\n"
        f"physical id\t: {i // 6}\ncpu cores\t: 6\n"
        for i in range(cpus)
    ]
    (root / "cpuinfo").write_text("\n".join(blocks))
    (root / "meminfo").write_text(
        f"MemTotal:       {mem_kb} kB\nMemFree:         1234567 kB\nMemAvailable:   2345678 kB\n"
    )
    (root / "net").mkdir(exist_ok=True)
    if routes is None:
        routes = [
            ("eth1", "0001A8C0", 0x1, 100),  # the LAN, not a default route
            ("eth0", "00000000", 0x3, 100),
            ("wlan0", "00000000", 0x3, 600),
        ]
    lines = [
        f"{nic}\t{dest}\t0101A8C0\t{flags:04X}\t0\t0\t{metric}\t{'00000000' if dest == '00000000' else '00FFFFFF'}\t0\t0\t0"
        for nic, dest, flags, metric in routes
    ]
    (root / "net" / "route").write_text("\n".join([ROUTE_HEADER, *lines]) + "\n")
    return root


LINKS: dict[str, Link] = {
    "lo": Link(True, 0, "up,loopback,running"),
    "eth0": Link(True, 25_000),
    "eth1": Link(True, 100_000),
    "wlan0": Link(True, 866),
}


@pytest.fixture(autouse=True)
def no_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``load`` finds the default config file through the real environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


def links_of(table: Mapping[str, Link]) -> Any:
    def links() -> Mapping[str, LinkStat]:
        return table

    return links


def config(tmp_path: Path, **changes: Any) -> Config:
    return Config(state_dir=str(tmp_path / "state" / "resd"), **changes)


def figures(inventory: HostInventory) -> dict[str, tuple[int, str]]:
    return {f.resource: (f.capacity, f.source) for f in inventory.figures}


def statvfs_total(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


# ------------------------------------------------------------------ detected figures


def test_fake_proc_gives_exact_figures(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc")
    inventory = discover(config(tmp_path), StaticBackend(H100S), proc, links=links_of(LINKS))
    assert figures(inventory) == {
        "cpu": (12_000, "detected"),
        "memory": (65_843_212 * 1024, "detected"),
        "disk": (statvfs_total(tmp_path), "detected"),
        "net": (25_000 * 1_000_000 // 8, "detected"),  # eth0: the default route, 25 Gbit/s
        "disk_io": (1 * GiB, "configured"),
    }
    assert inventory.figure("net") == Figure(
        "net", 3_125_000_000, "detected", "eth0 (default route)"
    )
    assert inventory.figure("disk") == Figure(
        "disk", statvfs_total(tmp_path), "detected", f"statvfs {tmp_path}"
    )
    assert inventory.gpus == tuple(H100S)
    assert inventory.gpu_source == "detected"


def test_lowest_metric_default_route_wins(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path / "proc",
        routes=[("wlan0", "00000000", 0x3, 50), ("eth0", "00000000", 0x3, 100)],
    )
    inventory = discover(config(tmp_path), StaticBackend([]), proc, links=links_of(LINKS))
    assert figures(inventory)["net"] == (866 * 125_000, "detected")


def test_default_route_down_or_without_speed_falls_back_to_fastest_link(
    tmp_path: Path,
) -> None:
    proc = fake_proc(
        tmp_path / "proc",
        routes=[("wg0", "00000000", 0x3, 0), ("eth0", "00000000", 0x2, 10)],  # eth0 route not up
    )
    table = {
        **LINKS,
        "wg0": Link(True, 0),  # a tunnel reports no speed
        "lo": Link(True, 400_000, "up,loopback,running"),  # never the loopback
        "eth2": Link(False, 200_000),  # nor a link that is down
    }
    inventory = discover(config(tmp_path), StaticBackend([]), proc, links=links_of(table))
    assert inventory.figure("net") == Figure(
        "net", 100_000 * 125_000, "detected", "eth1 (fastest link)"
    )


def test_no_link_speed_leaves_net_out(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", routes=[])
    with structlog.testing.capture_logs() as logs:
        inventory = discover(
            config(tmp_path), StaticBackend([]), proc, links=links_of({"eth0": Link(True, 0)})
        )
    assert inventory.figure("net") is None
    assert "net" not in host_pool_resources(inventory, DEFAULT_OVERSUB)
    assert any(line["event"] == "network_speed_unknown" for line in logs)


def test_missing_proc_files_fall_back(tmp_path: Path) -> None:
    empty = tmp_path / "proc"
    empty.mkdir()
    inventory = discover(config(tmp_path), StaticBackend([]), empty, links=links_of({}))
    cpu, memory = inventory.figure("cpu"), inventory.figure("memory")
    assert cpu is not None and cpu.capacity == (os.cpu_count() or 1) * 1000
    assert memory is not None and memory.capacity > 0 and memory.detail == "psutil"
    assert inventory.figure("net") is None


def test_real_proc(tmp_path: Path) -> None:
    """On the machine running the tests: every figure is there and positive."""
    inventory = discover(config(tmp_path), StaticBackend([]))
    for name in ("cpu", "memory", "disk", "disk_io"):
        figure = inventory.figure(name)
        assert figure is not None and figure.capacity > 0, name


def test_discovery_logs_each_figure_with_its_source(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc")
    with structlog.testing.capture_logs() as logs:
        discover(
            config(tmp_path, disk_limit="500G"), StaticBackend(H100S), proc, links=links_of(LINKS)
        )
    (line,) = [line for line in logs if line["event"] == "host_discovered"]
    assert (
        line["figures"]["cpu"]
        == "12 (detected: " + str(tmp_path / "proc" / "cpuinfo") + " (12 processors))"
    )
    assert line["figures"]["disk"] == "500GiB (configured: disk_limit)"
    assert line["gpus"] == 8


# ------------------------------------------------------------------ configured figures


def test_configured_limits_override_and_say_configured(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc")
    cfg = config(tmp_path, disk_limit="500G", network_limit="10Gbps", disk_io_limit="500MB/s")
    inventory = discover(cfg, StaticBackend([]), proc, links=links_of(LINKS))
    assert figures(inventory) == {
        "cpu": (12_000, "detected"),
        "memory": (65_843_212 * 1024, "detected"),
        "disk": (500 * GiB, "configured"),
        "net": (1_250_000_000, "configured"),
        "disk_io": (500 * 1024**2, "configured"),
    }


def test_limits_from_the_environment(tmp_path: Path) -> None:
    cfg = load(
        None,
        env={
            "RESD_DISK_LIMIT": "2T",
            "RESD_NETWORK_LIMIT": " 1GB/s ",
            "RESD_STATE_DIR": str(tmp_path),
        },
    )
    inventory = discover(cfg, StaticBackend([]), fake_proc(tmp_path / "proc"))
    assert figures(inventory)["disk"] == (2 * 1024**4, "configured")
    assert figures(inventory)["net"] == (GiB, "configured")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("disk_limit", "lots", "disk_limit: 'lots' is not a quantity"),
        ("disk_limit", "500Gbps", "disk_limit: unknown unit in '500Gbps'"),
        ("disk_limit", "0", "disk_limit: must be greater than zero"),
        ("disk_limit", "-5G", "disk_limit: -5G is negative"),
        ("network_limit", "fast", "network_limit: 'fast' is not a quantity"),
        ("network_limit", "10Xbps", "network_limit: unknown unit in '10Xbps'"),
        ("network_limit", "0Gbps", "network_limit: must be greater than zero"),
    ],
)
def test_bad_limits_are_config_errors(tmp_path: Path, key: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as at_discovery:
        discover(config(tmp_path, **{key: value}), StaticBackend([]), links=links_of({}))
    assert words in str(at_discovery.value)
    assert "leave it empty to detect" in str(at_discovery.value)
    with pytest.raises(ConfigError) as at_load:
        load(None, env={f"RESD_{key.upper()}": value})
    assert str(at_load.value) == str(at_discovery.value)


def test_bad_disk_io_limit_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disk_io_limit: disk_io: 'quick' is not a quantity"):
        discover(config(tmp_path, disk_io_limit="quick"), StaticBackend([]), links=links_of({}))


def test_gpus_file_is_configured(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([device_to_json(d) for d in H100S]))
    inventory = discover(config(tmp_path, gpus_file=str(path)), links=links_of({}))
    assert inventory.gpus == tuple(H100S)
    assert inventory.gpu_source == "configured"
    resources = host_pool_resources(inventory, DEFAULT_OVERSUB)
    assert resources["gpu"]["source"] == "configured"
    assert len(resources["gpu"]["members"]) == 8


def test_bad_gpus_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text('[{"index": 0, "uuid": "GPU-a", "name": "H100", "memory": "lots"}]')
    with pytest.raises(ConfigError, match=r"gpus_file: .*entry 0: field 'memory'"):
        discover(config(tmp_path, gpus_file=str(path)), links=links_of({}))
    with pytest.raises(ConfigError, match=r"gpus_file: .*entry 0: field 'memory'"):
        load(None, env={"RESD_GPUS_FILE": str(path)})
    with pytest.raises(ConfigError, match=r"gpus_file: .*cannot read"):
        load(None, env={"RESD_GPUS_FILE": str(tmp_path / "no.json")})


# ------------------------------------------------------------------ the host pool


def inventory_of(tmp_path: Path, gpus: list[GpuDevice]) -> HostInventory:
    proc = fake_proc(tmp_path / "proc")
    return discover(
        config(tmp_path, disk_limit="1T"), StaticBackend(gpus), proc, links=links_of(LINKS)
    )


def test_host_pool_resources_use_hypemans_ratios(tmp_path: Path) -> None:
    resources = host_pool_resources(inventory_of(tmp_path, H100S), DEFAULT_OVERSUB)
    assert resources == {
        "cpu": {"capacity": 12_000, "ratio": 4.0, "source": "detected"},
        "memory": {"capacity": 65_843_212 * 1024, "ratio": 1.0, "source": "detected"},
        "disk": {"capacity": 1024**4, "ratio": 1.0, "source": "configured"},
        "net": {"capacity": 3_125_000_000, "ratio": 2.0, "source": "detected"},
        "disk_io": {"capacity": GiB, "ratio": 2.0, "source": "configured"},
    } | {"gpu": resources["gpu"]}
    gpu = resources["gpu"]
    assert gpu["kind"] == "set" and gpu["source"] == "detected"
    assert [m["name"] for m in gpu["members"]] == [str(i) for i in range(8)]
    first = gpu["members"][0]
    assert first["capacity"] == H100S[0].memory_total
    assert first["labels"]["uuid"] == H100S[0].uuid
    assert first["labels"]["model"] == H100S[0].name
    assert first["labels"]["numa"] == str(H100S[0].numa_node)
    assert "gpu" not in host_pool_resources(inventory_of(tmp_path, []), DEFAULT_OVERSUB)


def test_oversub_from_the_environment_reaches_the_pool(tmp_path: Path) -> None:
    cfg = load(None, env={"RESD_OVERSUB_CPU": "2"})
    resources = host_pool_resources(inventory_of(tmp_path, []), cfg.oversub)
    assert resources["cpu"]["ratio"] == 2.0


def test_describe_reports_effective_limits(tmp_path: Path) -> None:
    report = describe(inventory_of(tmp_path, H100S[:2]), DEFAULT_OVERSUB)
    assert report["resources"]["cpu"] == {
        "capacity": 12_000,
        "source": "detected",
        "oversub_ratio": 4.0,
        "effective_limit": 48_000,
        "detail": f"{tmp_path / 'proc' / 'cpuinfo'} (12 processors)",
    }
    assert report["resources"]["net"]["effective_limit"] == 6_250_000_000
    assert report["resources"]["gpu"]["capacity"] == 2
    assert report["gpus"] == [device_to_json(d) for d in H100S[:2]]
    assert report["gpu_source"] == "detected"


async def test_daemon_creates_the_host_pool_from_discovery(short_tmp: Path) -> None:
    gpus = short_tmp / "gpus.json"
    gpus.write_text(json.dumps([device_to_json(d) for d in H100S]))
    cfg = make_config(
        short_tmp,
        host_pool=True,
        gpus_file=str(gpus),
        disk_limit="500G",
        network_limit="10Gbps",
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(Daemon(cfg, handle_signals=False).run)
            client = await WireClient.connect(cfg.socket)
            pool = await client.ok("pool.show", {"name": "host"})
            await WireClient.close_all()
            daemon.request_stop()
    assert pool["max_per_tenant"] == 0
    assert pool["labels"] == {"source": "discovery"}
    resources = {r["name"]: r for r in pool["resources"]}
    assert set(resources) == {"cpu", "memory", "disk", "net", "disk_io", "gpu", "vram"}
    assert resources["vram"]["capacity"] == sum(d.memory_total for d in H100S)
    assert [m["labels"]["uuid"] for m in resources["gpu"]["members"]] == [d.uuid for d in H100S]
    assert resources["disk"]["capacity"] == 500 * GiB
    assert resources["disk"]["source"] == "configured"
    assert resources["net"]["capacity"] == 1_250_000_000
    assert resources["net"]["effective"] == 2_500_000_000
    assert resources["cpu"]["ratio"] == 4.0
    assert resources["gpu"]["capacity"] == 8


# ------------------------------------------------------------------ hypeman's ParseBandwidth


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10Gbps", 1_250_000_000),
        ("1Gbps", 125_000_000),
        ("100Mbps", 12_500_000),
        ("1Kbps", 125),
        ("8bps", 1),
        ("1GB/s", 1_073_741_824),  # byte sizes are binary, as datasize
        ("125MB/s", 125 * 1024**2),
        ("500KB/s", 500 * 1024),
        ("10gbps", 1_250_000_000),  # case-insensitive
        ("10GBPS", 1_250_000_000),
        ("1gb/s", 125_000_000),  # unlike hypeman: a lower-case b is bits
        ("1GBps", 1_073_741_824),
        ("  10Gbps  ", 1_250_000_000),  # whitespace trimmed
        ("\t125MB/s\n", 125 * 1024**2),
        ("1GB", 1_073_741_824),  # "/s" is optional
    ],
)
def test_parse_bandwidth_like_hypeman(text: str, expected: int) -> None:
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize("text", ["bad", "", "Gbps", "10Xbps", "10 furlongs/s", "-1Gbps"])
def test_parse_bandwidth_refuses(text: str) -> None:
    with pytest.raises(InvalidError):
        parse_bandwidth(text)
