"""``resctl export --format slurm|kueue`` without a daemon: the pure renderers of
``resctl.scaleout`` on protocol values, the Slurm text read back by a strict
slurm.conf / gres.conf reader (tests/slurm_conf.py), the Kueue YAML by PyYAML with
every object checked against Kueue's v1beta1 rules; the flags each format refuses;
and the host's NUMA CPU lists read from a fake sysfs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from resctl.main import app
from resctl.scaleout import (
    check_node_name,
    gpu_type,
    gpu_types,
    kube_name,
    kube_quantity,
    kueue_manifests,
    kueue_objects,
    slurm_config,
)
from resd.discovery import numa_cpus
from resd_client.errors import InvalidError
from resd_client.protocol import (
    GpuStatus,
    HostResources,
    MemberUsage,
    PoolInfo,
    QuotaInfo,
    ResourceStatus,
    ResourceUsage,
    TenantInfo,
)
from tests.kueue_check import LABEL, check_kueue, quotas_of
from tests.slurm_conf import SlurmSyntaxError, parse_export, read_gres_conf, read_slurm_conf

GIB = 1 << 30
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
NUMA = {"0": "0-27,56-83", "1": "28-55,84-111"}


def status(capacity: int, unit: str = "count") -> ResourceStatus:
    return ResourceStatus(
        capacity=capacity,
        effective_limit=capacity,
        allocated=0,
        available=capacity,
        oversub_ratio=1.0,
        source="detected",
        unit=unit,
    )


def gpu(index: int, model: str = H100, numa: str = "", name: str = "") -> GpuStatus:
    return GpuStatus(
        name=name or str(index),
        index=str(index),
        uuid=f"GPU-{index}",
        model=model,
        numa=numa,
        memory_bytes=80 * GIB,
        vram_allocated=0,
        whole=False,
        holders=0,
    )


def host(
    gpus: list[GpuStatus], numa_cpus: dict[str, str], **extra: ResourceStatus
) -> HostResources:
    resources = {"cpu": status(112_000, "millicores"), "memory": status(2048 * GIB, "bytes")}
    if gpus:
        resources["gpu"] = status(len(gpus))
    return HostResources(
        pool="host",
        resources=resources | extra,
        gpus=gpus,
        allocations=[],
        numa_cpus=numa_cpus,
    )


EIGHT_H100 = host([gpu(i, numa="0" if i < 4 else "1") for i in range(8)], NUMA)


# ------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        (H100, "h100"),
        (A100, "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla V100-SXM2-32GB", "v100"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA H100 NVL", "h100"),
        ("", ""),
    ],
)
def test_gpu_type_is_the_short_model(model: str, kind: str) -> None:
    assert gpu_type(model) == kind


def test_models_sharing_a_type_keep_their_whole_names() -> None:
    assert gpu_types([H100, "NVIDIA H100 PCIe", A100, ""]) == {
        H100: "nvidia-h100-80gb-hbm3",
        "NVIDIA H100 PCIe": "nvidia-h100-pcie",
        A100: "a100",
        "": "",
    }


def test_kube_names_are_labels_and_keep_apart_names_that_differ() -> None:
    assert kube_name("alice") == "alice"
    names = [kube_name(n) for n in ("Alice", "alice", "a_b", "a.b", "a-b", "x" * 64)]
    assert all(LABEL.fullmatch(n) for n in names), names
    assert len(set(names)) == len(names)
    assert kube_name("Alice") == kube_name("Alice")  # stable from run to run


@pytest.mark.parametrize(
    ("resource", "amount", "text"),
    [
        ("cpu", 112_000, "112"),
        ("cpu", 1500, "1500m"),
        ("memory", 2048 * GIB, "2Ti"),
        ("memory", 80 * GIB, "80Gi"),
        ("memory", 512 << 20, "512Mi"),
        ("disk", 1000, "1000"),
        ("memory", 0, "0"),
        ("gpu", 8, "8"),
    ],
)
def test_kube_quantity(resource: str, amount: int, text: str) -> None:
    assert kube_quantity(resource, amount) == text


# ------------------------------------------------------------------ Slurm


def test_slurm_eight_h100_parses_strictly() -> None:
    text = slurm_config(EIGHT_H100, "gpu01")
    conf, gres = parse_export(text)
    assert conf.gres_types == ["gpu"]
    node = conf.nodes["gpu01"]
    assert (node.cpus, node.real_memory) == (112, 2048 * 1024)
    assert node.gres == {("gpu", "h100"): 8}
    assert conf.partitions["host"].nodes == ["gpu01"] and conf.partitions["host"].default
    assert [line.files for line in gres] == [[f"/dev/nvidia{i}"] for i in range(8)]
    assert {line.type for line in gres} == {"h100"}
    assert [line.cores for line in gres] == [[*range(0, 28), *range(56, 84)]] * 4 + [
        [*range(28, 56), *range(84, 112)]
    ] * 4
    assert "Cores=0-27,56-83" in text.splitlines()[-8]


def test_slurm_leaves_cores_out_where_the_node_is_unknown() -> None:
    gpus = [gpu(0, numa="0"), gpu(1, numa="1"), gpu(2, numa=""), gpu(3, numa="2")]
    numa = {"0": "0-1", "2": "0-3,200-201"}  # node 2's CPUs are beyond the pool's 112
    _, gres = parse_export(slurm_config(host(gpus, numa), "n1"))
    assert [line.cores for line in gres] == [[0, 1], None, None, None]


def test_slurm_mixed_models_and_mig() -> None:
    gpus = [
        gpu(0, H100, name="0-mig1"),
        gpu(0, H100, name="0-mig2"),
        gpu(1, H100),
        gpu(2, A100),
    ]
    text = slurm_config(host(gpus, {}), "n1")
    conf, gres = parse_export(text)
    assert conf.nodes["n1"].gres == {("gpu", "h100"): 2, ("gpu", "a100"): 1}
    assert "Gres=gpu:a100:1,gpu:h100:2" in text
    assert [line.files for line in gres] == [["/dev/nvidia0"], ["/dev/nvidia1"], ["/dev/nvidia2"]]
    assert "# GPU 0 is in MIG mode" in text


def test_slurm_counted_gpus_without_devices() -> None:
    view = HostResources(
        pool="train",
        resources={"cpu": status(8000, "millicores"), "gpu": status(4)},
        gpus=[],
        allocations=[],
    )
    text = slurm_config(view, "n1")
    conf, gres = parse_export(text)
    assert conf.nodes["n1"].gres == {("gpu", ""): 4} and conf.nodes["n1"].real_memory is None
    assert [(line.count, line.files) for line in gres] == [(4, [])]
    assert "PartitionName=train " in text


def test_slurm_cpu_only_pool_has_no_gres() -> None:
    text = slurm_config(host([], {}, net=status(10**9, "bytes/s")), "n1")
    conf, gres = parse_export(text)
    assert conf.gres_types == [] and conf.nodes["n1"].gres == {} and gres == []
    assert "# not exported from pool host: net" in text


def test_slurm_refuses_a_pool_without_cpus_and_a_bad_node_name() -> None:
    view = HostResources(pool="lic", resources={"licenses": status(3)}, gpus=[], allocations=[])
    with pytest.raises(InvalidError, match="pool 'lic' has no whole CPU"):
        slurm_config(view, "n1")
    for bad in ("node[1-4]", "a,b", "-x", "", "a b"):
        with pytest.raises(InvalidError, match="--node-name"):
            check_node_name(bad)


@pytest.mark.parametrize(
    ("conf", "gres", "why"),
    [
        ("NodeName=n1 CPUs=4 Bogus=1\n", "", "unknown parameter"),
        ("NodeName=n1 CPUs=four\n", "", "CPUs"),
        ("GresTypes=gpu\nNodeName=n1 CPUs=4 Gres=gpu:h100:x\n", "", "no count"),
        ("NodeName=n1 CPUs=4 Gres=gpu:1\n", "", "not in GresTypes"),
        ("GresTypes=gpu\nNodeName=n1 CPUs=4 Gres=gpu:1\n", "", "gres.conf"),
        ("NodeName=n1 CPUs=4\n", "NodeName=n1 Name=gpu File=dev/nvidia0\n", "absolute"),
        ("NodeName=n1 CPUs=4\n", "NodeName=n1 Name=gpu File=/dev/nvidia0 Cores=3-1\n", "back"),
        ("NodeName=n1 CPUs=4\n", "NodeName=n1 Name=gpu Cores=0,x\n", "N or N-M"),
        (
            "GresTypes=gpu\nNodeName=n1 CPUs=2 Gres=gpu:1\n",
            "Name=gpu File=/d/0 Cores=2\n",
            "beyond",
        ),
        ("NodeName=n1 CPUs=4\nPartitionName=p Nodes=n2\n", "", "unknown nodes"),
    ],
)
def test_the_reader_is_strict(conf: str, gres: str, why: str) -> None:
    with pytest.raises(SlurmSyntaxError, match=why):
        parse_export(f"# --- slurm.conf ---\n{conf}# --- gres.conf ---\n{gres}")


def test_the_reader_takes_what_the_man_pages_show() -> None:
    conf = read_slurm_conf(
        "GresTypes=gpu,mps  # comment\nNodeName=tux0 CPUs=16 Gres=gpu:tesla:2,mps:200 State=UNKNOWN\n"
    )
    assert conf.nodes["tux0"].gres == {("gpu", "tesla"): 2, ("mps", ""): 200}
    (line,) = read_gres_conf("NodeName=tux0 Name=gpu Type=tesla File=/dev/nvidia[0-1] Cores=0-7\n")
    assert line.files == ["/dev/nvidia0", "/dev/nvidia1"] and line.count == 2


# ------------------------------------------------------------------ Kueue


def member(index: int, model: str) -> MemberUsage:
    return MemberUsage(
        name=str(index),
        capacity=80 * GIB,
        allocated=0,
        whole=False,
        holders=0,
        labels={"index": str(index), "model": model, "numa": "0"},
    )


def usage(name: str, capacity: int, kind: str = "scalar", **extra: Any) -> ResourceUsage:
    return ResourceUsage(
        name=name,
        unit="count",
        capacity=capacity,
        ratio=1.0,
        effective=capacity * 2,  # an oversubscribed limit: not what Kueue is given
        allocated=0,
        available=capacity,
        kind=kind,
        **extra,
    )


def pool(
    name: str, resources: list[ResourceUsage], preemption: str = "off", **extra: Any
) -> PoolInfo:
    return PoolInfo(
        name=name,
        resources=resources,
        max_per_tenant=0,
        preemption=preemption,
        placement="binpack",
        grace=0.0,
        labels={},
        created_at=0.0,
        active=0,
        **extra,
    )


def tenant(name: str, priority: int, weight: float = 1.0) -> TenantInfo:
    return TenantInfo(
        name=name, priority=priority, owners=[], groups=[], weight=weight, created_at=0.0
    )


HOST_POOL = pool(
    "host",
    [
        usage("cpu", 112_000),
        usage("memory", 2048 * GIB),
        usage("gpu", 8, "set", members=[member(i, H100) for i in range(8)]),
        usage("vram", 640 * GIB, "slice"),
        usage("net", 10**9),
    ],
    quotas={
        "alice": QuotaInfo(min={"gpu": 2, "cpu": 16_000}, max={"gpu": 4}),
        "Bob_x": QuotaInfo(max={"gpu": 1}),
    },
)
TENANTS = [tenant("alice", 7, weight=2.0), tenant("Bob_x", 3), tenant("carol", 7)]


def test_kueue_manifests_parse_and_map_quotas() -> None:
    text = kueue_manifests([HOST_POOL], TENANTS)
    assert text.startswith("# resd pools and tenants as Kueue objects")
    assert "# not exported from pool host: vram, net" in text
    docs = list(yaml.safe_load_all(text))
    by_kind = check_kueue(docs)
    assert [d["kind"] for d in docs][:2] == ["ResourceFlavor", "ResourceFlavor"]
    assert by_kind["ResourceFlavor"]["h100"]["spec"]["nodeLabels"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"
    }
    assert "spec" not in by_kind["ResourceFlavor"]["default-flavor"]
    classes = by_kind["WorkloadPriorityClass"]
    assert {n: c["value"] for n, c in classes.items()} == {
        "resd-priority-3": 3,
        "resd-priority-7": 7,
    }
    bob = kube_name("Bob_x")
    assert set(by_kind["Namespace"]) == {"alice", bob, "carol"}

    queues = by_kind["ClusterQueue"]
    assert set(queues) == {"host", "host.alice", f"host.{bob}"}
    assert {q["spec"]["cohort"] for q in queues.values()} == {"host"}
    shared = quotas_of(queues["host"])
    assert shared["default-flavor", "cpu"] == {"name": "cpu", "nominalQuota": "96"}
    assert shared["default-flavor", "memory"]["nominalQuota"] == "2Ti"
    assert shared["h100", "nvidia.com/gpu"] == {"name": "nvidia.com/gpu", "nominalQuota": "6"}
    assert queues["host"]["spec"]["namespaceSelector"] == {}
    alice = quotas_of(queues["host.alice"])
    assert alice["h100", "nvidia.com/gpu"] == {
        "name": "nvidia.com/gpu",
        "nominalQuota": "2",
        "borrowingLimit": "2",
    }
    assert alice["default-flavor", "cpu"] == {"name": "cpu", "nominalQuota": "16"}
    assert queues["host.alice"]["spec"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "alice"}
    }
    assert queues["host.alice"]["spec"]["fairSharing"] == {"weight": "2"}
    bobs = quotas_of(queues[f"host.{bob}"])
    assert bobs["h100", "nvidia.com/gpu"]["borrowingLimit"] == "1"
    assert queues["host"]["spec"]["preemption"] == {
        "reclaimWithinCohort": "Any",
        "withinClusterQueue": "Never",
    }
    local = by_kind["LocalQueue"]
    assert local["alice/host"]["spec"]["clusterQueue"] == "host.alice"
    assert local["carol/host"]["spec"]["clusterQueue"] == "host"


def test_kueue_several_models_preemption_and_plain_pools() -> None:
    mixed = pool(
        "mixed",
        [
            usage("cpu", 8000),
            usage(
                "gpu",
                4,
                "set",
                members=[member(0, A100), member(1, A100), member(2, H100), member(3, "")],
            ),
            usage("licenses", 3),
            usage("ports", 100, "range", lo=30000, hi=30099),
        ],
        preemption="lower_priority",
        quotas={"alice": QuotaInfo(min={"gpu": 3}, max={"gpu": 4, "licenses": 1})},
    )
    counted = pool("counted", [usage("gpu", 2)])
    docs = kueue_objects([mixed, counted], [tenant("alice", 5)])
    by_kind = check_kueue(docs)
    assert set(by_kind["ResourceFlavor"]) == {"a100", "h100", "gpu", "default-flavor"}
    assert "spec" not in by_kind["ResourceFlavor"]["gpu"]
    queues = by_kind["ClusterQueue"]
    mine = quotas_of(queues["mixed.alice"])
    # the min of 3 fills the models in order: a100 2, gpu (unknown model) 1, h100 0
    assert {f: mine[f, "nvidia.com/gpu"]["nominalQuota"] for f in ("a100", "gpu", "h100")} == {
        "a100": "2",
        "gpu": "1",
        "h100": "0",
    }
    assert mine["a100", "nvidia.com/gpu"]["borrowingLimit"] == "2"
    assert mine["default-flavor", "resd/licenses"]["borrowingLimit"] == "1"
    shared = quotas_of(queues["mixed"])
    assert shared["a100", "nvidia.com/gpu"]["nominalQuota"] == "0"
    assert shared["h100", "nvidia.com/gpu"]["nominalQuota"] == "1"
    assert queues["mixed"]["spec"]["preemption"] == {
        "reclaimWithinCohort": "Any",
        "withinClusterQueue": "LowerPriority",
        "borrowWithinCohort": {"policy": "LowerPriority"},
    }
    assert quotas_of(queues["counted"]) == {
        ("gpu", "nvidia.com/gpu"): {"name": "nvidia.com/gpu", "nominalQuota": "2"}
    }
    assert by_kind["LocalQueue"]["alice/counted"]["spec"]["clusterQueue"] == "counted"


def test_kueue_without_pools_or_tenants() -> None:
    docs = list(yaml.safe_load_all(kueue_manifests([], [])))
    assert docs == []


# ------------------------------------------------------------------ the command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "slurm", "--since", "2h"], "--since applies only to --format json or csv"),
        (["--format", "kueue", "--tenant", "a"], "--tenant applies only to --format json or csv"),
        (["--format", "csv", "--pool", "host"], "--pool applies only to --format slurm or kueue"),
        (["--format", "kueue", "--node-name", "n1"], "--node-name applies only to --format slurm"),
        (["--format", "slurm", "--node-name", "n[1-2]"], "is not a Slurm node name"),
        (["--format", "slurm", "--pool", "no/slash"], "pool name 'no/slash' is not valid"),
        (["--format", "kueue", "--pool", "no/slash"], "name 'no/slash' is not valid"),
        (["--format", "yaml"], "use one of json, csv, slurm, kueue"),
    ],
)
def test_export_flags_refused_before_connecting(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    socket = str(tmp_path / "no-daemon.sock")
    result = CliRunner().invoke(app, ["export", *argv, "--socket", socket], env={"NO_COLOR": None})
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("resctl: invalid: ")
    assert message in result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------------ NUMA discovery


def test_numa_cpus_from_sysfs(tmp_path: Path) -> None:
    nodes = tmp_path / "devices" / "system" / "node"
    for name, cpus in [("node0", "0-27,56-83\n"), ("node1", "28-55,84-111\n"), ("node2", "\n")]:
        (nodes / name).mkdir(parents=True)
        (nodes / name / "cpulist").write_text(cpus)
    (nodes / "node10").mkdir()  # no cpulist: left out
    (nodes / "possible").write_text("0-10\n")
    (nodes / "nodeX").mkdir()
    assert numa_cpus(tmp_path) == {"0": "0-27,56-83", "1": "28-55,84-111"}
    assert numa_cpus(tmp_path / "nowhere") == {}
