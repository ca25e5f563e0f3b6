"""Prometheus metrics (SPEC §8): the HTTP endpoint scraped over real HTTP and parsed
with prometheus-client's parser, the ``metrics`` op, the hooks that count events, and
``metrics_listen`` validation."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from resd import config
from resd.config import Config, ConfigError, metrics_address
from resd.metrics import Metrics, eviction_cause, http_reply
from resd.pools import PoolBook
from resd_client import __version__
from resd_client.protocol import DeviceUse, PoolCreate, from_wire
from tests.conftest import DAEMON_ARGS, InProcess, Proc, resctl
from tests.wire import WireClient

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition text: (name, labels) → value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str) -> tuple[int, str, str]:
    """GET ``url`` with urllib (in a worker thread): status, content type, body."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


async def http(inproc: InProcess, path: str = "/metrics") -> tuple[int, str, str]:
    address = inproc.daemon.metrics_address
    assert address is not None
    return await trio.to_thread.run_sync(scrape, f"http://{address[0]}:{address[1]}{path}")


async def setup(c: WireClient, grace: float = 0.0) -> None:
    await c.ok(
        "pool.create",
        {
            "name": "p",
            "resources": {"cpu": {"capacity": 8000}, "slots": {"capacity": 4}},
            "grace": grace,
        },
    )
    await c.ok("tenant.add", {"name": "low", "priority": 3})
    await c.ok("tenant.add", {"name": "high", "priority": 8})


async def via_op(c: WireClient) -> Samples:
    return parse((await c.ok("metrics"))["text"])


@pytest.mark.timeout(30)
async def test_the_endpoint_serves_what_status_says(inproc: InProcess) -> None:
    await inproc.restart(metrics_listen="127.0.0.1:0", fsync="always")
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    r = await c.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"cpu": 6000}})
    status, kind, body = await http(inproc)
    assert status == 200 and kind == CONTENT_TYPE_LATEST
    s = parse(body)
    shown = {row["name"]: row for row in (await c.ok("pool.show", {"name": "p"}))["resources"]}
    for resource in ("cpu", "slots"):
        row = shown[resource]
        labels = {"pool": "p", "resource": resource, "unit": row["unit"]}
        assert value(s, "resd_resource_capacity", **labels) == row["capacity"]
        assert value(s, "resd_resource_effective", **labels) == row["effective"]
        assert value(s, "resd_resource_allocated", **labels) == row["allocated"]
        assert value(s, "resd_resource_available", **labels) == row["available"]
    assert shown["cpu"]["allocated"] == 6000
    assert value(s, "resd_reservations", pool="p", state="active") == 1
    assert value(s, "resd_reservations", pool="p", state="waiting") == 0
    assert value(s, "resd_queue_length") == 0
    assert value(s, "resd_request_seconds_count", op="reserve") == 1
    assert value(s, "resd_request_seconds_count", op="pool.create") == 1
    assert value(s, "resd_journal_fsync_seconds_count") >= 1
    assert value(s, "resd_journal_fsync_entries_sum") >= 3  # pool, two tenants, a lease
    assert value(s, "resd_build_info", version=__version__) == 1

    await c.ok("preempt", {"tenant": "high", "target": "low"})
    refused = await c.request("reserve", {"pool": "p", "tenant": "low", "resources": {"x": 1}})
    assert not refused["ok"]
    s = parse((await http(inproc))[2])
    assert value(s, "resd_preemptions_total", pool="p", cause="priority") == 1
    assert value(s, "resd_reclaims_total", pool="p", cause="quota") == 0
    assert value(s, "resd_reservations_ended_total", pool="p", state="preempted") == 1
    cpu = {"pool": "p", "resource": "cpu", "unit": shown["cpu"]["unit"]}
    assert value(s, "resd_resource_allocated", **cpu) == 0
    assert value(s, "resd_resource_available", **cpu) == 8000
    assert value(s, "resd_reservations", pool="p", state="active") == 0
    code = refused["error"]["code"]
    assert value(s, "resd_request_errors_total", op="reserve", code=code) == 1
    assert r["id"] not in body

    # the metrics op gives the same families
    through_socket = await via_op(c)
    assert {name for name, _ in s} <= {name for name, _ in through_socket}
    assert value(through_socket, "resd_resource_available", **cpu) == 8000


@pytest.mark.timeout(30)
async def test_only_get_metrics_is_served(inproc: InProcess) -> None:
    await inproc.restart(metrics_listen="127.0.0.1:0")
    status, _, body = await http(inproc, "/")
    assert status == 404 and "/metrics" in body
    status, _, _ = await http(inproc, "/metrics?name[]=x")
    assert status == 200
    address = inproc.daemon.metrics_address
    assert address is not None
    reply = b""
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(b"garbage\r\n\r\n")
        while chunk := await stream.receive_some():
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_a_taken_port_is_a_clear_startup_error(inproc: InProcess, short_tmp: Path) -> None:
    from resd.daemon import Daemon, StartupError
    from tests.conftest import make_config

    await inproc.restart(metrics_listen="127.0.0.1:0")
    address = inproc.daemon.metrics_address
    assert address is not None
    other = make_config(short_tmp / "b", metrics_listen=f"{address[0]}:{address[1]}")
    with pytest.raises(StartupError, match="metrics_listen: cannot listen on"):
        await Daemon(other, handle_signals=False).run()  # refused before it serves


async def test_no_endpoint_by_default(inproc: InProcess) -> None:
    assert inproc.daemon.metrics_address is None
    c = await WireClient.connect(inproc.socket)
    s = await via_op(c)
    assert value(s, "resd_queue_length") == 0


async def test_waits_expiries_and_the_queue_are_counted(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    holder = await c.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"cpu": 8000}})
    w = await WireClient.connect(inproc.socket)
    queued = await w.ok(
        "reserve", {"pool": "p", "tenant": "high", "resources": {"cpu": 4000}, "wait": True}
    )
    assert queued["state"] == "pending"
    s = await via_op(c)
    assert value(s, "resd_queue_length") == 1
    assert value(s, "resd_reservations", pool="p", state="waiting") == 1
    await trio.sleep(5.0)
    await c.ok("release", {"id": holder["id"]})
    assert (await w.push())["event"] == "granted"
    s = await via_op(c)
    assert value(s, "resd_queue_length") == 0
    assert value(s, "resd_wait_seconds_count", pool="p") == 1
    assert 5.0 <= value(s, "resd_wait_seconds_sum", pool="p") < 5.5
    assert value(s, "resd_wait_seconds_bucket", pool="p", le="10.0") == 1
    assert value(s, "resd_wait_seconds_bucket", pool="p", le="1.0") == 0
    assert value(s, "resd_reservations_ended_total", pool="p", state="released") == 1

    await c.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"slots": 1}, "ttl": 10.0})
    await trio.sleep(11.0)
    s = await via_op(c)
    assert value(s, "resd_expiries_total", pool="p") == 1
    assert value(s, "resd_reservations_ended_total", pool="p", state="expired") == 1


async def test_a_graceful_preemption_is_counted_once(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c, grace=30.0)
    await c.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"cpu": 6000}})
    await c.ok("preempt", {"tenant": "high", "target": "low"})
    s = await via_op(c)
    assert value(s, "resd_reservations", pool="p", state="terminating") == 1
    assert value(s, "resd_preemptions_total", pool="p", cause="priority") == 1
    await trio.sleep(31.0)
    s = await via_op(c)
    assert value(s, "resd_preemptions_total", pool="p", cause="priority") == 1
    assert value(s, "resd_reservations_ended_total", pool="p", state="preempted") == 1
    assert value(s, "resd_reservations", pool="p", state="terminating") == 0


def test_gpu_figures_come_from_the_last_sample() -> None:
    book = PoolBook()
    args = from_wire(PoolCreate, {"name": "g", "resources": {"cpu": {"capacity": 1000}}})
    book.apply(book.create_pool(args, 0.0))
    book.live_devices["g"] = [
        DeviceUse(
            member="0",
            uuid="GPU-a",
            memory_total=80 << 30,
            memory_used=30 << 30,
            foreign=2 << 30,
            overuse=1 << 30,
        )
    ]
    metrics = Metrics("9.9")
    metrics.watch(lambda: book)
    s = parse(metrics.text().decode())
    gpu = {"pool": "g", "gpu": "0", "uuid": "GPU-a"}
    assert value(s, "resd_gpu_foreign_bytes", **gpu) == 2 << 30
    assert value(s, "resd_gpu_overuse_bytes", **gpu) == 1 << 30
    assert value(s, "resd_gpu_memory_used_bytes", **gpu) == 30 << 30
    assert value(s, "resd_gpu_memory_total_bytes", **gpu) == 80 << 30
    assert value(s, "resd_build_info", version="9.9") == 1


def test_hooks_count_into_the_right_families() -> None:
    metrics = Metrics()
    metrics.evicted("p", "quota: reclaiming for tenant 'a' (within its min)")
    metrics.evicted("p", "idle: 600s")
    metrics.evicted("p", "preempted by overuse: terminate")
    metrics.evicted("p", "preempted by high")
    metrics.journal_synced(0.002, 5)
    metrics.journal_synced(0.001, 0)  # a directory fsync only: no batch
    metrics.request("status", 0.01, None)
    metrics.request("reserve", 0.01, "insufficient")
    s = parse(metrics.text().decode())
    assert value(s, "resd_reclaims_total", pool="p", cause="quota") == 1
    assert value(s, "resd_reclaims_total", pool="p", cause="idle") == 1
    assert value(s, "resd_preemptions_total", pool="p", cause="overuse") == 1
    assert value(s, "resd_preemptions_total", pool="p", cause="priority") == 1
    assert value(s, "resd_journal_fsync_seconds_count") == 2
    assert value(s, "resd_journal_fsync_entries_count") == 1
    assert value(s, "resd_journal_fsync_entries_sum") == 5
    assert value(s, "resd_request_errors_total", op="reserve", code="insufficient") == 1
    assert eviction_cause("high") == "priority"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"HEAD /metrics HTTP/1.0\r\n\r\n", b"200"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
        (b"GET /metrics\r\n\r\n", b"400"),
        (b"\xff\xfe\r\n\r\n", b"400"),
    ],
)
def test_http_replies(head: bytes, status: bytes) -> None:
    reply = http_reply(Metrics(), head)
    assert reply.split(b" ", 2)[1] == status
    if head.startswith(b"HEAD"):
        assert reply.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("", None),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_metrics_listen_accepted(text: str, address: Any) -> None:
    assert metrics_address(Config(metrics_listen=text)) == address


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("9464", "no valid host"),
        (":9464", "no valid host"),
        ("::1:9464", "no valid host"),
        ("[]:9464", "no valid host"),
        ("a b:9464", "no valid host"),
        ("127.0.0.1:", "no valid port"),
        ("127.0.0.1:65536", "no valid port"),
        ("127.0.0.1:http", "no valid port"),
        ("127.0.0.1:-1", "no valid port"),
    ],
)
def test_metrics_listen_refused(text: str, why: str, tmp_path: Path) -> None:
    file = tmp_path / "resd.toml"
    file.write_text(f"metrics_listen = {text!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=f"metrics_listen: .*{why}.*HOST:PORT"):
        config.load(file, env={})


def test_metrics_listen_from_the_environment(tmp_path: Path) -> None:
    file = tmp_path / "resd.toml"
    file.write_text("")
    cfg = config.load(file, env={"RESD_METRICS_LISTEN": "127.0.0.1:9464"})
    assert metrics_address(cfg) == ("127.0.0.1", 9464)
    with pytest.raises(ConfigError, match="metrics_listen"):
        config.load(file, env={"RESD_METRICS_LISTEN": "9464"})


@pytest.mark.slow
def test_a_real_daemon_serves_what_resctl_metrics_and_status_say(short_tmp: Path) -> None:
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=DAEMON_ARGS,
        log=short_tmp / "resd.log",
        env={"RESD_METRICS_LISTEN": "127.0.0.1:0"},
    ).start()
    try:
        address = next(
            json.loads(line)["address"]
            for line in proc.log_text().splitlines()
            if '"metrics_listening"' in line
        )
        resctl(proc, "pool", "create", "--name", "p", "--cpu", "4")
        resctl(proc, "reserve", "--pool", "p", "--cpu", "1.5", "--json")
        status = json.loads(resctl(proc, "status", "--json").stdout)
        code, _, body = scrape(f"http://{address}/metrics")
        assert code == 200
        served = parse(body)
        for row in status["pools"][0]["resources"]:
            labels = {"pool": "p", "resource": row["name"], "unit": row["unit"]}
            for field in ("capacity", "effective", "allocated", "available"):
                assert value(served, f"resd_resource_{field}", **labels) == row[field], field
        assert value(served, "resd_reservations", pool="p", state="active") == status["active"]
        printed = parse(resctl(proc, "metrics").stdout)
        cpu = next(row for row in status["pools"][0]["resources"] if row["name"] == "cpu")
        labels = {"pool": "p", "resource": "cpu", "unit": cpu["unit"]}
        assert value(printed, "resd_resource_allocated", **labels) == cpu["allocated"] > 0
        target = short_tmp / "resd.prom"
        assert resctl(proc, "metrics", "--output", str(target)).stdout == ""
        assert parse(target.read_text()).keys() >= {
            k for k in printed if k[0].startswith("resd_resource")
        }
        assert oct(target.stat().st_mode & 0o777) == "0o644"
    finally:
        assert proc.stop() == 0
