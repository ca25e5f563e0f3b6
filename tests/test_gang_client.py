"""The client's side of gang requests (issue 12): ``reserve_gang`` and
``try_reserve_gang`` on the sync, trio and asyncio clients.

First without a daemon: the arguments (a part as a dict in ``reserve``'s
quantities, or a ``Part``; what goes in a part and what applies to the whole
gang), the ``reserve`` flow sending one request with ``parts`` (``_core`` fed bytes
by hand, as in ``test_reconnect_core``), and the environment of a gang's lease.
Then the three clients against a real daemon: a gang across two pools is one lease,
released whole, waits whole, and a part that does not fit leaves nothing held.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from resd_client import (
    Client,
    GangPart,
    InsufficientError,
    InvalidError,
    Part,
    TimeoutError_,
)
from resd_client import _core as core
from resd_client._async import AsyncClient, LeaseRequest
from resd_client.asyncio import Client as AsyncioClient
from resd_client.env import lease_env
from resd_client.protocol import (
    MAX_PARTS,
    Empty,
    GrantedEvent,
    MemberSpec,
    PoolCreate,
    ReservationInfo,
    ResourceSpec,
    encode_frame,
    push,
)
from resd_client.trio import Client as TrioClient
from tests.conftest import Proc
from tests.test_reconnect_core import RID, FakeHost, info, perform_reply, sent, step

GANG: list[GangPart] = [{"pool": "a", "gpu": 2}, {"pool": "b", "cpu": 4, "memory": "8G"}]


# ------------------------------------------------------------------ arguments


def test_parts_take_the_quantities_of_reserve_and_options_apply_to_the_gang() -> None:
    args = core.gang_args(GANG, wait=True, ttl=60, label="train", timeout=30, reclaimable=True)
    assert args.parts == [
        Part(pool="a", resources={"gpu": 2}),
        Part(pool="b", resources={"cpu": 4000, "memory": 8 << 30}),
    ]
    plain = core.reserve_args("b", wait=False, cpu=4, memory="8G")
    assert args.parts[1].resources == plain.resources  # one converter for both
    assert (args.pool, args.resources, args.members, args.selector) == (None, {}, {}, {})
    assert (args.ttl, args.label, args.wait, args.timeout) == (60, "train", True, 30)
    assert args.reclaimable and args.binding == "session"
    assert core.gang_args(GANG, wait=False, pid=42).binding == "pid"


def test_a_part_may_name_members_constraints_and_contiguous_values() -> None:
    args = core.gang_args(
        [
            {"pool": "a", "members": {"gpu": [0, "3"]}, "constraints": {"model": "H100"}},
            {"pool": "b", "resources": {"ports": 4}, "contiguous": ["ports"], "vram": "20G"},
            Part(pool="c", resources={"cpu": 500}),
        ],
        wait=False,
    )
    first, second, third = args.parts
    assert first.members == {"gpu": ["0", "3"]} and first.constraints == {"model": "H100"}
    assert second.resources == {"ports": 4, "vram": 20 << 30}
    assert second.contiguous == ["ports"]
    assert third == Part(pool="c", resources={"cpu": 500})  # a Part is taken as it is


def test_what_goes_in_a_part_and_what_in_the_gang_is_all_of_reserve() -> None:
    assert core.GANG_OPTIONS.isdisjoint(core.PART_OPTIONS)
    assert core.GANG_OPTIONS | core.PART_OPTIONS | {"selector"} == set(
        core.ReserveOptions.__annotations__
    )


@pytest.mark.parametrize("count", [0, 1, MAX_PARTS + 1])
def test_a_gang_has_two_to_sixteen_parts(count: int) -> None:
    parts: list[GangPart] = [{"pool": "a", "cpu": 1}] * count
    with pytest.raises(InvalidError, match=f"2 to {MAX_PARTS} parts, got {count}"):
        core.gang_args(parts, wait=False)
    assert len(core.gang_args([{"pool": "a", "cpu": 1}] * MAX_PARTS, wait=False).parts) == 16


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([{"pool": "a", "gpu": 1}, {"cpu": 1}], r"parts\[1\]: pool: each part names the pool"),
        ([{"pool": "a", "gpu": 1}, {"pool": "", "cpu": 1}], r"parts\[1\]: pool"),
        ([{"pool": "a", "gpu": 1}, {"pool": "b", "cpu": "lots"}], r"parts\[1\]: cpu: 'lots'"),
        ([{"pool": "a", "gpu": -1}, {"pool": "b", "cpu": 1}], r"parts\[0\]: gpu: -1 is negative"),
        ([{"pool": "a"}, {"pool": "b", "cpu": 1}], r"parts\[0\]: resources: ask for at least"),
        (
            [{"pool": "a", "gpu": 1, "vram": "2G"}, {"pool": "b", "cpu": 1}],
            r"parts\[0\]: .*not both",
        ),
        ([{"pool": "A b", "gpu": 1}, {"pool": "b", "cpu": 1}], r"parts\[0\]: pool name 'A b'"),
        ([{"pool": "a", "gpu": 1}, Part(pool="b")], r"parts\[1\]: resources"),
    ],
)
def test_a_bad_part_is_refused_naming_it(parts: list[Any], match: str) -> None:
    with pytest.raises(InvalidError, match=match) as caught:
        core.gang_args(parts, wait=False)
    assert "part" in caught.value.details


@pytest.mark.parametrize(
    ("parts", "options", "match"),
    [
        (
            [{"pool": "a", "gpu": 1, "ttl": 5}, {"pool": "b", "cpu": 1}],
            {},
            "ttl applies to the whole gang",
        ),
        (
            [{"pool": "a", "gpus": 1}, {"pool": "b", "cpu": 1}],
            {},
            r"parts\[0\]: unexpected key\(s\): gpus$",
        ),
        (GANG, {"gpu": 1}, "give gpu in each part"),
        (GANG, {"selector": {"zone": "a"}}, "a gang has no selector"),
        (GANG, {"colour": "red"}, "unexpected reserve_gang argument"),
        ([{"pool": "a", "gpu": 1}, "b"], {}, r"parts\[1\]: give a dict"),
        ({"pool": "a", "gpu": 1}, {}, "give a list of parts"),
        ("a,b", {}, "give a list of parts"),
    ],
)
def test_misplaced_or_unknown_keywords_are_type_errors(
    parts: Any, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        core.gang_args(parts, wait=False, **options)


def test_every_client_mirrors_reserve_for_gangs() -> None:
    for cls in (Client, AsyncClient, TrioClient, AsyncioClient):
        for plain, gang in (("reserve", "reserve_gang"), ("try_reserve", "try_reserve_gang")):
            assert hasattr(cls, gang), (cls, gang)
            want = inspect.signature(getattr(cls, plain)).parameters
            got = inspect.signature(getattr(cls, gang)).parameters
            assert list(got)[1] == "parts" and list(want)[1] == "pool"
            assert list(got)[2:] == list(want)[2:]  # wait, on_reclaim, **options
    for cls in (AsyncClient,):
        assert not inspect.iscoroutinefunction(cls.reserve_gang)  # a LeaseRequest
        assert inspect.iscoroutinefunction(cls.try_reserve_gang)


# ------------------------------------------------------------------ the flow


def gang_info(rid: str = RID, state: str = "active") -> ReservationInfo:
    """A gang's lease as the daemon shows it: pool a's GPUs 2 and 3 (indices 2, 3)
    and pool b's cpu and GPU 0 (index 4), the parts' amounts together."""
    a = info(
        rid,
        state,
        pool="a",
        resources={"gpu": 2},
        members={"gpu": ["2", "3"]},
        devices=[{"name": "2", "index": "2"}, {"name": "3", "index": "3"}],
    )
    b = info(
        f"{rid}.1",
        state,
        pool="b",
        resources={"cpu": 4000, "gpu": 1},
        members={"gpu": ["b0"]},
        devices=[{"name": "b0", "index": "4", "uuid": "GPU-4"}],
    )
    return info(
        rid,
        state,
        pool="a,b",
        resources={"gpu": 3, "cpu": 4000},
        members={"gpu": ["2", "3", "b0"]},
        devices=[*a.devices, *b.devices],
        parts=[a, b],
    )


def test_reserve_sends_one_request_with_the_parts_and_gets_one_lease() -> None:
    host = FakeHost()
    args = core.gang_args(GANG, wait=False, ttl=60)
    runner = core.Runner(core.reserve(host, args))
    frame = sent(host, runner.next())
    assert frame["op"] == "reserve"
    wire = frame["args"]
    assert [p["pool"] for p in wire["parts"]] == ["a", "b"]
    assert wire["parts"][1]["resources"] == {"cpu": 4000, "memory": 8 << 30}
    assert wire.get("pool") is None and not wire.get("resources") and wire["ttl"] == 60
    assert wire["token"]  # re-attachable as any lease
    host.reply(frame["id"], gang_info())
    assert perform_reply(runner, step(runner)) is None
    lease = runner.result
    assert lease.id == RID and host.session.lease(RID) is lease
    assert lease.info.pool == "a,b" and [p.id for p in lease.info.parts] == [RID, f"{RID}.1"]
    assert lease.assigned == {"gpu": ["2", "3", "b0"]}


def test_the_lease_env_covers_every_gpu_of_the_gang() -> None:
    lease = core.LeaseState(gang_info(), threading.Event())
    env = lease.env
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3,4"
    assert env["RESD_GPUS"] == "2,3,b0"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["RESD_CPU"] == "4" and env["RESD_POOL"] == "a,b"
    assert env["RESD_RESERVATION_ID"] == RID
    assert lease.environment("uuid")["CUDA_VISIBLE_DEVICES"] == "2,3,GPU-4"
    assert lease_env(gang_info()) == env


def test_a_waiting_gang_is_granted_as_one_lease() -> None:
    host = FakeHost()
    seen: list[ReservationInfo] = []
    runner = core.Runner(
        core.reserve(host, core.gang_args(GANG, wait=True), on_pending=seen.append)
    )
    frame = sent(host, runner.next())
    assert frame["args"]["wait"] is True
    host.reply(frame["id"], gang_info(state="pending"))
    need = perform_reply(runner, step(runner))
    assert isinstance(need, core.Await) and seen[0].state == "pending"
    host.session.receive(encode_frame(push(GrantedEvent(reservation=gang_info()))))
    assert need.flag.is_set()
    assert step(runner, True) is None
    assert runner.result.info.parts[1].pool == "b" and not runner.result.pending


def test_try_reserve_gets_none_when_a_part_does_not_fit() -> None:
    host = FakeHost()
    runner = core.Runner(core.try_reserve(core.reserve(host, core.gang_args(GANG, wait=False))))
    frame = sent(host, runner.next())
    host.refuse(frame["id"], InsufficientError("parts[1]: pool 'b' cannot fit the request"))
    assert perform_reply(runner, step(runner)) is None
    assert runner.result is None and host.session.leases() == []


def test_releasing_the_lease_releases_the_gang_by_its_id() -> None:
    host = FakeHost()
    lease = host.session.track(core.LeaseState(gang_info(), threading.Event()))
    runner = core.Runner(core.release_lease(host, lease))
    frame = sent(host, runner.next())
    assert (frame["op"], frame["args"]) == ("release", {"id": RID})


# ---------------------------------------------------------- the three clients

WHOLE: list[GangPart] = [{"pool": "a", "gpu": 2}, {"pool": "b", "cpu": 4}]


def gpu_pool(name: str, first: int, count: int = 4) -> PoolCreate:
    members = [
        MemberSpec(name=str(i), labels={"index": str(i)}) for i in range(first, first + count)
    ]
    return PoolCreate(
        name=name,
        resources={"gpu": ResourceSpec(kind="set", members=members)},
        max_per_tenant=0,
    )


@pytest.fixture
def admin(resd_proc: Proc) -> Iterator[Client]:
    """An admin client of a daemon with pool ``a`` (GPUs 0-3) and ``b`` (8 cpu and
    GPUs 4-7)."""
    with Client(resd_proc.socket) as client:
        client.call("pool.create", gpu_pool("a", 0))
        b = gpu_pool("b", 4)
        b.resources["cpu"] = ResourceSpec(capacity=8000)
        client.call("pool.create", b)
        yield client


def allocated(client: Client) -> dict[str, dict[str, int]]:
    pools = client.call("pool.list", Empty()).pools
    return {p.name: {r.name: r.allocated for r in p.resources if r.allocated} for p in pools}


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_sync_gang_is_one_lease_released_whole(resd_proc: Proc, admin: Client) -> None:
    with Client(resd_proc.socket) as client:
        with client.reserve_gang(
            [{"pool": "a", "gpu": 2}, {"pool": "b", "cpu": 4, "gpu": 1}],
            ttl=300,
            label="train",
        ) as lease:
            assert lease.info.pool == "a,b" and lease.info.label == "train"
            assert lease.info.resources == {"gpu": 3, "cpu": 4000}
            assert [p.pool for p in lease.info.parts] == ["a", "b"]
            assert lease.env["CUDA_VISIBLE_DEVICES"] == "0,1,4"
            assert [r.id for r in admin.list()] == [lease.id]  # one lease, not two
            assert allocated(admin) == {"a": {"gpu": 2}, "b": {"cpu": 4000, "gpu": 1}}
        assert lease.ended == "released"
        assert admin.list() == [] and allocated(admin) == {"a": {}, "b": {}}


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_sync_gang_is_all_or_nothing(resd_proc: Proc, admin: Client) -> None:
    admin.reserve("b", cpu=6, binding="detached")
    with Client(resd_proc.socket) as client:
        with pytest.raises(InsufficientError, match=r"parts\[1\]: pool 'b'"):
            client.reserve_gang(WHOLE, wait=False)
        assert client.try_reserve_gang(WHOLE) is None
        assert allocated(admin)["a"] == {}  # no GPU was taken
        assert len(admin.list()) == 1


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_sync_gang_waits_whole_until_granted(resd_proc: Proc, admin: Client) -> None:
    holder = admin.reserve("b", cpu=6, binding="detached")
    errors: list[BaseException] = []

    def release_when_queued() -> None:
        try:
            deadline = time.monotonic() + 5
            while not admin.list(pending=True) and time.monotonic() < deadline:
                time.sleep(0.02)
            admin.release(holder.id)
        except BaseException as exc:
            errors.append(exc)

    with Client(resd_proc.socket, timeout=2) as client:
        helper = threading.Thread(target=release_when_queued)
        helper.start()
        try:
            lease = client.reserve_gang(WHOLE, timeout=5)
        finally:
            helper.join()
        assert errors == []
        assert lease.info.state == "active" and len(lease.info.parts) == 2
        lease.release()
        assert admin.list() == []


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_sync_gang_wait_times_out_whole(resd_proc: Proc, admin: Client) -> None:
    admin.reserve("b", cpu=6, binding="detached")
    with Client(resd_proc.socket, timeout=2) as client:
        with pytest.raises(TimeoutError_, match="gave up after waiting") as caught:
            client.reserve_gang(WHOLE, timeout=0.3)
        assert r"parts[1]" in caught.value.message
        assert admin.list(pending=True) == [] and allocated(admin)["a"] == {}


@pytest.mark.slow
@pytest.mark.timeout(30)
async def test_trio_gang_as_a_context_manager(resd_proc: Proc, admin: Client) -> None:
    async with TrioClient(resd_proc.socket) as client:
        request = client.reserve_gang(WHOLE)
        assert isinstance(request, LeaseRequest)
        async with request as lease:
            assert lease.info.pool == "a,b"
            assert lease.env["CUDA_VISIBLE_DEVICES"] == "0,1"
            assert [r.id for r in await client.list()] == [lease.id]
        assert await client.list() == []
        assert (
            await client.try_reserve_gang([{"pool": "a", "gpu": 5}, {"pool": "b", "cpu": 1}])
            is None
        )
        with pytest.raises(InvalidError, match=r"parts\[1\]"):
            client.reserve_gang([{"pool": "a", "gpu": 1}, {"pool": "b"}])
    assert admin.list() == []


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_asyncio_gang_awaited_and_tried(resd_proc: Proc, admin: Client) -> None:
    async def scenario() -> tuple[str, list[str]]:
        async with AsyncioClient(resd_proc.socket) as client:
            lease = await client.reserve_gang(WHOLE, label="x")
            listed = [r.pool for r in await client.list()]
            again = await client.try_reserve_gang(WHOLE)
            assert again is not None and again.id != lease.id
            await again.release()
            await lease.release()
            return lease.info.pool, listed

    assert asyncio.run(scenario()) == ("a,b", ["a,b"])
    assert admin.list() == []
