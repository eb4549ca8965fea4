"""The audit log's hash chain: every record carries its sequence number and the SHA-256 of the record before.

Two encodings. JSON lines (default):

a record is one JSON object on one line: `{"seq": N, "prev": "<hex>", ...}`, where `prev` is the SHA-256 of
the previous line's bytes (without its newline) and the first record of a chain has 64 zeros. msgpack
(`--audit-format msgpack`, smaller and cheaper to write): each record is a frame, a 4-byte big-endian
length and then the msgpack array `[seq, prev, record]`; `prev` is the SHA-256 of the previous frame's
array bytes. Editing a
record changes its hash, so the next record no longer names it; removing or reordering records breaks
`seq` and `prev` both. Rotation continues the chain in the next file, and an agent that restarts continues
it from the last record in the file. The last record has no successor to vouch for it: `audit verify`
prints the head hash so it can be anchored elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import orjson

GENESIS = "0" * 64


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class Chain:
    """Where the chain stands: the next sequence number and the hash of the last record written."""

    __slots__ = ("prev", "seq")

    def __init__(self, seq: int = 0, prev: str = GENESIS) -> None:
        self.seq = seq
        self.prev = prev

    def link(self, body: bytes) -> bytes:
        """One record line (without newline) from a serialised JSON object: seq and prev put first."""
        if not body.startswith(b"{") or len(body) < 2:
            raise ValueError("an audit record must be a JSON object")
        self.seq += 1
        head = b'{"seq":%d,"prev":"%s"' % (self.seq, self.prev.encode())
        line = head + (b"," + body[1:] if body != b"{}" else b"}")
        self.prev = line_hash(line)
        return line

    def link_msgpack(self, body: bytes) -> bytes:
        """One frame from a msgpack-encoded record: length, then the array [seq, prev, record]."""
        self.seq += 1
        envelope = b"\x93" + bytes(msgpack.packb(self.seq)) + bytes(msgpack.packb(self.prev)) + body
        self.prev = line_hash(envelope)
        return struct.pack(">I", len(envelope)) + envelope

    @classmethod
    def resume_msgpack(cls, path: Path) -> tuple[Chain, bool]:
        """Like `resume`, for a msgpack log: (the chain after its last whole frame, whether a partial one follows)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(), False
        chain = cls()
        for envelope, complete in frames(data):
            if not complete:
                return chain, True
            try:
                seq = msgpack.unpackb(envelope)[0]
            except (ValueError, IndexError, TypeError, msgpack.UnpackException):
                continue
            if isinstance(seq, int) and not isinstance(seq, bool):
                chain = cls(seq, line_hash(envelope))
        return chain, False

    @classmethod
    def resume(cls, path: Path) -> tuple[Chain, bool]:
        """The chain after the last complete record of `path` (a fresh one when there is none), and whether the
        file ended in a partial line (a crash mid-write, or tampering: `audit verify` will name it)."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return cls(), False
        if size == 0:
            return cls(), False
        with path.open("rb") as f:
            f.seek(max(0, size - 65536))
            tail = f.read()
        partial = not tail.endswith(b"\n")
        lines = [ln for ln in tail.split(b"\n") if ln]
        if partial and lines:
            lines.pop()
        for line in reversed(lines):
            try:
                seq = orjson.loads(line).get("seq")
            except orjson.JSONDecodeError:
                continue
            if isinstance(seq, int) and not isinstance(seq, bool):
                return cls(seq, line_hash(line)), partial
        return cls(), partial


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    seq: int | None
    what: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.what}"


@dataclass(frozen=True, slots=True)
class Verdict:
    records: int
    head: str  # the hash of the last record: anchor it elsewhere to protect the end of the log
    first_seq: int | None
    problem: Problem | None


def _lines(paths: Iterable[Path]) -> Iterator[tuple[str, int, bytes, bool]]:
    for path in paths:
        data = path.read_bytes()
        lines = data.split(b"\n")
        complete = data.endswith(b"\n") or not data
        for i, line in enumerate(lines, 1):
            last = i == len(lines)
            if last and not line:
                continue
            yield str(path), i, line, not (last and not complete)


def frames(data: bytes) -> Iterator[tuple[bytes, bool]]:
    i = 0
    while i < len(data):
        if len(data) - i < 4:
            yield data[i:], False
            return
        (n,) = struct.unpack(">I", data[i : i + 4])
        if len(data) - i - 4 < n:
            yield data[i + 4 :], False
            return
        yield data[i + 4 : i + 4 + n], True
        i += 4 + n


def _records(paths: Iterable[Path]) -> Iterator[tuple[str, int, bytes, bool, dict[str, object] | None]]:
    """(file, line or frame number, the hashed bytes, complete?, {"seq", "prev"} or None when unreadable)."""
    for path in paths:
        data = path.read_bytes()
        if data[:1] in (b"", b"{", b"\n"):
            for file, lineno, line, complete in _lines([path]):
                try:
                    parsed = orjson.loads(line)
                except orjson.JSONDecodeError:
                    parsed = None
                yield file, lineno, line, complete, parsed if isinstance(parsed, dict) else None
            continue
        for n, (envelope, complete) in enumerate(frames(data), 1):
            try:
                seq, prev, _ = msgpack.unpackb(envelope, raw=False)
                record: dict[str, object] | None = {"seq": seq, "prev": prev}
            except (ValueError, TypeError, msgpack.UnpackException):
                record = None
            yield str(path), n, envelope, complete, record


def verify(paths: list[Path]) -> Verdict:
    """Check the chain through `paths` in order; stop at the first record that is not what the chain says."""
    prev: str | None = None
    expected: int | None = None
    first: int | None = None
    count = 0
    for file, lineno, line, complete, record in _records(paths):
        if not complete:
            return Verdict(count, prev or GENESIS, first, Problem(file, lineno, None, "truncated record"))
        if record is None:
            return Verdict(count, prev or GENESIS, first, Problem(file, lineno, None, "not a readable record (edited)"))
        seq, link = record.get("seq"), record.get("prev")
        if not isinstance(seq, int) or not isinstance(link, str):
            return Verdict(
                count, prev or GENESIS, first, Problem(file, lineno, None, "no seq/prev (not a chained record)")
            )
        if expected is None:
            first = seq
            if seq == 1 and link != GENESIS:
                return Verdict(count, GENESIS, first, Problem(file, lineno, seq, "first record with a non-zero prev"))
        elif seq != expected:
            what = f"expected seq {expected}: " + (
                "records removed" if seq > expected else "records reordered or repeated"
            )
            return Verdict(count, prev or GENESIS, first, Problem(file, lineno, seq, what))
        elif link != prev:
            what = f"the record before (seq {seq - 1}) was edited: its hash is not the one this record names"
            return Verdict(count, prev or GENESIS, first, Problem(file, lineno, seq, what))
        prev = line_hash(line)
        expected = seq + 1
        count += 1
    return Verdict(count, prev or GENESIS, first, None)


def rotate(path: Path, keep: int) -> None:
    """audit.log -> audit.log.1 -> ... -> audit.log.KEEP (the oldest goes)."""
    for i in range(keep - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.1"))
