"""Set and range resources: GPUs whole and sliced, NUMA, placement, ranges, selectors."""

from __future__ import annotations

from typing import Any

import pytest

from resd.pools import PoolBook
from resd.records import Denied, Reserved, Tenant
from resd_client.errors import InvalidError, NotFoundError
from resd_client.protocol import PoolCreate, Reserve, from_wire

GiB = 1 << 30
T = Tenant("t", 5)


def gpus(
    n: int = 8, vram: int = 80 * GiB, per_numa: int = 4, model: str = "H100"
) -> dict[str, Any]:
    return {
        "kind": "set",
        "members": [
            {
                "name": str(i),
                "capacity": vram,
                "labels": {
                    "index": str(i),
                    "uuid": f"GPU-{i}",
                    "model": model,
                    "numa": str(i // per_numa),
                },
            }
            for i in range(n)
        ],
    }


def book_with(**pools: dict[str, Any]) -> PoolBook:
    book = PoolBook()
    for name, spec in pools.items():
        book.apply(
            book.create_pool(
                from_wire(PoolCreate, {"name": name, "max_per_tenant": 0, **spec}), 0.0
            )
        )
    return book


class Reserver:
    def __init__(self, book: PoolBook) -> None:
        self.book = book
        self.n = 0

    def __call__(self, **args: Any) -> Any:
        self.n += 1
        events = self.book.reserve(
            from_wire(Reserve, args), T, uid=0, session="", now=1.0, rid=f"r-{self.n:06x}"
        )
        self.book.apply(events)
        (event,) = events
        return event.reservation if isinstance(event, Reserved) else event

    def release(self, rid: str) -> None:
        self.book.apply(self.book.release(rid, 2.0))


def test_whole_gpus_prefer_one_numa_node() -> None:
    book = book_with(p={"resources": {"gpu": gpus()}})
    take = Reserver(book)
    a = take(pool="p", resources={"gpu": 1})
    assert a.members == {"gpu": ("0",)}
    b = take(pool="p", resources={"gpu": 4})  # node 0 has 3 left: go to node 1 whole
    assert b.members == {"gpu": ("4", "5", "6", "7")}
    assert [d["uuid"] for d in b.devices] == ["GPU-4", "GPU-5", "GPU-6", "GPU-7"]
    c = take(pool="p", resources={"gpu": 3})
    assert c.members == {"gpu": ("1", "2", "3")}
    d = take(pool="p", resources={"gpu": 1})
    assert isinstance(d, Denied) and d.code == "insufficient"
    assert d.details["resources"]["gpu"] == {"requested": 1, "available": 0, "shortfall": 1}


def test_slices_and_whole_exclude_each_other() -> None:
    book = book_with(p={"resources": {"gpu": gpus(2)}})
    take = Reserver(book)
    s1 = take(pool="p", resources={"vram": 40 * GiB})
    s2 = take(pool="p", resources={"vram": 40 * GiB})
    assert s1.members == s2.members == {"gpu": ("0",)}  # binpack: the same device
    s3 = take(pool="p", resources={"vram": 40 * GiB})
    assert s3.members == {"gpu": ("1",)}
    whole = take(pool="p", resources={"gpu": 1})
    assert isinstance(whole, Denied)  # both devices have slices
    take.release(s1.id)
    take.release(s2.id)
    whole = take(pool="p", resources={"gpu": 1})
    assert whole.members == {"gpu": ("0",)}
    slice_ = take(pool="p", resources={"vram": 41 * GiB})  # 40 free on GPU 1, 0 has a whole holder
    assert isinstance(slice_, Denied)
    assert slice_.details["resources"]["vram"]["available"] == 40 * GiB
    info = book.pool_info(book.pools["p"])
    rows = {r.name: r for r in info.resources}
    assert rows["gpu"].allocated == 2 and rows["gpu"].available == 0
    assert rows["vram"].allocated == 120 * GiB and rows["vram"].capacity == 160 * GiB


def test_spread_goes_to_the_emptiest_device() -> None:
    book = book_with(p={"resources": {"gpu": gpus(3)}, "placement": "spread"})
    take = Reserver(book)
    placed = [take(pool="p", resources={"vram": 10 * GiB}).members["gpu"][0] for _ in range(3)]
    assert sorted(placed) == ["0", "1", "2"]
    least = book_with(p={"resources": {"gpu": gpus(2)}, "placement": "least_used"})
    take = Reserver(least)
    assert take(pool="p", resources={"vram": 70 * GiB}).members["gpu"] == ("0",)
    assert take(pool="p", resources={"vram": 5 * GiB}).members["gpu"] == ("1",)


def test_model_and_numa_constraints() -> None:
    spec = gpus(4, per_numa=2)
    spec["members"][3]["labels"]["model"] = "A5000"
    book = book_with(p={"resources": {"gpu": spec}})
    take = Reserver(book)
    r = take(pool="p", resources={"gpu": 1}, constraints={"model": "A5000"})
    assert r.members == {"gpu": ("3",)}
    r = take(pool="p", resources={"gpu": 1}, constraints={"numa": "1"})
    assert r.members == {"gpu": ("2",)}
    denied = take(pool="p", resources={"gpu": 1}, constraints={"model": "A5000"})
    assert isinstance(denied, Denied)
    r = take(pool="p", resources={"vram": GiB}, constraints={"model": "H100", "numa": "0"})
    assert r.members == {"gpu": ("0",)}


def test_named_members() -> None:
    disks = {"kind": "set", "members": [{"name": n} for n in ("nvme0", "nvme1", "sda")]}
    book = book_with(p={"resources": {"disks": disks}})
    take = Reserver(book)
    r = take(pool="p", members={"disks": ["sda"]})
    assert r.members == {"disks": ("sda",)} and r.resources == {"disks": 1}
    denied = take(pool="p", members={"disks": ["sda", "nvme0"]})
    assert isinstance(denied, Denied)
    r = take(pool="p", resources={"disks": 2})
    assert r.members == {"disks": ("nvme0", "nvme1")}
    with pytest.raises(InvalidError, match="no member"):
        take(pool="p", members={"disks": ["hdd9"]})
    with pytest.raises(InvalidError, match="asked for 2 but named 1"):
        take(pool="p", resources={"disks": 2}, members={"disks": ["sda"]})


def test_a_million_value_range() -> None:
    book = book_with(p={"resources": {"ports": {"kind": "range", "lo": 0, "hi": 999_999}}})
    take = Reserver(book)
    a = take(pool="p", resources={"ports": 500_000})
    assert a.values == {"ports": ((0, 499_999),)}
    b = take(pool="p", members={"ports": ["600000-600009", "700000"]})
    assert b.values == {"ports": ((600_000, 600_009), (700_000, 700_000))}
    assert b.resources == {"ports": 11}
    c = take(pool="p", resources={"ports": 200_000}, contiguous=["ports"])
    assert c.values == {"ports": ((700_001, 900_000),)}  # the narrowest run that fits
    taken = take(pool="p", members={"ports": ["600005"]})
    assert isinstance(taken, Denied)
    free = book.holdings["p"].free["ports"]
    assert len(free) == 1_000_000 - 500_000 - 11 - 200_000
    assert len(list(free)) <= 4  # intervals, not values
    take.release(a.id)
    take.release(b.id)
    take.release(c.id)
    assert list(book.holdings["p"].free["ports"]) == [(0, 999_999)]
    too_long = take(pool="p", resources={"ports": 1_000_001})
    assert isinstance(too_long, Denied)
    with pytest.raises(InvalidError, match="must lie in"):
        take(pool="p", members={"ports": ["1000000"]})


def test_selector_chooses_a_pool_by_policy() -> None:
    book = book_with(
        a={"resources": {"cpu": {"capacity": 8000}}, "labels": {"zone": "x"}},
        b={"resources": {"cpu": {"capacity": 8000}}, "labels": {"zone": "x"}},
        c={"resources": {"cpu": {"capacity": 8000}}, "labels": {"zone": "y"}},
    )
    take = Reserver(book)
    first = take(selector={"zone": "x"}, resources={"cpu": 2000})
    second = take(selector={"zone": "x"}, resources={"cpu": 2000})
    assert first.pool == second.pool == "a"  # binpack: fill the fuller pool
    spread = take(selector={"zone": "x"}, resources={"cpu": 1000}, placement="spread")
    assert spread.pool == "b"
    big = take(selector={"zone": "x"}, resources={"cpu": 7000})
    assert big.pool == "b"  # only b still fits it
    with pytest.raises(NotFoundError):
        take(selector={"zone": "nowhere"}, resources={"cpu": 1})


def test_snapshot_rebuilds_holdings() -> None:
    book = book_with(
        p={"resources": {"gpu": gpus(2), "ports": {"kind": "range", "lo": 100, "hi": 199}}}
    )
    take = Reserver(book)
    take(pool="p", resources={"vram": GiB, "ports": 5})
    take(pool="p", resources={"gpu": 1})
    copy = PoolBook.from_snapshot(book.snapshot())
    assert copy.pool_infos() == book.pool_infos()
    assert list(copy.holdings["p"].free["ports"]) == list(book.holdings["p"].free["ports"])


def test_bad_pool_specs_are_refused() -> None:
    with pytest.raises(InvalidError, match="oversubscribed"):
        from_wire(
            PoolCreate,
            {
                "name": "p",
                "resources": {"ports": {"kind": "range", "lo": 1, "hi": 5, "ratio": 2.0}},
            },
        )
    with pytest.raises(InvalidError, match="lo <= hi"):
        from_wire(
            PoolCreate, {"name": "p", "resources": {"ports": {"kind": "range", "lo": 5, "hi": 1}}}
        )
    with pytest.raises(InvalidError, match="unique"):
        from_wire(
            PoolCreate,
            {
                "name": "p",
                "resources": {"d": {"kind": "set", "members": [{"name": "a"}, {"name": "a"}]}},
            },
        )
    with pytest.raises(InvalidError, match="not a resource of its own"):
        from_wire(PoolCreate, {"name": "p", "resources": {"vram": {"capacity": 5}}})


def test_resources_view_has_hypemans_shape_and_arithmetic() -> None:
    book = book_with(
        host={
            "resources": {
                "cpu": {"capacity": 64000, "ratio": 2.0, "source": "detected"},
                "memory": {"capacity": 256 * GiB},
                "gpu": gpus(2),
            }
        }
    )
    take = Reserver(book)
    r1 = take(
        pool="host", resources={"cpu": 4000, "memory": 8 * GiB, "vram": 20 * GiB}, label="my-job"
    )
    take(pool="host", resources={"cpu": 44000, "gpu": 1})
    view = book.resources_view("host")
    cpu = view.resources["cpu"]
    assert (cpu.capacity, cpu.effective_limit, cpu.allocated, cpu.available, cpu.oversub_ratio) == (
        64000,
        128000,
        48000,
        80000,
        2.0,
    )
    assert cpu.source == "detected" and view.resources["memory"].source == "configured"
    for status in view.resources.values():
        assert status.effective_limit == int(status.capacity * status.oversub_ratio)
        assert status.available == status.effective_limit - status.allocated
    assert view.resources["vram"].allocated == 100 * GiB  # one 20G slice + one GPU whole
    assert {g.name: (g.whole, g.vram_allocated) for g in view.gpus} in (
        {"0": (False, 20 * GiB), "1": (True, 80 * GiB)},
        {"0": (True, 80 * GiB), "1": (False, 20 * GiB)},
    )
    first = view.allocations[0]
    assert (first.reservation_id, first.name, first.cpu, first.memory_bytes, first.vram_bytes) == (
        r1.id,
        "my-job",
        4000,
        8 * GiB,
        20 * GiB,
    )
    assert first.gpus == list(r1.members["gpu"])
