"""Quantities: what people type, in internal units, and back (SPEC §2)."""

from __future__ import annotations

from typing import Any

import pytest

from resd_client.errors import InvalidError
from resd_client.quantity import (
    MAX_QUANTITY,
    Unit,
    check_resource_name,
    parse_bandwidth,
    parse_quantity,
    render_quantity,
    unit_of,
)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

GOOD: list[tuple[str, Any, int]] = [
    # cpu: cores or millicores
    ("cpu", "4", 4000),
    ("cpu", 4, 4000),
    ("cpu", "1.5", 1500),
    ("cpu", 1.5, 1500),
    ("cpu", "500m", 500),
    ("cpu", "0.5", 500),
    ("cpu", "0.001", 1),
    ("cpu", "1m", 1),
    ("cpu", "64", 64000),
    ("cpu", ".25", 250),
    # memory: a plain number is MiB (resgate's --memory 8192); sizes are binary
    ("memory", "8192", 8 * GiB),
    ("memory", 8192, 8 * GiB),
    ("memory", "8G", 8 * GiB),
    ("memory", "8GiB", 8 * GiB),
    ("memory", "8GB", 8 * GiB),
    ("memory", "8g", 8 * GiB),
    ("memory", "8Gi", 8 * GiB),
    ("memory", "512M", 512 * MiB),
    ("memory", "512MiB", 512 * MiB),
    ("memory", "1.5G", 1536 * MiB),
    ("memory", "1T", TiB),
    ("memory", "64K", 64 * KiB),
    ("memory", "4096B", 4096),
    ("memory", "0.5", 512 * KiB),
    ("vram", "20G", 20 * GiB),
    ("disk", "500G", 500 * GiB),
    ("disk", "2TiB", 2 * TiB),
    # bandwidth: a lower-case b or "bit" is bits/s with decimal multiples; B (or no
    # unit letter) is bytes/s with binary multiples, like every byte size
    ("net", "10Gbps", 1_250_000_000),
    ("net", "10Gb/s", 1_250_000_000),
    ("net", "10Gbit/s", 1_250_000_000),
    ("net", "10Gbits/s", 1_250_000_000),
    ("net", "10GBit/s", 1_250_000_000),
    ("net", "10gb/s", 1_250_000_000),
    ("net", "10Gb", 1_250_000_000),
    ("net", "10GBPS", 1_250_000_000),  # all capitals: hypeman's bits
    ("net", "1Gibit/s", 2**30 // 8),
    ("net", "125MB/s", 125 * MiB),
    ("net", "125MBps", 125 * MiB),
    ("net", "125MiB/s", 125 * MiB),
    ("net", "125M/s", 125 * MiB),
    ("net", "125MB", 125 * MiB),
    ("net", "1000B/s", 1000),
    ("net", "1000Bps", 1000),
    ("net", "1000", 1000),
    ("net", "100Mbps", 12_500_000),
    ("net", "1Kbps", 125),
    ("net", "8bps", 1),
    ("net", "1gbps", 125_000_000),
    ("net", "2.5Gbps", 312_500_000),
    ("net", "1GB/s", GiB),
    ("net", "125mb/s", 15_625_000),  # lower-case b: megabits
    ("net", "1G/s", GiB),
    ("disk_io", "10Gbps", 1_250_000_000),
    ("disk_io", "500MB/s", 500 * MiB),
    ("disk_io", "500MBps", 500 * MiB),
    ("disk_io", "4Gb/s", 500_000_000),
    # gpu and custom resources: whole counts
    ("gpu", "2", 2),
    ("gpu", 2, 2),
    ("licenses", "3", 3),
    ("licenses", 3, 3),
    ("gpu_slots", "16", 16),
]


@pytest.mark.parametrize(
    ("resource", "text", "expected"), GOOD, ids=[f"{r}={t!r}" for r, t, _ in GOOD]
)
def test_parse(resource: str, text: Any, expected: int) -> None:
    result = parse_quantity(resource, text)
    assert result == expected
    assert type(result) is int


BAD: list[tuple[str, Any, str]] = [
    ("cpu", "0.0001", "finer"),
    ("cpu", 0.0001, ""),
    ("cpu", "0.5m", "finer"),
    ("cpu", "4x", "suffix"),
    ("cpu", "4 cores", ""),
    ("cpu", "-1", ""),
    ("cpu", -1, "negative"),
    ("cpu", "0", "greater than zero"),
    ("cpu", 0, "greater than zero"),
    ("cpu", "", ""),
    ("cpu", "1e3", ""),
    ("cpu", float("nan"), ""),
    ("cpu", float("inf"), ""),
    ("cpu", True, "expected a quantity"),
    ("cpu", None, "expected a quantity"),
    ("cpu", [4], "expected a quantity"),
    ("memory", "8X", "unknown unit"),
    ("memory", "8Gbps", "unknown unit"),
    ("memory", "-1", ""),
    ("memory", -1, "negative"),
    ("memory", "0", "greater than zero"),
    ("memory", "0G", "greater than zero"),
    ("memory", "1.5B", "finer"),
    ("memory", "99999999E", "too large"),
    ("memory", "1,5G", ""),
    ("net", "10Xbps", "unknown unit"),
    ("net", "10ib/s", "unknown unit"),
    ("net", "10Gbyte/s", "unknown unit"),
    ("net", "10G/m", "unknown unit"),
    ("net", "fast", ""),
    ("net", "1bps", "greater than zero"),  # an eighth of a byte rounds down to nothing
    ("licenses", "1.5", "finer"),
    ("licenses", 1.5, "finer"),
    ("licenses", "3k", "unknown unit"),
    ("gpu", "0.5", "finer"),
    ("gpu", "0", "greater than zero"),
]


@pytest.mark.parametrize(("resource", "text", "words"), BAD, ids=[f"{r}={t!r}" for r, t, _ in BAD])
def test_refused(resource: str, text: Any, words: str) -> None:
    with pytest.raises(InvalidError) as info:
        parse_quantity(resource, text)
    message = info.value.message
    assert resource in message  # names the resource
    assert words in message
    assert info.value.code == "invalid"


@pytest.mark.parametrize(
    ("resource", "text"), [("cpu", "0"), ("memory", "0"), ("memory", "0G"), ("licenses", 0)]
)
def test_zero_allowed_only_when_asked(resource: str, text: Any) -> None:
    with pytest.raises(InvalidError):
        parse_quantity(resource, text)
    assert parse_quantity(resource, text, allow_zero=True) == 0


def test_negative_refused_even_with_allow_zero() -> None:
    for value in (-1, "-1", -0.5):
        with pytest.raises(InvalidError):
            parse_quantity("memory", value, allow_zero=True)


def test_max_quantity_bound() -> None:
    assert parse_quantity("licenses", MAX_QUANTITY) == MAX_QUANTITY
    with pytest.raises(InvalidError, match="too large"):
        parse_quantity("licenses", MAX_QUANTITY + 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10Gbps", 1_250_000_000),
        ("100Mbps", 12_500_000),
        ("1Kbps", 125),
        ("1GB/s", 1_073_741_824),
        ("125MB/s", 131_072_000),
        ("125MBps", 131_072_000),
        ("10Gb/s", 1_250_000_000),
        ("10Gbit/s", 1_250_000_000),
        ("1gbps", 125_000_000),
        ("0", 0),
    ],
)
def test_parse_bandwidth_like_hypeman(text: str, expected: int) -> None:
    assert parse_bandwidth(text) == expected


# --------------------------------------------------------------------- round trips

CPU_EXACT = [1, 5, 250, 500, 999, 1000, 1001, 1234, 1500, 2250, 4000, 64000, 100_500]
BYTES_EXACT = [
    KiB,
    3 * KiB,
    1023 * KiB,
    1025 * KiB,
    MiB,
    1536 * KiB,
    512 * MiB,
    1000 * MiB,
    1500 * MiB,
    GiB,
    1536 * MiB,
    8 * GiB,
    20 * GiB,
    1025 * MiB,
    3 * TiB,
    TiB + GiB,
]


@pytest.mark.parametrize("amount", CPU_EXACT)
def test_cpu_render_round_trips(amount: int) -> None:
    text = render_quantity("cpu", amount)
    assert parse_quantity("cpu", text) == amount, text


@pytest.mark.parametrize("amount", BYTES_EXACT, ids=[f"{a // KiB}KiB" for a in BYTES_EXACT])
def test_bytes_render_round_trips(amount: int) -> None:
    for resource in ("memory", "vram", "disk"):
        text = render_quantity(resource, amount)
        assert parse_quantity(resource, text) == amount, f"{resource}: {amount} -> {text!r}"


@pytest.mark.parametrize("amount", [1, 2, 3, 17, 1000, 123_456])
def test_count_render_round_trips(amount: int) -> None:
    for resource in ("gpu", "licenses"):
        assert parse_quantity(resource, render_quantity(resource, amount)) == amount


@pytest.mark.parametrize("text", ["10Gbps", "100Mbps", "1Kbps", "1Gbps", "2.5Gbps", "40Gbps"])
def test_bandwidth_render_round_trips(text: str) -> None:
    amount = parse_quantity("net", text)
    assert render_quantity("net", amount) == text
    assert parse_quantity("net", render_quantity("net", amount)) == amount


@pytest.mark.parametrize(
    "amount", [1, 3, 125, 1000, 1001, 1024, 125 * MiB, GiB, 1_250_000_001, 3 * TiB + 7]
)
def test_any_bandwidth_render_round_trips(amount: int) -> None:
    for resource in ("net", "disk_io"):
        text = render_quantity(resource, amount)
        assert parse_quantity(resource, text) == amount, f"{resource}: {amount} -> {text!r}"


@pytest.mark.parametrize(
    ("resource", "amount", "text"),
    [
        ("cpu", 4000, "4"),
        ("cpu", 1500, "1.5"),
        ("cpu", 500, "500m"),
        ("memory", 8 * GiB, "8GiB"),
        ("memory", 512 * MiB, "512MiB"),
        ("memory", 1536 * MiB, "1.5GiB"),
        ("memory", 100, "100B"),
        ("net", 1_250_000_000, "10Gbps"),
        ("net", GiB, "1GiB/s"),
        ("disk_io", 500 * MiB, "500MiB/s"),
        ("gpu", 2, "2"),
    ],
)
def test_render_is_human(resource: str, amount: int, text: str) -> None:
    assert render_quantity(resource, amount) == text


# ------------------------------------------------------------------ resource names


@pytest.mark.parametrize(
    "name",
    [
        "cpu",
        "memory",
        "gpu",
        "vram",
        "disk",
        "net",
        "disk_io",
        "licenses",
        "gpu_slots",
        "a",
        "a" * 32,
        "x9",
    ],
)
def test_good_resource_names(name: str) -> None:
    assert check_resource_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "CPU",
        "Cpu",
        "1cpu",
        "_cpu",
        "a" * 33,
        "gpu-slots",
        "gpu slots",
        "gpu.slots",
        "cpu\n",
        "\ncpu",
        "cpü",
        5,
        None,
        b"cpu",
    ],
)
def test_bad_resource_names(name: Any) -> None:
    with pytest.raises(InvalidError, match="resource name"):
        check_resource_name(name)


def test_units() -> None:
    assert unit_of("cpu") is Unit.MILLICORES
    for name in ("memory", "vram", "disk"):
        assert unit_of(name) is Unit.BYTES
    for name in ("net", "disk_io"):
        assert unit_of(name) is Unit.BANDWIDTH
    for name in ("gpu", "licenses", "ports"):
        assert unit_of(name) is Unit.COUNT
