"""The tenant book: tenants, their priorities and owners, and who may act as whom.

Pure and synchronous like the pool book; the tenant registry actor owns it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from resd.records import Tenant, TenantEvent, TenantRemoved, TenantSaved, converter
from resd_client.errors import ExistsError, ForbiddenError, NotFoundError
from resd_client.protocol import TenantAdd, TenantSet


@attrs.frozen
class Peer:
    """Who is on the other end of a connection, from SO_PEERCRED (never from a message)."""

    uid: int
    gid: int
    pid: int
    user: str
    groups: tuple[int, ...] = ()
    admin: bool = False


@attrs.define(eq=False)
class TenantBook:
    default_priority: int = 5
    tenants: dict[str, Tenant] = attrs.Factory(dict)

    def get(self, name: str) -> Tenant:
        try:
            return self.tenants[name]
        except KeyError:
            raise NotFoundError(
                f"tenant {name!r} does not exist; add it with 'resctl tenant add --name {name}'",
                {"tenant": name},
            ) from None

    @staticmethod
    def may_act_as(peer: Peer, tenant: Tenant) -> bool:
        """Admins act as anyone; a tenant with owners only for those uids/groups."""
        if peer.admin or (not tenant.owners and not tenant.groups):
            return True
        return peer.uid in tenant.owners or any(g in tenant.groups for g in peer.groups)

    def check_acts_as(self, peer: Peer, tenant: Tenant) -> None:
        if not self.may_act_as(peer, tenant):
            raise ForbiddenError(
                f"uid {peer.uid} may not act as tenant {tenant.name!r}",
                {"tenant": tenant.name, "uid": peer.uid},
            )

    @staticmethod
    def check_admin(peer: Peer, what: str) -> None:
        if not peer.admin:
            raise ForbiddenError(
                f"only an admin (root or the admin group) may {what}", {"uid": peer.uid}
            )

    # -------------------------------------------------------------- decisions

    def resolve(self, name: str | None, peer: Peer, now: float) -> tuple[Tenant, list[TenantEvent]]:
        """The tenant a request acts as, plus the events of creating the caller's own.

        ``None`` means the tenant named after the caller's Unix user, created on first
        use with the default priority and the caller as owner.
        """
        if name is None:
            own = self.tenants.get(peer.user)
            if own is None:
                own = Tenant(peer.user, self.default_priority, (peer.uid,), (), 1.0, now)
                return own, [TenantSaved(own)]
            self.check_acts_as(peer, own)
            return own, []
        tenant = self.get(name)
        self.check_acts_as(peer, tenant)
        return tenant, []

    def add(self, args: TenantAdd, peer: Peer, now: float) -> list[TenantEvent]:
        self.check_admin(peer, "add tenants")
        if args.name in self.tenants:
            raise ExistsError(f"tenant {args.name!r} already exists", {"tenant": args.name})
        tenant = Tenant(
            args.name, args.priority, tuple(args.owners), tuple(args.groups), args.weight, now
        )
        return [TenantSaved(tenant)]

    def set(self, args: TenantSet, peer: Peer) -> list[TenantEvent]:
        self.check_admin(peer, "change tenants")
        tenant = self.get(args.name)
        changes: dict[str, Any] = {}
        if args.priority is not None:
            changes["priority"] = args.priority
        if args.owners is not None:
            changes["owners"] = tuple(args.owners)
        if args.groups is not None:
            changes["groups"] = tuple(args.groups)
        if args.weight is not None:
            changes["weight"] = args.weight
        return [TenantSaved(attrs.evolve(tenant, **changes))]

    def remove(self, name: str, peer: Peer, now: float) -> list[TenantEvent]:
        self.check_admin(peer, "remove tenants")
        self.get(name)
        return [TenantRemoved(name, now)]

    # ------------------------------------------------------------------ apply

    def apply(self, events: Iterable[TenantEvent]) -> None:
        for event in events:
            match event:
                case TenantSaved(tenant=t):
                    self.tenants[t.name] = t
                case TenantRemoved(name=name):
                    del self.tenants[name]

    def snapshot(self) -> dict[str, Any]:
        return {"tenants": [converter.unstructure(t) for t in self.tenants.values()]}

    @classmethod
    def from_snapshot(cls, state: dict[str, Any] | None, default_priority: int = 5) -> TenantBook:
        book = cls(default_priority=default_priority)
        for raw in (state or {}).get("tenants", []):
            t = converter.structure(raw, Tenant)
            book.tenants[t.name] = t
        return book
