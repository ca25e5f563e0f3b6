"""``resd detect`` as a real command: JSON and table output, a configured GPU file,
configuration errors, and (marked ``gpu``) the real NVML backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resd.inventory import GpuDevice, MigInstance
from resd.nvml import NvmlUnavailable, PynvmlBackend, device_to_json
from tests.conftest import subprocess_env

GiB = 1024**3
H100S = [
    GpuDevice(
        index=i,
        uuid=f"GPU-{i:08x}-aaaa-bbbb-cccc-dddddddddddd",
        name="NVIDIA H100 80GB HBM3",
        memory_total=80 * GiB,
        numa_node=i // 4,
        pci_bus_id=f"0000:{0x18 + 0x10 * i:02x}:00.0",
        mig=i == 7,
        # a GPU in MIG mode offers its instances: one here, so the set still has 8
        mig_instances=(MigInstance("MIG-7", 10 * GiB, "1g.10gb", 0),) if i == 7 else (),
    )
    for i in range(8)
]


def resd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resd", *args],
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def gpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([device_to_json(d) for d in H100S], indent=1))
    return path


def test_detect_json_with_a_gpus_file(tmp_path: Path, gpus_file: Path) -> None:
    result = resd(
        "detect",
        "--json",
        "--state-dir",
        str(tmp_path / "state"),
        env={"RESD_GPUS_FILE": str(gpus_file)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    resources = report["resources"]
    assert {"cpu", "memory", "disk", "disk_io", "gpu"} <= set(resources)
    for name, res in resources.items():
        assert set(res) >= {"capacity", "source", "oversub_ratio", "effective_limit"}, name
        assert res["capacity"] > 0
        assert res["effective_limit"] == int(res["capacity"] * res["oversub_ratio"])
    assert resources["cpu"]["oversub_ratio"] == 4.0
    assert resources["disk_io"] == {
        "capacity": GiB,
        "source": "configured",
        "oversub_ratio": 2.0,
        "effective_limit": 2 * GiB,
        "detail": "disk_io_limit",
    }
    assert resources["gpu"]["capacity"] == 8
    assert resources["gpu"]["source"] == "configured"
    assert report["gpu_source"] == "configured"
    assert report["gpus"] == [device_to_json(d) for d in H100S]
    # the printed GPU list is itself a valid gpus_file
    again = tmp_path / "again.json"
    again.write_text(result.stdout)
    second = resd("detect", "--json", env={"RESD_GPUS_FILE": str(again)})
    assert json.loads(second.stdout)["gpus"] == report["gpus"]


def test_detect_table_lists_resources_and_gpus(tmp_path: Path, gpus_file: Path) -> None:
    result = resd(
        "--state-dir",  # the daemon's flag, before the command, works too
        str(tmp_path / "state"),
        "detect",
        env={
            "RESD_GPUS_FILE": str(gpus_file),
            "RESD_DISK_LIMIT": "500G",
            "RESD_NETWORK_LIMIT": "10Gbps",
        },
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RESOURCE", "CAPACITY", "SOURCE", "OVERSUB", "EFFECTIVE", "FROM"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert rows["disk"][:5] == ["disk", "500GiB", "configured", "1", "500GiB"]
    assert rows["net"][:5] == ["net", "10Gbps", "configured", "2", "20Gbps"]
    assert rows["disk_io"][:5] == ["disk_io", "1GiB/s", "configured", "2", "2GiB/s"]
    assert rows["gpu"][:5] == ["gpu", "8", "configured", "1", "8"]
    assert "GPUs (8, configured):" in lines
    gpu_lines = [line for line in lines if "NVIDIA H100 80GB HBM3" in line]
    assert len(gpu_lines) == 8
    assert gpu_lines[0].split() == [
        "0",
        "NVIDIA",
        "H100",
        "80GB",
        "HBM3",
        "80GiB",
        "0",
        "0000:18:00.0",
        "off",
        H100S[0].uuid,
    ]
    assert gpu_lines[7].split()[-2:] == ["on", H100S[7].uuid]
    assert result.stderr == ""


def test_detect_config_file_after_the_command(tmp_path: Path, gpus_file: Path) -> None:
    config = tmp_path / "resd.toml"
    config.write_text(f'gpus_file = "{gpus_file}"\ndisk_limit = "2T"\n\n[oversub]\ncpu = 2.0\n')
    result = resd("detect", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resources"]["disk"]["capacity"] == 2 * 1024**4
    assert report["resources"]["cpu"]["oversub_ratio"] == 2.0
    assert len(report["gpus"]) == 8


def test_detect_bad_limit_exits_2(tmp_path: Path) -> None:
    result = resd("detect", env={"RESD_NETWORK_LIMIT": "fast"})
    assert result.returncode == 2
    assert "network_limit" in result.stderr and "'fast'" in result.stderr
    assert result.stdout == ""


def test_detect_bad_gpus_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "gpus.json"
    bad.write_text('[{"index": 0, "uuid": "GPU-a", "name": "x"}]')
    result = resd("detect", "--json", env={"RESD_GPUS_FILE": str(bad)})
    assert result.returncode == 2
    assert "gpus_file" in result.stderr and "field 'memory': missing" in result.stderr


def test_plain_resd_still_runs_the_daemon_flags(tmp_path: Path) -> None:
    """No command: the daemon's flags are parsed as before (a bad one exits 2)."""
    result = resd("--fsync", "sometimes", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "fsync" in result.stderr
    help_text = resd("--help").stdout
    assert "--no-host-pool" in help_text and "detect" in help_text


def _nvml_works() -> bool:
    try:
        return bool(PynvmlBackend().devices())
    except NvmlUnavailable:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _nvml_works(), reason="needs a working NVIDIA driver and a GPU")
def test_detect_real_gpus(tmp_path: Path) -> None:
    result = resd("detect", "--json", "--state-dir", str(tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gpu_source"] == "detected"
    assert report["gpu_unavailable"] == ""
    gpus = report["gpus"]
    assert gpus, report
    assert [g["index"] for g in gpus] == list(range(len(gpus)))
    for gpu in gpus:
        assert gpu["uuid"].startswith("GPU-"), gpu
        assert gpu["memory"] > 0, gpu
        assert gpu["name"], gpu
        assert gpu["numa"] is None or gpu["numa"] >= 0
    assert report["resources"]["gpu"]["capacity"] == len(gpus)
    human = resd("detect", "--state-dir", str(tmp_path), timeout=60)
    assert gpus[0]["uuid"] in human.stdout
