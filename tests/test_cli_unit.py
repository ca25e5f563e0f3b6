"""resctl without a daemon: flag validation, exit codes, rendering, parsers, export."""

from __future__ import annotations

import contextlib
import io
import json
import os
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from resctl.export import CSV_FIELDS, history_csv, history_json
from resctl.main import app
from resctl.options import (
    parse_deadline,
    parse_duration,
    parse_labels,
    parse_ratios,
    parse_resources,
    parse_since,
)
from resctl.pools import gpu_policy, parse_idle_after
from resctl.render import (
    GREEN,
    RED,
    YELLOW,
    bar_colour,
    compact_bytes,
    duration,
    exact_duration,
    host_resources_view,
    insufficient_lines,
    is_plain,
    make_console,
    mark_counts,
    marks_text,
    pool_detail,
    pools_table,
    quota_line,
    quotas_summary,
    reservation_line,
    reservations_table,
    status_view,
    tenant_detail,
    tenants_table,
    usage_bar,
    utilization_table,
    wait_lines,
)
from resctl.reservations import wait_fields
from resctl.run import Supervisor
from resctl.tenants import parse_quota_side, quota_fields
from resctl.watch import Throttle
from resd_client.errors import (
    ForbiddenError,
    InvalidError,
    QuotaExceededError,
)
from resd_client.protocol import (
    Allocation,
    DeviceUse,
    GpuStatus,
    HistoryEvent,
    HostResources,
    PlanResult,
    PoolInfo,
    QuotaInfo,
    ReservationInfo,
    ReservationList,
    ResourceUsage,
    TenantInfo,
    TenantSet,
    WaitInfo,
)

GIB = 1024**3
NOW = 1_800_000_000.0


@pytest.fixture
def missing_socket(tmp_path: Path) -> str:
    return str(tmp_path / "no-daemon" / "resd.sock")


def invoke(*args: str, socket: str | None = None) -> tuple[int, str, str]:
    argv = [*args, "--socket", socket] if socket else list(args)
    result = CliRunner().invoke(app, argv, env={"NO_COLOR": None, "RESD_SOCKET": None})
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------ flag validation

BAD_FLAGS = [
    (["tenant", "add", "--name", "t", "--priority", "0"], "priority 0 is out of range"),
    (["tenant", "add", "--name", "t", "--priority", "11"], "priority 11 is out of range"),
    (["tenant", "set", "--name", "t", "--priority", "11"], "priority 11 is out of range"),
    (["tenant", "set", "--name", "t"], "nothing to change"),
    (["tenant", "add", "--name", "bad name"], "tenant name 'bad name' is not valid"),
    (["reserve", "--cpu", "0"], "cpu: must be greater than zero"),
    (["reserve", "--cpu", "-2"], "cpu"),
    (["reserve", "--memory", "lots"], "memory: 'lots' is not a quantity"),
    (["reserve", "--gpu", "1.5"], "finer than the smallest unit"),
    (["reserve"], "ask for at least one resource"),
    (["reserve", "--cpu", "1", "--ttl", "0"], "ttl 0 is not valid"),
    (["reserve", "--cpu", "1", "--ttl", "-5"], "ttl -5 is not valid"),
    (["reserve", "--cpu", "1", "--ttl", "soon"], "ttl: 'soon' is not a duration"),
    (["reserve", "--res", "vram"], "--res: 'vram' is not of the form NAME=QTY"),
    (["reserve", "--res", "=3"], "is not of the form NAME=QTY"),
    (["reserve", "--res", "Bad=3"], "resource name 'Bad' is not valid"),
    (["reserve", "--cpu", "1", "--res", "cpu=2"], "resource cpu is given twice"),
    (["renew", "--id", "r-00ff00ff", "--ttl", "0"], "ttl 0 is not valid"),
    (["unreserve", "--id", "nope"], "reservation id 'nope' is not valid"),
    (["release", "--id", "nope"], "reservation id 'nope' is not valid"),
    (["pool", "create", "--name", "p", "--cpu", "4", "--oversub", "gpu=2"], "no such resource"),
    (["pool", "create", "--name", "p", "--cpu", "4", "--oversub", "cpu=0"], "ratio for cpu"),
    (["pool", "create", "--name", "p", "--cpu", "4", "--oversub", "cpu=x"], "not a number"),
    (["pool", "create", "--name", "p", "--preemption", "always"], "'always' is not allowed"),
    (["pool", "create", "--name", "p", "--placement", "random"], "'random' is not allowed"),
    (["pool", "create", "--name", "p", "--max-per-tenant", "-1"], "max_per_tenant"),
    (["pool", "create", "--name", "p", "--label", "novalue"], "--label"),
    (["pool", "set", "--name", "p"], "nothing to change"),
    (["export", "--format", "xml"], "use one of json, csv"),
    (["export", "--since", "last tuesday"], "--since: 'last tuesday' is not a time"),
    (["watch", "--interval", "-1"], "interval must be 0 or more"),
    (["list", "--pool", "no/slash"], "pool name 'no/slash' is not valid"),
    (["list", "--pending", "--idle"], "pending and idle cannot be combined"),
    (["pool", "create", "--name", "p", "--overuse", "kill"], "--overuse: 'kill' is not supported"),
    (["pool", "set", "--name", "p", "--overuse", "Warn"], "use one of warn, terminate"),
    (["pool", "set", "--name", "p", "--preemption", "x"], "use one of off, lower_priority"),
    (["pool", "set", "--name", "p", "--placement", "x"], "use one of binpack, spread, least_used"),
    (["pool", "create", "--name", "p", "--idle-after", "soon"], "--idle-after: 'soon' is not a"),
    (["pool", "set", "--name", "p", "--idle-after", "-1"], "--idle-after: '-1' is out of range"),
    (["pool", "set", "--name", "p", "--idle-after", "31d"], "up to 30d"),
    (["pool", "set", "--name", "p", "--idle-after", "inf"], "--idle-after: must be a finite"),
    (["top", "--sort", "memory"], "--sort: 'memory' is not supported; use one of id, tenant"),
    (["top", "--pool", "no/slash"], "pool name 'no/slash' is not valid"),
    (["tenant", "set", "--name", "t", "--min", "gpu=2"], "give --pool POOL too"),
    (["tenant", "set", "--name", "t", "--clear-max"], "give --pool POOL too"),
    (["tenant", "set", "--name", "t", "--pool", "p"], "give --min, --max, --clear-min or"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", "gpu"], "NAME=QTY[,NAME=QTY...]"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", "gpu=2,"], "'' is not of the form"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", "=2"], "e.g. cpu=8,gpu=2"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", ""], "or --clear-min to clear"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--max", "gpu=2x"], "--max gpu: unknown unit"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--max", "cpu=8G"], "use cores like 4"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", "memory=lots"], "size like 512M"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", "gpu=-1"], "gpu: -1 is negative"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", "gpu=1.5"], "smallest unit"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", "Gpu=1"], "'Gpu' is not valid"),
    (["tenant", "set", "--name", "t", "--pool", "p", "--min", "gpu=1,gpu=2"], "given twice"),
    (
        ["tenant", "set", "--name", "t", "--pool", "p", "--min", "gpu=1", "--clear-min"],
        "give --min or --clear-min, not both",
    ),
    (
        ["tenant", "set", "--name", "t", "--pool", "p", "--min", "cpu=8", "--max", "cpu=500m"],
        "--min cpu=8 is above --max cpu=500m",
    ),
    (["tenant", "set", "--name", "t", "--pool", "no/slash", "--max", "gpu=1"], "pool name"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS)
def test_bad_flags_exit_2_before_connecting(
    argv: list[str], message: str, missing_socket: str
) -> None:
    code, stdout, stderr = invoke(*argv, socket=missing_socket)
    assert code == 2, stderr
    assert message in stderr
    assert stderr.startswith("resctl: invalid: ")
    assert "unavailable" not in stderr
    assert stdout == ""


def test_bad_flag_with_json_prints_error_map(missing_socket: str) -> None:
    code, stdout, stderr = invoke(
        "tenant", "add", "--name", "t", "--priority", "11", "--json", socket=missing_socket
    )
    assert code == 2
    error = json.loads(stdout)["error"]
    assert error["code"] == "invalid"
    assert error["details"]["field"] == "priority"
    assert "priority 11" in stderr


def test_wrong_flag_type_is_a_usage_error(missing_socket: str) -> None:
    code, _, stderr = invoke("tenant", "add", "--name", "t", "--priority", "high")
    assert code == 2
    assert "priority" in stderr


# ------------------------------------------------------------ no daemon


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["status"],
        ["pool", "list"],
        ["tenant", "list"],
        ["reserve", "--tenant", "t1", "--pool", "pool1", "--cpu", "4", "--memory", "8192"],
        ["pool", "create", "--name", "pool1", "--cpu", "32", "--memory", "65536", "--gpu", "8"],
        ["export", "--format", "csv"],
        ["watch"],
        ["top"],
        ["list", "--idle"],
        ["pool", "set", "--name", "p", "--overuse", "terminate", "--idle-after", "off"],
        ["pool", "set", "--name", "p", "--no-adopt-foreign"],
        ["pool", "create", "--name", "p", "--gpu", "1", "--adopt-foreign", "--idle-after", "2h"],
    ],
)
def test_no_daemon_is_unavailable_exit_12(argv: list[str], missing_socket: str) -> None:
    code, stdout, stderr = invoke(*argv, socket=missing_socket)
    assert code == 12
    assert stderr.startswith("resctl: unavailable: no resd daemon is listening")
    assert missing_socket in stderr
    assert stdout == ""


def test_no_daemon_json_error(missing_socket: str) -> None:
    code, stdout, _ = invoke("status", "--json", socket=missing_socket)
    assert code == 12
    assert json.loads(stdout)["error"]["code"] == "unavailable"


def test_version_without_daemon_exits_0(missing_socket: str) -> None:
    code, stdout, _ = invoke("version", socket=missing_socket)
    assert code == 0
    assert stdout.startswith("resctl ")
    assert "not reachable" in stdout
    code, stdout, _ = invoke("version", "--json", socket=missing_socket)
    data = json.loads(stdout)
    assert code == 0
    assert data["daemon"] is None
    assert data["error"]["code"] == "unavailable"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["pool"],
        ["tenant"],
        *[[c, "--help"] for c in ("reserve", "unreserve", "release", "renew", "preempt")],
        *[[c, "--help"] for c in ("list", "status", "export", "watch", "version", "resources")],
        ["top", "--help"],
        *[["pool", c, "--help"] for c in ("create", "list", "show", "set", "delete")],
        *[["tenant", c, "--help"] for c in ("add", "list", "show", "set", "remove")],
    ],
)
def test_help(argv: list[str]) -> None:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code in (0, 2)  # bare groups show help with usage exit code
    assert "Usage" in result.output


# ------------------------------------------------------------ bars and colour


def usage(allocated: int, effective: int) -> ResourceUsage:
    return ResourceUsage(
        name="cpu",
        unit="millicores",
        capacity=effective,
        ratio=1.0,
        effective=effective,
        allocated=allocated,
        available=effective - allocated,
    )


@pytest.mark.parametrize(
    ("allocated", "effective", "colour"),
    [
        (0, 100, GREEN),
        (59, 100, GREEN),
        (599, 1000, GREEN),
        (60, 100, YELLOW),
        (89, 100, YELLOW),
        (90, 100, RED),
        (100, 100, RED),
        (120, 100, RED),  # over-allocated after a capacity cut
        (0, 0, RED),  # no capacity at all: exhausted
    ],
)
def test_bar_colour_thresholds(allocated: int, effective: int, colour: str) -> None:
    assert bar_colour(allocated, effective, effective - allocated) == colour


def test_exhausted_is_red_whatever_the_percentage() -> None:
    assert bar_colour(10, 100, 0) == RED


def test_plain_bar_is_ascii() -> None:
    assert usage_bar(usage(50, 100), plain=True, width=10).plain == "[#####.....]  50%"
    assert usage_bar(usage(150, 100), plain=True, width=4).plain == "[####] 150%"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def sample_pool() -> PoolInfo:
    return PoolInfo(
        name="pool1",
        resources=[
            ResourceUsage(
                name="memory",
                unit="bytes",
                capacity=64 * GIB,
                ratio=1.0,
                effective=64 * GIB,
                allocated=60 * GIB,
                available=4 * GIB,
            ),
            usage(4000, 32000),
        ],
        max_per_tenant=1,
        preemption="off",
        placement="binpack",
        grace=0.0,
        labels={},
        created_at=NOW,
        active=2,
    )


def test_plain_console_has_no_ansi_even_on_a_tty() -> None:
    stream = FakeTTY()
    make_console(stream, plain=True).print(utilization_table([sample_pool()], plain=True))
    text = stream.getvalue()
    assert "\x1b" not in text
    assert "█" not in text and "─" not in text
    assert "pool1  cpu" in text
    assert "60GiB" in text and "4GiB" in text


def test_colour_console_on_a_tty_has_colours() -> None:
    stream = FakeTTY()
    console = make_console(stream, plain=False)
    console.print(utilization_table([sample_pool()], plain=False))
    assert "\x1b[" in stream.getvalue()


def test_is_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert not is_plain(FakeTTY())
    assert is_plain(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert is_plain(FakeTTY())
    monkeypatch.setenv("NO_COLOR", "")
    assert not is_plain(FakeTTY())


def test_socket_before_the_command(tmp_path: Path) -> None:
    before, after, env = (str(tmp_path / name / "resd.sock") for name in ("a", "b", "env"))

    def tried(argv: list[str], resd_socket: str | None = None) -> str:
        result = CliRunner().invoke(app, argv, env={"NO_COLOR": None, "RESD_SOCKET": resd_socket})
        assert result.exit_code == 12, result.output
        return result.stderr

    assert before in tried(["--socket", before, "list"])
    assert before in tried(["--socket", before, "pool", "list"])  # through a sub-app too
    assert before in tried(["--socket", before, "why", "r-0123456789ab"])
    assert after in tried(["--socket", before, "list", "--socket", after])  # the command's wins
    assert env in tried(["list"], resd_socket=env)
    assert before in tried(["--socket", before, "list"], resd_socket=env)
    assert env in tried(["list"], resd_socket=env)  # forgotten after the invocation


def test_shell_completion_is_offered() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_cli_output_when_piped_has_no_ansi(missing_socket: str) -> None:
    result = CliRunner().invoke(app, ["version", "--socket", missing_socket])
    assert "\x1b" not in result.stdout


def test_reservations_table_human_units() -> None:
    info = ReservationInfo(
        id="r-0123456789ab",
        tenant="t1",
        pool="pool1",
        resources={"memory": 8 * GIB, "cpu": 1500},
        label="",
        created_at=NOW,
        ttl=300.0,
        expires_at=NOW + 299.5,
        binding="detached",
        reclaimable=False,
        state="active",
        uid=1000,
    )
    stream = io.StringIO()
    make_console(stream, plain=True).print(reservations_table([info], NOW, plain=True))
    row = stream.getvalue().splitlines()[1].split()
    assert row == [
        "r-0123456789ab",
        "t1",
        "pool1",
        "cpu=1.5,memory=8GiB",
        "-",
        "detached",
        "active",
        "5m00s",
    ]


def _lease(ttl: float, left: float) -> ReservationInfo:
    return ReservationInfo(
        id="r-0123456789ab",
        tenant="t1",
        pool="pool1",
        resources={"cpu": 1000},
        label="",
        created_at=NOW,
        ttl=ttl,
        expires_at=NOW + left,
        binding="detached",
        reclaimable=False,
        state="active",
        uid=1000,
    )


@pytest.mark.parametrize(
    ("ttl", "left", "shown"),
    [
        (0.25, 0.248, "ttl=250ms"),  # just granted: the ttl as given, not a rounded 1s
        (1.5, 1.49, "ttl=1.5s"),
        (0.001, 0.0005, "ttl=1ms"),
        (300.0, 299.99, "ttl=5m00s"),
        (90.5, 90.4, "ttl=90.5s"),
        (300.0, 100.2, "ttl=1m41s"),  # granted a while ago: time left, rounded up
        (2.0, 0.5, "ttl=1s"),
    ],
)
def test_reservation_line_shows_ttl_as_given(ttl: float, left: float, shown: str) -> None:
    assert reservation_line(_lease(ttl, left), NOW).split()[-1] == shown


def test_exact_duration() -> None:
    assert [exact_duration(s) for s in (0.25, 0.5, 1.5, 2, 61, 0.0001, 12.75)] == [
        "250ms",
        "500ms",
        "1.5s",
        "2s",
        "1m01s",
        "0.0001s",
        "12.75s",
    ]


def test_insufficient_details_in_human_units() -> None:
    details = {
        "resources": {
            "memory": {"requested": 16 * GIB, "available": 4 * GIB, "shortfall": 12 * GIB},
            "cpu": {"requested": 8000, "available": 500, "shortfall": 7500},
        }
    }
    assert insufficient_lines(details) == [
        "  cpu: requested 8, available 500m, shortfall 7.5",
        "  memory: requested 16GiB, available 4GiB, shortfall 12GiB",
    ]
    assert insufficient_lines({"resources": "junk"}) == []


def test_duration() -> None:
    assert [duration(s) for s in (0, 59, 61, 3600, 3661, 90000)] == [
        "0s",
        "59s",
        "1m01s",
        "1h00m",
        "1h01m",
        "1d01h",
    ]


# ------------------------------------------------------------ parsers


def test_parse_since() -> None:
    assert parse_since("90s", NOW) == NOW - 90
    assert parse_since("10m", NOW) == NOW - 600
    assert parse_since("2h", NOW) == NOW - 7200
    assert parse_since("1d", NOW) == NOW - 86400
    assert parse_since("1h30m", NOW) == NOW - 5400
    assert parse_since("1700000000", NOW) == 1_700_000_000
    assert parse_since("1700000000.5", NOW) == 1_700_000_000.5
    iso = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_since("2026-01-31T12:00:00Z", NOW) == iso.timestamp()
    assert parse_since("2026-01-31T13:00:00+01:00", NOW) == iso.timestamp()
    naive = datetime(2026, 1, 31, 12, 0).astimezone().timestamp()
    assert parse_since("2026-01-31 12:00", NOW) == naive


@pytest.mark.parametrize("text", ["", "yesterday", "10 parsecs", "5x", "-1", "2h-", "h"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(InvalidError):
        parse_since(text, NOW)


def test_parse_since_rejects_the_future() -> None:
    with pytest.raises(InvalidError, match="future"):
        parse_since(str(NOW + 3600), NOW)


def test_parse_duration() -> None:
    assert parse_duration("300", "ttl") == 300
    assert parse_duration("1.5", "ttl") == 1.5
    assert parse_duration("5m", "ttl") == 300
    assert parse_duration("1h 30m", "ttl") == 5400
    assert parse_duration("250ms", "ttl") == 0.25
    assert parse_duration("-5", "ttl") == -5  # range is the protocol's to refuse
    for bad in ("nan", "inf", "5 minutes", "m5"):
        with pytest.raises(InvalidError):
            parse_duration(bad, "ttl")


def test_parse_resources() -> None:
    assert parse_resources(
        cpu="500m", memory="65536", gpu="8", res=["vram=20G", "licenses=3", "net = 10Gbps"]
    ) == {
        "cpu": 500,
        "memory": 64 * GIB,
        "gpu": 8,
        "vram": 20 * GIB,
        "licenses": 3,
        "net": 1_250_000_000,
    }
    assert parse_resources(memory="64G") == {"memory": 64 * GIB}
    assert parse_resources(res=["gpu=0"], allow_zero=True) == {"gpu": 0}
    with pytest.raises(InvalidError, match="greater than zero"):
        parse_resources(res=["gpu=0"])
    for bad in (["vram"], ["=1"], ["vram="], ["x-y=1"], ["cpu=1", "cpu=2"]):
        with pytest.raises(InvalidError):
            parse_resources(res=bad)


def test_parse_ratios_and_labels() -> None:
    assert parse_ratios(["cpu=4", "net=2.5"]) == {"cpu": 4.0, "net": 2.5}
    assert parse_ratios(None) == {}
    assert parse_labels(None) is None
    assert parse_labels(["zone=a", "rack=r1=x"]) == {"zone": "a", "rack": "r1=x"}
    with pytest.raises(InvalidError):
        parse_ratios(["cpu=inf"])


# ------------------------------------------------------------ export


EVENTS = [
    HistoryEvent(
        seq=1,
        at=1_700_000_000.25,
        kind="reserved",
        reservation="r-0123456789ab",
        tenant="t1",
        pool="pool1",
        resources={"memory": 8 * GIB, "cpu": 4000},
    ),
    HistoryEvent(
        seq=2,
        at=1_700_000_001.0,
        kind="denied",
        reservation="",
        tenant="t2",
        pool="pool1",
        resources={"gpu": 9},
        detail="pool 'pool1' cannot fit the request: gpu: requested 9, available 8",
    ),
]


def test_history_csv() -> None:
    lines = history_csv(EVENTS).splitlines()
    assert lines[0] == ",".join(CSV_FIELDS)
    assert lines[0] == "seq,at,kind,reservation,tenant,pool,resources,detail"
    assert (
        lines[1] == "1,1700000000.25,reserved,r-0123456789ab,t1,pool1,cpu=4000;memory=8589934592,"
    )
    assert lines[2] == (
        "2,1700000001.0,denied,,t2,pool1,gpu=9,\"pool 'pool1' cannot fit the request: gpu:"
        ' requested 9, available 8"'
    )
    assert history_csv([]) == "seq,at,kind,reservation,tenant,pool,resources,detail\n"


def test_history_json() -> None:
    data = json.loads(history_json(EVENTS))
    assert [e["seq"] for e in data] == [1, 2]
    assert data[0]["resources"] == {"memory": 8 * GIB, "cpu": 4000}
    assert set(data[1]) == set(CSV_FIELDS)


# ------------------------------------------------------------ watch coalescing


def test_throttle_coalesces_bursts() -> None:
    t = Throttle(interval=2.0)
    assert t.wait(0.0) is None  # nothing pending: block until a push
    t.drawn(10.0)
    t.changed()
    assert not t.due(10.5)
    assert t.wait(10.5) == 1.5
    t.changed()  # a burst collapses into one pending redraw
    assert t.due(12.0)
    t.drawn(12.0)
    assert not t.pending
    assert t.wait(12.1) is None
    t.changed()
    assert t.due(20.0)  # a lone change after a quiet spell is drawn at once


def test_throttle_zero_interval_draws_every_change() -> None:
    t = Throttle(interval=0.0)
    t.drawn(1.0)
    t.changed()
    assert t.due(1.0)


def test_wait_flags() -> None:
    now = 1_800_000_000.0
    assert parse_deadline("30m", now) == now + 1800
    assert parse_deadline("1800000600", now) == 1_800_000_600.0
    assert parse_deadline("2027-01-01T00:00:00+00:00", now) == 1798761600.0
    for bad in ("soon", "-5", "30x"):
        with pytest.raises(InvalidError, match="--deadline"):
            parse_deadline(bad, now)
    assert wait_fields(True, "5m", None) == {"wait": True, "timeout": 300.0, "deadline": None}
    with pytest.raises(InvalidError, match="only a waiting request"):
        wait_fields(False, "5", None)
    with pytest.raises(InvalidError, match="timeout"):
        wait_fields(True, "forever", None)


def test_wait_flags_are_refused_before_connecting(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    for argv in (
        ["reserve", "--cpu", "1", "--timeout", "5"],
        ["reserve", "--cpu", "1", "--wait", "--deadline", "someday"],
        ["reserve", "--cpu", "1", "--pid", "0"],
        ["plan", "--cpu", "1", "--priority", "11"],
        ["why", "--id", "nope"],
    ):
        result = CliRunner().invoke(app, [*argv, "--socket", sock])
        assert result.exit_code == 2, (argv, result.output)


@pytest.mark.parametrize("command", ["why", "release", "unreserve", "renew", "resize"])
def test_reservation_id_given_once(command: str, tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    both = CliRunner().invoke(app, [command, "r-0123456789ab", "--id", "r-0", "--socket", sock])
    assert both.exit_code == 2, both.output
    assert "not both" in both.stderr
    neither = CliRunner().invoke(app, [command, "--socket", sock])
    assert neither.exit_code == 2, neither.output
    assert "missing the reservation id" in neither.stderr
    more = ["--cpu", "1"] if command == "resize" else []
    for argv in ([command, "nope"], [command, "--id", "nope"]):  # checked before connecting
        result = CliRunner().invoke(app, [*argv, *more, "--socket", sock])
        assert result.exit_code == 2, (argv, result.output)
        assert "nope" in result.stderr


# ------------------------------------------------------------ GPU truth (SPEC §10)


def test_parse_idle_after() -> None:
    assert parse_idle_after(None) is None
    assert parse_idle_after("off") == parse_idle_after("OFF") == parse_idle_after("0") == 0.0
    assert parse_idle_after("90m") == 5400.0
    assert parse_idle_after("30d") == 30 * 86400.0
    for bad, message in (("31d", "out of range"), ("-1", "out of range"), ("never", "duration")):
        with pytest.raises(InvalidError, match=message):
            parse_idle_after(bad)


def test_gpu_policy_fields() -> None:
    assert gpu_policy(None, None, None) == {
        "overuse": None,
        "idle_after": None,
        "adopt_foreign": None,
    }
    assert gpu_policy("terminate", "2h", False) == {
        "overuse": "terminate",
        "idle_after": 7200.0,
        "adopt_foreign": False,
    }


def test_compact_bytes_and_marks() -> None:
    assert [compact_bytes(n) for n in (0, 512, 1536, 8 * GIB, GIB * 61 // 2, 117 << 20)] == [
        "0",
        "512",
        "1.5K",
        "8G",
        "30G",
        "117M",
    ]
    assert marks_text({"idle": "x", "overuse": "y"}, plain=True).plain == "OVERUSE,IDLE"
    assert marks_text({}, plain=True).plain == "-"
    assert mark_counts({"overuse": 1, "idle": 0}) == "1 overuse"
    assert mark_counts({}) == ""


def gpu_pool() -> PoolInfo:
    return msgspec.structs.replace(
        sample_pool(),
        overuse="terminate",
        idle_after=3600.0,
        adopt_foreign=True,
        devices=[
            DeviceUse(
                member="0",
                uuid="GPU-0",
                memory_total=80 * GIB,
                memory_used=32 * GIB,
                foreign=2 * GIB,
                overuse=10 * GIB,
                utilization=97,
            ),
            DeviceUse(member="1", uuid="GPU-1", memory_total=80 * GIB, memory_used=0, foreign=0),
        ],
        marks={"overuse": 1, "idle": 2},
    )


def plain(renderable: Any) -> str:
    stream = io.StringIO()
    make_console(stream, plain=True).print(renderable)
    return stream.getvalue()


def test_status_shows_each_sampled_gpu_and_the_marks() -> None:
    def view(pool: PoolInfo) -> str:
        return plain(
            status_view(
                server_version="1",
                boot_id="b",
                started_at=NOW,
                pools=[pool],
                tenants=1,
                active=2,
                connections=1,
                now=NOW,
                plain=True,
            )
        )

    lines = view(gpu_pool()).splitlines()
    assert "pool pool1 gpu 0: 32G/80G used, foreign 2G, overuse 10G, util 97%" in lines
    assert "pool pool1 gpu 1: 0/80G used" in lines
    assert "pool pool1 marks: 2 idle, 1 overuse" in lines
    assert "gpu 0" not in view(sample_pool()) and "marks" not in view(sample_pool())


def test_pool_show_and_list_show_the_gpu_policy() -> None:
    def fields(pool: PoolInfo) -> dict[str, str]:
        lines = plain(pool_detail(pool, plain=True)).splitlines()
        pairs = (line.partition(":  ") for line in lines if ":  " in line)
        return {key: value.strip() for key, _, value in pairs}

    shown = fields(gpu_pool())
    assert shown["overuse"] == "terminate" and shown["idle after"] == "1h00m"
    assert shown["foreign use"] == "adopt" and shown["marks"] == "2 idle, 1 overuse"
    detail = plain(pool_detail(gpu_pool(), plain=True))
    assert "pool pool1 gpu 0: 32G/80G used" in detail and "pool pool1 marks" not in detail
    calm = fields(sample_pool())
    assert (calm["overuse"], calm["idle after"], calm["foreign use"]) == ("warn", "off", "show")
    assert calm["marks"] == "-"
    header, row = plain(pools_table([gpu_pool(), sample_pool()], plain=True)).splitlines()[:2]
    assert header.split()[-4:] == ["OVERUSE", "IDLE", "AFTER", "FOREIGN"]
    assert row.split()[-3:] == ["terminate", "1h00m", "adopt"]
    last = plain(pools_table([sample_pool()], plain=True)).splitlines()[1]
    assert last.split()[-3:] == ["warn", "off", "show"]


def reservation(**fields: Any) -> ReservationInfo:
    values: dict[str, Any] = {
        "id": "r-0123456789ab",
        "tenant": "t1",
        "pool": "pool1",
        "resources": {"vram": 20 * GIB},
        "label": "",
        "created_at": NOW,
        "ttl": None,
        "expires_at": None,
        "binding": "session",
        "reclaimable": False,
        "state": "active",
        "uid": 1000,
    }
    values.update(fields)
    return ReservationInfo(**values)


def test_list_shows_a_marks_column_only_when_a_lease_is_marked() -> None:
    calm = reservation()
    assert "MARKS" not in plain(reservations_table([calm], NOW, plain=True))
    marked = reservation(id="r-0123456789ac", marks={"overuse": "30 GiB", "idle": "1h"})
    lines = plain(reservations_table([calm, marked], NOW, plain=True)).splitlines()
    assert lines[0].split()[-1] == "MARKS"
    assert lines[1].split()[-1] == "-" and lines[2].split()[-1] == "OVERUSE,IDLE"


def test_resources_shows_live_gpu_use_and_marks_only_when_sampled() -> None:
    gpu = GpuStatus(
        name="0",
        index="0",
        uuid="GPU-0",
        model="H100",
        numa="0",
        memory_bytes=80 * GIB,
        vram_allocated=20 * GIB,
        whole=False,
        holders=1,
    )
    alloc = Allocation(
        reservation_id="r-0123456789ab",
        name="train",
        tenant="t1",
        cpu=0,
        memory_bytes=0,
        disk_bytes=0,
        network_bps=0,
        disk_io_bps=0,
        gpus=["0"],
        vram_bytes=20 * GIB,
        other={},
    )
    quiet = HostResources(pool="host", resources={}, gpus=[gpu], allocations=[alloc])
    text = plain(host_resources_view(quiet, plain=True))
    assert "FOREIGN" not in text and "VRAM USED" not in text and "MARKS" not in text
    live = HostResources(
        pool="host",
        resources={},
        gpus=[
            msgspec.structs.replace(
                gpu, memory_used=32 * GIB, foreign_bytes=2 * GIB, utilization=97
            )
        ],
        allocations=[
            msgspec.structs.replace(alloc, vram_used_bytes=30 * GIB, marks={"overuse": "30 GiB"})
        ],
    )
    lines = plain(host_resources_view(live, plain=True)).splitlines()
    gpu_row = next(line.split() for line in lines if line.startswith("0 "))
    assert gpu_row[-3:] == ["32GiB", "2GiB", "97%"]
    alloc_row = next(line.split() for line in lines if line.startswith("r-"))
    assert alloc_row[-2:] == ["30GiB", "OVERUSE"]


class FakeListClient:
    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    def call(self, op: str, args: Any) -> Any:
        self.asked.append((op, args))
        return ReservationList(
            reservations=[reservation(enforcement="mps", marks={"idle": "1h"}, processes=[7])]
        )


def test_list_idle_asks_for_idle_leases_and_json_has_enforcement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = FakeListClient()
    monkeypatch.setattr(
        "resctl.reservations.connect", lambda socket: contextlib.nullcontext(client)
    )
    code, stdout, stderr = invoke("list", "--idle", "--json")
    assert code == 0, stderr
    ((op, args),) = client.asked
    assert op == "list" and args.idle and not args.pending
    (listed,) = json.loads(stdout)["reservations"]
    assert listed["enforcement"] == "mps"
    assert listed["marks"] == {"idle": "1h"} and listed["processes"] == [7]
    code, stdout, _ = invoke("list", "--idle")
    assert code == 0 and stdout.splitlines()[1].split()[-1] == "IDLE"


# ------------------------------------------------------------ run registers CMD


class FakeRunClient:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.registered: list[tuple[str, int, bool]] = []

    def register(self, reservation_id: str, pid: int, *, confine: bool = False) -> Any:
        self.registered.append((reservation_id, pid, confine))
        if self.error is not None:
            raise self.error
        return types.SimpleNamespace(enforcement="cgroup", cgroup="/sys/fs/cgroup/x")


def registered(error: Exception | None) -> tuple[list[str], Any]:
    """Run ``Supervisor._register`` (what the spawn helper's gate waits for) against a
    fake client; the warnings and the client."""
    client = FakeRunClient(error)
    warnings: list[str] = []
    lease: Any = types.SimpleNamespace(id="r-0123456789ab")
    fake: Any = client
    supervisor = Supervisor(fake, lease, ["true"], {}, kill_after=1.0, warn=warnings.append)
    try:
        supervisor._register(4242)
    finally:
        os.close(supervisor._wake_r)
        os.close(supervisor._wake_w)
    assert client.registered == [("r-0123456789ab", 4242, True)], "confined where resd can"
    return warnings, client


def test_run_registers_cmd_with_the_lease() -> None:
    warnings, _ = registered(None)
    assert warnings == []


def test_run_says_once_when_registering_fails() -> None:
    warnings, _ = registered(ForbiddenError("pid 4242 is not yours"))
    assert warnings == [
        "could not register CMD (pid 4242) with r-0123456789ab: forbidden: pid 4242 is not"
        " yours; it runs without cgroup limits and its GPU use may count as foreign"
    ]


def test_run_is_quiet_with_an_older_resd() -> None:
    old = InvalidError("unknown op 'register'; known ops: hello", {"field": "op"})
    assert registered(old)[0] == []


# ------------------------------------------------------------ quotas


def test_parse_quota_side_uses_the_reserve_units() -> None:
    assert parse_quota_side(None, "--min") is None
    assert parse_quota_side(["cpu=8,gpu=2"], "--min") == {"cpu": 8000, "gpu": 2}
    assert parse_quota_side(["cpu=500m", " memory = 64G ", "vram=20G,licenses=3"], "--max") == {
        "cpu": 500,
        "memory": 64 * GIB,
        "vram": 20 * GIB,
        "licenses": 3,
    }
    assert parse_quota_side(["memory=8192"], "--min") == {"memory": 8192 << 20}  # MiB, as reserve
    assert parse_quota_side(["gpu=0"], "--max") == {"gpu": 0}  # a max of 0 forbids it


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([""], "--min: empty; give NAME=QTY[,NAME=QTY...] (e.g. cpu=8,gpu=2), or --clear-min"),
        (["gpu"], "--min: 'gpu' is not of the form NAME=QTY[,NAME=QTY...] (e.g. cpu=8,gpu=2)"),
        (["gpu=2", "gpu=3"], "--min resource gpu is given twice"),
        (["gpu=2x"], "--min gpu: unknown unit in '2x'; use a whole number like 3"),
        (["vram=20Q"], "--min vram: unknown unit in '20Q'; use a number of MiB (8192) or a size"),
        (["net=10Qbps"], "bits per second like 10Gbps"),
    ],
)
def test_parse_quota_side_errors_say_what_is_allowed(items: list[str], message: str) -> None:
    with pytest.raises(InvalidError) as caught:
        parse_quota_side(items, "--min")
    assert message in caught.value.message
    assert caught.value.details["field"] == "min"


def test_quota_fields() -> None:
    def fields(**flags: Any) -> dict[str, object]:
        base: dict[str, Any] = {
            "pool": None,
            "min_": None,
            "max_": None,
            "clear_min": False,
            "clear_max": False,
        }
        return quota_fields(**{**base, **flags})

    assert fields() == {}
    assert fields(pool="p", min_=["gpu=4"]) == {"pool": "p", "min": {"gpu": 4}, "max": None}
    assert fields(pool="p", clear_min=True, max_=["gpu=6"]) == {
        "pool": "p",
        "min": {},
        "max": {"gpu": 6},
    }
    assert fields(pool="p", clear_min=True, clear_max=True) == {"pool": "p", "min": {}, "max": {}}
    assert fields(pool="p", min_=["gpu=6"], max_=["gpu=6"])["min"] == {"gpu": 6}  # equal is fine
    with pytest.raises(InvalidError, match="--min memory=2GiB is above --max memory=1GiB"):
        fields(pool="p", min_=["memory=2G"], max_=["memory=1G"])


class FakeTenantClient:
    def __init__(self, result: TenantInfo) -> None:
        self.result = result
        self.asked: list[tuple[str, Any]] = []

    def call(self, op: str, args: Any) -> Any:
        self.asked.append((op, args))
        return self.result


def quota_tenant(**fields: Any) -> TenantInfo:
    values: dict[str, Any] = {
        "name": "a",
        "priority": 5,
        "owners": [],
        "groups": [],
        "weight": 2.0,
        "created_at": NOW,
        "active": 2,
        "usage": 1234.5678,
        "share": 0.6667,
        "quotas": {
            "gp": QuotaInfo(min={"gpu": 4, "cpu": 8000}, max={"gpu": 8}, used={"gpu": 8}),
            "cpus": QuotaInfo(max={"cpu": 4000}, used={"cpu": 1500}),
        },
    }
    values.update(fields)
    return TenantInfo(**values)


def test_tenant_set_sends_the_quota_in_internal_units(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeTenantClient(quota_tenant())
    monkeypatch.setattr("resctl.tenants.connect", lambda socket: contextlib.nullcontext(client))
    code, stdout, stderr = invoke(
        "tenant", "set", "--name", "a", "--pool", "gp", "--min", "cpu=8,gpu=2", "--max", "gpu=6"
    )
    assert code == 0, stderr
    assert stdout.startswith("updated tenant a\n")
    code, _, stderr = invoke("tenant", "set", "--name", "a", "--pool", "gp", "--clear-min")
    assert code == 0, stderr
    code, _, stderr = invoke("tenant", "set", "--name", "a", "--weight", "2")
    assert code == 0, stderr
    sent = [args for _, args in client.asked]
    assert [op for op, _ in client.asked] == ["tenant.set"] * 3
    assert sent[0] == TenantSet(name="a", pool="gp", min={"cpu": 8000, "gpu": 2}, max={"gpu": 6})
    assert sent[1] == TenantSet(name="a", pool="gp", min={})  # the max side stays
    assert sent[2] == TenantSet(name="a", weight=2.0)  # no quota fields at all


def test_tenant_set_help_documents_the_quota_flags() -> None:
    result = CliRunner().invoke(app, ["tenant", "set", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--pool", "--min", "--max", "--clear-min", "--clear-max", "cpu=8,gpu=2"):
        assert flag in result.output


def test_tenant_show_prints_quotas_usage_and_share() -> None:
    text = plain(tenant_detail(quota_tenant(), plain=True))
    lines = [line.rstrip() for line in text.splitlines()]
    assert "usage:                1234.6 (decayed dominant-share seconds)" in lines
    assert "share:                66.7% of all tenants' usage" in lines
    assert "quotas:               2 pool(s)" in lines
    rows = [line.split() for line in lines[lines.index("") + 1 :]]
    assert rows[0] == ["POOL", "RESOURCE", "MIN", "MAX", "USED", "NOTE"]
    assert rows[1:] == [
        ["cpus", "cpu", "-", "4", "1.5", "BORROWING", "1.5"],  # only a max: all is borrowed
        ["gp", "cpu", "8", "-", "0", "-"],
        ["gp", "gpu", "4", "8", "8", "BORROWING", "4,", "AT", "MAX"],
    ]
    bare = plain(tenant_detail(quota_tenant(quotas={}), plain=True))
    assert "POOL" not in bare and "quotas:               -" in bare


def test_tenant_show_json_has_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeTenantClient(quota_tenant())
    monkeypatch.setattr("resctl.tenants.connect", lambda socket: contextlib.nullcontext(client))
    code, stdout, stderr = invoke("tenant", "show", "--name", "a", "--json")
    assert code == 0, stderr
    shown = json.loads(stdout)
    assert shown["usage"] == 1234.5678 and shown["share"] == 0.6667 and shown["weight"] == 2.0
    assert shown["quotas"]["gp"] == {
        "min": {"gpu": 4, "cpu": 8000},
        "max": {"gpu": 8},
        "used": {"gpu": 8},
    }


def test_tenant_list_has_weight_usage_share_and_quotas() -> None:
    calm = quota_tenant(name="b", priority=9, weight=1.0, usage=0.0, share=0.0, quotas={})
    within = quota_tenant(
        name="c", priority=1, quotas={"gp": QuotaInfo(min={"gpu": 4}, used={"gpu": 4})}
    )
    lines = plain(tenants_table([quota_tenant(), calm, within], plain=True)).splitlines()
    header = lines[0].split()
    assert header[:5] == ["NAME", "PRIORITY", "WEIGHT", "USAGE", "SHARE"]
    assert header[-2:] == ["QUOTAS", "CREATED"]
    b, a, c = (line.split() for line in lines[1:])
    assert b[:5] == ["b", "9", "1", "0.0", "0.0%"] and b[-3] == "-"
    assert a[:5] == ["a", "5", "2", "1234.6", "66.7%"]
    assert "cpus (borrowing),gp (borrowing)" in lines[2]
    assert c[-3] == "gp"  # within its min: not borrowing
    assert quotas_summary(calm) == "-"


def quota_pool() -> PoolInfo:
    return msgspec.structs.replace(
        sample_pool(),
        quotas={
            "b": QuotaInfo(min={"gpu": 4, "cpu": 8000}, max={"gpu": 6}, used={"gpu": 6}),
            "a": QuotaInfo(min={"gpu": 4}, used={"gpu": 8, "memory": GIB}),
        },
    )


def test_quota_line() -> None:
    pool = quota_pool()
    assert (
        quota_line("gp", "a", pool.quotas["a"], plain=True).plain
        == "pool gp quota a: gpu 8/min 4/max -  (borrowing gpu 4)"
    )
    assert (
        quota_line("gp", "b", pool.quotas["b"], plain=True).plain
        == "pool gp quota b: cpu 0/min 8/max -, gpu 6/min 4/max 6  (borrowing gpu 2)  (at max gpu)"
    )
    calm = QuotaInfo(min={"memory": 8 * GIB}, used={"memory": 2 * GIB})
    assert (
        quota_line("p", "c", calm, plain=True).plain == "pool p quota c: memory 2GiB/min 8GiB/max -"
    )
    coloured = quota_line("gp", "b", pool.quotas["b"], plain=False)
    assert {span.style for span in coloured.spans} == {YELLOW, RED}


def test_status_and_pool_show_print_quotas_only_when_the_pool_has_some() -> None:
    def view(pool: PoolInfo) -> str:
        return plain(
            status_view(
                server_version="1",
                boot_id="b",
                started_at=NOW,
                pools=[pool],
                tenants=2,
                active=3,
                connections=1,
                now=NOW,
                plain=True,
            )
        )

    lines = view(quota_pool()).splitlines()
    a = lines.index("pool pool1 quota a: gpu 8/min 4/max -  (borrowing gpu 4)")
    assert lines[a + 1].startswith("pool pool1 quota b: cpu 0/min 8/max -, gpu 6/min 4/max 6")
    assert lines[a - 1] == ""
    assert "quota" not in view(sample_pool())
    detail = plain(pool_detail(quota_pool(), plain=True)).splitlines()
    assert "pool pool1 quota a: gpu 8/min 4/max -  (borrowing gpu 4)" in detail
    assert "quota" not in plain(pool_detail(sample_pool(), plain=True))


def wait_info(reason: str, message: str, details: dict[str, Any]) -> WaitInfo:
    return WaitInfo(
        id="r-0123456789ab",
        state="pending",
        position=1,
        queued=2,
        reason=reason,
        message=message,
        details=details,
    )


def test_why_says_quota_and_reclaiming_readably() -> None:
    quota = wait_info(
        "quota",
        "tenant 'b' holds 4000 cpu in pool 'gp'; 2000 more would pass its max of 5000",
        {
            "pool": "gp",
            "tenant": "b",
            "resource": "cpu",
            "max": 5000,
            "held": 4000,
            "requested": 2000,
            "never": False,
        },
    )
    assert wait_lines(quota) == [
        "r-0123456789ab is waiting: position 1 of 2",
        "reason: quota (it would take its tenant past its max) — tenant 'b' holds 4000 cpu"
        " in pool 'gp'; 2000 more would pass its max of 5000",
        "  cpu in pool gp: tenant b holds 4, asks 2 more, its max is 5",
    ]
    never = msgspec.structs.replace(
        quota, details={**quota.details, "held": 0, "requested": 6000, "never": True}
    )
    assert wait_lines(never)[-1] == "  it asks more than the max by itself: it can never be granted"
    reclaiming = wait_info(
        "reclaiming",
        "reclaiming from borrowers: waiting for r-1, r-2 to give back what tenant 'b' is guaranteed",
        {"victims": ["r-1", "r-2"], "pool": "gp"},
    )
    assert wait_lines(reclaiming)[1:] == [
        "reason: reclaiming — reclaiming from borrowers: waiting for r-1, r-2 to give back"
        " what tenant 'b' is guaranteed",
        "  reclaiming from borrowers in pool gp: r-1, r-2",
        "  (leases of tenants above their min; each is released when its grace ends)",
    ]
    odd = wait_info("quota", "over", {"resource": "gpu"})  # details it cannot read: no lines
    assert wait_lines(odd) == [
        "r-0123456789ab is waiting: position 1 of 2",
        "reason: quota (it would take its tenant past its max) — over",
    ]


class FakePlanClient:
    def __init__(self, result: PlanResult) -> None:
        self.result = result

    def call(self, op: str, args: Any) -> Any:
        assert op == "plan"
        return self.result


def test_plan_shows_the_reclaim_and_its_victims(monkeypatch: pytest.MonkeyPatch) -> None:
    victim = reservation(id="r-00000000000a", tenant="a", resources={"gpu": 4}, priority=9)
    result = PlanResult(
        outcome="reclaim",
        pool="gp",
        message="would reclaim 1 reservation(s) from borrowers in pool 'gp' (r-00000000000a),"
        " after a grace of 10s: the tenant asks within its min",
        victims=[victim],
        grace=10.0,
    )
    monkeypatch.setattr(
        "resctl.waiting.connect", lambda socket: contextlib.nullcontext(FakePlanClient(result))
    )
    code, stdout, stderr = invoke("plan", "--tenant", "b", "--pool", "gp", "--gpu", "4")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("reclaim: would reclaim 1 reservation(s) from borrowers")
    assert lines[1] == (
        "to reclaim from borrowers (tenants above their min, whatever their priority):"
    )
    assert lines[3].split()[:4] == ["r-00000000000a", "a", "pool1", "gpu=4"]
    code, stdout, _ = invoke("plan", "--tenant", "b", "--pool", "gp", "--gpu", "4", "--json")
    shown = json.loads(stdout)
    assert shown["outcome"] == "reclaim" and shown["victims"][0]["id"] == "r-00000000000a"


def test_quota_exceeded_exits_7(monkeypatch: pytest.MonkeyPatch) -> None:
    class Refusing:
        def call(self, op: str, args: Any) -> Any:
            raise QuotaExceededError(
                "tenant 'b' holds 4 gpu in pool 'gp'; 4 more would pass its max of 6"
            )

    monkeypatch.setattr("resctl.waiting.connect", lambda socket: contextlib.nullcontext(Refusing()))
    code, _, stderr = invoke("plan", "--tenant", "b", "--pool", "gp", "--gpu", "4")
    assert code == 7
    assert stderr.startswith("resctl: quota_exceeded: tenant 'b' holds 4 gpu")
