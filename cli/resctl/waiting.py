"""Queue commands: ``why`` (why a request waits) and ``plan`` (what a request would
take, evictions included, without changing anything). ``list --pending`` lives
with ``list``."""

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
    ReservationIdOpt,
    ReservePoolOpt,
    ResOpt,
    SelectorOpt,
    SocketOpt,
    VramOpt,
    build,
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
    reservation_id: ReservationIdOpt, json_out: JsonOpt = False, socket: SocketOpt = None
) -> None:
    """Why a request waits: its place in the queue and what it is short of."""
    out = Output(json_out)
    with guard(out):
        args = build(ReservationRef, {"id": reservation_id})
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
    """Dry run: would this request fit, wait, or evict whom? Changes nothing."""
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
            out.show(reservations_table(result.victims, time.time(), plain=out.plain))
