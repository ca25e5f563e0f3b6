"""The actor base: a mailbox and a loop that handles one message at a time.

``handle`` is synchronous on purpose: an actor cannot await in the middle of a
state change, so no other task ever sees half a change and no lock is needed. A
message that needs I/O (the journal) returns what the caller should await next
(a log sequence number) instead of awaiting it here.

Callers use ``ask`` (await a result) or ``tell`` (fire and forget). A ResdError
raised by a handler goes back to the asker; any other exception is logged and
becomes an ``internal`` error, so one bad message never kills the daemon.

When the actor is parked with nothing sent to it unhandled, ``ask`` runs the
handler in the caller's task instead of waking the actor's: the same single
synchronous step in the same order (nothing was queued before it), minus two task
switches on the daemon's hot path.

Log context (``resd.logs``): a message is handled in its sender's contextvars
context, whichever task runs the handler. ``ask`` and ``tell`` put a copy of it
in the envelope (trio copies a task's context only when the task is spawned, so
nothing would flow through the mailbox otherwise), and the loop runs the handler
inside it; a line the handler logs carries the request's bound keys (``op``,
``peer_uid``, ...). ``after_batch`` and ``on_deadline`` act for no one request and
run in the actor's own context, on the fast path of ``ask`` too.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import trio

from resd_client.errors import InternalError, ResdError

log = structlog.get_logger("resd.actor")


_WAKE: Any = object()  # a message that only makes the loop look at its deadline again


@attrs.define(eq=False)
class _Envelope:
    message: Any
    done: trio.Event | None
    #: the sender's context, which the handler runs in (None: the caller's own)
    context: contextvars.Context | None = None
    result: Any = None
    error: ResdError | None = None


class Actor:
    """Subclasses fill ``handlers`` (message type → bound method) and may override
    ``after_batch`` (runs once the mailbox is drained) and the timer hooks."""

    name = "actor"

    def __init__(self) -> None:
        self._mailbox, self._inbox = trio.open_memory_channel[_Envelope](math.inf)
        self.handlers: dict[type, Callable[[Any], Any]] = {}
        #: envelopes sent and not yet handled (some may already be handed to the loop)
        self._unhandled = 0
        #: the loop is parked in ``receive``, sleeping until ``_parked_until`` at most
        self._parked = False
        self._parked_until = math.inf
        #: the actor's task's own context, for the steps no one message caused
        self._own_context = contextvars.copy_context()

    async def ask(self, message: Any) -> Any:
        if self._parked and not self._unhandled:
            envelope = _Envelope(message, None)
            self._handle(envelope)  # in the caller's task and context
            self._own_context.run(self.after_batch)
            if self.next_deadline() < self._parked_until:
                self._post(_Envelope(_WAKE, None))  # re-arm the loop's timer
        else:
            envelope = _Envelope(message, trio.Event(), contextvars.copy_context())
            self._post(envelope)
            assert envelope.done is not None
            await envelope.done.wait()
        if envelope.error is not None:
            raise envelope.error
        return envelope.result

    def tell(self, message: Any) -> None:
        try:
            self._post(_Envelope(message, None, contextvars.copy_context()))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # shutting down

    def _post(self, envelope: _Envelope) -> None:
        self._mailbox.send_nowait(envelope)
        self._unhandled += 1

    def next_deadline(self) -> float:
        """trio time at which ``on_deadline`` should run; ``inf`` for never."""
        return math.inf

    def on_deadline(self) -> None:
        """Called when ``next_deadline`` has passed."""

    def after_batch(self) -> None:
        """Called after the messages that were waiting have all been handled."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._own_context = contextvars.copy_context()
        task_status.started()
        while True:
            envelope: _Envelope | None = None
            deadline = self.next_deadline()
            self._parked, self._parked_until = True, deadline
            try:
                if deadline == math.inf:  # the common case: no cancel scope to set up
                    envelope = await self._inbox.receive()
                else:
                    with trio.move_on_at(deadline):
                        envelope = await self._inbox.receive()
            finally:
                self._parked = False
            if envelope is not None:
                self._deliver(envelope)
                while True:
                    try:
                        envelope = self._inbox.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._deliver(envelope)
            try:
                if self.next_deadline() <= trio.current_time():
                    self.on_deadline()
                self.after_batch()
            except Exception:  # one failed step must not stop the actor (and the daemon)
                log.exception("actor_step_failed", actor=self.name)

    def _deliver(self, envelope: _Envelope) -> None:
        """Handle an envelope that came through the mailbox."""
        self._unhandled -= 1
        if envelope.message is _WAKE:
            return
        if envelope.context is None:
            self._handle(envelope)
        else:
            envelope.context.run(self._handle, envelope)

    def _handle(self, envelope: _Envelope) -> None:
        message = envelope.message
        try:
            handler = self.handlers[type(message)]
            envelope.result = handler(message)
        except ResdError as exc:
            envelope.error = exc
        except Exception as exc:
            log.exception("actor_failed", actor=self.name, message=type(message).__name__)
            envelope.error = InternalError(
                f"{self.name} failed on {type(message).__name__}: {type(exc).__name__}: {exc}"
            )
        if envelope.done is not None:
            envelope.done.set()
        elif envelope.error is not None and not isinstance(envelope.error, ResdError):
            log.warning("told_message_failed", actor=self.name, error=str(envelope.error))
