"""``resctl top`` without a daemon: the pure rendering, sorting and filtering of a
``TopSnapshot``, and the command driven by a fake client (``--json``, pushed
samples, ``resd away``, Ctrl-C)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from resctl import top as top_cli
from resctl.main import app
from resctl.render import make_console
from resctl.top import (
    SORTS,
    filter_snapshot,
    render_top,
    reserved_text,
    reserved_vram,
    sort_rows,
)
from resd_client import Disconnected, Reconnected
from resd_client.errors import InvalidError
from resd_client.protocol import DeviceUse, StateEvent, TopEvent, TopRow, TopSnapshot, to_wire

GIB = 1024**3
AT = 1_800_000_100.0


def row(rid: str, tenant: str, pool: str = "host", **fields: Any) -> TopRow:
    values: dict[str, Any] = {"state": "active", "label": "", "priority": 5, "resources": {}}
    values.update(fields)
    return TopRow(id=rid, tenant=tenant, pool=pool, **values)


TRAIN = row(
    "r-00000000000a",
    "alice",
    resources={"cpu": 4000, "memory": 8 * GIB, "vram": 20 * GIB},
    members={"gpu": ["0"]},
    pids=[11],
    cpu_percent=153.2,
    rss=3 * GIB,
    gpu_memory={"0": 30 * GIB},
    gpu_utilization={"0": 97},
    marks={"overuse": "30 GiB on gpu 0 where 20 GiB reserved"},
    enforcement="watch",
    created_at=AT - 100,
)
IDLE = row(
    "r-00000000000b",
    "bob",
    resources={"gpu": 2},
    members={"gpu": ["1", "2"]},
    gpu_utilization={"1": 0, "2": 0},
    marks={"idle": "no use for 1h"},
    enforcement="mig",
    idle_for=3700,
    created_at=AT - 10_000,
)
CPU = row(
    "r-00000000000c",
    "carol",
    pool="cpus",
    resources={"cpu": 500, "licenses": 2},
    cpu_percent=400.0,
    rss=GIB // 2,
    created_at=AT - 5,
)


def device(member: str, used: int, **fields: Any) -> DeviceUse:
    return DeviceUse(
        member=member, uuid=f"GPU-{member}", memory_total=80 * GIB, memory_used=used, **fields
    )


SNAPSHOT = TopSnapshot(
    at=AT,
    interval=2.0,
    rows=[CPU, IDLE, TRAIN],
    devices={
        "host": [
            device("0", 32 * GIB, foreign=2 * GIB, overuse=10 * GIB, utilization=97),
            device("1", 0, foreign=0, utilization=0),
            device("2", 0, foreign=0, utilization=0),
        ]
    },
)


def plain_text(snapshot: TopSnapshot = SNAPSHOT, sort: str = "gpu", **kwargs: Any) -> str:
    stream = io.StringIO()
    make_console(stream, plain=True).print(render_top(snapshot, sort, plain=True, **kwargs))
    return stream.getvalue()


# ------------------------------------------------------------------ sorting


@pytest.mark.parametrize(
    ("sort", "order"),
    [
        ("id", ["a", "b", "c"]),
        ("tenant", ["a", "b", "c"]),
        ("pool", ["c", "a", "b"]),  # cpus < host, then by id
        ("cpu", ["c", "a", "b"]),
        ("rss", ["a", "c", "b"]),
        ("gpu", ["a", "b", "c"]),  # 30 GiB used; then nothing used: by utilization, id
        ("vram", ["b", "a", "c"]),  # two whole 80 GiB GPUs > a 20 GiB slice > none
        ("age", ["b", "a", "c"]),  # oldest first
        ("idle", ["b", "a", "c"]),
    ],
)
def test_sort_rows(sort: str, order: list[str]) -> None:
    assert [r.id[-1] for r in sort_rows(SNAPSHOT, sort)] == order


def test_every_sort_column_is_tested() -> None:
    assert set(SORTS) == {"id", "tenant", "pool", "cpu", "rss", "gpu", "vram", "age", "idle"}


def test_gpu_ties_are_broken_by_utilization() -> None:
    busy = row("r-00000000000d", "dan", gpu_utilization={"3": 50})
    snapshot = TopSnapshot(at=AT, interval=2.0, rows=[IDLE, busy])
    assert [r.id for r in sort_rows(snapshot)] == [busy.id, IDLE.id]


def test_an_unknown_sort_column_says_which_are_allowed() -> None:
    with pytest.raises(InvalidError, match="--sort: 'mem' is not supported; use one of id, "):
        sort_rows(SNAPSHOT, "mem")


def test_reserved_vram_is_the_slice_or_the_whole_gpus() -> None:
    assert reserved_vram(TRAIN, SNAPSHOT.devices) == 20 * GIB
    assert reserved_vram(IDLE, SNAPSHOT.devices) == 160 * GIB
    assert reserved_vram(CPU, SNAPSHOT.devices) == 0
    assert reserved_vram(IDLE, {}) == 0  # no sample of its pool


# ---------------------------------------------------------------- filtering


def test_filter_by_pool_keeps_its_rows_and_devices() -> None:
    shown = filter_snapshot(SNAPSHOT, "cpus", None)
    assert [r.id for r in shown.rows] == [CPU.id] and shown.devices == {}
    shown = filter_snapshot(SNAPSHOT, "host", None)
    assert {r.id for r in shown.rows} == {TRAIN.id, IDLE.id}
    assert list(shown.devices) == ["host"]


def test_filter_by_tenant_keeps_every_device() -> None:
    shown = filter_snapshot(SNAPSHOT, None, "bob")
    assert [r.id for r in shown.rows] == [IDLE.id] and shown.devices == SNAPSHOT.devices
    assert filter_snapshot(SNAPSHOT, "cpus", "bob").rows == []
    assert filter_snapshot(SNAPSHOT, None, None) == SNAPSHOT


# ---------------------------------------------------------------- rendering


def test_reserved_text_is_compact() -> None:
    assert reserved_text(TRAIN) == "cpu=4 mem=8G vram=20G@0"
    assert reserved_text(IDLE) == "gpu=1,2"
    assert reserved_text(CPU) == "cpu=500m licenses=2"
    assert reserved_text(row("r-00000000000e", "e", resources={"gpu": 1})) == "gpu=1"
    assert reserved_text(row("r-00000000000e", "e")) == "-"


def test_render_top_plain() -> None:
    text = plain_text()
    lines = text.splitlines()
    assert lines[0].startswith("resd top  ")
    assert "sampled every 2s  3 leases  sorted by gpu" in lines[0]
    assert "Ctrl-C" not in lines[0]
    assert lines[1] == "pool host gpu 0: 32G/80G used, foreign 2G, overuse 10G, util 97%"
    assert lines[2] == "pool host gpu 1: 0/80G used, util 0%"
    header = lines[5].split()
    assert header == [
        "ID",
        "TENANT",
        "POOL",
        "RESERVED",
        "CPU%",
        "RSS",
        "GPU",
        "MEM",
        "GPU",
        "UTIL",
        "MARKS",
        "ENFORCE",
        "AGE",
        "IDLE",
    ]
    rows = {line.split()[0]: line for line in lines[6:] if line.startswith("r-")}
    assert list(rows) == [TRAIN.id, IDLE.id, CPU.id]
    train = rows[TRAIN.id].split()
    assert train[:3] == ["r-00000000000a", "alice", "host"]
    assert train[6:] == ["153", "3G", "0:30G", "0:97%", "OVERUSE", "watch", "1m40s", "-"]
    assert rows[CPU.id].split()[-8:] == ["400", "512M", "-", "-", "-", "none", "5s", "-"]
    assert "\x1b" not in text


def test_render_top_marks_and_ages_of_the_idle_lease() -> None:
    line = next(x for x in plain_text().splitlines() if x.startswith(IDLE.id))
    assert line.split()[-4:] == ["IDLE", "mig", "2h46m", "1h01m"]
    assert "1:0% 2:0%" in line and "gpu=1,2" in line


def test_render_top_says_resd_is_away_and_why_gpus_are_not_sampled() -> None:
    snapshot = TopSnapshot(at=AT, interval=5.0, gpu_sampling="no NVIDIA driver")
    lines = plain_text(snapshot, away="resd closed the connection", live=True).splitlines()
    assert "(Ctrl-C quits)" in lines[0] and "0 leases" in lines[0]
    assert (
        lines[1] == "resd away (resd closed the connection); reconnecting, showing the last sample"
    )
    assert lines[2] == "GPUs not sampled: no NVIDIA driver"
    assert lines[-1] == "no active reservations"


def test_render_top_in_colour_marks_overuse_red() -> None:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, color_system="standard", width=200)
    console.print(render_top(SNAPSHOT, "gpu", plain=False))
    text = stream.getvalue()
    assert "\x1b[31mOVERUSE" in text and "\x1b[33mIDLE" in text
    assert "\x1b[33m, foreign 2G" in text and "\x1b[31m, overuse 10G" in text


# ------------------------------------------------------------------ the command


class FakeClient:
    """What ``top`` needs of a client: ``top()``, ``subscribe()``, ``events()``."""

    def __init__(self, events: list[Any], *, interrupt: bool = False) -> None:
        self._events = events
        self.interrupt = interrupt
        self.subscribed: list[list[str]] = []
        self.session = type("S", (), {"closed": "resd closed the connection; gave up"})()

    def top(self) -> TopSnapshot:
        return SNAPSHOT

    def subscribe(self, topics: list[str]) -> None:
        self.subscribed.append(list(topics))

    def events(self) -> Iterator[Any]:
        yield from self._events
        if self.interrupt:
            raise KeyboardInterrupt


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeClient]]:
    clients: list[FakeClient] = []

    @contextlib.contextmanager
    def connect(socket: str | None) -> Iterator[FakeClient]:
        yield clients[0]

    monkeypatch.setattr(top_cli, "connect", connect)
    yield clients


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["top", *args], env={"NO_COLOR": None})
    return result.exit_code, result.stdout, result.stderr


def test_json_prints_one_snapshot_and_exits(fake: list[FakeClient]) -> None:
    fake.append(FakeClient([]))
    code, stdout, _ = invoke("--json")
    assert code == 0
    assert json.loads(stdout) == to_wire(SNAPSHOT)
    assert fake[0].subscribed == [], "one snapshot needs no subscription"


def test_json_is_filtered(fake: list[FakeClient]) -> None:
    fake.append(FakeClient([]))
    code, stdout, _ = invoke("--json", "--pool", "host", "--tenant", "bob")
    assert code == 0
    data = json.loads(stdout)
    assert [r["id"] for r in data["rows"]] == [IDLE.id] and list(data["devices"]) == ["host"]
    assert data["rows"][0]["marks"] == {"idle": "no use for 1h"}


def test_follows_pushed_samples_and_says_when_resd_is_away(fake: list[FakeClient]) -> None:
    later = TopSnapshot(at=AT + 2, interval=2.0, rows=[CPU])
    events = [
        StateEvent(pools=[], active=0, at=AT),  # not ours: no frame
        TopEvent(snapshot=later),
        Disconnected("resd closed the connection"),
        Reconnected(1),
    ]
    fake.append(FakeClient(events))
    code, stdout, stderr = invoke("--sort", "cpu")
    assert fake[0].subscribed == [["top"]]
    frames = stdout.split("resd top  ")[1:]
    assert len(frames) == 4  # the first sample, the pushed one, away, back
    assert "3 leases" in frames[0] and "1 lease  sorted by cpu" in frames[1]
    assert "resd away (resd closed the connection)" in frames[2]
    assert "resd away" not in frames[3] and CPU.id in frames[3]
    assert code == 12 and "top stopped" in stderr


def test_ctrl_c_exits_0(fake: list[FakeClient]) -> None:
    fake.append(FakeClient([TopEvent(snapshot=SNAPSHOT)], interrupt=True))
    code, stdout, stderr = invoke()
    assert code == 0, stderr
    assert stdout.count("resd top  ") == 2


def test_live_display_on_a_terminal(
    fake: list[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("resctl.session.is_plain", lambda stream: False)
    fake.append(FakeClient([TopEvent(snapshot=SNAPSHOT)], interrupt=True))
    code, stdout, stderr = invoke("--tenant", "alice")
    assert code == 0, stderr
    assert TRAIN.id in stdout and IDLE.id not in stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sort", "memory"], "--sort: 'memory' is not supported; use one of id, tenant, pool,"),
        (["--sort", ""], "--sort: '' is not supported"),
        (["--pool", "no/slash"], "pool name 'no/slash' is not valid"),
        (["--tenant", "bad name"], "tenant name 'bad name' is not valid"),
    ],
)
def test_bad_flags_exit_2_before_connecting(
    argv: list[str], message: str, fake: list[FakeClient]
) -> None:
    code, stdout, stderr = invoke(*argv)  # no client: connecting would fail the test
    assert code == 2, stderr
    assert stderr.startswith("resctl: invalid: ") and message in stderr
    assert stdout == ""
