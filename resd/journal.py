"""The write-ahead log and snapshots: the only module that touches the state directory.

Layout of the state directory (format version 1; files written by any release must replay):

- ``wal-<first lsn, 20 digits>.log``: ``b"RESDWAL\\x00"`` + u32 BE version, then entries of
  u32 BE length + u32 BE crc32(payload) + payload, where payload is the msgpack map
  ``{"lsn": int, "d": domain, "r": [records]}``. One ``append`` is one entry, so a
  multi-record change replays all or nothing.
- ``snapshot.msgpack``: ``b"RESDSNAP"`` + u32 BE version + u32 BE crc32(payload) + payload,
  the msgpack map ``{"lsn": covered_lsn, "domains": {domain: {"lsn": int, "state": any}}}``.
  Every entry with lsn <= ``covered_lsn`` is reflected in the snapshot, and so is every entry of
  a domain with lsn <= that domain's lsn. Written atomically (tmp file, fsync, rename, fsync dir).

``Journal`` owns one append-only file descriptor and a flusher (``run``) doing group commit:
``append`` writes its entry at once (so a full disk refuses *this* change, before the caller
applies it), and every entry written while the previous fsync was in progress shares the
next one. The fsyncs run in one long-lived flusher thread, which the event loop hands work
under a lock and which reports each outcome back with ``run_sync_soon``: the report wakes
``wait_durable`` and calls the ``on_durable`` listeners (the announcer's pushes) right
there. Records are opaque msgpack-able values.

What can fail, and what it costs (never the daemon):

- ``recover`` raises ``JournalCorrupt`` for anything unreadable except a torn final entry of
  the last segment (truncated with a warning): resd refuses to start rather than reset state.
- A failed write (ENOSPC, EDQUOT, EIO) makes ``append`` raise ``JournalRefused`` and leaves
  the file as it was (a partial entry is truncated away, or before the next write): nothing
  was appended, and the next ``append`` simply tries again, so writes resume by themselves
  once there is room.
- A failed fsync cannot be retried (after it the page cache is not to be trusted): the
  journal becomes *unsynced*. ``wait_durable`` of entries not yet durable raises
  ``JournalFailed`` (their outcome is unknown), ``append`` raises ``JournalRefused`` and
  ``on_failure`` is called, until ``write_snapshot(resync=True)`` has written the whole state
  to a fresh snapshot and segment; then everything appended so far is durable again.
- ``write_snapshot`` raises ``OSError`` if the snapshot cannot be written; the previous
  snapshot and the WAL stay valid, and the caller retries later.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final, Generic, Literal, TypeVar, final

import attrs
import msgpack
import msgspec
import structlog
import trio

__all__ = [
    "FsyncMode",
    "Journal",
    "JournalCorrupt",
    "JournalFailed",
    "JournalRefused",
    "Recovered",
]

log = structlog.get_logger("resd.journal")

FsyncMode = Literal["always", "batch", "never"]

FORMAT_VERSION: Final = 1
WAL_MAGIC: Final = b"RESDWAL\x00"
SNAP_MAGIC: Final = b"RESDSNAP"
SNAPSHOT_NAME: Final = "snapshot.msgpack"
MAX_ENTRY: Final = 64 << 20  # a larger length field is corruption, never a torn tail

_FILE_HEADER: Final = struct.Struct(">8sI")  # magic, version
_ENTRY_HEADER: Final = struct.Struct(">II")  # length, crc32
_SNAP_HEADER: Final = struct.Struct(">8sII")  # magic, version, crc32
_WAL_HEADER: Final = _FILE_HEADER.pack(WAL_MAGIC, FORMAT_VERSION)
_SEGMENT_NAME: Final = re.compile(r"^wal-(\d{20})\.log$")

_Entry = tuple[int, str, list[Any]]  # (lsn, domain, records)
_Job = tuple[int, int | None, list[int], Path | None]  # see Journal._take


# Every fsync goes through this name, so tests can count or fail them.
# ``fdatasync`` would do for the segments, but costs the same here: every append changes
# the file's size, which both must commit (docs/architecture.md, "Durability").
_fsync: Callable[[int], None] = os.fsync

#: ``append`` decodes each entry again to check that it would replay (a tuple as a map
#: key packs, then fails to unpack). That costs a decode per change, so it is off in
#: production and on in the tests (``tests/conftest.py``); snapshots are always checked.
CHECK_REPLAY = False


@final
class JournalCorrupt(Exception):
    """The state directory holds data resd cannot read; it refuses to start."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"{path}: offset {offset}: {reason}. resd refuses to start rather than reset its "
            "state; restore the state directory from a backup or move it aside to start empty"
        )


@final
class JournalFailed(Exception):
    """An fsync of the WAL failed: entries not yet durable may or may not survive a crash
    until the state is written anew (``write_snapshot(resync=True)``)."""


@final
class JournalRefused(Exception):
    """An entry was not appended (nothing was written); the message says why, e.g. the
    state directory is full and how much is free."""

    def __init__(self, directory: Path, cause: OSError | JournalFailed) -> None:
        if isinstance(cause, JournalFailed):
            message = f"{cause}; resd is writing its state anew and refuses changes until then"
        elif cause.errno in (errno.ENOSPC, errno.EDQUOT):
            message = (
                f"the state directory {directory} is full ({_free_bytes(directory)} bytes free):"
                f" {cause.strerror or cause}"
            )
        else:
            message = f"writing the journal in {directory} failed: {cause.strerror or cause}"
        super().__init__(message)


def _free_bytes(directory: Path) -> int | str:
    try:
        st = os.statvfs(directory)
    except OSError:
        return "unknown"
    return st.f_bavail * st.f_frsize


@final
@attrs.frozen
class Recovered:
    """What ``recover`` read: replay ``snapshots``, then ``entries`` in order (empty when
    they went to ``recover``'s ``replay`` callback instead; ``replayed`` counts them)."""

    snapshots: dict[str, tuple[int, Any]]
    entries: list[tuple[int, str, list[Any]]]
    warnings: list[str]
    next_lsn: int
    replayed: int = 0


def _segment_name(first_lsn: int) -> str:
    return f"wal-{first_lsn:020d}.log"


def _packb(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _sync_files(retired: list[int], fd: int | None, directory: Path | None) -> None:
    """fsync and close the retired segments (oldest first), then fsync ``fd`` and the dir."""
    try:
        for old in retired:
            _fsync(old)
    finally:
        for old in retired:
            os.close(old)
    if fd is not None:
        _fsync(fd)
    if directory is not None:
        _fsync_dir(directory)


def _write_snapshot_file(directory: Path, data: bytes, sync: bool) -> None:
    tmp = directory / (SNAPSHOT_NAME + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            if sync:
                _fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / SNAPSHOT_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        _fsync_dir(directory)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_snapshot(path: Path) -> tuple[int, dict[str, tuple[int, Any]]]:
    """Returns (covered lsn, domain -> (lsn, state)); raises JournalCorrupt."""
    data = path.read_bytes()
    if len(data) < _SNAP_HEADER.size:
        raise JournalCorrupt(path, 0, f"file is {len(data)} bytes, shorter than its header")
    magic, version, crc = _SNAP_HEADER.unpack_from(data)
    if magic != SNAP_MAGIC:
        raise JournalCorrupt(path, 0, f"bad magic {magic!r}, expected {SNAP_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise JournalCorrupt(
            path, 8, f"unknown snapshot format version {version}; this resd reads version 1"
        )
    payload = data[_SNAP_HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise JournalCorrupt(path, _SNAP_HEADER.size, "snapshot crc32 mismatch")
    try:
        body = _unpackb(payload)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise JournalCorrupt(path, _SNAP_HEADER.size, f"undecodable snapshot: {exc}") from exc
    domains: dict[str, tuple[int, Any]] = {}
    ok = (
        isinstance(body, dict)
        and _is_int(body.get("lsn"))
        and isinstance(body.get("domains"), dict)
    )
    if ok:
        for name, entry in body["domains"].items():
            if not (
                isinstance(name, str)
                and isinstance(entry, dict)
                and _is_int(entry.get("lsn"))
                and "state" in entry
            ):
                ok = False
                break
            domains[name] = (entry["lsn"], entry["state"])
    if not ok:
        raise JournalCorrupt(path, _SNAP_HEADER.size, "snapshot payload has the wrong shape")
    covered: int = body["lsn"]
    return covered, domains


def _entry_of(body: Any) -> tuple[_Entry | None, str]:
    if (
        isinstance(body, dict)
        and _is_int(body.get("lsn"))
        and isinstance(body.get("d"), str)
        and isinstance(body.get("r"), list)
    ):
        return (body["lsn"], body["d"], body["r"]), ""
    return None, "entry has the wrong shape"


def _decode_entry(payload: bytes) -> tuple[_Entry | None, str]:
    """Returns ((lsn, domain, records), "") or (None, what is wrong), as msgpack reads
    the entry (what ``append`` checks an entry against: any release can read it)."""
    try:
        body = _unpackb(payload)
    except Exception as exc:  # msgpack raises several unrelated exception types
        return None, f"undecodable entry: {exc}"
    return _entry_of(body)


#: How recovery reads an entry: msgspec's decoder of any msgpack value, about twice as
#: fast as msgpack's on a long log. It reads whatever msgpack wrote the same way
#: (maps, arrays as lists, str, bin as bytes; it also takes some keys msgpack refuses,
#: which ``append`` never writes).
_read_value = msgspec.msgpack.Decoder().decode

_Records = TypeVar("_Records")
_Reader = Callable[[memoryview], tuple[_Entry | None, str]]


class _TypedEntry(msgspec.Struct, Generic[_Records], gc=False):
    """An entry as ``_entry_of`` accepts it, with records of a given type."""

    lsn: Annotated[int, msgspec.Meta(ge=0)]
    d: str
    r: list[_Records]


def _read_entry(payload: memoryview) -> tuple[_Entry | None, str]:
    """``_decode_entry`` for recovery, from a view of the segment (no copy)."""
    try:
        body = _read_value(payload)
    except Exception as exc:  # msgspec.DecodeError, or a RecursionError on deep junk
        return None, f"undecodable entry: {exc}"
    return _entry_of(body)


def _entry_reader(records: Any) -> _Reader:
    """``_read_entry`` with records read as ``records`` (a msgspec type), in C, where
    they are of it; an entry that is not so (or is not an entry) is read by
    ``_read_entry``, so its records come as plain values, or it is refused as before."""
    if records is Any:
        return _read_entry
    typed = msgspec.msgpack.Decoder(_TypedEntry[records]).decode

    def read(payload: memoryview) -> tuple[_Entry | None, str]:
        try:
            entry = typed(payload)
        except Exception:  # not of the type, or not an entry: as any msgpack value
            return _read_entry(payload)
        return (entry.lsn, entry.d, entry.r), ""

    return read


def _parse_entry(
    data: memoryview, offset: int, read: _Reader = _read_entry
) -> tuple[_Entry | None, str, bool, int]:
    """Returns (entry or None, what is wrong, whether a bad entry reaches end of file, end),
    from a view of the segment (no copy)."""
    size = len(data)
    if size - offset < _ENTRY_HEADER.size:
        return None, "entry header runs past end of file", True, size
    length, crc = _ENTRY_HEADER.unpack_from(data, offset)
    end = offset + _ENTRY_HEADER.size + length
    if length == 0 or length > MAX_ENTRY:
        return None, f"invalid entry length {length}", False, end
    if end > size:
        present = size - offset - _ENTRY_HEADER.size
        return None, f"entry of {length} bytes runs past end of file ({present} present)", True, end
    payload = data[offset + _ENTRY_HEADER.size : end]
    if zlib.crc32(payload) != crc:
        return None, "entry crc32 mismatch", end == size, end
    entry, problem = read(payload)
    return entry, problem, end == size, end


def _warn(message: str, path: Path, offset: int) -> str:
    log.warning("journal.torn_tail", detail=message, file=str(path), offset=offset)
    return message


@final
class Journal:
    """The WAL and snapshots of one state directory; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        fsync: FsyncMode = "always",
        *,
        batch_interval: float = 0.1,
        on_failure: Callable[[], None] = lambda: None,
        on_sync: Callable[[float, int], None] = lambda seconds, entries: None,
    ) -> None:
        """``on_sync(seconds, entries)``: told after each successful group-commit fsync
        how long it took and how many entries it made durable (metrics); it must not
        raise."""
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync must be always, batch or never, not {fsync!r}")
        self._dir = state_dir
        self._mode: FsyncMode = fsync
        self._batch_interval = batch_interval
        self._on_failure = on_failure
        self._on_sync = on_sync
        self._recovered = False
        self._closed = False
        self._running = False
        self._snapshot_lock = trio.Lock()  # snapshots are written one after the other
        self._failure: OSError | None = None  # a failed fsync, until a resync
        self._size = 0  # bytes of the current segment that hold whole entries
        self._torn = False  # a failed write may have left bytes past _size
        self._segments: list[int] = []  # first lsn of each segment, the last one current
        self._durable_lsn = 0
        self._snapshot_lsn = 0
        self._work = trio.Event()  # set: the flusher task has something to hand over
        self._dirty = trio.Event()  # set: the background syncer has something to do
        self._progress = trio.Event()  # set and replaced whenever an lsn advances
        self._listeners: list[Callable[[], None]] = []  # told when _progress is
        # What the flusher thread reads is changed (and, by the loop, read) under _lock
        # only; a job it took is its own until it reports back.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # notified: look for work again
        self._fd: int | None = None  # None: the last segment is not created yet
        self._retired: list[int] = []  # rotated-out fds awaiting fsync and close
        self._dir_dirty = False  # a segment was created since the last directory fsync
        self._last_lsn = 0  # appended, i.e. written (the loop writes it outside _lock)
        self._taken = 0  # the highest lsn a sync has been started for
        self._wanted = 0  # the highest lsn someone waits for (mode always)
        self._kicked = False  # the loop asked the thread for a sync
        self._busy = False  # the thread is syncing, or about to look for more to sync
        self._halted = False  # its last fsync failed: it syncs nothing until a resync
        self._stopping = False  # the thread is to end

    # -- recovery ---------------------------------------------------------------------------

    def recover(
        self,
        replay: Callable[[int, str, list[Any]], None] | None = None,
        on_snapshot: Callable[[dict[str, tuple[int, Any]]], None] | None = None,
        *,
        records: Any = Any,
    ) -> Recovered:
        """Read the snapshot and every segment; call once, before ``run``.

        With ``replay``, each entry to replay is handed to it as soon as it is read (after
        ``on_snapshot`` got the snapshot), and none is kept: memory stays at the size of
        the state, not of the log. A JournalCorrupt found later still stops the start.

        ``records``: a msgspec type to read each record as, straight into typed values
        (much faster than maps on a long log); the records of an entry that are not all
        of it come as plain msgpack values, so ``replay`` must take both.

        Creates the state directory (0o700) if missing. Truncates a torn final entry of the
        last segment (and fsyncs it) with a warning. Raises JournalCorrupt for anything else
        unreadable: bad magic or version, a bad entry before the end, an lsn out of sequence,
        a missing segment, a bad snapshot.
        """
        if self._recovered:
            raise RuntimeError("recover() was already called")
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self._dir / (SNAPSHOT_NAME + ".tmp")).unlink(missing_ok=True)
        snap_path = self._dir / SNAPSHOT_NAME
        covered, snapshots = _read_snapshot(snap_path) if snap_path.exists() else (0, {})
        if on_snapshot is not None:
            on_snapshot(snapshots)
        segments = sorted(
            (int(m[1]), self._dir / m[0])
            for m in (_SEGMENT_NAME.match(p.name) for p in self._dir.iterdir())
            if m
        )
        warnings: list[str] = []
        entries: list[_Entry] = []
        replayed = 0

        floors = {domain: lsn for domain, (lsn, _state) in snapshots.items()}

        def keep(entry: _Entry) -> None:
            nonlocal replayed
            lsn, domain, values = entry
            if lsn > covered and lsn > floors.get(domain, 0):
                replayed += 1
                if replay is None:
                    entries.append(entry)
                else:
                    replay(lsn, domain, values)

        reader = _entry_reader(records)
        expected = covered + 1
        kept: list[int] = []
        for index, (first, path) in enumerate(segments):
            if index == 0 and first > expected:
                missing = f"lsns {expected}..{first - 1} are in no segment and not in the snapshot"
                raise JournalCorrupt(path, 0, missing)
            if index > 0 and first != expected:
                reason = (
                    f"segment starts at lsn {first} but the previous one ends at {expected - 1}"
                )
                raise JournalCorrupt(path, 0, reason)
            is_last = index == len(segments) - 1
            read, warning = self._read_segment(path, first, is_last, keep, reader)
            if warning:
                warnings.append(warning)
            if read is None:  # a torn header: the file was removed
                continue
            kept.append(first)
            expected = first + read
        high = max((lsn for lsn, _ in snapshots.values()), default=0)
        if max(covered, high) >= expected:
            reason = (
                f"the snapshot covers lsn {max(covered, high)} but the WAL ends at {expected - 1}"
            )
            raise JournalCorrupt(snap_path, 0, reason)
        self._segments = kept or [expected]
        if kept:
            self._fd = os.open(self._dir / _segment_name(kept[-1]), os.O_WRONLY | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size
            if self._mode != "never":
                _fsync(self._fd)  # what we replay must not vanish after a later crash
                _fsync_dir(self._dir)
        self._last_lsn = self._durable_lsn = expected - 1
        self._snapshot_lsn = covered
        self._recovered = True
        return Recovered(snapshots, entries, warnings, expected, replayed)

    def _read_segment(
        self,
        path: Path,
        first: int,
        is_last: bool,
        sink: Callable[[_Entry], None],
        read: _Reader = _read_entry,
    ) -> tuple[int | None, str]:
        """Hands each entry to ``sink``; returns (how many, warning), None for how many if
        a torn header was removed."""
        data = path.read_bytes()
        if len(data) < _FILE_HEADER.size:
            if is_last and (_WAL_HEADER.startswith(data) or not any(data)):
                path.unlink()
                _fsync_dir(self._dir)
                what = f"removed {path.name}, whose segment header is torn ({len(data)} bytes)"
                return None, _warn(what, path, 0)
            raise JournalCorrupt(path, 0, f"file is {len(data)} bytes, shorter than its header")
        magic, version = _FILE_HEADER.unpack_from(data)
        if magic != WAL_MAGIC:
            raise JournalCorrupt(path, 0, f"bad magic {magic!r}, expected {WAL_MAGIC!r}")
        if version != FORMAT_VERSION:
            reason = f"unknown WAL format version {version}; this resd reads version 1"
            raise JournalCorrupt(path, 8, reason)
        count = 0
        offset = _FILE_HEADER.size
        size = len(data)
        view = memoryview(data)
        while offset < size:
            entry, problem, torn, end = _parse_entry(view, offset, read)
            if entry is None:
                if is_last and (torn or not any(data[offset:])):
                    self._truncate(path, offset)
                    what = (
                        f"truncated a torn final record at {path.name} offset {offset} "
                        f"({len(data) - offset} bytes): {problem}"
                    )
                    return count, _warn(what, path, offset)
                raise JournalCorrupt(path, offset, problem)
            lsn = entry[0]
            if lsn != first + count:
                reason = f"entry has lsn {lsn} where {first + count} was expected"
                raise JournalCorrupt(path, offset, reason)
            sink(entry)
            count += 1
            offset = end
        return count, ""

    def _truncate(self, path: Path, offset: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, offset)
            _fsync(fd)
        finally:
            os.close(fd)

    # -- appending --------------------------------------------------------------------------

    @property
    def last_lsn(self) -> int:
        """The lsn of the last appended entry (0 if none ever)."""
        return self._last_lsn

    @property
    def entries_since_snapshot(self) -> int:
        """Entries appended after the last snapshot's covered lsn."""
        return self._last_lsn - self._snapshot_lsn

    @property
    def unsynced(self) -> bool:
        """An fsync failed and the state has not been written anew since."""
        return self._failure is not None

    def append(self, domain: str, records: list[Any]) -> int:
        """Write one entry now and have it fsync'ed soon; never blocks. Returns its lsn.

        Raises JournalRefused when it cannot be written (disk full, I/O error) or the
        journal is unsynced, TypeError/ValueError if the entry cannot be encoded (or, with
        ``CHECK_REPLAY``, would not decode again); nothing is appended then. RuntimeError
        if not recovered or closed.
        """
        self._check_open()
        if self._failure is not None:
            raise JournalRefused(self._dir, self._failed())
        lsn = self._last_lsn + 1
        payload = _packb({"lsn": lsn, "d": domain, "r": records})
        if len(payload) > MAX_ENTRY:
            raise ValueError(f"journal entry of {len(payload)} bytes exceeds {MAX_ENTRY}")
        if CHECK_REPLAY and _decode_entry(payload)[0] is None:  # e.g. a tuple as a map key
            raise ValueError(f"journal entry for {domain!r} would not replay: {records!r}")
        try:
            self._write(_ENTRY_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        except OSError as exc:
            log.error("journal.write_failed", dir=str(self._dir), error=str(exc))
            raise JournalRefused(self._dir, exc) from exc
        self._last_lsn = lsn
        if self._mode != "never":
            self._dirty.set()  # fsync'ed soon, at the latest by the background syncer
        return lsn

    def _write(self, entry: bytes) -> None:
        """Write ``entry`` at the end of the current segment (created with its header if
        needed). On OSError the segment holds exactly its whole entries again, or is
        marked to be truncated to them before the next write."""
        if self._fd is None:
            path = self._dir / _segment_name(self._segments[-1])
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, _WAL_HEADER)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            with self._lock:
                self._fd, self._dir_dirty = fd, True
            self._size, self._torn = len(_WAL_HEADER), False
        assert self._fd is not None
        if self._torn:
            os.ftruncate(self._fd, self._size)
            self._torn = False
        try:
            _write_all(self._fd, entry)
        except OSError:
            self._torn = True
            try:
                os.ftruncate(self._fd, self._size)
                self._torn = False
            except OSError:
                pass  # tried again before the next write
            raise
        self._size += len(entry)

    async def wait_durable(self, lsn: int) -> None:
        """Return once entry ``lsn`` is durable: fsync'ed in mode always, written otherwise
        (at once, without a checkpoint, if it already is).

        Raises JournalFailed if an fsync failed before it was durable (its outcome is
        unknown until a resync), ValueError for an lsn never appended.
        """
        if lsn > self._last_lsn:
            raise ValueError(f"lsn {lsn} was never appended (last is {self._last_lsn})")
        if self._mode != "always" or lsn <= self._durable_lsn:
            return  # no checkpoint: a reply must not pay a scheduler round for nothing
        self.want_durable(lsn)
        while lsn > self._durable_lsn:
            if self._failure is not None:
                raise self._failed()
            if self._closed:
                raise RuntimeError("the journal was closed before the entry was durable")
            await self._progress.wait()

    def want_durable(self, lsn: int) -> None:
        """Someone waits for entry ``lsn`` (a reply, a push): have it fsync'ed now, with
        everything written before it, rather than by the background syncer. Mode always
        only (the others are durable once written); ``wait_durable`` calls it."""
        if self._mode != "always" or lsn <= self._durable_lsn:
            return
        with self._lock:
            self._wanted = max(self._wanted, lsn)
            busy = self._busy
        # A busy flusher thread takes it into its next sync by itself; an idle one is
        # handed it by the flusher task at its next turn, after the other handlers of
        # this scheduler round wrote theirs (so they share the fsync).
        if not busy:
            self._work.set()

    @property
    def waits_for_fsync(self) -> bool:
        """Whether ``wait_durable`` may wait for an fsync (mode always); otherwise an
        entry is durable once ``append`` returns."""
        return self._mode == "always"

    def is_durable(self, lsn: int) -> bool:
        """Whether ``wait_durable(lsn)`` would return at once (``lsn`` 0: nothing to wait
        for): entry ``lsn`` is fsync'ed in mode always, or written in the others."""
        return self._mode != "always" or lsn <= self._durable_lsn

    def on_durable(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever ``wait_durable`` waiters are woken: entries became
        durable, an fsync failed, a resync finished, the journal closed. It runs on the
        event loop, often straight from the flusher thread's report (no task of its own):
        it must be quick and must not await; what it raises is logged."""
        self._listeners.append(listener)

    async def wait_synced(self) -> None:
        """Return once the journal is not unsynced (at once if it is not); raises
        RuntimeError if it is closed unsynced."""
        while self._failure is not None:
            if self._closed:
                raise RuntimeError("the journal was closed unsynced")
            await self._progress.wait()
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if not self._recovered:
            raise RuntimeError("call recover() first")
        if self._closed:
            raise RuntimeError("the journal is closed")

    def _failed(self) -> JournalFailed:
        failure = JournalFailed(f"fsync of the WAL in {self._dir} failed: {self._failure}")
        failure.__cause__ = self._failure
        return failure

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # raised into the flusher thread's report, it would end the run
                log.exception("journal.listener_failed")

    def _fail(self, exc: OSError) -> None:
        """Record an fsync failure and wake everyone so they see it."""
        self._failure = exc
        log.error("journal.fsync_failed", dir=str(self._dir), error=str(exc))
        self._notify()
        self._on_failure()

    def _synced(self, target: int, took: float) -> None:
        """A sync up to lsn ``target`` succeeded in ``took`` seconds: wake the waiters."""
        self._on_sync(took, max(0, target - self._durable_lsn))
        self._durable_lsn = max(self._durable_lsn, target)
        self._notify()

    # -- syncing: what is owed, taken under _lock -------------------------------------------

    def _owed(self) -> bool:
        """(Under ``_lock``.) Something written is neither synced nor being synced."""
        return self._last_lsn > self._taken or bool(self._retired) or self._dir_dirty

    def _take(self) -> _Job:
        """(Under ``_lock``.) Hand what is owed to a sync: (the lsn it makes durable, the
        current segment if it holds entries not yet taken, the retired segments, the
        directory if a segment was created)."""
        target = self._last_lsn
        fd = self._fd if target > self._taken else None
        retired, self._retired = self._retired, []
        directory = self._dir if self._dir_dirty else None
        self._dir_dirty = False
        self._taken = target
        return target, fd, retired, directory

    async def _sync(self) -> None:
        """Without the flusher thread (``run`` is not on, e.g. in ``close``): fsync what is
        owed in a worker thread; records a failure instead of raising."""
        with self._lock:
            self._taken = max(self._taken, self._durable_lsn)
            if self._failure is not None or not self._owed():
                return
            before = self._taken
            target, fd, retired, directory = self._take()
        started = False
        took = 0.0

        def sync() -> None:
            nonlocal started, took
            started = True
            begun = time.perf_counter()
            _sync_files(retired, fd, directory)
            took = time.perf_counter() - begun

        try:
            await trio.to_thread.run_sync(sync)
        except OSError as exc:
            self._fail(exc)
            return
        except BaseException:
            if not started:  # cancelled before the thread began: the work is still owed
                with self._lock:
                    self._retired[:0] = retired
                    self._dir_dirty = self._dir_dirty or directory is not None
                    self._taken = before
            raise
        self._synced(target, took)

    def _kick(self) -> None:
        """Have the flusher thread sync everything written so far."""
        with self._lock:
            self._kicked = True
            self._wake.notify()

    # -- the flusher ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: group-commits written entries until cancelled; never raises for an
        I/O error (see the module docstring).

        Mode always fsyncs as soon as someone waits for an entry (``wait_durable``, a
        push: ``want_durable``), with everything written before it; what is wanted while
        an fsync runs goes in the next one, and what nobody waits for is fsync'ed at most
        ``batch_interval`` after it was written. Mode batch fsyncs at most every
        ``batch_interval``; mode never uses no thread. Cancelling it loses nothing
        acknowledged (a sync under way is finished and reported first); call ``close``
        afterwards.
        """
        self._check_open()
        if self._running:
            raise RuntimeError("run() is already running")
        self._running = True
        try:
            if self._mode == "never":  # nothing is ever fsync'ed: no thread
                task_status.started()
                await trio.sleep_forever()
            ended = trio.Event()
            with self._lock:
                self._taken = max(self._taken, self._durable_lsn)
                self._kicked = self._busy = self._stopping = False
                self._halted = self._failure is not None
            thread = threading.Thread(
                target=self._flusher,
                args=(trio.lowlevel.current_trio_token(), ended),
                name="resd-journal-flusher",
                daemon=True,
            )
            thread.start()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._background_sync_loop)
                    task_status.started()
                    while True:
                        await self._work.wait()
                        self._work = trio.Event()
                        # cancelled meanwhile: hand nothing over, close() syncs what is owed
                        await trio.lowlevel.checkpoint_if_cancelled()
                        self._kick()
            finally:
                with self._lock:
                    self._stopping = True
                    self._wake.notify()
                with trio.CancelScope(shield=True):
                    await ended.wait()  # after the report of its last sync, if any
                thread.join()
        finally:
            self._running = False

    def _flusher(self, token: trio.lowlevel.TrioToken, ended: trio.Event) -> None:
        """The flusher thread: sync what the loop hands over (``_kick``) and whatever
        came to be wanted while it synced (``want_durable``), until ``_stopping``; each
        sync takes everything written so far. Each outcome is reported to the loop with
        ``run_sync_soon``: ``_synced``, which wakes the waiters and sends the pushes that
        were waiting, or ``_fail``, after which it syncs nothing until a resync."""
        try:
            while True:
                with self._lock:
                    job = self._next_job()
                if job is None:
                    return
                target, fd, retired, directory = job
                begun = time.perf_counter()
                try:
                    _sync_files(retired, fd, directory)
                except OSError as exc:
                    with self._lock:
                        self._halted = True
                    token.run_sync_soon(self._fail, exc)
                    continue
                token.run_sync_soon(self._synced, target, time.perf_counter() - begun)
        finally:
            token.run_sync_soon(ended.set)

    def _next_job(self) -> _Job | None:
        """(Under ``_lock``, in the flusher thread.) Wait for a sync to do; None: stop."""
        while not self._stopping:
            wanted = self._kicked or (self._busy and self._wanted > self._taken)
            if wanted and not self._halted and self._owed():
                self._kicked, self._busy = False, True
                return self._take()
            self._kicked = self._busy = False
            self._wake.wait()
        self._busy = False
        return None

    async def _background_sync_loop(self) -> None:
        """Sync what was written at most ``batch_interval`` after it was: in mode batch
        everything, in mode always what nobody waited for (a cancelled loop hands
        nothing over: ``close`` syncs it)."""
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await trio.sleep(self._batch_interval)
            self._kick()

    async def close(self) -> None:
        """fsync what was written (except in mode never) and close the files.

        Call after ``run`` has returned (RuntimeError otherwise); the fsync is shielded from
        cancellation. Idempotent. Raises JournalFailed if the journal is unsynced (files
        closed anyway).
        """
        if self._closed or not self._recovered:
            self._closed = True
            await trio.lowlevel.checkpoint()
            return
        if self._running:
            raise RuntimeError("cancel run() before close()")
        try:
            if self._mode != "never":
                with trio.CancelScope(shield=True):
                    await self._sync()
        finally:
            with self._lock:
                fds = [*self._retired, *([] if self._fd is None else [self._fd])]
                self._retired, self._fd = [], None
            for fd in fds:
                os.close(fd)
            self._closed = True
            self._notify()
        if self._failure is not None:
            raise self._failed()
        await trio.lowlevel.checkpoint()

    # -- segments and snapshots -------------------------------------------------------------

    def rotate(self) -> int:
        """Start a new segment for the next entry; returns the last lsn of the old ones.

        The old segment's fsync is left to the flusher. A no-op if the current segment is
        still empty.
        """
        self._check_open()
        if self._segments[-1] == self._last_lsn + 1:
            return self._last_lsn
        self._retire_current()
        self._segments.append(self._last_lsn + 1)
        return self._last_lsn

    def _retire_current(self) -> None:
        if self._fd is None:
            return
        # an unsynced segment is not fsync'ed again (the flusher thread is halted): it is
        # replaced by the resync
        keep = self._mode != "never" and self._failure is None
        with self._lock:
            fd, self._fd = self._fd, None
            if keep:
                self._retired.append(fd)
        if keep:
            self._dirty.set()
        else:
            os.close(fd)

    async def write_snapshot(
        self, domains: dict[str, tuple[int, Any]], covered_lsn: int, *, resync: bool = False
    ) -> None:
        """Write ``snapshot.msgpack`` atomically, then delete segments it makes redundant.

        Concurrent calls are serialized (lsns are checked once it is this call's turn).

        ``domains`` maps each domain to (lsn, state): the state reflects that domain's entries
        up to lsn. Every entry <= ``covered_lsn`` must be reflected in some domain's state.
        First makes the WAL durable up to the highest of these lsns, so the snapshot never
        claims more than the WAL holds. With ``resync`` (after a failed fsync) the states must
        cover every entry appended: the snapshot replaces the WAL, the next entry starts a
        fresh segment, and once it is written everything appended is durable again.

        Raises ValueError for lsns not yet appended or below the previous snapshot (with
        ``resync``: not covering everything), or a state that would not decode again;
        OSError if the file cannot be written (nothing changes); JournalFailed if the journal
        is unsynced and this is no resync.
        """
        async with self._snapshot_lock:
            self._check_open()
            high = max([covered_lsn, *(lsn for lsn, _ in domains.values())])
            if high > self._last_lsn or covered_lsn < self._snapshot_lsn:
                raise ValueError(
                    f"snapshot lsns must be between {self._snapshot_lsn} and {self._last_lsn}"
                )
            if resync and covered_lsn != self._last_lsn:
                raise ValueError(f"a resync snapshot must cover lsn {self._last_lsn}")
            body = {
                "lsn": covered_lsn,
                "domains": {
                    name: {"lsn": lsn, "state": state} for name, (lsn, state) in domains.items()
                },
            }
            payload = _packb(body)
            try:
                _unpackb(payload)
            except Exception as exc:  # e.g. a tuple as a map key: the snapshot would not load
                raise ValueError(f"the snapshot would not load again: {exc}") from exc
            data = _SNAP_HEADER.pack(SNAP_MAGIC, FORMAT_VERSION, zlib.crc32(payload)) + payload
            if resync:
                if self._segments[-1] != self._last_lsn + 1:
                    self._retire_current()
                    self._segments.append(self._last_lsn + 1)
            else:
                await self._wait_synced(high)
            if self._mode == "never":
                _write_snapshot_file(self._dir, data, sync=False)
            else:
                await trio.to_thread.run_sync(_write_snapshot_file, self._dir, data, True)
            self._snapshot_lsn = covered_lsn
            while len(self._segments) > 1 and self._segments[1] - 1 <= covered_lsn:
                (self._dir / _segment_name(self._segments.pop(0))).unlink(missing_ok=True)
            if resync and self._failure is not None:
                self._failure = None
                self._durable_lsn = covered_lsn
                with self._lock:  # the flusher thread may sync again
                    self._halted = False
                    self._taken = covered_lsn
                log.warning("journal.resynced", dir=str(self._dir), lsn=covered_lsn)
                self._notify()

    async def _wait_synced(self, lsn: int) -> None:
        """Make entries up to ``lsn`` fsync'ed unless mode never."""
        if self._mode != "never" and not self._running:
            await self._sync()
        while self._mode != "never" and self._durable_lsn < lsn and self._failure is None:
            self._kick()
            await self._progress.wait()
        if self._failure is not None:
            raise self._failed()
