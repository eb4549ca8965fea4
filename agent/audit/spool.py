"""A sink's bounded disk spool: chained audit lines wait here, in order, until the sink's sender delivered them.

One directory per sink. The audit writer thread appends whole lines to the newest segment file
(`seg-<n>.log`); the sender thread reads from its own position and, once a receiver confirmed records,
moves the cursor (`cursor`: segment and offset, replaced atomically) and deletes the segments behind it.
The bound counts the bytes waiting (the segment files less what the sender already delivered of the oldest,
so disk use can pass it by at most one segment, a sixteenth of it): a batch that would pass it keeps the
lines that fit and drops the rest for this sink (the local audit file still has them). The writer never waits for the
sender: they share only the segment sizes, under a lock held for a few assignments.

The spool directory must be the agent's own: created 0700, and refused at start when it is a symlink, another
user's, or writable by others, as is a parent that others may write without the sticky bit. Files in it are opened
without following symlinks. (A planted link would otherwise have the agent truncate, append to, or ship a file
of someone else's choosing.)

A restart resumes from the cursor. Segments written before it are never appended to again (a new one is
started), and a line a crash left half-written at the end of one is cut off, so readers only ever see
whole lines.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

SEGMENT_MAX = 8 << 20  # a segment is closed at about this size (or a sixteenth of the bound, when smaller)
SEGMENT_MIN = 4096
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Where a reader is: a segment number and a byte offset in it (always at the start of a line)."""

    segment: int
    offset: int


class Spool:
    """The segments and cursor of one sink. append() is the writer thread's, read() and commit() the sender's."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int | None = None) -> None:
        if max_bytes < 1:
            raise ValueError("a spool's bound must be at least 1 byte")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(SEGMENT_MIN, min(SEGMENT_MAX, max_bytes // 16))
        self.dropped = 0  # records refused for room (the writer's count)
        self.appended = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._sizes: dict[int, int] = {}  # segment -> bytes of whole lines in it (lock)
        self._bytes = 0  # their sum (lock)
        private_directory(directory)
        for path in directory.glob("seg-*.log"):
            try:
                n = int(path.name[4:-4])
            except ValueError:
                continue
            self._sizes[n] = _whole_lines(path)
        self._bytes = sum(self._sizes.values())
        self.cursor = self._read_cursor()
        for n in [n for n in self._sizes if n < self.cursor.segment]:  # consumed before a crash
            self._delete(n)
        # This process writes a new segment: one another process may have left unfinished is never appended to.
        self._segment = max(self._sizes, default=self.cursor.segment - 1) + 1
        self._sizes[self._segment] = 0
        self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o600)
        if self.cursor.segment not in self._sizes:  # nothing left where the cursor points: start at the oldest
            self.cursor = Position(min(self._sizes), 0)
        elif self.cursor.offset > self._sizes[self.cursor.segment]:
            self.cursor = Position(self.cursor.segment, self._sizes[self.cursor.segment])

    def _path(self, segment: int) -> Path:
        return self.directory / f"seg-{segment:012d}.log"

    def _read_cursor(self) -> Position:
        try:
            seg, off = _read_at(self.directory / "cursor", 0, 64).decode().split()
            pos = Position(int(seg), int(off))
        except (OSError, ValueError):
            return Position(min(self._sizes, default=0), 0)
        return pos if pos.segment >= 0 and pos.offset >= 0 else Position(min(self._sizes, default=0), 0)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segment files."""
        return self._bytes

    @property
    def pending_bytes(self) -> int:
        """Bytes not yet confirmed delivered: what the bound counts."""
        with self._lock:
            return self._bytes - self.cursor.offset

    def append(self, data: bytes | bytearray) -> tuple[int, int]:
        """(The writer thread.) Whole lines, in order: as many as fit under the bound; the rest are dropped
        for this sink. Returns (records kept, records dropped). A failed write counts the batch as dropped."""
        if not data:
            return 0, 0
        with self._lock:
            room = self.max_bytes - (self._bytes - self.cursor.offset)
        if len(data) > room:
            cut = data.rfind(b"\n", 0, max(room, 0)) + 1  # the whole lines that fit
            dropped = data.count(b"\n", cut)
            data = data[:cut]
        else:
            dropped = 0
        kept = data.count(b"\n")
        if data:
            try:
                _write_all(self._fd, data)
            except OSError:
                self.dropped += kept + dropped
                self._cut_back()
                return 0, kept + dropped
            with self._ready:
                self._sizes[self._segment] += len(data)
                self._bytes += len(data)
                self._ready.notify_all()
            if self._sizes[self._segment] >= self.segment_bytes:
                self._roll()
        self.dropped += dropped
        self.appended += kept
        return kept, dropped

    def _cut_back(self) -> None:
        """After a failed (maybe partial) write, the segment goes back to its whole lines."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._sizes[self._segment])

    def _roll(self) -> None:
        """A new segment; when it cannot be made, the current one goes on growing (and is retried next batch)."""
        try:
            fd = os.open(self._path(self._segment + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o600)
        except OSError:
            return
        os.close(self._fd)
        self._fd = fd
        with self._lock:
            self._segment += 1
            self._sizes[self._segment] = 0

    def wait(self, position: Position, timeout_s: float) -> None:
        """(The sender.) Block until there is something after `position`, or timeout_s."""
        with self._ready:
            self._ready.wait_for(lambda: self._has_after(position), timeout_s)

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def _has_after(self, position: Position) -> bool:
        size = self._sizes.get(position.segment)
        return (size is not None and size > position.offset) or any(n > position.segment for n in self._sizes)

    def read(self, position: Position, max_bytes: int) -> tuple[list[bytes], Position]:
        """(The sender.) Whole lines after `position` (without newlines), about max_bytes of them (at least one
        when there is any), and the position after them."""
        for _ in range(len(self._sizes) + 2):
            with self._lock:
                size = self._sizes.get(position.segment)
                later = [n for n in self._sizes if n > position.segment]
            if size is None or position.offset >= size:
                if not later:
                    return [], position
                position = Position(min(later), 0)
                continue
            path = self._path(position.segment)
            data = _read_at(path, position.offset, min(size - position.offset, max(max_bytes, 1)))
            end = data.rfind(b"\n") + 1
            if end == 0:  # one line longer than max_bytes
                data = _read_at(path, position.offset, size - position.offset)
                end = data.find(b"\n") + 1
            return data[: end - 1].split(b"\n"), Position(position.segment, position.offset + end)
        return [], position

    def commit(self, position: Position) -> None:
        """(The sender.) Everything before `position` was delivered: the cursor moves there, durably, and the
        segments wholly behind it are deleted."""
        if position <= self.cursor:
            return
        tmp = self.directory / "cursor.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600)
        try:
            _write_all(fd, f"{position.segment} {position.offset}\n".encode())
            os.fsync(fd)  # the cursor never points past what a crash kept: duplicates at worst, never a loss
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / "cursor")
        with self._lock:
            self.cursor = position
            behind = [n for n in self._sizes if n < position.segment]
        for n in behind:
            self._delete(n)

    def _delete(self, segment: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(segment).unlink()
        with self._lock:
            self._bytes -= self._sizes.pop(segment, 0)

    def close(self) -> None:
        """(The writer, last.) The open segment is closed; an empty one is removed (a restart starts another)."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        with self._lock:
            empty = self._sizes[self._segment] == 0 and len(self._sizes) > 1
        if empty:
            self._delete(self._segment)


def private_directory(directory: Path) -> None:
    """Make `directory` (0700) or check that it is this user's own and no one else may write it or its parent;
    ValueError says what is wrong."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = parent.stat()
    if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        raise ValueError(f"audit spool {directory}: its parent {parent} is writable by anyone (and not sticky)")
    if st.st_uid not in (os.geteuid(), 0) and st.st_mode & 0o022:
        raise ValueError(f"audit spool {directory}: its parent {parent} is another user's and writable by others")
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"audit spool {directory}: not a directory (a symlink?): remove it or choose another")
    if st.st_uid != os.geteuid():
        raise ValueError(f"audit spool {directory}: owned by uid {st.st_uid}, not this user ({os.geteuid()})")
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)  # ours: made private (records wait here)


def _read_at(path: Path, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def _whole_lines(path: Path) -> int:
    """The size of `path` up to its last newline; a partial line after it (a crash mid-write) is cut off.
    Only a regular file is read (opened without following a link)."""
    fd = os.open(path, os.O_RDWR | _NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"audit spool: {path} is not a regular file")
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        end = data.rfind(b"\n") + 1
        if end != len(data):
            os.ftruncate(fd, end)
        return end
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    for _ in range(10_000):
        if not view:
            return
        view = view[os.write(fd, view) :]
    raise OSError("the spool segment took no bytes")
