"""The ``mps`` and ``framework`` levels of the enforcement ladder, client side:
the caps ``lease_env`` sets for a VRAM slice, and ``limit_torch`` (SPEC §10).

``limit_torch`` runs against a fake ``torch`` module put in ``sys.modules``.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
from msgspec.structs import replace

import resd_client
from resd_client import Lease, limit_torch
from resd_client.env import lease_env, vram_fraction, vram_share
from resd_client.protocol import ReservationInfo
from tests.test_lease_env import GIB, device, info, whole_gpus

H100 = 80 * GIB
CAPS = [
    "RESD_VRAM_FRACTION",
    "XLA_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
]


def vram_slice(vram: int, enforcement: str = "watch", memory: int | None = H100) -> ReservationInfo:
    labels = {} if memory is None else {"memory": str(memory)}
    return info(
        resources={"vram": vram},
        members={"gpu": ["3"]},
        devices=[device(3, **labels)],
        enforcement=enforcement,
    )


def caps(r: ReservationInfo) -> dict[str, str]:
    env = lease_env(r)
    return {k: env[k] for k in CAPS if k in env}


@pytest.mark.parametrize("enforcement", ["mig", "cgroup", "framework", "watch", "none"])
def test_framework_caps_for_every_slice(enforcement: str) -> None:
    assert caps(vram_slice(20 * GIB, enforcement)) == {
        "RESD_VRAM_FRACTION": "0.25",
        "XLA_CLIENT_MEM_FRACTION": "0.25",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25",
    }


def test_mps_caps() -> None:
    assert caps(vram_slice(20 * GIB, "mps")) == {
        "RESD_VRAM_FRACTION": "0.25",
        "XLA_CLIENT_MEM_FRACTION": "0.25",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=20480M",  # ordinal 0: the first visible GPU
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
    }


@pytest.mark.parametrize(
    ("vram", "fraction", "limit", "percent"),
    [
        (30 * GIB, "0.375", "30720M", "38"),  # the fraction rounds down, the percentage up
        (H100 // 3, "0.333", "27306M", "34"),  # the limit rounds down to whole MiB
        (H100, "1.0", "81920M", "100"),
        (50 << 20, "0.001", "50M", "1"),  # 0.0006: at least 0.001 and 1 %
        (1000, "0.001", "1M", "1"),  # under a MiB: at least 1M
    ],
)
def test_rounding(vram: int, fraction: str, limit: str, percent: str) -> None:
    env = caps(vram_slice(vram, "mps"))
    assert env["RESD_VRAM_FRACTION"] == env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == fraction
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={limit}"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == percent


def test_no_memory_label_no_fractions() -> None:
    """An older daemon does not report device memory: the share is unknown."""
    r = vram_slice(20 * GIB, "mps", memory=None)
    assert vram_share(r) is None and vram_fraction(r) is None
    assert caps(r) == {"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=20480M"}  # needs no share
    assert caps(vram_slice(20 * GIB, memory=None)) == {}


def test_bad_memory_label_no_fractions() -> None:
    assert vram_share(vram_slice(20 * GIB, memory=0)) is None
    bad = info(resources={"vram": GIB}, members={"gpu": ["0"]}, devices=[device(0, memory="x")])
    assert vram_share(bad) is None


def test_whole_gpus_get_no_caps() -> None:
    r = whole_gpus(0, 1)
    for enforcement in ("mps", "framework"):
        assert caps(replace(r, enforcement=enforcement)) == {}
    assert vram_fraction(r) is None
    assert caps(info(resources={"cpu": 1000}, enforcement="mps")) == {}


def test_a_mig_instance_slice_is_capped_against_the_instance() -> None:
    r = info(
        resources={"vram": 10 * GIB},
        members={"gpu": ["8"]},
        devices=[device(8, mig="instance", parent="0", uuid="MIG-x", memory=str(20 * GIB))],
        enforcement="mig",
    )
    env = lease_env(r)
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-x"
    assert env["RESD_VRAM_FRACTION"] == "0.5"
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env


def test_fixed_cap_names_win_over_custom_resources() -> None:
    r = replace(vram_slice(20 * GIB), resources={"vram": 20 * GIB, "vram_fraction": 7})
    assert lease_env(r)["RESD_VRAM_FRACTION"] == "0.25"


# ------------------------------------------------------------------ limit_torch


class FakeCuda:
    def __init__(self, devices: int) -> None:
        self.devices = devices
        self.fractions: dict[int, float] = {}

    def is_available(self) -> bool:
        return self.devices > 0

    def device_count(self) -> int:
        return self.devices

    def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
        assert 0 < fraction <= 1 and 0 <= device < self.devices
        self.fractions[device] = fraction


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda(devices=1)
    torch = ModuleType("torch")
    torch.cuda = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    return fake


def test_limit_torch_from_the_environment(cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``resctl run`` no lease object is needed."""
    cuda.devices = 2
    monkeypatch.setenv("RESD_VRAM_FRACTION", "0.25")
    assert limit_torch() == 0.25
    assert cuda.fractions == {0: 0.25, 1: 0.25}


def test_limit_torch_from_a_lease_env(cuda: FakeCuda) -> None:
    r = vram_slice(20 * GIB)
    env = lease_env(r)
    assert limit_torch(environ=env) == 0.25
    assert limit_torch(r, environ=env) == 0.25
    lease = Lease(None, r)  # type: ignore[arg-type]  # no daemon needed
    assert limit_torch(lease, environ=lease.environment("uuid")) == 0.25
    assert cuda.fractions == {0: 0.25}


def test_limit_torch_refuses_other_gpus(cuda: FakeCuda) -> None:
    """Capping device 0 of a process that sees every GPU would cap the wrong one."""
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=None"):
        limit_torch(vram_slice(20 * GIB), environ={})
    with pytest.raises(RuntimeError, match="not the lease's"):
        limit_torch(vram_slice(20 * GIB), environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert cuda.fractions == {}


def test_limit_torch_nothing_to_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole GPUs, no slice, or an old daemon: None, and torch is not even imported."""
    monkeypatch.setitem(sys.modules, "torch", None)  # importing it would raise
    assert limit_torch(environ={}) is None
    assert limit_torch(whole_gpus(0), environ={}) is None
    assert limit_torch(vram_slice(20 * GIB, memory=None), environ={}) is None


@pytest.mark.parametrize("text", ["x", "0", "1.5", "-0.2", "nan"])
def test_limit_torch_bad_fraction(cuda: FakeCuda, text: str) -> None:
    with pytest.raises(ValueError, match="RESD_VRAM_FRACTION"):
        limit_torch(environ={"RESD_VRAM_FRACTION": text})


def test_limit_torch_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch"):
        limit_torch(environ={"RESD_VRAM_FRACTION": "0.5"})


def test_limit_torch_without_cuda(cuda: FakeCuda) -> None:
    cuda.devices = 0
    with pytest.raises(RuntimeError, match="no CUDA device"):
        limit_torch(environ={"RESD_VRAM_FRACTION": "0.5"})


def test_limit_torch_fewer_devices_than_the_lease(cuda: FakeCuda) -> None:
    r = info(
        resources={"vram": 20 * GIB},
        members={"gpu": ["0", "1"]},
        devices=[device(0, memory=str(H100)), device(1, memory=str(H100))],
    )
    with pytest.raises(RuntimeError, match="sees 1 CUDA devices, the lease holds 2"):
        limit_torch(r, environ=lease_env(r))


def test_exported() -> None:
    assert resd_client.limit_torch is limit_torch
    assert "limit_torch" in resd_client.__all__
