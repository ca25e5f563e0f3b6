"""``resctl top``: every lease's live use, redrawn from the samples resd pushes.

The pure half (``filter_snapshot``, ``sort_rows``, ``render_top``) turns a
``TopSnapshot`` into a table; the command half subscribes to the ``top`` topic and
redraws on each ``TopEvent``. resd is never polled: one ``top`` request draws the
first frame, then every frame comes from a push (one per sample interval). When
resd goes away the last frame stays up with a ``resd away`` line; the client
reconnects and subscribes again by itself, and the next sample replaces it.
``--json`` prints one snapshot and exits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Final

import msgspec
import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from resctl.options import SocketOpt, require_choice
from resctl.render import (
    RED,
    compact_bytes,
    device_line,
    duration,
    make_table,
    marks_text,
)
from resctl.session import Output, connect, guard
from resd_client import Client, Disconnected, Reconnected
from resd_client.errors import UnavailableError
from resd_client.protocol import DeviceUse, TopEvent, TopRow, TopSnapshot, check_name
from resd_client.quantity import render_quantity

#: ``--sort`` columns; text columns sort ascending, numbers largest first
SORTS: Final = ("id", "tenant", "pool", "cpu", "rss", "gpu", "vram", "age", "idle")
DEFAULT_SORT: Final = "gpu"


# ------------------------------------------------------------------ the pure half


def filter_snapshot(snapshot: TopSnapshot, pool: str | None, tenant: str | None) -> TopSnapshot:
    """Only the rows of ``pool`` and ``tenant`` (None: any), and only ``pool``'s devices."""
    rows = [
        r
        for r in snapshot.rows
        if (pool is None or r.pool == pool) and (tenant is None or r.tenant == tenant)
    ]
    devices = (
        snapshot.devices
        if pool is None
        else {k: v for k, v in snapshot.devices.items() if k == pool}
    )
    return msgspec.structs.replace(snapshot, rows=rows, devices=devices)


def gpu_members(row: TopRow) -> list[str]:
    """The GPUs a lease holds: its assigned ``gpu`` members."""
    return row.members.get("gpu", [])


def reserved_vram(row: TopRow, devices: dict[str, list[DeviceUse]]) -> int:
    """GPU memory a lease reserved: its ``vram`` slice, or the whole memory of the
    GPUs it holds (as the pool's last sample gives it)."""
    if "vram" in row.resources:
        return row.resources["vram"]
    held = set(gpu_members(row))
    return sum(d.memory_total for d in devices.get(row.pool, []) if d.member in held)


SortKey = tuple[float | str, ...]


def _sort_key(sort: str, devices: dict[str, list[DeviceUse]]) -> Callable[[TopRow], SortKey]:
    keys: dict[str, Callable[[TopRow], SortKey]] = {
        "id": lambda r: (r.id,),
        "tenant": lambda r: (r.tenant, r.id),
        "pool": lambda r: (r.pool, r.id),
        "cpu": lambda r: (-r.cpu_percent, r.id),
        "rss": lambda r: (-r.rss, r.id),
        "gpu": lambda r: (
            -sum(r.gpu_memory.values()),
            -max(r.gpu_utilization.values(), default=0),
            r.id,
        ),
        "vram": lambda r: (-reserved_vram(r, devices), r.id),
        "age": lambda r: (r.created_at, r.id),
        "idle": lambda r: (-r.idle_for, r.id),
    }
    return keys[sort]


def sort_rows(snapshot: TopSnapshot, sort: str = DEFAULT_SORT) -> list[TopRow]:
    """The rows ordered by ``sort`` (one of ``SORTS``): ``id``, ``tenant``, ``pool``
    ascending; ``cpu``, ``rss``, ``gpu`` (GPU memory used, then utilization),
    ``vram`` (reserved), ``age`` (oldest first) and ``idle`` largest first; ties by id.
    Raises InvalidError for another column."""
    require_choice(sort, "--sort", SORTS)
    return sorted(snapshot.rows, key=_sort_key(sort, snapshot.devices))


def reserved_text(row: TopRow) -> str:
    """What a lease reserved, compactly: ``cpu=4 mem=8.0G gpu=0,1`` or ``vram=20.0G@3``."""
    parts: list[str] = []
    res = row.resources
    if "cpu" in res:
        parts.append(f"cpu={render_quantity('cpu', res['cpu'])}")
    if "memory" in res:
        parts.append(f"mem={compact_bytes(res['memory'])}")
    gpus = gpu_members(row)
    if "vram" in res:
        parts.append(f"vram={compact_bytes(res['vram'])}" + (f"@{','.join(gpus)}" if gpus else ""))
    elif gpus or "gpu" in res:
        parts.append(f"gpu={','.join(gpus) or res.get('gpu', 0)}")
    parts += [
        f"{name}={render_quantity(name, amount)}"
        for name, amount in sorted(res.items())
        if name not in ("cpu", "memory", "gpu", "vram")
    ]
    return " ".join(parts) or "-"


def _per_gpu(values: dict[str, int], show: Callable[[int], str]) -> str:
    return " ".join(f"{m}:{show(v)}" for m, v in sorted(values.items())) or "-"


def top_table(snapshot: TopSnapshot, sort: str, *, plain: bool) -> RenderableType:
    """One row per lease: what it reserved and what its processes use now."""
    table = make_table(
        "id",
        "tenant",
        "pool",
        "reserved",
        "cpu%",
        "rss",
        "gpu mem",
        "gpu util",
        "marks",
        "enforce",
        "age",
        "idle",
        plain=plain,
    )
    table.box = None  # two spaces between columns: top is wide
    for column in table.columns:  # a narrow terminal cuts cells short, never wraps them
        column.no_wrap = True
        column.overflow = "ellipsis"
    table.columns[0].min_width = max((len(r.id) for r in snapshot.rows), default=2)
    table.columns[8].min_width = len("OVERUSE")
    for r in sort_rows(snapshot, sort):
        table.add_row(
            r.id,
            r.tenant,
            r.pool,
            reserved_text(r),
            f"{r.cpu_percent:.0f}",
            compact_bytes(r.rss) if r.rss else "-",
            _per_gpu(r.gpu_memory, compact_bytes),
            _per_gpu(r.gpu_utilization, lambda u: f"{u}%"),
            marks_text(r.marks, plain=plain),
            r.enforcement,
            duration(snapshot.at - r.created_at),
            duration(r.idle_for) if r.idle_for > 0 else "-",
        )
    return table


def render_top(
    snapshot: TopSnapshot,
    sort: str = DEFAULT_SORT,
    *,
    plain: bool,
    away: str | None = None,
    live: bool = False,
) -> RenderableType:
    """A whole ``top`` frame: a heading, ``resd away`` while disconnected (``away``:
    why), one line per sampled GPU, then the leases sorted by ``sort``."""
    at = datetime.fromtimestamp(snapshot.at).strftime("%H:%M:%S")
    heading = (
        f"resd top  {at}  sampled every {snapshot.interval:g}s  "
        f"{len(snapshot.rows)} lease{'' if len(snapshot.rows) == 1 else 's'}  sorted by {sort}"
        + ("  (Ctrl-C quits)" if live else "")
    )
    lines: list[RenderableType] = [Text(heading, style="" if plain else "bold")]
    if away is not None:
        lines.append(
            Text(
                f"resd away ({away}); reconnecting, showing the last sample",
                style="" if plain else RED,
            )
        )
    if snapshot.gpu_sampling:
        lines.append(Text(f"GPUs not sampled: {snapshot.gpu_sampling}"))
    for pool in sorted(snapshot.devices):
        lines += [device_line(pool, d, plain=plain) for d in snapshot.devices[pool]]
    lines.append(Text(""))
    if snapshot.rows:
        lines.append(top_table(snapshot, sort, plain=plain))
    else:
        lines.append(Text("no active reservations"))
    return Group(*lines)


# ----------------------------------------------------------------- the command


def follow(
    client: Client, first: TopSnapshot, draw: Callable[[TopSnapshot, str | None], None]
) -> None:
    """Draw ``first``, then each pushed sample, and the last one again with the
    reason while resd is away; returns when the events end.

    Raises UnavailableError when the session closes (reconnecting gave up).
    """
    snapshot, away = first, None
    draw(snapshot, away)
    for event in client.events():
        if isinstance(event, TopEvent):
            snapshot, away = event.snapshot, None
        elif isinstance(event, Disconnected):
            away = event.reason
        elif isinstance(event, Reconnected):
            away = None  # subscribed again; the next sample comes within an interval
        else:
            continue
        draw(snapshot, away)
    why = client.session.closed or "resd closed the connection"
    raise UnavailableError(f"{why}; top stopped")


def top(
    sort: Annotated[
        str,
        typer.Option(
            "--sort",
            metavar="COLUMN",
            help=f"Order by {', '.join(SORTS)}: names ascending, numbers largest first"
            f" (default: {DEFAULT_SORT}, GPU memory used).",
        ),
    ] = DEFAULT_SORT,
    pool: Annotated[
        str | None, typer.Option("--pool", metavar="POOL", help="Only this pool.")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", metavar="TENANT", help="Only this tenant.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one snapshot as JSON and exit.")
    ] = False,
    socket: SocketOpt = None,
) -> None:
    """Live use of every lease: CPU, RSS, GPU memory and utilization, over-use and
    idle marks; redrawn on every sample resd pushes. Ctrl-C quits."""
    out = Output(json_out)
    with guard(out):
        require_choice(sort, "--sort", SORTS)
        if pool is not None:
            check_name("pool", pool)
        if tenant is not None:
            check_name("tenant", tenant)

        def shown(snapshot: TopSnapshot) -> TopSnapshot:
            return filter_snapshot(snapshot, pool, tenant)

        with connect(socket) as client:
            if out.json:
                out.emit(shown(client.top()))
                return
            try:
                client.subscribe(["top"])
                first = client.top()
                if out.plain:
                    follow(client, first, lambda s, away: _reprint(out, shown(s), sort, away))
                else:
                    with Live(console=out.console, auto_refresh=False) as live:

                        def redraw(s: TopSnapshot, away: str | None) -> None:
                            frame = render_top(shown(s), sort, plain=False, away=away, live=True)
                            live.update(frame, refresh=True)

                        follow(client, first, redraw)
            except KeyboardInterrupt:
                return


def _reprint(out: Output, snapshot: TopSnapshot, sort: str, away: str | None) -> None:
    out.show(render_top(snapshot, sort, plain=True, away=away))
    out.line("")
    sys.stdout.flush()


__all__ = ["SORTS", "filter_snapshot", "render_top", "sort_rows", "top"]
