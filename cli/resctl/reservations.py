"""Reservation commands: ``reserve``, ``unreserve``/``release``, ``renew``, ``preempt``,
``list`` and ``resources``."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from resctl.options import (
    ContiguousOpt,
    CpuOpt,
    DeadlineOpt,
    GpuModelOpt,
    GpuOpt,
    JsonOpt,
    MemberOpt,
    MemoryOpt,
    NumaOpt,
    PidOpt,
    PlacementOpt,
    ReservationIdOpt,
    ReservePoolOpt,
    ResOpt,
    SelectorOpt,
    SocketOpt,
    VramOpt,
    WaitOpt,
    WaitTimeoutOpt,
    build,
    parse_deadline,
    parse_duration,
    reserve_fields_of,
)
from resctl.render import (
    host_resources_view,
    pending_table,
    reservation_line,
    reservations_table,
    waiting_line,
)
from resctl.session import Output, connect, guard
from resd_client.errors import InvalidError
from resd_client.protocol import (
    HostResources,
    ListReservations,
    Preempt,
    Preempted,
    Renew,
    ReservationInfo,
    ReservationList,
    ReservationRef,
    Reserve,
    ResourcesOf,
)

TenantOpt = Annotated[
    str | None,
    typer.Option("--tenant", metavar="TENANT", help="Act as this tenant (default: your user's)."),
]
PoolFilterOpt = Annotated[
    str | None, typer.Option("--pool", metavar="POOL", help="Only this pool.")
]
TtlOpt = Annotated[
    str | None,
    typer.Option("--ttl", metavar="SECONDS", help="Expire after this long (300, 5m, 2h)."),
]


LabelOpt = Annotated[
    str, typer.Option("--label", metavar="TEXT", help="Free-form note shown in lists.")
]
ReclaimableOpt = Annotated[
    bool,
    typer.Option("--reclaimable", help="May be taken back first when capacity is needed."),
]


def _ttl(value: str | None) -> float | None:
    return None if value is None else parse_duration(value, "ttl")


def reserve(
    ctx: typer.Context,
    tenant: TenantOpt = None,
    pool: ReservePoolOpt = None,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    gpu: GpuOpt = None,
    vram: VramOpt = None,
    res: ResOpt = None,
    member: MemberOpt = None,
    contiguous: ContiguousOpt = None,
    gpu_model: GpuModelOpt = None,
    numa: NumaOpt = None,
    selector: SelectorOpt = None,
    placement: PlacementOpt = None,
    ttl: TtlOpt = None,
    label: LabelOpt = "",
    reclaimable: ReclaimableOpt = False,
    wait: WaitOpt = False,
    timeout: WaitTimeoutOpt = None,
    deadline: DeadlineOpt = None,
    pid: PidOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Reserve resources until released, expired or preempted; prints the id first.

    With --wait it queues when it does not fit and returns once granted."""
    out = Output(json_out)
    with guard(out):
        args = build(
            Reserve,
            {
                **reserve_fields_of(ctx.params),
                "tenant": tenant,
                "ttl": _ttl(ttl),
                "binding": "detached" if pid is None else "pid",
                "pid": pid,
                "label": label,
                "reclaimable": reclaimable,
                **wait_fields(wait, timeout, deadline),
            },
        )
        with connect(socket) as client:
            info = client.request(args, on_pending=lambda w: out.warn(waiting_line(w))).info
        out.emit(info)
        out.line(reservation_line(info, time.time()))


def wait_fields(wait: bool, timeout: str | None, deadline: str | None) -> dict[str, Any]:
    """The ``Reserve`` fields of ``--wait``/``--no-wait``, ``--timeout``, ``--deadline``."""
    if timeout is not None and not wait:
        raise InvalidError("--timeout: only a waiting request has one", {"field": "timeout"})
    return {
        "wait": wait,
        "timeout": None if timeout is None else parse_duration(timeout, "timeout"),
        "deadline": None if deadline is None else parse_deadline(deadline, time.time()),
    }


def unreserve(
    reservation_id: ReservationIdOpt, json_out: JsonOpt = False, socket: SocketOpt = None
) -> None:
    """Release a reservation now."""
    out = Output(json_out)
    with guard(out):
        args = build(ReservationRef, {"id": reservation_id})
        with connect(socket) as client:
            info: ReservationInfo = client.call("release", args)
        out.emit(info)
        out.line(f"{info.id} released")


def release(
    reservation_id: ReservationIdOpt, json_out: JsonOpt = False, socket: SocketOpt = None
) -> None:
    """Release a reservation now (alias of unreserve)."""
    unreserve(reservation_id, json_out, socket)


def renew(
    reservation_id: ReservationIdOpt,
    ttl: Annotated[
        str | None,
        typer.Option(
            "--ttl", metavar="SECONDS", help="New time to live from now (default: its own ttl)."
        ),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Extend a reservation's expiry to now + ttl."""
    out = Output(json_out)
    with guard(out):
        args = build(Renew, {"id": reservation_id, "ttl": _ttl(ttl)})
        with connect(socket) as client:
            info: ReservationInfo = client.call("renew", args)
        out.emit(info)
        out.line(reservation_line(info, time.time()))


def preempt(
    target: Annotated[
        str, typer.Option("--target", metavar="TENANT", help="Tenant whose reservations to evict.")
    ],
    tenant: Annotated[
        str | None,
        typer.Option(
            "--tenant",
            metavar="TENANT",
            help="Preempt as this tenant; needs a strictly higher priority (default: your user's).",
        ),
    ] = None,
    pool: PoolFilterOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Evict all active reservations of a lower-priority tenant (or those in --pool)."""
    out = Output(json_out)
    with guard(out):
        args = build(Preempt, {"target": target, "tenant": tenant, "pool": pool})
        with connect(socket) as client:
            result: Preempted = client.call("preempt", args)
        out.emit(result)
        count = len(result.reservations)
        out.line(f"preempted {count} reservation(s) of {target}")
        if count:
            out.show(reservations_table(result.reservations, time.time(), plain=out.plain))


def list_(
    pool: PoolFilterOpt = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", metavar="TENANT", help="Only this tenant.")
    ] = None,
    pending: Annotated[
        bool,
        typer.Option("--pending", help="List queued requests instead, in queue order."),
    ] = False,
    idle: Annotated[
        bool,
        typer.Option(
            "--idle", help="Only leases marked idle (their GPUs unused for the pool's idle_after)."
        ),
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """List active reservations (or, with --pending, the requests waiting for room).

    A MARKS column shows OVERUSE and IDLE marks when any lease has one; --json has
    each lease's marks, enforcement level and registered processes."""
    out = Output(json_out)
    with guard(out):
        args = build(
            ListReservations, {"pool": pool, "tenant": tenant, "pending": pending, "idle": idle}
        )
        with connect(socket) as client:
            result: ReservationList = client.call("list", args)
        out.emit(result)
        table = pending_table if pending else reservations_table
        if result.reservations:
            out.show(table(result.reservations, time.time(), plain=out.plain))
        else:
            kind = "idle" if idle else "active"
            out.line("no waiting requests" if pending else f"no {kind} reservations")


ResourcesPoolOpt = Annotated[
    str | None,
    typer.Option("--pool", metavar="POOL", help="The pool to show (default: host)."),
]


def resources(
    pool: ResourcesPoolOpt = None, json_out: JsonOpt = False, socket: SocketOpt = None
) -> None:
    """hypeman's GET /resources for one pool: per resource capacity, effective limit,
    allocated and available, then its GPUs and allocations."""
    out = Output(json_out)
    with guard(out):
        args = build(ResourcesOf, {"pool": pool})
        with connect(socket) as client:
            view: HostResources = client.call("resources", args)
        out.emit(view)
        out.show(host_resources_view(view, plain=out.plain))
