"""The worker environment of a reservation (``resd_client.env``) and ``Lease.env``."""

from __future__ import annotations

from typing import Any

import pytest

from resd_client import Lease
from resd_client.env import GpuIds, assigned, cores, gpu_ids, lease_env, render_values
from resd_client.protocol import ReservationInfo

GIB = 1 << 30


def info(**changes: Any) -> ReservationInfo:
    base: dict[str, Any] = {
        "id": "r-0123456789ab",
        "tenant": "alice",
        "pool": "gpus",
        "resources": {},
        "label": "",
        "created_at": 1_800_000_000.0,
        "ttl": None,
        "expires_at": None,
        "binding": "session",
        "reclaimable": False,
        "state": "active",
        "uid": 1000,
    }
    base.update(changes)
    return ReservationInfo(**base)


def device(i: int, **labels: str) -> dict[str, str]:
    return {
        "name": str(i),
        "index": str(i),
        "uuid": f"GPU-fake-{i}",
        "model": "NVIDIA H100 80GB HBM3",
        "numa": str(i // 4),
        **labels,
    }


def whole_gpus(*members: int, **resources: int) -> ReservationInfo:
    return info(
        resources={"gpu": len(members), **resources},
        members={"gpu": [str(m) for m in members]},
        devices=[device(m) for m in members],
    )


def test_gpus_by_index() -> None:
    env = lease_env(whole_gpus(0, 3))
    assert env["CUDA_VISIBLE_DEVICES"] == "0,3"
    assert env["RESD_GPUS"] == "0,3"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["RESD_RESERVATION_ID"] == "r-0123456789ab"
    assert env["RESD_POOL"] == "gpus"
    assert env["RESD_TENANT"] == "alice"
    assert "RESD_GPU" not in env  # the count is len(RESD_GPUS)
    assert "RESD_VRAM_BYTES" not in env


def test_gpus_by_uuid() -> None:
    env = lease_env(whole_gpus(0, 3), "uuid")
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0,GPU-fake-3"
    assert env["RESD_GPUS"] == "0,3"
    assert "CUDA_DEVICE_ORDER" not in env  # UUIDs do not depend on the order


def test_index_label_differs_from_member_name() -> None:
    r = info(
        resources={"gpu": 2},
        members={"gpu": ["a", "b"]},
        devices=[device(5, name="a"), {"name": "b"}],
    )
    assert gpu_ids(r) == ["5", "b"]  # the index label, else the member name
    assert gpu_ids(r, "uuid") == ["GPU-fake-5", "b"]  # the uuid, else the index


def test_no_gpu_hides_every_gpu() -> None:
    env = lease_env(info(resources={"cpu": 1500, "memory": 8 * GIB}))
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["RESD_GPUS"] == ""
    assert "CUDA_DEVICE_ORDER" not in env
    assert env["RESD_CPU"] == "1.5"
    assert env["RESD_MEMORY_BYTES"] == str(8 * GIB)
    assert "RESD_MEMORY" not in env and "RESD_CPU_VALUES" not in env


def test_vram_slice() -> None:
    r = info(resources={"vram": 20 * GIB}, members={"gpu": ["3"]}, devices=[device(3)])
    env = lease_env(r)
    assert env["RESD_VRAM_BYTES"] == str(20 * GIB)
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["RESD_GPUS"] == "3"
    assert "RESD_VRAM" not in env


@pytest.mark.parametrize(
    ("millicores", "text"),
    [(1500, "1.5"), (4000, "4"), (500, "0.5"), (1, "0.001"), (100_000, "100"), (1250, "1.25")],
)
def test_cores(millicores: int, text: str) -> None:
    assert cores(millicores) == text


def test_ranges_and_other_resources() -> None:
    r = info(
        resources={"ports": 11, "disk": 500 * GIB, "licenses": 3, "nic": 2},
        values={"ports": [[30000, 30009], [30020, 30020]]},
        members={"nic": ["eth1", "eth2"]},
    )
    env = lease_env(r)
    assert env["RESD_PORTS"] == "11"
    assert env["RESD_PORTS_VALUES"] == "30000-30009,30020"
    assert env["RESD_DISK"] == str(500 * GIB)
    assert env["RESD_LICENSES"] == "3"
    assert env["RESD_NIC"] == "2"
    assert env["RESD_NIC_MEMBERS"] == "eth1,eth2"
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_named_values_without_an_amount_are_counted() -> None:
    env = lease_env(info(values={"ports": [[30001, 30001], [30005, 30009]]}))
    assert env["RESD_PORTS"] == "6"
    assert env["RESD_PORTS_VALUES"] == "30001,30005-30009"


def test_fixed_names_win_over_custom_resources() -> None:
    r = info(resources={"gpus": 7, "pool": 1}, members={"gpu": ["1"]}, devices=[device(1)])
    env = lease_env(r)
    assert env["RESD_GPUS"] == "1"
    assert env["RESD_POOL"] == "gpus"


def test_expiry() -> None:
    env = lease_env(info(resources={"cpu": 1000}, ttl=60.0, expires_at=1_800_000_060.25))
    assert env["RESD_EXPIRES_AT"] == "1800000060.250"
    assert "RESD_EXPIRES_AT" not in lease_env(info(resources={"cpu": 1000}))


def test_every_value_is_a_string() -> None:
    env = lease_env(whole_gpus(0, 1, cpu=2000, memory=GIB, licenses=1))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert all(k.isupper() or k.startswith("CUDA") for k in env)


def test_render_values() -> None:
    assert render_values([]) == ""
    assert render_values([[5, 5]]) == "5"
    assert render_values([[1, 3], [7, 8]]) == "1-3,7-8"


def test_assigned() -> None:
    r = info(
        resources={"gpu": 2, "ports": 10},
        members={"gpu": ["0", "3"]},
        values={"ports": [[30000, 30009]]},
    )
    assert assigned(r) == {"gpu": ["0", "3"], "ports": [[30000, 30009]]}
    assert assigned(info(resources={"cpu": 1})) == {}


def test_lease_properties() -> None:
    r = info(
        resources={"gpu": 2, "ports": 10},
        members={"gpu": ["0", "3"]},
        values={"ports": [[30000, 30009]]},
        devices=[device(0), device(3)],
    )
    lease = Lease(None, r)  # type: ignore[arg-type]  # no daemon needed for these
    assert lease.assigned == {"gpu": ["0", "3"], "ports": [[30000, 30009]]}
    assert lease.env == lease_env(r)
    assert lease.environment(gpu_ids="uuid")["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0,GPU-fake-3"
    assert lease.env["RESD_PORTS_VALUES"] == "30000-30009"


def test_bad_gpu_ids() -> None:
    with pytest.raises(ValueError, match="gpu_ids"):
        lease_env(whole_gpus(0), "serial")  # type: ignore[arg-type]


def mig_instance(i: int, parent: int) -> dict[str, str]:
    return device(i, mig="instance", parent=str(parent), uuid=f"MIG-fake-{parent}-{i}")


@pytest.mark.parametrize("kind", ["index", "uuid"])
def test_mig_instances_by_uuid_whatever_gpu_ids(kind: GpuIds) -> None:
    r = info(resources={"gpu": 1}, members={"gpu": ["7"]}, devices=[mig_instance(7, parent=0)])
    env = lease_env(r, kind)
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-fake-0-7"  # CUDA takes MIG devices by uuid only
    assert env["RESD_GPUS"] == "7"
    assert "CUDA_DEVICE_ORDER" not in env  # a uuid does not depend on the order


def test_mig_instance_beside_a_whole_gpu() -> None:
    r = info(
        resources={"gpu": 2},
        members={"gpu": ["1", "9"]},
        devices=[device(1, mig="off"), mig_instance(9, parent=0)],
    )
    env = lease_env(r)
    assert env["CUDA_VISIBLE_DEVICES"] == "1,MIG-fake-0-9"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # for the GPU given by index
    assert lease_env(r, "uuid")["CUDA_VISIBLE_DEVICES"] == "GPU-fake-1,MIG-fake-0-9"
