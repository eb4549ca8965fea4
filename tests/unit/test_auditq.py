"""The audit record queue and JSON chain (both twins): the bytes Chain.link makes, in order, nothing accepted lost,
woken per batch; then the writer built on them (rotation, stdout) and the C producers' capsule."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.audit.chain import GENESIS, Chain, line_hash, verify
from agent.audit.writer import JsonLinesAudit
from tests.conftest import native_module, twins
from tests.wait import until

MODULES = twins("agent.audit._auditq_py", "_auditq")


@pytest.fixture(params=MODULES, scope="module")
def auditq(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


@pytest.fixture
def out(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    path = tmp_path / "audit.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    yield fd, path
    os.close(fd)


def record(i: int, pad: int = 0) -> bytes:
    return orjson.dumps({"type": "decision", "i": i, "pad": "x" * pad, "text": 'é\n"}'})


def linked(records: list[bytes], seq: int = 0, prev: str = GENESIS) -> bytes:
    chain = Chain(seq, prev)
    return b"".join(chain.link(r) + b"\n" for r in records)


def drain_all(chain: Any, queue: Any, fd: int) -> int:
    written = 0
    for _ in range(10_000):
        n, _ = chain.drain(queue, fd, 1 << 62)
        if not n:
            return written
        written += n
    raise AssertionError("the queue never emptied")


def test_drained_lines_are_chain_links_in_order_and_verify(auditq: Any, out: tuple[int, Path]) -> None:
    fd, path = out
    records = [b"{}", b'{"a":1}', record(1), record(2, pad=100_000), b'{"x":"\\u0000"}']
    records += [record(i, pad=i % 700) for i in range(3, 2000)]
    queue, chain = auditq.RecordQueue(), auditq.JsonChain()
    assert all(queue.append(r) for r in records) and len(queue) == len(records)
    n, nbytes = chain.drain(queue, fd, 1 << 62)
    expected = linked(records)
    assert (n, nbytes) == (len(records), len(expected)) and len(queue) == 0
    assert path.read_bytes() == expected
    reference = Chain()
    for r in records:
        reference.link(r)
    assert (chain.seq, chain.prev) == (reference.seq, reference.prev)
    verdict = verify([path])
    assert verdict.problem is None and verdict.records == len(records) and verdict.head == chain.prev
    assert chain.drain(queue, fd, 1 << 62) == (0, 0)


def test_a_resumed_chain_goes_on_from_its_seq_and_prev(auditq: Any, out: tuple[int, Path]) -> None:
    fd, path = out
    prev = line_hash(b"the last line")
    chain = auditq.JsonChain(41, prev)
    queue = auditq.RecordQueue()
    queue.append(b'{"k":"v"}')
    chain.drain(queue, fd, 1 << 62)
    assert path.read_bytes() == linked([b'{"k":"v"}'], 41, prev) and chain.seq == 42
    for seq in (-5, (1 << 63) - 10):  # the range of a 64-bit seq, as orjson reads one back
        c = auditq.JsonChain(seq, prev)
        queue.append(b"{}")
        c.drain(queue, fd, 1 << 62)
        assert c.seq == seq + 1
    assert path.read_bytes().endswith(linked([b"{}"], (1 << 63) - 10, prev))
    with pytest.raises(ValueError):
        auditq.JsonChain(0, "A" * 64)
    with pytest.raises(ValueError):
        auditq.JsonChain(0, "0" * 63)
    with pytest.raises(OverflowError):
        auditq.JsonChain(1 << 63)


@settings(max_examples=200, deadline=None)
@given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=30), seq=st.integers(0, 1 << 40))
def test_any_bytes_after_a_brace_link_as_chain_link_does(bodies: list[bytes], seq: int) -> None:
    records = [b"{" + b for b in bodies if b] + [b"{}"]
    for name in MODULES:
        auditq = importlib.import_module(name)
        r, w = os.pipe()
        try:
            queue, chain = auditq.RecordQueue(), auditq.JsonChain(seq, GENESIS)
            assert all(queue.append(rec) for rec in records)
            drain_all(chain, queue, w)  # well under a pipe's 64 KiB
            os.close(w)
            with os.fdopen(r, "rb") as f:
                assert f.read() == linked(records, seq), name
        finally:
            for fd in (r, w):
                with contextlib.suppress(OSError):  # closed already
                    os.close(fd)


def test_room_stops_after_the_record_that_reaches_it(auditq: Any, out: tuple[int, Path]) -> None:
    fd, path = out
    records = [record(i, pad=50) for i in range(10)]
    lines = linked(records).splitlines(keepends=True)
    queue, chain = auditq.RecordQueue(), auditq.JsonChain()
    for r in records:
        queue.append(r)
    assert chain.drain(queue, fd, len(lines[0]) + 1) == (2, len(lines[0]) + len(lines[1]))
    assert chain.drain(queue, fd, len(lines[2])) == (1, len(lines[2]))
    assert chain.drain(queue, fd, 0) == (1, len(lines[3]))  # at least one record
    queue.prepend(b'{"front":1}')  # ahead of the six left
    assert len(queue) == 7
    assert drain_all(chain, queue, fd) == 7
    assert path.read_bytes() == linked([*records[:4], b'{"front":1}', *records[4:]])


def test_a_tee_gets_exactly_the_bytes_written_across_chunks_and_rooms(auditq: Any, out: tuple[int, Path]) -> None:
    fd, path = out
    # Several 256 KiB chunks in one drain, then drains stopped by `room`: the tee has what the file has.
    records = [record(i, pad=(i * 37) % 5000) for i in range(600)]
    queue, chain = auditq.RecordQueue(), auditq.JsonChain()
    for r in records[:400]:
        queue.append(r)
    tee = bytearray(b"kept:")
    n, nbytes = chain.drain(queue, fd, 1 << 62, tee)
    assert n == 400 and bytes(tee) == b"kept:" + path.read_bytes() and len(tee) == 5 + nbytes
    for r in records[400:]:
        queue.append(r)
    for room in (1, 3000, 100_000):
        before = path.stat().st_size
        part = bytearray()
        n, nbytes = chain.drain(queue, fd, room, part)
        assert n >= 1 and bytes(part) == path.read_bytes()[before:] and len(part) == nbytes
    chain.drain(queue, fd, 1 << 62, None)  # no tee: nothing kept
    assert path.read_bytes() == linked(records) and len(queue) == 0
    empty = bytearray()
    assert chain.drain(queue, fd, 1 << 62, empty) == (0, 0) and empty == b""


def test_a_tee_keeps_nothing_of_a_failed_write(auditq: Any, tmp_path: Path) -> None:
    path = tmp_path / "ro.log"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        queue, chain, tee = auditq.RecordQueue(), auditq.JsonChain(), bytearray()
        queue.append(record(1))
        with pytest.raises(OSError):
            chain.drain(queue, fd, 1 << 62, tee)
        assert tee == b"" and queue.dropped == 1
    finally:
        os.close(fd)


def test_refused_records_are_counted_and_nothing_accepted_is_lost(auditq: Any, out: tuple[int, Path]) -> None:
    fd, path = out
    queue, chain = auditq.RecordQueue(max_records=100, max_bytes=10_000), auditq.JsonChain()
    assert not queue.append(b"") and not queue.append(b"{") and not queue.append(b"[1]")  # not JSON objects
    assert queue.dropped == 3 and len(queue) == 0
    accepted = [r for r in (record(i) for i in range(300)) if queue.append(r)]
    assert len(accepted) == 100 and queue.dropped == 203  # full by count
    queue.prepend(b'{"alert":"x"}')  # never refused
    assert len(queue) == 101
    assert drain_all(chain, queue, fd) == 101
    big = [record(i, pad=3000) for i in range(5)]
    took = [r for r in big if queue.append(r)]
    assert len(took) == 3 and queue.dropped == 205  # full by bytes
    assert drain_all(chain, queue, fd) == 3
    assert path.read_bytes() == linked([b'{"alert":"x"}', *accepted, *took])
    with pytest.raises(ValueError):
        queue.prepend(b"nope")
    assert queue.dropped == 205 and verify([path]).problem is None


def test_a_queue_of_other_records_is_taken_not_drained(auditq: Any, out: tuple[int, Path]) -> None:
    queue = auditq.RecordQueue(json_objects=False)
    assert queue.append(b"\x81\xa1a\x01") and queue.append(b"")
    queue.prepend(b"first")
    assert queue.take() == [b"first", b"\x81\xa1a\x01", b""] and len(queue) == 0 and queue.take() == []
    with pytest.raises(ValueError):
        auditq.JsonChain().drain(queue, out[0], 1 << 62)


def test_wait_returns_on_a_batch_on_close_and_on_timeout(auditq: Any) -> None:
    queue = auditq.RecordQueue(batch=50)
    for i in range(49):
        queue.append(record(i))
    t = time.monotonic()
    queue.wait(0.2)  # one short of a batch: only the timeout ends it
    assert time.monotonic() - t >= 0.19

    def fill() -> None:
        for i in range(10):
            queue.append(record(i))

    filler = threading.Thread(target=fill)
    t = time.monotonic()
    filler.start()
    queue.wait(30)
    assert time.monotonic() - t < 15, "the batch did not wake the waiter"
    filler.join(10)
    queue.wait(30)  # a batch is queued: returns at once
    assert time.monotonic() - t < 15
    assert len(queue.take()) == 59

    closer = threading.Timer(0.05, queue.close)
    t = time.monotonic()
    closer.start()
    queue.wait(30)
    assert time.monotonic() - t < 15, "close() did not wake the waiter"
    queue.wait(30)  # closed: never blocks again, and appending still works
    assert queue.append(b"{}") and queue.take() == [b"{}"]
    queue.wait(float("nan"))
    queue.wait(-1)


def test_a_producer_appending_while_the_writer_drains_loses_nothing(auditq: Any, out: tuple[int, Path]) -> None:
    fd, path = out
    queue, chain = auditq.RecordQueue(max_records=20_000, batch=256), auditq.JsonChain()
    accepted: list[int] = []

    def produce() -> None:
        for i in range(200_000):
            if queue.append(b'{"i":%d}' % i):
                accepted.append(i)

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 120
    while producer.is_alive() or len(queue):
        assert time.monotonic() < deadline, "the writer did not keep up within 120 s"
        queue.wait(0.01)
        chain.drain(queue, fd, 1 << 62)
    producer.join()
    data = path.read_bytes()
    written = [orjson.loads(line)["i"] for line in data.splitlines()]
    assert written == accepted and len(accepted) + queue.dropped == 200_000
    checked = subprocess.run([sys.executable, "-m", "agent", "audit", "verify", str(path)], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 0 and f"ok: {len(accepted)} records chained" in checked.stdout


def test_a_failed_write_raises_and_counts_the_chunk_as_dropped(auditq: Any, tmp_path: Path) -> None:
    path = tmp_path / "ro.log"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        queue, chain = auditq.RecordQueue(), auditq.JsonChain()
        for i in range(10):
            queue.append(record(i))
        with pytest.raises(OSError):
            chain.drain(queue, fd, 1 << 62)
        assert queue.dropped == 10 and len(queue) == 0 and chain.seq == 10  # the gap shows in the chain
    finally:
        os.close(fd)


def test_a_slow_non_blocking_reader_gets_every_byte(auditq: Any) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)  # partial writes and EAGAIN: the drain waits for room
    records = [record(i, pad=500) for i in range(4000)]
    got = bytearray()

    def read() -> None:
        while chunk := os.read(r, 4096):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        queue, chain = auditq.RecordQueue(), auditq.JsonChain()
        for rec in records:
            assert queue.append(rec)
        assert drain_all(chain, queue, w) == len(records)
    finally:
        os.close(w)
        reader.join(30)
        os.close(r)
    assert bytes(got) == linked(records)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_the_writer_rotates_and_the_chain_verifies_across_files(encoding: str, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    audit = JsonLinesAudit(str(log), max_bytes=2_000, keep=1000, flush_interval_s=0.01, encoding=encoding)
    for i in range(3000):
        audit.alert("test", {"i": i})
    audit.close(timeout=60)
    files = [*sorted(tmp_path.glob("audit.log.*"), key=lambda p: -int(p.suffix[1:])), log]
    verdict = verify(files)
    assert verdict.problem is None and verdict.records == 3000 and audit.written == 3000
    assert audit.rotations == len(files) - 1 > 50 and audit.dropped == 0
    if encoding == "json":
        assert all(f.stat().st_size < 2_000 + 200 for f in files)  # stops after the line that reaches the limit
        alerts = [orjson.loads(line)["i"] for f in files for line in f.read_bytes().splitlines()]
        assert alerts == list(range(3000))


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_a_device_or_fifo_is_never_sized_rotated_or_read(encoding: str, tmp_path: Path) -> None:
    fifo = tmp_path / "audit.fifo"  # as /dev/null: rotating it would rename the device
    os.mkfifo(fifo)
    got = bytearray()

    def read() -> None:
        with fifo.open("rb") as f:
            while chunk := f.read(65536):
                got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    audit = JsonLinesAudit(str(fifo), max_bytes=500, flush_interval_s=0.01, encoding=encoding)
    for i in range(300):
        audit.alert("test", {"i": i})
    audit.close(timeout=60)
    reader.join(60)
    assert not reader.is_alive() and audit.rotations == 0 and audit.written == 300
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(tmp_path.iterdir()) == [fifo]
    (tmp_path / "copy.log").write_bytes(bytes(got))
    assert verify([tmp_path / "copy.log"]).records == 300


def test_records_a_full_disk_refuses_are_counted_as_dropped(caplog: pytest.LogCaptureFixture) -> None:
    audit = JsonLinesAudit("/dev/full", flush_interval_s=0.01)  # every write: ENOSPC (JSON: msgpack reads the file)
    for i in range(10):
        audit.alert("test", {"i": i})
    until(lambda: audit.dropped == 10, "the records the write lost are counted")
    audit.alert("later", {})  # accepted, and counted once nothing can be written
    until(lambda: audit.dropped == 11, "a record accepted after the failure is counted")
    audit.close()
    assert audit.written == 0 and "is not writable; records are being lost" in caplog.text


def test_the_writer_on_stdout_writes_after_what_python_buffered(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from agent.audit.writer import JsonLinesAudit\n"
        "print('before', end='\\n')\n"
        "a = JsonLinesAudit(None, flush_interval_s=0.01)\n"
        "for i in range(500): a.alert('test', {'i': i})\n"
        "a.close(timeout=60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=env, check=True)
    first, *rest = proc.stdout.split(b"\n", 1)
    assert first == b"before"
    (tmp_path / "stdout.log").write_bytes(rest[0])
    verdict = verify([tmp_path / "stdout.log"])
    assert verdict.problem is None and verdict.records == 500
    assert [json.loads(line)["i"] for line in rest[0].splitlines()] == list(range(500))


def test_the_capsule_appends_for_c_producers(tmp_path: Path) -> None:
    module: Any = native_module("_auditq")
    if module is None:
        assert not hasattr(importlib.import_module("agent.audit._auditq_py").RecordQueue, "capsule")
        pytest.skip("extensions are off: the pure twin has no capsule")
    queue = module.RecordQueue(max_records=2)
    capsule = queue.capsule()
    assert capsule is module.api
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    api = get(capsule, b"agent._auditq_c.api")
    # The first member of agent_auditq_api, called with the GIL held (PYFUNCTYPE), as a C producer does.
    append_t = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p, ctypes.c_ssize_t)
    append = append_t(ctypes.c_void_p.from_address(api).value)
    assert append(queue, b'{"a":1}xx', 7) == 0
    assert append(queue, b"[]", 2) == 1 and queue.dropped == 1  # not a JSON object
    assert append(queue, b"{}", 2) == 0
    assert append(queue, b"{}", 2) == 1 and queue.dropped == 2  # full
    assert queue.take() == [b'{"a":1}', b"{}"]
    with pytest.raises(TypeError):
        append(object(), b"{}", 2)
    imp = ctypes.pythonapi.PyCapsule_Import  # what a C producer calls: the module's `api`
    imp.restype, imp.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    assert imp(b"agent._auditq_c.api", 0) == api
