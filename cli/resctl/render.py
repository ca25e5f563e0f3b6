"""Human and JSON renderings of protocol results: tables, utilization bars, units.

Pure functions from protocol values to rich renderables or strings; nothing here
talks to the daemon or reads the clock (``now`` is passed in). ``plain`` output
(stdout not a TTY, or ``NO_COLOR`` set) has no colour, no box drawing and ASCII
bars, so that it can be piped to ``grep`` and ``awk``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import IO, Any, Final

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from resctl.options import group_name, resource_order, user_name
from resd_client.protocol import (
    Allocation,
    DeviceUse,
    GpuStatus,
    HostResources,
    PoolInfo,
    QuotaInfo,
    ReservationInfo,
    ResourceUsage,
    TenantInfo,
    WaitInfo,
    to_wire,
)
from resd_client.quantity import render_quantity

BAR_WIDTH: Final = 20
GREEN: Final = "green"
YELLOW: Final = "yellow"
RED: Final = "red"
_PLAIN_WIDTH: Final = 10_000  # piped output is never wrapped by rich

# -------------------------------------------------------------------- consoles


def is_plain(stream: IO[str]) -> bool:
    """True when ``stream`` is not a terminal or ``NO_COLOR`` is set (non-empty)."""
    if os.environ.get("NO_COLOR", "") != "":
        return True
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


def make_console(file: IO[str], plain: bool) -> Console:
    """A console on ``file``: plain ones emit no ANSI escapes at all."""
    if plain:
        return Console(
            file=file,
            color_system=None,
            no_color=True,
            force_terminal=False,
            force_interactive=False,
            highlight=False,
            markup=False,
            emoji=False,
            width=_PLAIN_WIDTH,
        )
    return Console(file=file, highlight=False, markup=False, emoji=False)


def json_text(value: Any, *, compact: bool = False) -> str:
    """JSON of a protocol value (dataclasses become maps)."""
    wire = to_wire(value)
    if compact:
        return json.dumps(wire, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(wire, ensure_ascii=False, indent=2)


def make_table(
    *headers: str, plain: bool, title: str | None = None, keep: tuple[str, ...] = ("id", "usage")
) -> Table:
    """A table with upper-case headers; borderless when ``plain``.

    Columns named in ``keep`` are never wrapped (ids, bars), even on a narrow terminal.
    """
    if plain:
        table = Table(
            box=None,
            show_edge=False,
            pad_edge=False,
            header_style="",
            title=title,
            title_style="",
            title_justify="left",
        )
    else:
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", title=title, title_justify="left")
    for header in headers:
        keep_it = header in keep
        table.add_column(
            header.upper(),
            no_wrap=plain or keep_it,
            min_width=BAR_WIDTH + 5 if header == "usage" else None,
        )
    return table


# -------------------------------------------------------------- small formats


def amounts(resources: dict[str, int], sep: str = ",") -> str:
    """``cpu=4,memory=8GiB`` in human units, well-known resources first."""
    if not resources:
        return "-"
    return sep.join(
        f"{name}={render_quantity(name, resources[name])}"
        for name in sorted(resources, key=resource_order)
    )


def duration(seconds: float) -> str:
    """Compact duration: ``45s``, ``4m05s``, ``3h12m``, ``2d03h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def timestamp(unix: float | None) -> str:
    """Local time ``2026-01-31 12:00:00``, or ``-``."""
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ttl_left(info: ReservationInfo, now: float) -> str:
    """Time until expiry (rounded up), ``-`` when it does not expire or has ended."""
    if info.expires_at is None or info.state not in ("active", "terminating"):
        return "-"
    return duration(math.ceil(info.expires_at - now))


def exact_duration(seconds: float) -> str:
    """A duration as it was given: ``250ms``, ``1.5s``, ``90.25s``; whole seconds as
    ``duration`` shows them (``45s``, ``5m00s``)."""
    if seconds == int(seconds):
        return duration(seconds)
    if seconds < 1 and seconds * 1000 == round(seconds * 1000):
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def ttl_text(info: ReservationInfo, now: float) -> str:
    """``ttl_left``, except that a reservation whose ttl has just started (less than a
    second ago: it was just granted, renewed or changed) shows its ttl as given, so
    ``--ttl 250ms`` reads ``250ms`` rather than a rounded-up ``1s``."""
    if (
        info.ttl is not None
        and info.expires_at is not None
        and info.state == "active"
        and 0 <= info.ttl - (info.expires_at - now) < 1
    ):
        return exact_duration(info.ttl)
    return ttl_left(info, now)


def seconds(value: float) -> str:
    return f"{value:g}s"


def idle_after_text(value: float) -> str:
    """A pool's ``idle_after``: ``off`` (0) or a compact duration."""
    return "off" if value <= 0 else duration(value)


def compact_bytes(amount: int) -> str:
    """Bytes in at most four characters and a binary unit letter, for live figures
    where width matters more than the last digit: ``1.5G``, ``30G``, ``117M``, ``0``."""
    value, unit = float(amount), ""
    for bigger in ("K", "M", "G", "T", "P"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    if not unit:
        return str(amount)
    if abs(value) < 10 and round(value, 1) != round(value):
        return f"{value:.1f}{unit}"
    return f"{value:.0f}{unit}"


#: how marks look in tables, and their colour (SPEC §10)
MARK_STYLES: Final = {"overuse": RED, "idle": YELLOW}


def marks_text(marks: Iterable[str], *, plain: bool) -> Text:
    """``OVERUSE,IDLE`` (overuse first), coloured unless ``plain``; ``-`` when none."""
    known = list(MARK_STYLES)
    names = sorted(marks, key=lambda m: (known.index(m) if m in known else len(known), m))
    if not names:
        return Text("-")
    text = Text()
    for i, name in enumerate(names):
        if i:
            text.append(",")
        text.append(name.upper(), style="" if plain else MARK_STYLES.get(name, YELLOW))
    return text


def mark_counts(marks: Mapping[str, int]) -> str:
    """A pool's ``{"overuse": 1, "idle": 2}`` as ``1 overuse, 2 idle``; ``""`` when none."""
    return ", ".join(f"{n} {name}" for name, n in sorted(marks.items()) if n)


def device_line(pool: str, d: DeviceUse, *, plain: bool) -> Text:
    """One GPU as the last sample saw it: ``pool host gpu 0: 30.0G/80.0G used,
    foreign 2.0G, overuse 10.0G, util 95%`` (foreign in yellow, overuse in red)."""
    text = Text(
        f"pool {pool} gpu {d.member}: "
        f"{compact_bytes(d.memory_used)}/{compact_bytes(d.memory_total)} used"
    )
    if d.foreign:
        text.append(f", foreign {compact_bytes(d.foreign)}", style="" if plain else YELLOW)
    if d.overuse:
        text.append(f", overuse {compact_bytes(d.overuse)}", style="" if plain else RED)
    if d.utilization is not None:
        text.append(f", util {d.utilization}%")
    return text


def gpu_lines(pools: Sequence[PoolInfo], *, plain: bool) -> list[Text]:
    """Per pool: one ``device_line`` per sampled GPU, then its mark counts if any."""
    lines: list[Text] = []
    for pool in pools:
        lines += [device_line(pool.name, d, plain=plain) for d in pool.devices]
        counts = mark_counts(pool.marks)
        if counts:
            lines.append(Text(f"pool {pool.name} marks: {counts}", style="" if plain else YELLOW))
    return lines


# ------------------------------------------------------------------- the bar


def percent(allocated: int, effective: int) -> float:
    """Allocated share of the effective capacity, in percent (100 when there is none)."""
    if effective <= 0:
        return 100.0
    return allocated * 100.0 / effective


def bar_colour(allocated: int, effective: int, available: int) -> str:
    """resgate's colours: green below 60 %, yellow to 90 %, red at 90 % or exhausted."""
    pct = percent(allocated, effective)
    if available <= 0 or pct >= 90:
        return RED
    if pct >= 60:
        return YELLOW
    return GREEN


def usage_bar(usage: ResourceUsage, *, plain: bool, width: int = BAR_WIDTH) -> Text:
    """``████░░░░ 40%`` coloured by ``bar_colour``; ``[####....]  40%`` when plain."""
    return fill_bar(usage.allocated, usage.effective, usage.available, plain=plain, width=width)


def fill_bar(
    allocated: int, effective: int, available: int, *, plain: bool, width: int = BAR_WIDTH
) -> Text:
    """The utilization bar of ``allocated`` out of ``effective`` (see ``usage_bar``)."""
    pct = percent(allocated, effective)
    filled = min(width, max(0, round(pct * width / 100)))
    label = f" {math.floor(pct):3d}%"
    if plain:
        return Text("[" + "#" * filled + "." * (width - filled) + "]" + label)
    colour = bar_colour(allocated, effective, available)
    text = Text()
    text.append("█" * filled, style=colour)
    text.append("░" * (width - filled), style="dim")
    text.append(label, style=colour)
    return text


def _q(usage: ResourceUsage, amount: int) -> str:
    return render_quantity(usage.name, amount)


def _sorted_usage(pool: PoolInfo) -> list[ResourceUsage]:
    return sorted(pool.resources, key=lambda u: resource_order(u.name))


def capacity_summary(pool: PoolInfo) -> str:
    """``cpu=32,memory=64GiB,gpu=8`` (capacities, before oversubscription)."""
    return amounts({u.name: u.capacity for u in pool.resources})


# --------------------------------------------------------------------- quotas


def quota_resources(quota: QuotaInfo) -> list[str]:
    """The resources a quota names (in its min or its max), well-known ones first."""
    return sorted(set(quota.min) | set(quota.max), key=resource_order)


def borrowing(quota: QuotaInfo) -> dict[str, int]:
    """What the tenant holds beyond its min, per resource the quota names (all it
    holds of one with only a max): what borrowers may have reclaimed (SPEC §4)."""
    return {
        name: quota.used.get(name, 0) - quota.min.get(name, 0)
        for name in quota_resources(quota)
        if quota.used.get(name, 0) > quota.min.get(name, 0)
    }


def at_max(quota: QuotaInfo) -> list[str]:
    """The resources the tenant holds all its max of."""
    return [
        name
        for name in quota_resources(quota)
        if name in quota.max and quota.used.get(name, 0) >= quota.max[name]
    ]


def _side(quota: dict[str, int], name: str) -> str:
    return render_quantity(name, quota[name]) if name in quota else "-"


def quota_figures(quota: QuotaInfo) -> str:
    """``cpu 4/min 8/max -, gpu 8/min 4/max 6``: used against min and max, per
    resource the quota names, in human units (``-``: no bound)."""
    return ", ".join(
        f"{name} {render_quantity(name, quota.used.get(name, 0))}"
        f"/min {_side(quota.min, name)}/max {_side(quota.max, name)}"
        for name in quota_resources(quota)
    )


def _per_resource(amounts_by_name: Mapping[str, int]) -> str:
    return ", ".join(
        f"{name} {render_quantity(name, amount)}" for name, amount in amounts_by_name.items()
    )


def quota_line(pool: str, tenant: str, quota: QuotaInfo, *, plain: bool) -> Text:
    """One tenant's quota in a pool, for ``status`` and ``pool show``:
    ``pool p quota a: gpu 8/min 4/max -  (borrowing gpu 4)``; borrowing in yellow,
    a max reached in red (``(at max gpu)``)."""
    text = Text(f"pool {pool} quota {tenant}: {quota_figures(quota) or '-'}")
    over = borrowing(quota)
    if over:
        text.append(f"  (borrowing {_per_resource(over)})", style="" if plain else YELLOW)
    full = at_max(quota)
    if full:
        text.append(f"  (at max {', '.join(full)})", style="" if plain else RED)
    return text


def quota_lines(pools: Sequence[PoolInfo], *, plain: bool) -> list[Text]:
    """A ``quota_line`` per tenant with a quota, for each pool that has quotas."""
    return [
        quota_line(pool.name, tenant, pool.quotas[tenant], plain=plain)
        for pool in pools
        for tenant in sorted(pool.quotas)
    ]


def quotas_summary(tenant: TenantInfo) -> str:
    """``tenant list``'s QUOTAS: the pools where it has a quota, ``(borrowing)``
    after those where it holds more than its min; ``-`` when none."""
    return (
        ",".join(
            pool + (" (borrowing)" if borrowing(tenant.quotas[pool]) else "")
            for pool in sorted(tenant.quotas)
        )
        or "-"
    )


def quotas_table(tenant: TenantInfo, *, plain: bool) -> Table:
    """``tenant show``: per pool and resource, min, max and used in human units, and
    a ``BORROWING n`` note where it holds more than its min (``AT MAX`` at its max)."""
    table = make_table("pool", "resource", "min", "max", "used", "note", plain=plain)
    for pool in sorted(tenant.quotas):
        quota = tenant.quotas[pool]
        over, full = borrowing(quota), at_max(quota)
        for i, name in enumerate(quota_resources(quota)):
            notes = []
            if name in over:
                notes.append(f"BORROWING {render_quantity(name, over[name])}")
            if name in full:
                notes.append("AT MAX")
            note = Text(", ".join(notes) or "-")
            if not plain and notes:
                note.stylize(RED if name in full else YELLOW)
            table.add_row(
                pool if i == 0 or plain else "",
                name,
                _side(quota.min, name),
                _side(quota.max, name),
                render_quantity(name, quota.used.get(name, 0)),
                note,
            )
    return table


def usage_text(usage: float) -> str:
    """A tenant's decayed fair-share usage (dominant-share seconds)."""
    return f"{usage:.1f}"


def share_text(share: float) -> str:
    """A tenant's part of all tenants' usage, in percent."""
    return f"{share * 100:.1f}%"


# --------------------------------------------------------------------- tables


def utilization_table(pools: Sequence[PoolInfo], *, plain: bool) -> Table:
    """One row per pool and resource: bar, allocated, effective and available."""
    table = make_table(
        "pool", "resource", "usage", "allocated", "effective", "available", plain=plain
    )
    for pool in pools:
        usages = _sorted_usage(pool)
        if not usages:
            table.add_row(pool.name, "-", "-", "-", "-", "-")
        for i, usage in enumerate(usages):
            table.add_row(
                pool.name if i == 0 or plain else "",
                usage.name,
                usage_bar(usage, plain=plain),
                _q(usage, usage.allocated),
                _q(usage, usage.effective),
                _q(usage, usage.available),
            )
    return table


def resources_table(pool: PoolInfo, *, plain: bool) -> Table:
    """hypeman's resource view of one pool: capacity, ratio, effective limit, usage."""
    table = make_table(
        "resource", "capacity", "ratio", "effective", "allocated", "available", "usage", plain=plain
    )
    for usage in _sorted_usage(pool):
        table.add_row(
            usage.name,
            _q(usage, usage.capacity),
            f"{usage.ratio:g}",
            _q(usage, usage.effective),
            _q(usage, usage.allocated),
            _q(usage, usage.available),
            usage_bar(usage, plain=plain),
        )
    return table


def host_resources_table(view: HostResources, *, plain: bool) -> Table:
    """hypeman's per-resource status: capacity, oversub ratio, effective limit, usage, source."""
    table = make_table(
        "resource",
        "capacity",
        "ratio",
        "effective",
        "allocated",
        "available",
        "source",
        "usage",
        plain=plain,
    )
    for name in sorted(view.resources, key=resource_order):
        s = view.resources[name]
        table.add_row(
            name,
            render_quantity(name, s.capacity),
            f"{s.oversub_ratio:g}",
            render_quantity(name, s.effective_limit),
            render_quantity(name, s.allocated),
            render_quantity(name, s.available),
            s.source,
            fill_bar(s.allocated, s.effective_limit, s.available, plain=plain),
        )
    return table


def gpu_holders(view: HostResources) -> dict[str, list[Allocation]]:
    """GPU name → the allocations on it (whole or a VRAM slice), oldest first."""
    held: dict[str, list[Allocation]] = {}
    for a in view.allocations:
        for gpu in a.gpus:
            held.setdefault(gpu, []).append(a)
    return held


def _holder(a: Allocation) -> str:
    if a.vram_bytes:
        return f"{a.reservation_id} ({a.tenant}, {render_quantity('vram', a.vram_bytes)})"
    return f"{a.reservation_id} ({a.tenant})"


def _gpu_bar(g: GpuStatus, *, plain: bool) -> Text:
    if g.memory_bytes > 0:
        return fill_bar(
            g.vram_allocated, g.memory_bytes, g.memory_bytes - g.vram_allocated, plain=plain
        )
    busy = 1 if g.whole or g.holders else 0
    return fill_bar(busy, 1, 1 - busy, plain=plain)


def gpus_table(view: HostResources, *, plain: bool) -> Table:
    """One row per GPU: model, NUMA node, memory, VRAM allocated, and who holds it;
    when resd samples the GPUs, also the memory really used, the foreign part of it
    (held by no lease) and the utilization, in columns at the end."""
    held = gpu_holders(view)
    live = any(g.memory_used is not None for g in view.gpus)
    headers = ["gpu", "model", "numa", "memory", "allocated", "usage", "held", "holders"]
    table = make_table(*headers, *(["used", "foreign", "util"] if live else []), plain=plain)
    for g in view.gpus:
        mine = held.get(g.name, [])
        state = "whole" if g.whole else "free"
        if not g.whole and g.holders:
            state = f"{g.holders} slice" + ("s" if g.holders > 1 else "")
        row: list[RenderableType] = [
            g.name,
            g.model or "-",
            g.numa or "-",
            render_quantity("vram", g.memory_bytes) if g.memory_bytes else "-",
            render_quantity("vram", g.vram_allocated) if g.memory_bytes else "-",
            _gpu_bar(g, plain=plain),
            state,
            ", ".join(_holder(a) for a in mine) or "-",
        ]
        if live:
            row += [
                "-" if g.memory_used is None else render_quantity("vram", g.memory_used),
                Text(
                    render_quantity("vram", g.foreign_bytes) if g.foreign_bytes else "-",
                    style=YELLOW if g.foreign_bytes and not plain else "",
                ),
                "-" if g.utilization is None else f"{g.utilization}%",
            ]
        table.add_row(*row)
    return table


def allocation_amounts(a: Allocation) -> dict[str, int]:
    """An allocation's non-zero amounts by resource name (``gpu`` = whole GPUs held)."""
    whole = 0 if a.vram_bytes else len(a.gpus)
    named = {
        "cpu": a.cpu,
        "memory": a.memory_bytes,
        "gpu": whole,
        "vram": a.vram_bytes,
        "disk": a.disk_bytes,
        "net": a.network_bps,
        "disk_io": a.disk_io_bps,
        **a.other,
    }
    return {name: amount for name, amount in named.items() if amount}


def allocations_table(view: HostResources, *, plain: bool) -> Table:
    """hypeman's allocation breakdown: one row per active reservation; when any holds
    GPU memory now or carries a mark, the VRAM its processes use and its marks, in
    columns at the end."""
    live = any(a.vram_used_bytes or a.marks for a in view.allocations)
    headers = ["id", "tenant", "label", "resources", "gpus"]
    table = make_table(*headers, *(["vram used", "marks"] if live else []), plain=plain)
    for a in view.allocations:
        row: list[RenderableType] = [
            a.reservation_id,
            a.tenant,
            a.name or "-",
            amounts(allocation_amounts(a)),
            ",".join(a.gpus) or "-",
        ]
        if live:
            used = render_quantity("vram", a.vram_used_bytes) if a.vram_used_bytes else "-"
            row += [used, marks_text(a.marks, plain=plain)]
        table.add_row(*row)
    return table


def host_resources_view(view: HostResources, *, plain: bool) -> Group:
    """``resctl resources``: the pool's resources, then its GPUs, then its allocations."""
    heading = "" if plain else "bold"
    parts: list[RenderableType] = [
        Text(f"pool {view.pool}", style=heading),
        host_resources_table(view, plain=plain),
    ]
    if view.gpus:
        parts += [Text(""), Text(f"GPUs ({len(view.gpus)})", style=heading)]
        parts.append(gpus_table(view, plain=plain))
    parts.append(Text(""))
    if view.allocations:
        parts.append(Text(f"allocations ({len(view.allocations)})", style=heading))
        parts.append(allocations_table(view, plain=plain))
    else:
        parts.append(Text("no allocations"))
    return Group(*parts)


def pools_table(pools: Sequence[PoolInfo], *, plain: bool) -> Table:
    """Pools with their capacities and policies."""
    table = make_table(
        "name",
        "capacity",
        "active",
        "max/tenant",
        "preemption",
        "placement",
        "grace",
        "labels",
        "overuse",
        "idle after",
        "foreign",
        plain=plain,
    )
    for pool in pools:
        table.add_row(
            pool.name,
            capacity_summary(pool),
            str(pool.active),
            "unlimited" if pool.max_per_tenant == 0 else str(pool.max_per_tenant),
            pool.preemption,
            pool.placement,
            seconds(pool.grace),
            labels_text(pool.labels),
            pool.overuse,
            idle_after_text(pool.idle_after),
            foreign_text(pool.adopt_foreign),
        )
    return table


def foreign_text(adopt: bool) -> str:
    """What a pool does with GPU memory no lease holds: ``adopt`` it as an
    ``unmanaged`` reservation, or only ``show`` it (and keep it out of new grants)."""
    return "adopt" if adopt else "show"


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def pool_detail(pool: PoolInfo, *, plain: bool) -> Group:
    """``pool show``: the pool's settings, then its resources, its sampled GPUs, and a
    line per tenant with a quota here (used against min/max)."""
    return Group(
        _fields(
            [
                ("name", pool.name),
                ("active reservations", str(pool.active)),
                (
                    "max per tenant",
                    "unlimited" if pool.max_per_tenant == 0 else str(pool.max_per_tenant),
                ),
                ("preemption", pool.preemption),
                ("placement", pool.placement),
                ("grace", seconds(pool.grace)),
                ("overuse", pool.overuse),
                ("idle after", idle_after_text(pool.idle_after)),
                ("foreign use", foreign_text(pool.adopt_foreign)),
                ("marks", mark_counts(pool.marks) or "-"),
                ("labels", labels_text(pool.labels)),
                ("created", timestamp(pool.created_at)),
            ],
            plain=plain,
        ),
        Text(""),
        resources_table(pool, plain=plain),
        *([Text("")] if pool.devices else []),
        *(device_line(pool.name, d, plain=plain) for d in pool.devices),
        *([Text("")] if pool.quotas else []),
        *quota_lines([pool], plain=plain),
    )


def _fields(rows: Iterable[tuple[str, str]], *, plain: bool) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="" if plain else "bold")
    table.add_column()
    for key, value in rows:
        table.add_row(f"{key}:", value)
    return table


def _ids(values: list[int], name: Any) -> str:
    return ",".join(name(v) for v in values) or "-"


def tenants_table(tenants: Sequence[TenantInfo], *, plain: bool) -> Table:
    """Tenants, highest priority first (then by name), as resgate lists them, with
    their fair-share weight, decayed usage and share, and the pools where they have
    a quota (``quotas_summary``)."""
    table = make_table(
        "name",
        "priority",
        "weight",
        "usage",
        "share",
        "owners",
        "groups",
        "active",
        "quotas",
        "created",
        plain=plain,
        keep=("name",),
    )
    table.columns[3].min_width = None  # a figure here, not a bar
    for t in sorted(tenants, key=lambda t: (-t.priority, t.name)):
        table.add_row(
            t.name,
            str(t.priority),
            f"{t.weight:g}",
            usage_text(t.usage),
            share_text(t.share),
            _ids(t.owners, user_name),
            _ids(t.groups, group_name),
            str(t.active),
            quotas_summary(t),
            timestamp(t.created_at),
        )
    return table


def tenant_detail(tenant: TenantInfo, *, plain: bool) -> RenderableType:
    """``tenant show``: one field per line (fair-share usage and share among them),
    then its quotas per pool (``quotas_table``) when it has any."""
    fields = _fields(
        [
            ("name", tenant.name),
            ("priority", str(tenant.priority)),
            ("weight", f"{tenant.weight:g}"),
            ("usage", f"{usage_text(tenant.usage)} (decayed dominant-share seconds)"),
            ("share", f"{share_text(tenant.share)} of all tenants' usage"),
            ("owners", _ids(tenant.owners, user_name)),
            ("groups", _ids(tenant.groups, group_name)),
            ("active reservations", str(tenant.active)),
            ("quotas", "-" if not tenant.quotas else f"{len(tenant.quotas)} pool(s)"),
            ("created", timestamp(tenant.created_at)),
        ],
        plain=plain,
    )
    if not tenant.quotas:
        return fields
    return Group(fields, Text(""), quotas_table(tenant, plain=plain))


def reservations_table(
    reservations: Sequence[ReservationInfo], now: float, *, plain: bool
) -> Table:
    """Active reservations: id first, resources in human units, time left; when any
    carries a mark (SPEC §10), a last column with them (``OVERUSE``, ``IDLE``)."""
    marked = any(r.marks for r in reservations)
    headers = ["id", "tenant", "pool", "resources", "label", "binding", "state", "ttl left"]
    table = make_table(*headers, *(["marks"] if marked else []), plain=plain)
    for r in reservations:
        state = Text(r.state + (" (reclaimable)" if r.reclaimable and not plain else ""))
        if not plain and r.state != "active":
            state.stylize(YELLOW)
        row: list[RenderableType] = [
            r.id,
            r.tenant,
            r.pool,
            amounts(r.resources),
            r.label or "-",
            r.binding,
            state,
            ttl_left(r, now),
        ]
        if marked:
            row.append(marks_text(r.marks, plain=plain))
        table.add_row(*row)
    return table


def assigned_text(info: ReservationInfo) -> str:
    """``gpu:0,3;ports:30000-30009,30020``: assigned members and values, or ``""``."""
    parts = [f"{name}:{','.join(names)}" for name, names in info.members.items()]
    parts += [
        f"{name}:{','.join(str(lo) if lo == hi else f'{lo}-{hi}' for lo, hi in spans)}"
        for name, spans in info.values.items()
    ]
    return ";".join(parts)


def reservation_line(info: ReservationInfo, now: float) -> str:
    """One line, id first so that ``awk '{print $1}'`` gets it."""
    parts = [
        info.id,
        info.state,
        f"tenant={info.tenant}",
        f"pool={info.pool}",
        amounts(info.resources),
    ]
    held = assigned_text(info)
    if held:
        parts.append(f"assigned={held}")
    if info.expires_at is not None:
        parts.append(f"ttl={ttl_text(info, now)}")
    if info.label:
        parts.append(f"label={info.label}")
    return " ".join(parts)


def part_line(part: ReservationInfo) -> str:
    """One part of a gang, shown indented under its lease: its id, pool and what it
    holds (``  r-….1 pool=b cpu=4``)."""
    fields = [f"  {part.id}", f"pool={part.pool}", amounts(part.resources)]
    held = assigned_text(part)
    if held:
        fields.append(f"assigned={held}")
    return " ".join(fields)


def reservation_lines(info: ReservationInfo, now: float) -> list[str]:
    """``reservation_line``, then for a gang one ``part_line`` per part."""
    return [reservation_line(info, now), *(part_line(p) for p in info.parts)]


def status_view(
    *,
    server_version: str,
    boot_id: str,
    started_at: float,
    pools: Sequence[PoolInfo],
    tenants: int | None,
    active: int,
    connections: int | None,
    now: float,
    plain: bool,
    heading: str | None = None,
) -> RenderableType:
    """``status`` and each ``watch`` frame: daemon facts, counts, utilization, each
    sampled GPU, and per pool with quotas a line per tenant with one."""
    lines: list[RenderableType] = []
    if heading is not None:
        lines.append(Text(heading, style="" if plain else "bold"))
    lines.append(
        Text(
            f"resd {server_version}  boot {boot_id}  up {duration(now - started_at)}"
            f" (since {timestamp(started_at)})"
        )
    )
    counts = [f"pools {len(pools)}"]
    if tenants is not None:
        counts.append(f"tenants {tenants}")
    counts.append(f"active reservations {active}")
    if connections is not None:
        counts.append(f"connections {connections}")
    lines.append(Text("  ".join(counts)))
    lines.append(Text(""))
    if pools:
        lines.append(utilization_table(pools, plain=plain))
        gpus = gpu_lines(pools, plain=plain)
        if gpus:
            lines += [Text(""), *gpus]
        quotas = quota_lines(pools, plain=plain)
        if quotas:
            lines += [Text(""), *quotas]
    else:
        lines.append(Text("no pools"))
    return Group(*lines)


def insufficient_lines(details: dict[str, Any]) -> list[str]:
    """Per-resource ``requested / available / shortfall`` from an insufficient error."""
    resources = details.get("resources")
    if not isinstance(resources, dict):
        return []
    out = []
    for name in sorted(resources, key=lambda n: resource_order(str(n))):
        entry = resources[name]
        if not isinstance(entry, dict):
            continue
        parts = []
        for key in ("requested", "available", "shortfall"):
            value = entry.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                parts.append(f"{key} {render_quantity(str(name), value)}")
        if parts:
            out.append(f"  {name}: " + ", ".join(parts))
    return out


def pending_table(waiters: Sequence[ReservationInfo], now: float, *, plain: bool) -> Table:
    """Queued requests in queue order: position, what they ask, why they wait."""
    table = make_table(
        "#", "id", "tenant", "priority", "pool", "resources", "reason", "waiting", plain=plain
    )
    for w in waiters:
        table.add_row(
            str(w.position),
            w.id,
            w.tenant,
            str(w.priority),
            w.pool,
            amounts(w.resources),
            w.reason,
            duration(max(0.0, now - w.created_at)),
        )
    return table


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def quota_detail_lines(details: Mapping[str, Any]) -> list[str]:
    """A ``quota_exceeded`` refusal's (or a ``quota`` waiter's) details in human
    units: ``  gpu in pool p: tenant a holds 4, asks 2 more, its max is 6``."""
    name = details.get("resource")
    cap = _int(details.get("max"))
    if not isinstance(name, str) or cap is None:
        return []
    held = _int(details.get("held")) or 0
    line = f"  {name}"
    if isinstance(details.get("pool"), str):
        line += f" in pool {details['pool']}"
    line += ": "
    if isinstance(details.get("tenant"), str):
        line += f"tenant {details['tenant']} "
    line += f"holds {render_quantity(name, held)}"
    requested = _int(details.get("requested"))
    if requested is not None:
        line += f", asks {render_quantity(name, requested)} more"
    line += f", its max is {render_quantity(name, cap)}"
    lines = [line]
    if details.get("never") is True:
        lines.append("  it asks more than the max by itself: it can never be granted")
    return lines


def reclaim_detail_lines(details: Mapping[str, Any]) -> list[str]:
    """A ``reclaiming`` waiter's details: the borrowers' leases being taken back."""
    victims = details.get("victims")
    if not isinstance(victims, list) or not victims:
        return []
    where = f" in pool {details['pool']}" if isinstance(details.get("pool"), str) else ""
    return [
        f"  reclaiming from borrowers{where}: {', '.join(str(v) for v in victims)}",
        "  (leases of tenants above their min; each is released when its grace ends)",
    ]


#: ``why``'s reasons whose code alone says too little (the others are shown as is)
REASON_TEXT: Final = {"quota": "quota (it would take its tenant past its max)"}


def wait_lines(info: WaitInfo) -> list[str]:
    """``why``: the position, the reason, and what it is short of: the per-resource
    shortfall, its tenant's max (``quota``), or the borrowers' leases being
    reclaimed for it (``reclaiming``)."""
    if info.state != "pending":
        return [info.message]
    lines = [
        f"{info.id} is waiting: position {info.position} of {info.queued}",
        f"reason: {REASON_TEXT.get(info.reason, info.reason)} — {info.message}",
    ]
    if info.reason == "quota":
        lines += quota_detail_lines(info.details)
    elif info.reason == "reclaiming":
        lines += reclaim_detail_lines(info.details)
    else:
        lines += insufficient_lines(info.details)
    return lines


def waiting_line(info: ReservationInfo) -> str:
    """Said on stderr while a request waits: its id, place and reason."""
    return f"waiting as {info.id} (position {info.position}: {info.reason}); Ctrl-C cancels"
