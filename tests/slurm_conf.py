"""A strict reader of the slurm.conf and gres.conf lines ``resctl export --format
slurm`` writes, after slurm.conf(5) and gres.conf(5). No maintained Python parser of
these files exists (pyslurm needs a Slurm install), so the tests hold this one.

The grammar it enforces: ``#`` starts a comment to the end of the line; a line is
whitespace-separated ``Key=Value`` tokens, keys case-insensitive, values non-empty
without spaces; the first key says what the line is (``NodeName``,
``PartitionName``, or a single global parameter such as ``GresTypes``); only keys
slurm.conf(5) / gres.conf(5) define for that line are accepted; ``Gres`` is a comma
list of ``name[:type][:count]`` with ``name`` in ``GresTypes`` and a count with an
optional ``K``/``M``/``G``/``T``/``P`` suffix; ``File`` is an absolute path, with a
``[0-3,5]`` hostlist range expanded; ``Cores`` is ``N`` or ``N-M`` items, comma
separated, ascending within a range. ``check`` then holds the two files together:
every gres.conf node and GRES is in slurm.conf, counts per (name, type) agree,
device files are distinct, and cores are below the node's CPUs.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

NODE_KEYS: Final = frozenset(
    {
        "nodename",
        "nodehostname",
        "nodeaddr",
        "boards",
        "cpus",
        "corespersocket",
        "features",
        "gres",
        "memspeclimit",
        "port",
        "realmemory",
        "sockets",
        "socketsperboard",
        "state",
        "threadspercore",
        "tmpdisk",
        "weight",
    }
)
PARTITION_KEYS: Final = frozenset(
    {"partitionname", "nodes", "default", "maxtime", "defaulttime", "state", "priorityjobfactor"}
)
GLOBAL_KEYS: Final = frozenset({"grestypes", "clustername", "slurmctldhost"})
GRES_KEYS: Final = frozenset(
    {"nodename", "name", "type", "file", "cores", "count", "autodetect", "links", "flags"}
)
NODE_STATES: Final = frozenset({"CLOUD", "DOWN", "DRAIN", "FAIL", "FAILING", "FUTURE", "UNKNOWN"})
PARTITION_STATES: Final = frozenset({"UP", "DOWN", "DRAIN", "INACTIVE"})
AUTODETECT: Final = frozenset({"nvml", "rsmi", "oneapi", "nrt", "nvidia", "off"})

_TOKEN: Final = re.compile(r"([A-Za-z]+)=(\S+)")
_HOST: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_GRES_NAME: Final = re.compile(r"[a-z][a-z0-9_]*")
_GRES_TYPE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_COUNT: Final = re.compile(r"(\d+)([KMGTP]?)")
_CORE_ITEM: Final = re.compile(r"(\d+)(?:-(\d+))?")
_FILE: Final = re.compile(r"(/[A-Za-z0-9_./-]*?)(?:\[([0-9,-]+)\])?")
_MAXTIME: Final = re.compile(r"INFINITE|UNLIMITED|\d+(:\d{2}){0,2}|\d+-\d+(:\d{2}){0,2}")
_SUFFIX: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class SlurmSyntaxError(AssertionError):
    """A line these files may not hold, with its number and why."""


@dataclass
class Node:
    name: str
    cpus: int
    real_memory: int | None
    gres: Counter[tuple[str, str]]
    state: str


@dataclass
class Partition:
    name: str
    nodes: list[str]
    default: bool
    state: str


@dataclass
class GresLine:
    node: str | None
    name: str
    type: str
    files: list[str]
    cores: list[int] | None
    count: int


@dataclass
class SlurmConf:
    gres_types: list[str] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)
    partitions: dict[str, Partition] = field(default_factory=dict)


def split_sections(text: str) -> tuple[str, str]:
    """The slurm.conf and gres.conf parts of the export, by its marker lines."""
    head, sep, rest = text.partition("# --- slurm.conf ---\n")
    assert sep, "no slurm.conf marker"
    slurm, sep, gres = rest.partition("# --- gres.conf ---\n")
    assert sep, "no gres.conf marker"
    assert all(not line or line.startswith("#") for line in head.splitlines()), head
    return slurm, gres


def _tokens(line: str, number: int, allowed: frozenset[str]) -> list[tuple[str, str]]:
    text = line.split("#", 1)[0].strip()
    pairs = []
    for word in text.split():
        match = _TOKEN.fullmatch(word)
        if match is None:
            raise SlurmSyntaxError(f"line {number}: {word!r} is not Key=Value")
        key = match.group(1).lower()
        if key not in allowed:
            raise SlurmSyntaxError(f"line {number}: unknown parameter {match.group(1)!r}")
        if key in (k for k, _ in pairs):
            raise SlurmSyntaxError(f"line {number}: {match.group(1)} given twice")
        pairs.append((key, match.group(2)))
    return pairs


def _int(value: str, number: int, what: str, least: int = 0) -> int:
    if not value.isdigit() or int(value) < least:
        raise SlurmSyntaxError(f"line {number}: {what}={value!r} is not an integer >= {least}")
    return int(value)


def _host(value: str, number: int) -> str:
    if not _HOST.fullmatch(value):
        raise SlurmSyntaxError(f"line {number}: {value!r} is not a node name")
    return value


def _gres_spec(value: str, number: int, types: list[str]) -> Counter[tuple[str, str]]:
    """``gpu:h100:8,gpu:a100:2`` → {("gpu", "h100"): 8, ("gpu", "a100"): 2}."""
    found: Counter[tuple[str, str]] = Counter()
    for item in value.split(","):
        parts = item.split(":")
        if not 1 <= len(parts) <= 3 or not _GRES_NAME.fullmatch(parts[0]):
            raise SlurmSyntaxError(f"line {number}: Gres item {item!r} is not name[:type][:count]")
        if parts[0] not in types:
            raise SlurmSyntaxError(f"line {number}: Gres {parts[0]!r} is not in GresTypes")
        count = 1
        if len(parts) > 1 and (match := _COUNT.fullmatch(parts[-1])):
            count = int(match.group(1)) * _SUFFIX[match.group(2)]
            parts = parts[:-1]
        if len(parts) == 2 and not _GRES_TYPE.fullmatch(parts[1]):
            raise SlurmSyntaxError(f"line {number}: Gres type {parts[1]!r} is not valid")
        if len(parts) > 2:
            raise SlurmSyntaxError(f"line {number}: Gres item {item!r} has no count")
        key = (parts[0], parts[1] if len(parts) == 2 else "")
        if key in found:
            raise SlurmSyntaxError(f"line {number}: Gres {item!r} given twice")
        found[key] = count
    return found


def read_slurm_conf(text: str) -> SlurmConf:
    conf = SlurmConf()
    for number, line in enumerate(text.splitlines(), 1):
        first = line.split("#", 1)[0].strip().split("=", 1)[0].lower()
        if not first:
            continue
        if first == "nodename":
            fields = dict(_tokens(line, number, NODE_KEYS))
            name = _host(fields["nodename"], number)
            state = fields.get("state", "UNKNOWN")
            if state.upper() not in NODE_STATES:
                raise SlurmSyntaxError(f"line {number}: node State={state!r}")
            memory = fields.get("realmemory")
            conf.nodes[name] = Node(
                name=name,
                cpus=_int(fields.get("cpus", "1"), number, "CPUs", least=1),
                real_memory=None if memory is None else _int(memory, number, "RealMemory", 1),
                gres=_gres_spec(fields["gres"], number, conf.gres_types)
                if "gres" in fields
                else Counter(),
                state=state,
            )
        elif first == "partitionname":
            fields = dict(_tokens(line, number, PARTITION_KEYS))
            nodes = [_host(n, number) for n in fields.get("nodes", "").split(",")]
            if missing := [n for n in nodes if n not in conf.nodes]:
                raise SlurmSyntaxError(f"line {number}: partition names unknown nodes {missing}")
            default = fields.get("default", "NO").upper()
            state = fields.get("state", "UP").upper()
            if default not in ("YES", "NO") or state not in PARTITION_STATES:
                raise SlurmSyntaxError(f"line {number}: Default={default} State={state}")
            if not _MAXTIME.fullmatch(fields.get("maxtime", "INFINITE")):
                raise SlurmSyntaxError(f"line {number}: MaxTime={fields['maxtime']!r}")
            conf.partitions[fields["partitionname"]] = Partition(
                fields["partitionname"], nodes, default == "YES", state
            )
        else:
            ((key, value),) = _tokens(line, number, GLOBAL_KEYS)
            if key == "grestypes":
                conf.gres_types = value.split(",")
                if not all(_GRES_NAME.fullmatch(t) for t in conf.gres_types):
                    raise SlurmSyntaxError(f"line {number}: GresTypes={value!r}")
    return conf


def _cores(value: str, number: int) -> list[int]:
    cores: list[int] = []
    for item in value.split(","):
        match = _CORE_ITEM.fullmatch(item)
        if match is None:
            raise SlurmSyntaxError(f"line {number}: Cores item {item!r} is not N or N-M")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise SlurmSyntaxError(f"line {number}: Cores range {item!r} runs backwards")
        cores += range(lo, hi + 1)
    if len(set(cores)) != len(cores):
        raise SlurmSyntaxError(f"line {number}: Cores={value!r} names a core twice")
    return cores


def _files(value: str, number: int) -> list[str]:
    match = _FILE.fullmatch(value)
    if match is None:
        raise SlurmSyntaxError(f"line {number}: File={value!r} is not an absolute path")
    if match.group(2) is None:
        return [match.group(1)]
    return [f"{match.group(1)}{i}" for i in _cores(match.group(2), number)]


def read_gres_conf(text: str) -> list[GresLine]:
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        pairs = _tokens(line, number, GRES_KEYS)
        if not pairs:
            continue
        if pairs[0][0] not in ("nodename", "name", "autodetect"):
            raise SlurmSyntaxError(f"line {number}: a line starts with NodeName or Name")
        fields = dict(pairs)
        if "autodetect" in fields and fields["autodetect"] not in AUTODETECT:
            raise SlurmSyntaxError(f"line {number}: AutoDetect={fields['autodetect']!r}")
        if "name" not in fields:
            continue  # a node-wide AutoDetect line
        if not _GRES_NAME.fullmatch(fields["name"]):
            raise SlurmSyntaxError(f"line {number}: Name={fields['name']!r}")
        if "type" in fields and not _GRES_TYPE.fullmatch(fields["type"]):
            raise SlurmSyntaxError(f"line {number}: Type={fields['type']!r}")
        files = _files(fields["file"], number) if "file" in fields else []
        count = len(files) or 1
        if "count" in fields:
            match = _COUNT.fullmatch(fields["count"])
            if match is None:
                raise SlurmSyntaxError(f"line {number}: Count={fields['count']!r}")
            count = int(match.group(1)) * _SUFFIX[match.group(2)]
            if files and count != len(files):
                raise SlurmSyntaxError(f"line {number}: Count differs from the File count")
        lines.append(
            GresLine(
                node=_host(fields["nodename"], number) if "nodename" in fields else None,
                name=fields["name"],
                type=fields.get("type", ""),
                files=files,
                cores=_cores(fields["cores"], number) if "cores" in fields else None,
                count=count,
            )
        )
    return lines


def check(conf: SlurmConf, gres: list[GresLine]) -> None:
    """Hold gres.conf to slurm.conf: known nodes and GRES, equal counts, distinct
    device files, cores below the node's CPUs."""
    files = [f for line in gres for f in line.files]
    if len(set(files)) != len(files):
        raise SlurmSyntaxError(f"a device file is given twice: {files}")
    for name, node in conf.nodes.items():
        mine = [line for line in gres if line.node in (name, None)]
        counts: Counter[tuple[str, str]] = Counter()
        for line in mine:
            counts[line.name, line.type] += line.count
            if line.cores is not None and max(line.cores) >= node.cpus:
                raise SlurmSyntaxError(f"node {name}: Cores {line.cores} beyond CPUs={node.cpus}")
        if counts != node.gres:
            raise SlurmSyntaxError(f"node {name}: gres.conf {counts} but Gres= {node.gres}")
    if unknown := {line.node for line in gres} - set(conf.nodes) - {None}:
        raise SlurmSyntaxError(f"gres.conf names nodes not in slurm.conf: {unknown}")


def parse_export(text: str) -> tuple[SlurmConf, list[GresLine]]:
    """Both files of an export, read strictly and checked together."""
    slurm, gres_text = split_sections(text)
    conf = read_slurm_conf(slurm)
    gres = read_gres_conf(gres_text)
    check(conf, gres)
    return conf, gres
