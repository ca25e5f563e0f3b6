"""Shared option types and the parsers that turn flag strings into typed values.

Everything here is pure and raises ``InvalidError`` (exit 2) on bad input, so a
flag is refused with the same message shape the daemon would use, before any
connection is made. The ``Annotated`` aliases keep flag spellings and help texts
identical across commands.
"""

from __future__ import annotations

import grp
import math
import pwd
import re
from datetime import datetime
from typing import Annotated, Any, Final, TypeVar

import typer

from resd_client.errors import InvalidError
from resd_client.protocol import MAX_PARTS, Reserve, from_wire
from resd_client.quantity import check_resource_name, parse_quantity

T = TypeVar("T")

# ------------------------------------------------------------------ option types

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON and nothing else on stdout.")
]
SocketOpt = Annotated[
    str | None,
    typer.Option(
        "--socket",
        metavar="PATH",
        help="Daemon socket (default: $RESD_SOCKET, then the user socket, then /run/resd/resd.sock).",
    ),
]
CpuOpt = Annotated[
    str | None,
    typer.Option("--cpu", metavar="QTY", help="CPU: cores (4, 1.5) or millicores (500m)."),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option("--memory", metavar="QTY", help="Memory: MiB (8192) or a size (8G, 512M, 1T)."),
]
GpuOpt = Annotated[str | None, typer.Option("--gpu", metavar="N", help="Whole GPU devices.")]
VramOpt = Annotated[
    str | None,
    typer.Option(
        "--vram", metavar="QTY", help="A slice of one GPU's memory (20G); not with --gpu."
    ),
]
GpuModelOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-model",
        metavar="NAME",
        help="Only GPUs of this model, as the pool lists it (e.g. 'NVIDIA H100 80GB HBM3').",
    ),
]
NumaOpt = Annotated[
    str | None, typer.Option("--numa", metavar="N", help="Only GPUs on this NUMA node.")
]
MemberOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--member",
        metavar="NAME=M1,M2",
        help="Exactly these members of a set (gpu=0,3) or values of a range (ports=30001,30005-30009) (repeatable).",
    ),
]
ContiguousOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--contiguous",
        metavar="NAME",
        help="Take the values of this range resource as one unbroken run (repeatable).",
    ),
]
SelectorOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--selector",
        metavar="K=V",
        help="Place in any pool with these labels, by its placement policy (repeatable; not with --pool).",
    ),
]
PlacementOpt = Annotated[
    str | None,
    typer.Option(
        "--placement",
        metavar="binpack|spread|least_used",
        help="How to choose members for this request (default: the pool's policy).",
    ),
]
ReservePoolOpt = Annotated[
    str | None,
    typer.Option("--pool", metavar="POOL", help="Pool to reserve in (default: host)."),
]
ResOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--res",
        metavar="NAME=QTY",
        help="Any resource by name, e.g. vram=20G, disk=500G, net=10Gbps, licenses=3 (repeatable).",
    ),
]
PartOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--part",
        metavar="pool=NAME,RES=QTY,...",
        help="One part of a gang (repeat, 2 to 16): all parts are granted together or"
        " none, as one lease. Items: pool=NAME (required), amounts as RES=QTY (cpu=4,"
        " memory=8G, gpu=2, vram=20G, ports=3), members.RES=M1+M2 for exact members or"
        " values (members.gpu=0+3, members.ports=30000-30009), gpu-model=NAME, numa=N."
        " E.g. --part pool=a,gpu=2 --part pool=b,cpu=4,memory=8G. Not with --pool,"
        " --selector or the resource flags (--cpu ... --res, --member, --contiguous,"
        " --gpu-model, --numa); --contiguous has no part form.",
    ),
]
PoolNameOpt = Annotated[str, typer.Option("--name", metavar="POOL", help="Pool name.")]
TenantNameOpt = Annotated[str, typer.Option("--name", metavar="TENANT", help="Tenant name.")]
NoWaitOpt = Annotated[
    bool,
    typer.Option("--no-wait", help="Fail at once when it does not fit instead of waiting."),
]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait", help="Wait in the queue until it fits (the daemon says when; Ctrl-C cancels)."
    ),
]
WaitTimeoutOpt = Annotated[
    str | None,
    typer.Option(
        "--timeout", metavar="SECONDS", help="Give up waiting after this long (30, 5m); exit 9."
    ),
]
DeadlineOpt = Annotated[
    str | None,
    typer.Option(
        "--deadline",
        metavar="WHEN",
        help="When this must start by: ranks it before equal-priority waiters with later"
        " deadlines. A duration from now (30m) or a time (2026-11-23T18:00).",
    ),
]
PidOpt = Annotated[
    int | None,
    typer.Option(
        "--pid",
        metavar="PID",
        help="Release when this process exits (a pid binding; pid reuse cannot keep it).",
    ),
]
ReservationIdOpt = Annotated[
    str | None, typer.Option("--id", metavar="ID", help="Reservation id (r-…), as ID.")
]
ReservationIdArg = Annotated[
    str | None,
    typer.Argument(
        metavar="ID", help="Reservation id (r-…), or give it as --id.", show_default=False
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Also release the active reservations it holds.")
]

# ------------------------------------------------------------------- validation


def reservation_id_of(positional: str | None, flag: str | None) -> str:
    """The reservation id given as the ``ID`` argument or as ``--id``; raises
    InvalidError when it is given both ways or not at all."""
    if positional is not None and flag is not None:
        raise InvalidError(
            f"give the reservation id once: as ID ({positional!r}) or as --id ({flag!r}), not both",
            {"field": "id"},
        )
    if positional is None and flag is None:
        raise InvalidError(
            "missing the reservation id: give it as ID or --id (e.g. r-0123456789ab)",
            {"field": "id"},
        )
    return positional if positional is not None else flag  # type: ignore[return-value]


def build(cls: type[T], fields: dict[str, Any]) -> T:
    """Build a protocol args value through the protocol's own decoder and checks.

    ``None`` values are left out so that the protocol's defaults apply. Raises
    InvalidError exactly as the daemon would for the same fields.
    """
    return from_wire(cls, {k: v for k, v in fields.items() if v is not None}, "")


# ----------------------------------------------------------------- quantities

_ORDER: Final = ("cpu", "memory", "gpu", "vram", "disk", "net", "disk_io")


def resource_order(name: str) -> tuple[int, str]:
    """Sort key: the well-known resources first, in the spec's order, then by name."""
    return (_ORDER.index(name), "") if name in _ORDER else (len(_ORDER), name)


def split_pair(text: str, what: str, form: str, example: str) -> tuple[str, str]:
    """Split ``KEY=VALUE``; raises InvalidError naming the flag, its form and an example."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise InvalidError(
            f"{what}: {text!r} is not of the form {form} (e.g. {example})",
            {"field": what, "value": text},
        )
    return key, value


def parse_resources(
    *,
    cpu: str | None = None,
    memory: str | None = None,
    gpu: str | None = None,
    res: list[str] | None = None,
    vram: str | None = None,
    allow_zero: bool = False,
) -> dict[str, int]:
    """Internal-unit amounts from ``--cpu/--memory/--gpu/--vram`` and ``--res NAME=QTY``.

    Raises InvalidError for a malformed pair, a bad name or quantity, or a resource
    given twice.
    """
    out: dict[str, int] = {}
    pairs: list[tuple[str, str]] = [
        (name, value)
        for name, value in (("cpu", cpu), ("memory", memory), ("gpu", gpu), ("vram", vram))
        if value is not None
    ]
    pairs += [split_pair(item, "--res", "NAME=QTY", "vram=20G") for item in res or []]
    for name, value in pairs:
        check_resource_name(name)
        if name in out:
            raise InvalidError(f"resource {name} is given twice", {"resource": name})
        if value.strip().startswith("-"):
            raise InvalidError(
                f"{name}: must be greater than zero, got {value!r}", {"resource": name}
            )
        out[name] = parse_quantity(name, value, allow_zero=allow_zero)
    return out


def parse_members(items: list[str] | None) -> dict[str, list[str]]:
    """``--member NAME=M1,M2`` flags as ``{name: [M1, M2]}``; a name given again adds
    to its list. Raises InvalidError for a malformed pair or resource name."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, value = split_pair(item, "--member", "NAME=M1,M2", "gpu=0,3")
        check_resource_name(name)
        values = [v.strip() for v in value.split(",")]
        if any(not v for v in values):
            raise InvalidError(
                f"--member {name}: {value!r} has an empty member; separate names with commas",
                {"field": "members", "resource": name},
            )
        out.setdefault(name, []).extend(values)
    return out


def parse_constraints(gpu_model: str | None, numa: str | None) -> dict[str, str]:
    """GPU member constraints from ``--gpu-model`` and ``--numa``."""
    out: dict[str, str] = {}
    if gpu_model is not None:
        if not gpu_model.strip():
            raise InvalidError("--gpu-model: give a model name", {"field": "gpu-model"})
        out["model"] = gpu_model.strip()
    if numa is not None:
        if not numa.strip().isdigit():
            raise InvalidError(
                f"--numa: {numa!r} is not a NUMA node number", {"field": "numa", "value": numa}
            )
        out["numa"] = str(int(numa.strip()))
    return out


def reserve_fields(
    *,
    pool: str | None,
    selector: list[str] | None,
    cpu: str | None,
    memory: str | None,
    gpu: str | None,
    vram: str | None,
    res: list[str] | None,
    member: list[str] | None,
    contiguous: list[str] | None,
    gpu_model: str | None,
    numa: str | None,
    placement: str | None,
) -> dict[str, Any]:
    """The ``Reserve`` fields of the resource and placement flags shared by ``reserve``
    and ``run``. The pool defaults to ``host`` unless a ``--selector`` is given."""
    labels: dict[str, str] | None = None
    if selector:
        labels = dict(split_pair(s, "--selector", "KEY=VALUE", "zone=a") for s in selector)
        if pool is not None:
            raise InvalidError("give --pool or --selector, not both", {"field": "selector"})
    elif pool is None:
        pool = "host"
    if placement is not None:
        require_choice(placement, "--placement", ("binpack", "spread", "least_used"))
    return {
        "pool": pool,
        "selector": labels,
        "resources": parse_resources(cpu=cpu, memory=memory, gpu=gpu, vram=vram, res=res),
        "members": parse_members(member) or None,
        "contiguous": list(contiguous) if contiguous else None,
        "constraints": parse_constraints(gpu_model, numa) or None,
        "placement": placement,
    }


#: the resource and placement flags ``reserve``, ``run`` and ``plan`` share
RESERVE_FLAGS: Final = (
    "pool",
    "selector",
    "cpu",
    "memory",
    "gpu",
    "vram",
    "res",
    "member",
    "contiguous",
    "gpu_model",
    "numa",
    "placement",
)


def reserve_fields_of(params: dict[str, Any]) -> dict[str, Any]:
    """``reserve_fields`` from a command's parsed flags (typer's ``ctx.params``); with
    ``--part`` flags, the ``Reserve`` fields of a gang (``gang_fields``)."""
    if params.get("part"):
        return gang_fields(params["part"], params)
    return reserve_fields(**{name: params.get(name) for name in RESERVE_FLAGS})


#: the flags whose place a gang's ``--part`` items take (``--placement`` applies to
#: the whole gang and may come with them)
_PART_EXCLUSIVE: Final = tuple(name for name in RESERVE_FLAGS if name != "placement")
#: ``--part`` items that are constraints, by the ``--`` flag they stand for
_PART_CONSTRAINTS: Final = ("gpu-model", "numa")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def gang_fields(parts: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """The ``Reserve`` fields of a gang: ``parts`` (the ``--part`` flags, each parsed
    by ``parse_part``) and ``--placement`` from ``params``.

    Raises InvalidError for fewer than 2 or more than ``MAX_PARTS`` parts, for a
    flag that ``--part`` replaces (``--pool``, ``--cpu``, ``--member``, ...), and
    for a bad part (saying which).
    """
    given = [_flag(name) for name in _PART_EXCLUSIVE if params.get(name)]
    if given:
        raise InvalidError(
            f"--part gives each part's pool and amounts: do not combine it with"
            f" {', '.join(given)}; put what they ask for in the parts instead"
            " (--part pool=a,gpu=2 --part pool=b,cpu=4)",
            {"field": "part", "flags": given},
        )
    if not 2 <= len(parts) <= MAX_PARTS:
        raise InvalidError(
            f"--part: a gang has 2 to {MAX_PARTS} parts, got {len(parts)}; for one pool"
            " use --pool and the resource flags instead",
            {"field": "part", "count": len(parts)},
        )
    placement = params.get("placement")
    if placement is not None:
        require_choice(placement, "--placement", ("binpack", "spread", "least_used"))
    return {"parts": [parse_part(text) for text in parts], "placement": placement}


def parse_part(text: str) -> dict[str, Any]:
    """One ``--part pool=NAME,RES=QTY,members.RES=M1+M2,gpu-model=M,numa=N`` as the
    wire map of a ``Part`` (internal units), checked as the daemon checks a part.

    Raises InvalidError naming the ``--part`` and what is wrong: an item not of the
    form KEY=VALUE, no pool or two, a resource given twice, a bad quantity, name or
    member list.
    """
    where = f"--part {text!r}"
    items: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not key or not value:
            raise InvalidError(
                f"{where}: {item.strip()!r} is not of the form KEY=VALUE; give"
                " comma-separated items such as pool=a,gpu=2,members.gpu=0+1",
                {"field": "part", "value": text},
            )
        if key in items:
            raise InvalidError(
                f"{where}: gives {key} twice"
                + ("; give each part its own --part" if key == "pool" else ""),
                {"field": "part", "value": text},
            )
        items[key] = value
    pool = items.pop("pool", None)
    if pool is None:
        raise InvalidError(
            f"{where}: name the part's pool (pool=NAME, e.g. --part pool=a,gpu=2)",
            {"field": "part", "value": text},
        )
    try:
        constraints = parse_constraints(items.pop("gpu-model", None), items.pop("numa", None))
        members: dict[str, list[str]] = {}
        for key in [k for k in items if k.startswith("members.")]:
            members[check_resource_name(key.removeprefix("members."))] = _part_members(
                key, items.pop(key)
            )
        part = {
            "pool": pool,
            "resources": parse_resources(res=[f"{k}={v}" for k, v in items.items()]),
            "members": members,
            "constraints": constraints,
        }
        build(Reserve, part)  # what the daemon checks of a part
    except InvalidError as exc:
        raise InvalidError(
            f"{where}: {exc.message.removeprefix('--')}", {**exc.details, "part": text}
        ) from None
    return part


def _part_members(key: str, value: str) -> list[str]:
    """``0+3`` (a part's ``members.RES`` item) as ``["0", "3"]``."""
    names = [v.strip() for v in value.split("+")]
    if any(not v for v in names):
        raise InvalidError(
            f"{key}: {value!r} has an empty member; join members or values with '+'"
            " (members.gpu=0+3, members.ports=30000-30009+30020)",
            {"field": "members", "value": value},
        )
    return names


def parse_ratios(items: list[str] | None) -> dict[str, float]:
    """``--oversub NAME=RATIO`` flags as a map; raises InvalidError."""
    out: dict[str, float] = {}
    for item in items or []:
        name, value = split_pair(item, "--oversub", "NAME=RATIO", "cpu=4")
        check_resource_name(name)
        try:
            ratio = float(value)
        except ValueError:
            raise InvalidError(
                f"--oversub {name}: {value!r} is not a number", {"resource": name}
            ) from None
        if not math.isfinite(ratio):
            raise InvalidError(f"--oversub {name}: must be a finite number", {"resource": name})
        out[name] = ratio
    return out


def parse_labels(items: list[str] | None) -> dict[str, str] | None:
    """``--label K=V`` flags as a map, or None when none were given; raises InvalidError."""
    if items is None:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, value = split_pair(item, "--label", "KEY=VALUE", "zone=a")
        out[key] = value
    return out


# ---------------------------------------------------------------------- times

_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]+)")
_UNIT_SECONDS: Final[dict[str, float]] = {
    "ms": 0.001,
    "s": 1,
    "sec": 1,
    "m": 60,
    "min": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
}


def parse_duration(text: str, what: str) -> float:
    """Seconds from ``300``, ``1.5``, ``90s``, ``10m``, ``2h``, ``1d`` or ``1h30m``.

    A plain number may be negative or zero (the protocol's range checks say what is
    allowed); raises InvalidError for anything that is not a duration.
    """
    raw = text.strip().lower()
    try:
        value = float(raw)
    except ValueError:
        value = _parse_units(raw, text, what)
    if not math.isfinite(value):
        raise InvalidError(f"{what}: must be a finite number of seconds", {"field": what})
    return value


def _parse_units(raw: str, text: str, what: str) -> float:
    compact = raw.replace(" ", "")
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(compact):
        if match.start() != pos or match.group(2) not in _UNIT_SECONDS:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(compact):
        raise InvalidError(
            f"{what}: {text!r} is not a duration; use seconds (300) or 90s, 10m, 2h, 1d, 1h30m",
            {"field": what, "value": text},
        )
    return total


def _parse_time(text: str, now: float, flag: str, direction: int) -> float:
    """Unix seconds from an ISO-8601 time (naive: local), unix seconds, or a
    duration counted from ``now`` (``direction`` -1: ago, +1: from now)."""
    raw = text.strip()
    result: float
    try:
        result = float(raw)
    except ValueError:
        try:
            when = datetime.fromisoformat(raw)
        except ValueError:
            try:
                result = now + direction * _parse_units(raw.lower(), text, flag)
            except InvalidError:
                relative = "ago" if direction < 0 else "from now"
                raise InvalidError(
                    f"{flag}: {text!r} is not a time; use an ISO-8601 time "
                    f"(2026-01-31T12:00:00), unix seconds (1767225600) or a duration {relative} "
                    "(90s, 10m, 2h, 1d)",
                    {"field": flag.lstrip("-"), "value": text},
                ) from None
        else:
            result = (when if when.tzinfo else when.astimezone()).timestamp()
    if not math.isfinite(result) or result < 0:
        raise InvalidError(f"{flag}: {text!r} is before 1970", {"field": flag.lstrip("-")})
    return result


def parse_since(text: str, now: float) -> float:
    """``--since``: a time, unix seconds, or a duration ago (``2h``); not in the future."""
    result = _parse_time(text, now, "--since", -1)
    if result > now + 1:
        raise InvalidError(f"--since: {text!r} is in the future", {"field": "since"})
    return result


def parse_deadline(text: str, now: float) -> float:
    """``--deadline``: a time, unix seconds, or a duration from now (``30m``)."""
    return _parse_time(text, now, "--deadline", +1)


# ---------------------------------------------------------------- identities


def parse_uids(items: list[str] | None) -> list[int] | None:
    """``--owner`` values (uids or user names) as uids; raises InvalidError."""
    return None if items is None else [_lookup(v, "owner", _uid) for v in items]


def parse_gids(items: list[str] | None) -> list[int] | None:
    """``--group`` values (gids or group names) as gids; raises InvalidError."""
    return None if items is None else [_lookup(v, "group", _gid) for v in items]


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _lookup(value: str, what: str, resolve: Any) -> int:
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        number: int = resolve(value)
    except KeyError:
        kind = "user" if what == "owner" else "group"
        raise InvalidError(
            f"--{what}: no {kind} named {value!r} on this host; give a name or a numeric id",
            {"field": what, "value": value},
        ) from None
    return number


def user_name(uid: int) -> str:
    """The user name of ``uid``, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The group name of ``gid``, or the number when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def require_choice(value: str, what: str, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``; raises InvalidError listing them."""
    if value not in allowed:
        raise InvalidError(
            f"{what}: {value!r} is not supported; use one of {', '.join(allowed)}",
            {"field": what, "allowed": list(allowed)},
        )
    return value
