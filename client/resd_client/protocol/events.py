"""Push event types, and ``EVENTS``, event name → type (SPEC §1).

A push is a map ``{"event": name, ...}`` the daemon sends unasked, to the holder
of a lease or to ``subscribe``rs.
"""

from __future__ import annotations

from typing import Any, Final

from resd_client.protocol.convert import Float, Int, Message
from resd_client.protocol.results import PoolInfo, ReservationInfo, TopSnapshot


class ExpiredEvent(Message, frozen=True):
    reservation: ReservationInfo


class PreemptedEvent(Message, frozen=True):
    reservation: ReservationInfo
    by: str
    deadline: Float | None = None


class GrantedEvent(Message, frozen=True):
    """A waiting request was granted; ``reservation`` is now active."""

    reservation: ReservationInfo


class DeniedEvent(Message, frozen=True):
    """A waiting request left the queue ungranted (timeout, pool gone, cancelled);
    ``error`` is a wire error map (code, message, details)."""

    reservation_id: str
    error: dict[str, Any]


class ReclaimEvent(Message, frozen=True):
    """A reclaimable lease is asked to give its resources back by ``deadline``;
    releasing in time ends it as ``released``, not ``preempted``."""

    reservation: ReservationInfo
    by: str
    deadline: Float


class ReleasedEvent(Message, frozen=True):
    """The lease was released by someone other than its holder (an admin, a deleted
    pool or removed tenant, or resd when it was not re-attached in time after a
    restart); ``reservation.reason`` says why."""

    reservation: ReservationInfo


class StateEvent(Message, frozen=True):
    """Pools after a change; pushed to ``subscribe``rs, coalesced per actor turn."""

    pools: list[PoolInfo]
    active: Int
    at: Float


class MarkedEvent(Message, frozen=True):
    """The reconciler put a mark on the lease (``on``) or took it off: ``mark`` is
    ``overuse`` (its processes hold more GPU memory than it reserved, or use a GPU
    not assigned to it) or ``idle``; ``detail`` says what was seen."""

    reservation: ReservationInfo
    mark: str
    on: bool
    detail: str = ""


class TopEvent(Message, frozen=True):
    """A new sample for ``top`` subscribers."""

    snapshot: TopSnapshot


class ResizedEvent(Message, frozen=True):
    """A waiting resize of the holder's lease was granted: ``reservation`` has its
    new amounts."""

    reservation: ReservationInfo


#: event name → push type.
EVENTS: Final[dict[str, type]] = {
    "granted": GrantedEvent,
    "denied": DeniedEvent,
    "reclaim": ReclaimEvent,
    "expired": ExpiredEvent,
    "preempted": PreemptedEvent,
    "released": ReleasedEvent,
    "state": StateEvent,
    "marked": MarkedEvent,
    "top": TopEvent,
    "resized": ResizedEvent,
}
EVENT_NAMES: Final[dict[type, str]] = {v: k for k, v in EVENTS.items()}
