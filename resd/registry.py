"""The tenant registry actor: sole owner of the tenant book."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from resd.actor import Actor
from resd.journal import Journal
from resd.messages import (
    AddTenant,
    GetTenant,
    ListTenants,
    PeekTenant,
    RemoveTenant,
    Resolve,
    SetTenant,
    TakeSnapshot,
)
from resd.records import Tenant, TenantEvent, journal_events
from resd.tenants import TenantBook

DOMAIN = "tenants"


class TenantRegistry(Actor):
    name = "tenant-registry"

    def __init__(self, book: TenantBook, journal: Journal, wall: Callable[[], float]) -> None:
        super().__init__()
        self.book = book
        self.journal = journal
        self.wall = wall
        self.handlers = {
            Resolve: self._resolve,
            PeekTenant: self._peek,
            AddTenant: lambda m: self._saved(self.book.add(m.args, m.peer, self.wall())),
            SetTenant: lambda m: self._saved(self.book.set(m.args, m.peer)),
            RemoveTenant: lambda m: self._commit(self.book.remove(m.name, m.peer, self.wall())),
            GetTenant: lambda m: self.book.get(m.name),
            ListTenants: lambda m: sorted(
                self.book.tenants.values(), key=lambda t: (-t.priority, t.name)
            ),
            TakeSnapshot: lambda m: (self.journal.last_lsn, self.book.snapshot()),
        }

    def _commit(self, events: Sequence[TenantEvent]) -> int:
        """Journal decided ``events``, then apply them (nothing changes if the journal
        refuses them: UnavailableError)."""
        if not events:
            return 0
        lsn = journal_events(self.journal, DOMAIN, events)
        self.book.apply(events)
        return lsn

    def _saved(self, events: Sequence[TenantEvent]) -> tuple[Tenant, int]:
        lsn = self._commit(events)
        (event,) = events
        tenant: Tenant = event.tenant  # type: ignore[union-attr]
        return tenant, lsn

    def _peek(self, msg: PeekTenant) -> tuple[Tenant, bool]:
        tenant, events = self.book.resolve(msg.name, msg.peer, self.wall())
        return tenant, bool(events)

    def _resolve(self, msg: Resolve) -> tuple[Tenant, int]:
        tenant, events = self.book.resolve(msg.name, msg.peer, self.wall())
        return tenant, self._commit(events)
