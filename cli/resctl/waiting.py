"""Queue commands: ``why`` (why a request waits: resources, conflict, its tenant's
max — ``quota`` —, or borrowers' leases being reclaimed for it — ``reclaiming``)
and ``plan`` (what a request would take, evictions and quota reclaims included,
without changing anything). ``list --pending`` lives with ``list``."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from resctl.options import (
    ContiguousOpt,
    CpuOpt,
    GpuModelOpt,
    GpuOpt,
    JsonOpt,
    MemberOpt,
    MemoryOpt,
    NumaOpt,
    PlacementOpt,
    ReservationIdArg,
    ReservationIdOpt,
    ReservePoolOpt,
    ResOpt,
    SelectorOpt,
    SocketOpt,
    VramOpt,
    build,
    reservation_id_of,
    reserve_fields_of,
)
from resctl.render import reservations_table, wait_lines
from resctl.session import Output, connect, guard
from resd_client.protocol import Plan, PlanResult, ReservationRef, Reserve, WaitInfo, to_wire

PriorityOpt = Annotated[
    int | None,
    typer.Option(
        "--priority", metavar="1-10", help="Plan as if at this priority (default: the tenant's)."
    ),
]
PlanTenantOpt = Annotated[
    str | None,
    typer.Option("--tenant", metavar="TENANT", help="Plan as this tenant (default: your user's)."),
]


def why(
    id_arg: ReservationIdArg = None,
    reservation_id: ReservationIdOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Why a request waits: its place in the queue and what it is short of, its
    tenant's quota max it would pass, or the borrowers' leases reclaimed for it."""
    out = Output(json_out)
    with guard(out):
        args = build(ReservationRef, {"id": reservation_id_of(id_arg, reservation_id)})
        with connect(socket) as client:
            info: WaitInfo = client.call("why", args)
        out.emit(info)
        for line in wait_lines(info):
            out.line(line)


def plan(
    ctx: typer.Context,
    tenant: PlanTenantOpt = None,
    priority: PriorityOpt = None,
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
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Dry run: would this request fit, wait, evict whom, or reclaim whom from borrowers
    (when its tenant asks within its quota's min)? Changes nothing."""
    out = Output(json_out)
    with guard(out):
        request = build(
            Reserve,
            {
                **reserve_fields_of(ctx.params),
                "tenant": tenant,
            },
        )
        args = build(Plan, {"request": to_wire(request), "priority": priority})
        with connect(socket) as client:
            result: PlanResult = client.call("plan", args)
        out.emit(result)
        out.line(f"{result.outcome}: {result.message}")
        if result.victims:
            out.line(victims_heading(result))
            out.show(reservations_table(result.victims, time.time(), plain=out.plain))


def victims_heading(result: PlanResult) -> str:
    """The heading of ``plan``'s table of ``result.victims``: borrowers' leases it
    would reclaim (any priority: the tenant asks within its min), lower-priority
    leases it would evict, or leases already leaving that it would wait for."""
    match result.outcome:
        case "reclaim":
            return "to reclaim from borrowers (tenants above their min, whatever their priority):"
        case "preempt":
            return "to evict (lower priority):"
        case _:
            return "already giving back:"
