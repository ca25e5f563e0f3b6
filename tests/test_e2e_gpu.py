"""GPUs end to end: a real ``resd`` that discovered eight fake 80 GiB H100s (a
``gpus_file``) into its ``host`` pool, driven only through ``resctl``.

No ``--pool`` anywhere: requests go to ``host``. Covers ``resctl run --gpu``'s
``CUDA_VISIBLE_DEVICES``, VRAM slices under binpack and spread placement, SIGKILL
of ``resctl run`` freeing its GPUs and killing CMD, and ``resctl resources``
(hypeman's GET /resources) in JSON and as tables.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resd.inventory import GpuDevice
from resd.nvml import device_to_json
from tests.conftest import Proc, resctl, subprocess_env, wait_for

pytestmark = pytest.mark.slow

GIB = 1 << 30
MODEL = "NVIDIA H100 80GB HBM3"
H100S = [
    GpuDevice(
        index=i,
        uuid=f"GPU-{i:08x}-1111-2222-3333-444444444444",
        name=MODEL,
        memory_total=80 * GIB,
        numa_node=i // 4,
        pci_bus_id=f"0000:{0x18 + 0x10 * i:02x}:00.0",
        mig=False,
    )
    for i in range(8)
]
DISK_RATIO = 1.7  # not a round ratio, so that effective_limit's rounding shows
STATUS_KEYS = {
    "capacity",
    "effective_limit",
    "allocated",
    "available",
    "oversub_ratio",
    "source",
    "unit",
}


@pytest.fixture
def host(short_tmp: Path) -> Iterator[Proc]:
    """A real resd with the discovered ``host`` pool holding the eight fake GPUs."""
    gpus = short_tmp / "gpus.json"
    gpus.write_text(json.dumps({"gpus": [device_to_json(d) for d in H100S]}))
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=["--fsync", "always", "--log-level", "info", "--log-format", "json"],
        log=short_tmp / "resd.log",
        env={"RESD_GPUS_FILE": str(gpus), "RESD_OVERSUB_DISK": str(DISK_RATIO)},
    )
    proc.start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            assert proc.stop() == 0, proc.log_text()


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Background ``resctl`` processes; killed at the end whatever happened."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def start_run(procs: list[subprocess.Popen[str]], proc: Proc, *args: str) -> subprocess.Popen[str]:
    """``resctl run ARGS`` in the background (ARGS include ``-- CMD``)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "resctl", "run", "--socket", proc.socket, *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    return p


def listed(proc: Proc) -> list[dict[str, Any]]:
    reservations: list[dict[str, Any]] = json.loads(resctl(proc, "list", "--json").stdout)[
        "reservations"
    ]
    return reservations


def wait_listed(proc: Proc, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal found
        found = listed(proc)
        return len(found) == count

    wait_for(enough, 15, f"{count} active reservation(s)")
    return found


def resources(proc: Proc) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(resctl(proc, "resources", "--json").stdout)
    return view


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> dict[int, list[str]]:
    """Live child processes of ``pid`` with their command lines."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(entry.name)] = [a.decode() for a in cmdline.split(b"\0") if a]
    return out


def env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# ---------------------------------------------------------------------- tests


def test_run_two_gpus_from_the_host_pool(host: Proc) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resctl", "run", "--socket", host.socket, "--gpu", "2", "--", "env"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    env = env_lines(result.stdout)
    devices = env["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(devices) == 2 and len(set(devices)) == 2
    assert {int(d) for d in devices} <= set(range(8))
    assert len({int(d) // 4 for d in devices}) == 1  # one NUMA node
    assert env["RESD_POOL"] == "host"
    assert env["RESD_GPUS"] == env["CUDA_VISIBLE_DEVICES"]
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "RESD_VRAM_BYTES" not in env
    assert listed(host) == []  # released when CMD exited


@pytest.mark.parametrize("how", ["binpack", "pool spread", "reserve spread"])
def test_vram_slices_binpack_and_spread(
    host: Proc, started: list[subprocess.Popen[str]], how: str
) -> None:
    """Three concurrent 40 GiB holds: binpack puts two on one GPU and the third on
    another; spread (the pool's policy, or the request's) gives each its own GPU."""
    extra: list[str] = []
    if how == "pool spread":
        resctl(host, "pool", "set", "--name", "host", "--placement", "spread")
    elif how == "reserve spread":
        extra = ["--placement", "spread"]
    for _ in range(3):
        start_run(started, host, "--vram", "40G", "-q", *extra, "--", "sleep", "30")
    held = wait_listed(host, 3)
    assert all(r["binding"] == "session" and r["pool"] == "host" for r in held)
    assert all(r["resources"] == {"vram": 40 * GIB} for r in held)
    devices = [r["members"]["gpu"] for r in held]
    assert all(len(d) == 1 for d in devices)
    per_device: dict[str, int] = {}
    for (d,) in devices:
        per_device[d] = per_device.get(d, 0) + 1
    if how == "binpack":
        assert sorted(per_device.values()) == [1, 2]
    else:
        assert sorted(per_device.values()) == [1, 1, 1]
    view = resources(host)
    vram_on = {g["name"]: g["vram_allocated"] for g in view["gpus"] if g["vram_allocated"]}
    assert vram_on == {d: n * 40 * GIB for d, n in per_device.items()}
    assert all(not g["whole"] for g in view["gpus"])
    assert view["resources"]["vram"]["allocated"] == 120 * GIB
    assert view["resources"]["gpu"]["allocated"] == len(per_device)  # sliced GPUs are busy
    for p in started:
        p.send_signal(signal.SIGTERM)
    assert [p.wait(15) for p in started] == [143, 143, 143]  # sleep's SIGTERM status
    assert listed(host) == []


def test_sigkill_of_resctl_run_frees_gpus_and_kills_cmd(
    host: Proc, started: list[subprocess.Popen[str]]
) -> None:
    p = start_run(started, host, "--gpu", "4", "-q", "--", "sleep", "60")
    sleeper: list[int] = []

    def cmd_started() -> bool:
        sleeper[:] = [pid for pid, argv in children(p.pid).items() if argv == ["sleep", "60"]]
        return bool(sleeper)

    wait_for(cmd_started, 15, "CMD (sleep 60) to start")
    (held,) = wait_listed(host, 1)
    assert len(held["members"]["gpu"]) == 4
    assert alive(sleeper[0])
    p.kill()
    p.wait(5)
    wait_for(lambda: listed(host) == [], 5, "the GPUs of the killed resctl run to be freed")
    wait_for(lambda: not alive(sleeper[0]), 5, "CMD to die with resctl")
    view = resources(host)
    assert view["resources"]["gpu"]["allocated"] == 0
    assert view["resources"]["gpu"]["available"] == 8
    assert all(not g["whole"] and g["holders"] == 0 for g in view["gpus"])
    assert view["allocations"] == []


def test_resources_json_is_hypemans_shape(host: Proc) -> None:
    whole = json.loads(resctl(host, "reserve", "--gpu", "2", "--label", "train", "--json").stdout)
    part = json.loads(
        resctl(
            host,
            "reserve",
            "--vram",
            "40G",
            "--cpu",
            "1.5",
            "--memory",
            "2G",
            "--res",
            "disk=1G",
            "--label",
            "serve",
            "--json",
        ).stdout
    )
    view = resources(host)
    # hypeman's fields, and resd's quotas (tenant → min, max, used in this pool)
    assert set(view) == {"pool", "resources", "gpus", "allocations", "quotas", "numa_cpus"}
    assert view["pool"] == "host"
    res = view["resources"]
    assert {"cpu", "memory", "disk", "disk_io", "gpu", "vram"} <= set(res)
    for name, status in res.items():
        assert set(status) == STATUS_KEYS, name
        assert status["effective_limit"] == int(status["capacity"] * status["oversub_ratio"]), name
        assert status["available"] == status["effective_limit"] - status["allocated"], name
    # hypeman's ratios for a discovered host, and the configured one
    assert res["cpu"]["oversub_ratio"] == 4.0 and res["cpu"]["unit"] == "millicores"
    assert res["memory"]["oversub_ratio"] == 1.0
    assert res["disk_io"]["oversub_ratio"] == 2.0
    assert res["disk"]["oversub_ratio"] == DISK_RATIO
    assert res["disk"]["effective_limit"] == int(res["disk"]["capacity"] * DISK_RATIO)
    assert res["cpu"]["source"] == res["memory"]["source"] == "detected"
    assert res["gpu"]["source"] == "configured"  # from the gpus_file
    assert (res["cpu"]["allocated"], res["memory"]["allocated"]) == (1500, 2 * GIB)
    assert res["disk"]["allocated"] == GIB
    assert res["gpu"] == {
        "capacity": 8,
        "effective_limit": 8,
        "allocated": 3,  # two whole, one holding a slice
        "available": 5,
        "oversub_ratio": 1.0,
        "source": "configured",
        "unit": "count",
    }
    assert res["vram"]["capacity"] == 640 * GIB
    assert res["vram"]["allocated"] == (2 * 80 + 40) * GIB

    gpus = {g["name"]: g for g in view["gpus"]}
    assert list(gpus) == [str(i) for i in range(8)]
    for d in H100S:
        g = gpus[str(d.index)]
        assert (g["index"], g["uuid"], g["model"], g["numa"]) == (
            str(d.index),
            d.uuid,
            MODEL,
            str(d.numa_node),
        )
        assert g["memory_bytes"] == 80 * GIB
    for name in whole["members"]["gpu"]:
        assert gpus[name]["whole"] and gpus[name]["holders"] == 1
        assert gpus[name]["vram_allocated"] == 80 * GIB
    (sliced,) = part["members"]["gpu"]
    assert not gpus[sliced]["whole"] and gpus[sliced]["holders"] == 1
    assert gpus[sliced]["vram_allocated"] == 40 * GIB

    assert view["allocations"] == [
        {
            "reservation_id": whole["id"],
            "name": "train",
            "tenant": whole["tenant"],
            "cpu": 0,
            "memory_bytes": 0,
            "disk_bytes": 0,
            "network_bps": 0,
            "disk_io_bps": 0,
            "gpus": whole["members"]["gpu"],
            "vram_bytes": 0,
            "other": {},
            # resd's additions: live GPU memory of its processes, reconciler marks
            "vram_used_bytes": 0,
            "marks": {},
        },
        {
            "reservation_id": part["id"],
            "name": "serve",
            "tenant": part["tenant"],
            "cpu": 1500,
            "memory_bytes": 2 * GIB,
            "disk_bytes": GIB,
            "network_bps": 0,
            "disk_io_bps": 0,
            "gpus": [sliced],
            "vram_bytes": 40 * GIB,
            "other": {},
            "vram_used_bytes": 0,
            "marks": {},
        },
    ]

    # the same view as tables (plain: not a TTY)
    text = resctl(host, "resources").stdout
    lines = text.splitlines()
    assert lines[0] == "pool host"
    assert "\x1b[" not in text
    gpu_row = next(line.split() for line in lines if line.startswith("gpu "))
    assert gpu_row[:7] == ["gpu", "8", "1", "8", "3", "5", "configured"]
    assert gpu_row[-1] == "37%"
    vram_row = next(line.split() for line in lines if line.startswith("vram "))
    assert vram_row[1:6] == ["640GiB", "1", "640GiB", "200GiB", "440GiB"]
    sliced_row = next(line for line in lines if line.split()[:1] == [sliced] and "GiB" in line)
    assert f"{part['id']} ({part['tenant']}, 40GiB)" in sliced_row and "1 slice" in sliced_row
    for name in whole["members"]["gpu"]:
        row = next(line for line in lines if line.split()[:1] == [name] and "GiB" in line)
        assert "whole" in row and whole["id"] in row
    alloc = {line.split()[0]: line.split() for line in lines if line.startswith("r-")}
    assert alloc[whole["id"]][1:] == [
        whole["tenant"],
        "train",
        "gpu=2",
        ",".join(whole["members"]["gpu"]),
    ]
    assert alloc[part["id"]][1:] == [
        part["tenant"],
        "serve",
        "cpu=1.5,memory=2GiB,vram=40GiB,disk=1GiB",
        sliced,
    ]

    missing = resctl(host, "resources", "--pool", "nope", check=False)
    assert missing.returncode == 3 and "nope" in missing.stderr


def test_resources_of_a_named_pool(host: Proc) -> None:
    resctl(
        host,
        "pool",
        "create",
        "--name",
        "lic",
        "--res",
        "licenses=4",
        "--oversub",
        "licenses=1.5",
        "--range",
        "ports=100-199",
        "--max-per-tenant",
        "0",
    )
    held = resctl(host, "reserve", "--pool", "lic", "--res", "licenses=5", "--res", "ports=3")
    rid = held.stdout.split()[0]
    view = json.loads(resctl(host, "resources", "--pool", "lic", "--json").stdout)
    assert view["pool"] == "lic" and view["gpus"] == []
    assert view["resources"]["licenses"] == {
        "capacity": 4,
        "effective_limit": 6,  # oversubscribed 1.5 times
        "allocated": 5,
        "available": 1,
        "oversub_ratio": 1.5,
        "source": "configured",
        "unit": "count",
    }
    assert view["resources"]["ports"]["capacity"] == 100
    assert view["resources"]["ports"]["allocated"] == 3
    assert view["resources"]["ports"]["available"] == 97
    (alloc,) = view["allocations"]
    assert alloc["reservation_id"] == rid
    assert alloc["other"] == {"licenses": 5, "ports": 3} and alloc["gpus"] == []
    assert resources(host)["allocations"] == []  # the host pool is untouched
    text = resctl(host, "resources", "--pool", "lic").stdout
    assert text.splitlines()[0] == "pool lic" and "GPUs" not in text
    assert f"{rid} " in text and "licenses=5,ports=3" in text
