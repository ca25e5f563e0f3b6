"""``FileBackend``: GPUs and their live use as a JSON file says, re-read at every
sample, so that an end-to-end test (a real resd) scripts per-process GPU use by
replacing the file, and another agent can feed resd what it measures. Bad files give
``NvmlUnavailable`` (when sampled) or ValueError (``load_gpus_file``), naming the
file, the entry and the field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from resd.gpu_usage import GpuProcess, GpuSample
from resd.nvml import FileBackend, NvmlUnavailable, load_gpus_file

GiB = 1024**3


def write(path: Path, gpus: list[dict[str, Any]]) -> Path:
    """Replace ``path`` atomically, as a script (or a measuring agent) should."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps({"gpus": gpus}))
    os.replace(temp, path)
    return path


def gpu(index: int, **live: Any) -> dict[str, Any]:
    return {"index": index, "uuid": f"GPU-{index}", "name": "H100", "memory": "80G", **live}


def test_devices_are_the_files_gpus(tmp_path: Path) -> None:
    path = write(tmp_path / "gpus.json", [gpu(1, used="1G"), gpu(0)])
    assert FileBackend(path).devices() == load_gpus_file(path)
    assert [d.uuid for d in FileBackend(str(path)).devices()] == ["GPU-0", "GPU-1"]


def test_a_sample_reads_the_live_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path / "gpus.json",
        [
            gpu(0, processes={"4343": 1024, "4242": "20G"}, utilization=87),
            gpu(1, used="5G", utilization=None),  # the driver's own, say
            gpu(2, used=30 * GiB, processes={"999": "10G"}),  # 20G unaccounted
            gpu(3),
        ],
    )
    first, second, third, idle = FileBackend(path).sample()
    assert first == GpuSample(
        index=0,
        uuid="GPU-0",
        memory_total=80 * GiB,
        memory_used=20 * GiB + 1024,  # no "used": the sum of the processes
        utilization=87,
        processes=(GpuProcess(4242, 20 * GiB), GpuProcess(4343, 1024)),
    )
    assert (second.memory_used, second.utilization, second.processes) == (5 * GiB, None, ())
    assert (third.memory_used, third.used_by(999)) == (30 * GiB, 10 * GiB)
    assert idle == GpuSample(3, "GPU-3", 80 * GiB, 0)


def test_the_file_is_read_again_at_every_sample(tmp_path: Path) -> None:
    path = write(tmp_path / "gpus.json", [gpu(0)])
    backend = FileBackend(path)
    assert backend.sample()[0].processes == ()
    write(path, [gpu(0, processes={"4242": "30G"})])
    assert backend.sample()[0].used_by(4242) == 30 * GiB
    write(path, [gpu(0)])
    assert backend.sample()[0].memory_used == 0


def test_a_mig_gpu_is_sampled_per_instance(tmp_path: Path) -> None:
    instances = [
        {"uuid": "MIG-a", "memory": "10G", "profile": "1g.10gb", "processes": {"7": "4G"}},
        {"uuid": "MIG-b", "memory": "20G", "used": "1G"},
    ]
    path = write(tmp_path / "gpus.json", [gpu(0, mig=True, mig_instances=instances)])
    assert FileBackend(path).sample() == [
        GpuSample(0, "MIG-a", 10 * GiB, 4 * GiB, None, (GpuProcess(7, 4 * GiB),)),
        GpuSample(0, "MIG-b", 20 * GiB, GiB),
    ]


def test_a_missing_or_bad_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    backend = FileBackend(path)
    for call in (backend.sample, backend.devices):
        with pytest.raises(NvmlUnavailable, match="cannot read") as info:
            call()
        assert str(path) in info.value.reason
    path.write_text("[{")
    with pytest.raises(NvmlUnavailable, match="not valid JSON"):
        backend.sample()
    path.write_text("[" * 100_000 + "]" * 100_000)  # too deep for the JSON parser
    with pytest.raises(NvmlUnavailable, match="not valid JSON"):
        backend.sample()
    write(path, [gpu(0, used="lots")])
    with pytest.raises(NvmlUnavailable, match=r"entry 0: field 'used': 'lots' is not a size"):
        backend.sample()
    with pytest.raises(NvmlUnavailable, match="cannot read"):
        FileBackend(tmp_path).sample()  # a directory


@pytest.mark.parametrize(
    ("live", "message"),
    [
        ({"used": "20X"}, r"field 'used': '20X' is not a size"),
        ({"used": "20"}, r"field 'used': '20' has no unit"),
        ({"used": -1}, r"field 'used': -1 is not a number of bytes >= 0"),
        ({"used": True}, r"field 'used': True is not a size"),
        ({"used": "81G"}, r"field 'used': \d+ bytes in use is more than the memory"),
        ({"utilization": 101}, r"field 'utilization': 101 is not a percentage"),
        ({"utilization": -1}, r"field 'utilization': -1 is not a percentage"),
        ({"utilization": True}, r"field 'utilization': True is not a percentage"),
        ({"utilization": "50"}, r"field 'utilization': '50' is not a percentage"),
        ({"processes": [1, 2]}, r"field 'processes': \[1, 2\] is not an object of pid"),
        ({"processes": {"abc": "1G"}}, r"field 'processes': 'abc' is not a process id"),
        ({"processes": {"0": "1G"}}, r"field 'processes': '0' is not a process id"),
        ({"processes": {"12": "1X"}}, r"field 'processes.12': '1X' is not a size"),
        ({"processes": {"12": -5}}, r"field 'processes.12': -5 is not a number of bytes"),
        ({"processes": {"12": None}}, r"field 'processes.12': None is not a size"),
        (
            {"processes": {"1": "50G", "2": "50G"}},
            r"field 'processes': \d+ bytes in use is more than the memory",
        ),
        (
            {
                "mig": True,
                "mig_instances": [{"uuid": "MIG-a", "memory": "10G", "utilization": 5}],
            },
            r"field 'mig_instances\[0\]\.utilization': unknown field",
        ),
        (
            {"mig": True, "mig_instances": [{"uuid": "MIG-a", "memory": "10G", "used": "11G"}]},
            r"field 'mig_instances\[0\]\.used': \d+ bytes in use is more than the memory",
        ),
        (
            {
                "mig": True,
                "mig_instances": [{"uuid": "MIG-a", "memory": "10G", "processes": {"x": 1}}],
            },
            r"field 'mig_instances\[0\]\.processes': 'x' is not a process id",
        ),
        ({"mig": True, "utilization": 5}, r"field 'utilization': a GPU in MIG mode"),
    ],
)
def test_bad_live_fields_name_file_entry_and_field(
    tmp_path: Path, live: dict[str, Any], message: str
) -> None:
    path = write(tmp_path / "gpus.json", [gpu(0), gpu(1, **live)])
    with pytest.raises(ValueError, match=message) as info:
        load_gpus_file(path)
    assert f"{path}: entry 1: field" in str(info.value)
    with pytest.raises(NvmlUnavailable, match=message) as unavailable:
        FileBackend(path).sample()
    assert unavailable.value.reason == str(info.value)


def test_null_live_fields_mean_unknown(tmp_path: Path) -> None:
    path = write(tmp_path / "gpus.json", [gpu(0, used=None, utilization=None, processes={})])
    assert FileBackend(path).sample() == [GpuSample(0, "GPU-0", 80 * GiB, 0)]
