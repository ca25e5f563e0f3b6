"""``resctl export --format slurm|kueue`` end to end: a real ``resd`` whose host pool
is a fake 8 × H100 80GB host (a ``gpus_file``: GPUs 0-3 on NUMA node 0, 4-7 on node
1), real ``resctl`` processes. The Slurm text is read back by the strict reader of
tests/slurm_conf.py, the Kueue YAML by PyYAML and checked as Kueue would.

``Cores=`` comes from this machine's own /sys (the daemon reads it at each
``resources`` call), so the expectation is read from there too: a NUMA node the
machine lacks (node 1 on a one-node box) must leave ``Cores=`` out."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from resd.inventory import GpuDevice
from resd.nvml import device_to_json
from tests.conftest import Proc, resctl
from tests.kueue_check import check_kueue, quotas_of
from tests.slurm_conf import parse_export

pytestmark = pytest.mark.slow

GIB = 1 << 30
MIB = 1 << 20
GPUS = [
    GpuDevice(i, f"GPU-h100-{i}", "NVIDIA H100 80GB HBM3", 80 * GIB, numa_node=0 if i < 4 else 1)
    for i in range(8)
]


@pytest.fixture
def h100_host(short_tmp: Path) -> Iterator[Proc]:
    """resd with the discovered host pool holding the eight fake H100s."""
    gpus = short_tmp / "gpus.json"
    gpus.write_text(json.dumps([device_to_json(g) for g in GPUS]))
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=["--log-level", "info", "--log-format", "json"],
        log=short_tmp / "resd.log",
        env={"RESD_GPUS_FILE": str(gpus), "RESD_GPU_SAMPLE_INTERVAL": "0"},
    ).start()
    yield proc
    assert proc.stop() == 0, proc.log_text()


def sysfs_cores(node: int) -> list[int] | None:
    """The CPUs of NUMA node ``node`` on this machine, read here independently of resd."""
    try:
        text = Path(f"/sys/devices/system/node/node{node}/cpulist").read_text().strip()
    except OSError:
        return None
    if not text:
        return None
    cores: list[int] = []
    for item in text.split(","):
        lo, _, hi = item.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def test_slurm_export_of_an_eight_h100_host(h100_host: Proc) -> None:
    view: dict[str, Any] = json.loads(resctl(h100_host, "resources", "--json").stdout)
    text = resctl(h100_host, "export", "--format", "slurm").stdout
    conf, gres = parse_export(text)

    node_name = socket.gethostname().partition(".")[0]
    (node,) = conf.nodes.values()
    assert node.name == node_name
    assert node.cpus == view["resources"]["cpu"]["capacity"] // 1000
    assert node.real_memory == view["resources"]["memory"]["capacity"] // MIB
    assert node.gres == {("gpu", "h100"): 8}
    assert conf.partitions["host"].nodes == [node_name]
    assert [(line.type, line.files) for line in gres] == [
        ("h100", [f"/dev/nvidia{i}"]) for i in range(8)
    ]
    assert [line.cores for line in gres] == [sysfs_cores(0)] * 4 + [sysfs_cores(1)] * 4
    assert set(view["numa_cpus"]) == {n for n in ("0", "1") if sysfs_cores(int(n)) is not None}

    named = resctl(h100_host, "export", "--format", "slurm", "--node-name", "gpu01").stdout
    assert "gpu01" in parse_export(named)[0].nodes
    missing = resctl(h100_host, "export", "--format", "slurm", "--pool", "nope", check=False)
    assert missing.returncode == 3 and "not_found" in missing.stderr


def test_kueue_export_of_pools_and_tenants(h100_host: Proc, tmp_path: Path) -> None:
    resctl(h100_host, "pool", "create", "--name", "train", "--cpu", "8", "--gpu", "4")
    resctl(h100_host, "pool", "set", "--name", "train", "--preemption", "lower_priority")
    resctl(h100_host, "tenant", "add", "--name", "alice", "--priority", "7", "--weight", "2")
    resctl(h100_host, "tenant", "add", "--name", "bob", "--priority", "3")
    resctl(
        h100_host, "tenant", "set", "--name", "alice", "--pool", "host", "--min", "gpu=2",
        "--max", "gpu=6",
    )  # fmt: skip
    out = tmp_path / "kueue.yaml"
    summary = json.loads(
        resctl(h100_host, "export", "--format", "kueue", "-o", str(out), "--json").stdout
    )
    assert summary == {"output": str(out), "format": "kueue", "pools": 2, "tenants": 2}

    by_kind = check_kueue(list(yaml.safe_load_all(out.read_text())))
    assert by_kind["ResourceFlavor"]["h100"]["spec"]["nodeLabels"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"
    }
    assert {n: c["value"] for n, c in by_kind["WorkloadPriorityClass"].items()} == {
        "resd-priority-3": 3,
        "resd-priority-7": 7,
    }
    queues = by_kind["ClusterQueue"]
    assert set(queues) == {"host", "host.alice", "train"}
    assert quotas_of(queues["host"])["h100", "nvidia.com/gpu"]["nominalQuota"] == "6"
    assert quotas_of(queues["host.alice"])["h100", "nvidia.com/gpu"] == {
        "name": "nvidia.com/gpu",
        "nominalQuota": "2",
        "borrowingLimit": "4",
    }
    assert quotas_of(queues["train"])["gpu", "nvidia.com/gpu"]["nominalQuota"] == "4"
    assert queues["train"]["spec"]["preemption"]["withinClusterQueue"] == "LowerPriority"
    local = by_kind["LocalQueue"]
    assert {k: q["spec"]["clusterQueue"] for k, q in local.items()} == {
        "alice/host": "host.alice",
        "alice/train": "train",
        "bob/host": "host",
        "bob/train": "train",
    }

    only = resctl(h100_host, "export", "--format", "kueue", "--pool", "train").stdout
    assert set(check_kueue(list(yaml.safe_load_all(only)))["ClusterQueue"]) == {"train"}
