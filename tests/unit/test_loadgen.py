"""The bench's load generator (agent._loadgen, both twins) against real servers on loopback: nghttpd, and an h2
server of ours (tests/h2server.py, a child process) that can stall, reset, close and send hostile answers. Both
twins give the same outcomes; the open loop counts the time a request waited for a slot (no coordinated
omission); every run ends within its bounds, whatever the server does."""

from __future__ import annotations

import importlib
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agent._loadgen_py import check_response_status
from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent.decision import Decision
from agent.server.envoy_wire import encode
from tests.conftest import twins
from tests.wait import until

ROOT = Path(__file__).resolve().parents[2]
MODULES = twins("agent._loadgen_py", "_loadgen")


@pytest.fixture(params=MODULES)
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def h2server() -> Iterator[Callable[..., int]]:
    """Start tests/h2server.py with the given arguments; its port."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> int:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.h2server", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "tests/h2server.py printed no port within 20 s"
        line = proc.stdout.readline()
        assert line.startswith("port "), line
        return int(line.split()[1])

    yield start
    for p in procs:
        stop(p)


@pytest.fixture(scope="module")
def nghttpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Debian's nghttpd serving a directory over h2c: 200 for its file, 404 otherwise."""
    if shutil.which("nghttpd") is None:
        pytest.skip("nghttpd not installed (Debian nghttp2-server)")
    root = tmp_path_factory.mktemp("docroot")
    (root / "index.html").write_text("hello\n")
    port = free_port()
    proc = subprocess.Popen(["nghttpd", "--no-tls", "-d", str(root), str(port)], stdout=subprocess.DEVNULL)
    try:
        until(lambda: proc.poll() is not None or accepts(port), "nghttpd listens")
        assert proc.poll() is None, "nghttpd exited"
        yield port
    finally:
        stop(proc)


def get(path: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    return (b"GET", path, [(b"User-Agent", b"authz-agent-bench-test")], b"")


def grpc_item(path: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    return (b"POST", path, [], b"\x0a\x00")


def framed(message: bytes, flag: int = 0, length: int | None = None) -> bytes:
    return bytes([flag]) + (len(message) if length is None else length).to_bytes(4, "big") + message


def run_in_thread(load: Any, limit_s: float) -> None:
    """run() in a thread, joined within `limit_s` (a hang fails the test instead of blocking it)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            load.run()
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"run() still running after {limit_s} s"
    if errors:
        raise errors[0]


def test_closed_loop_statuses_from_nghttpd(mod: ModuleType, nghttpd: int) -> None:
    items = [get(b"/index.html"), get(b"/missing")]
    order = [i % 2 for i in range(400)]
    load = mod.Load("127.0.0.1", nghttpd, items, order, grpc=False, authority="localhost", connections=2, streams=8)
    run_in_thread(load, 30)
    assert load.sent == load.completed == 400
    assert list(load.outcomes()) == [200 if k % 2 == 0 else 404 for k in range(400)]
    lat, intended = load.latencies_ns(), load.intended_ns()
    assert lat.typecode == "q" and load.outcomes().typecode == "i" and intended.typecode == "q"
    assert len(lat) == len(intended) == len(load.outcomes()) == 400
    assert min(lat) > 0 and min(intended) >= 0
    assert 0 < load.elapsed_ns < 30e9


def test_open_loop_sends_at_the_rate(mod: ModuleType, nghttpd: int) -> None:
    items = [get(b"/index.html"), get(b"/missing")]
    order = [i % 2 for i in range(5000)]
    load = mod.Load("127.0.0.1", nghttpd, items, order, grpc=False, authority="localhost", rate=500, duration_s=1.0)
    run_in_thread(load, 30)
    assert 499 <= load.sent <= 501 and load.completed == load.sent
    out, lat, intended = load.outcomes(), load.latencies_ns(), load.intended_ns()
    n = load.sent
    assert list(out[:n]) == [200 if k % 2 == 0 else 404 for k in range(n)]
    assert set(out[n:]) == {0} and set(lat[n:]) == {-1} and set(intended[n:]) == {-1}  # never due
    assert list(intended[:n]) == [int(k * 1e9 / 500) for k in range(n)]  # 2 ms apart from t0
    assert min(lat[:n]) > 0
    assert load.elapsed_ns >= 1e9


def test_open_loop_latency_counts_the_wait_for_a_slot(mod: ModuleType, h2server: Callable[..., int]) -> None:
    # The server holds every answer for 200 ms once; 4 slots only. Requests due during the stall wait for a slot:
    # measured from their due time, far more than the 4 stuck in flight show the stall (those due in its first
    # 50 ms: about 25).
    port = h2server("--stall-after", "50", "--stall-ms", "200")
    load = mod.Load(
        "127.0.0.1", port, [get(b"/")], [0] * 2000, grpc=False, authority="x", connections=1, streams=4, rate=500,
        duration_s=1.0,
    )  # fmt: skip
    run_in_thread(load, 30)
    n = sum(1 for x in load.intended_ns() if x >= 0)  # due within the duration, sent or not
    assert 499 <= n <= 501
    out = Counter(load.outcomes()[:n])
    assert set(out) <= {200, -3} and out[200] >= 0.8 * n, out  # -3: due at the very end, every slot still busy
    slow = [x for x in load.latencies_ns()[:n] if x >= 150e6]
    assert len(slow) >= 12, sorted(load.latencies_ns()[:n])[-30:]  # more than were in flight: the wait counted
    assert max(load.latencies_ns()[:n]) >= 190e6


def test_due_but_never_sent_is_counted_not_dropped(mod: ModuleType, h2server: Callable[..., int]) -> None:
    # The server stalls 20 s from the first request on: nothing is answered before the run ends. Every request
    # that fell due is reported -3 (in flight at the deadline, or never given a slot), none vanishes. The run
    # ends at duration + timeout (0.8 s), far inside the stall: the bound below has room for a loaded machine.
    port = h2server("--stall-after", "1", "--stall-ms", "20000")
    load = mod.Load(
        "127.0.0.1", port, [get(b"/")], [0] * 1000, grpc=False, authority="x", connections=1, streams=2, rate=200,
        duration_s=0.5, timeout_s=0.3,
    )  # fmt: skip
    started = time.monotonic()
    run_in_thread(load, 10)
    assert time.monotonic() - started < 10  # duration + timeout, not the stall
    out, intended = load.outcomes(), load.intended_ns()
    assert load.sent == 2 and load.completed == 0
    assert Counter(out[:100]) == {-3: 100} and set(out[100:]) == {0}
    assert list(intended[:100]) == [int(k * 1e9 / 200) for k in range(100)]
    assert set(load.latencies_ns()) == {-1}


def decision(status: int) -> Decision:
    allowed = status == 200
    return Decision(
        decision_id="d-1", allowed=allowed, status=status, reason="ok" if allowed else "denied",
        outcome="allow" if allowed else "deny", route="r", upstream_headers=[("x-authz-subject", "s")],
        response_headers=[] if allowed else [("www-authenticate", "Bearer")], body=b"" if allowed else b"{}",
    )  # fmt: skip


def _cases() -> list[tuple[str, str, int]]:
    """(path, what, outcome): CheckResponses read as Envoy reads them, and gRPC answers it would refuse."""
    allowed = encode(decision(200)).SerializeToString()
    denied401 = encode(decision(401)).SerializeToString()
    bare_denial = ext.CheckResponse()
    bare_denial.status.code = 7
    no_code = ext.CheckResponse()
    no_code.status.code = 7
    no_code.denied_response.body = "no"
    negative = ext.CheckResponse()
    negative.status.code = -1
    negative.denied_response.status.code = 429

    def g(status: str, message: bytes) -> str:
        return f"/grpc/{status}/{message.hex()}"

    return [
        (g("0", framed(allowed)), "allowed", 200),
        (g("0", framed(denied401)), "denied 401", 401),
        (g("0", framed(bare_denial.SerializeToString())), "denied, no denied_response", 403),
        (g("0", framed(no_code.SerializeToString())), "denied_response without a status", 403),
        (g("0", framed(negative.SerializeToString())), "negative code, 10-byte varint", 429),
        (g("0", framed(b"")), "empty CheckResponse: OK", 200),
        (g("0", framed(b"\x49" + bytes(8))), "an unknown fixed64 field is skipped", 200),
        (g("0", framed(b"\x0a\x05\x08")), "truncated", -2),
        (g("0", framed(b"\x08\x01")), "status as a varint", -2),
        (g("0", framed(b"\x0b\x0c")), "a group", -2),
        (g("0", framed(b"\x0a\x0b" + b"\x08" + b"\xff" * 10)), "an 11-byte varint", -2),
        (g("0", framed(allowed, flag=1)), "compressed", -2),
        (g("0", framed(allowed, length=len(allowed) + 1)), "length prefix too long", -2),
        (g("0", framed(allowed) + b"\x00"), "bytes after the message", -2),
        (g("0", b""), "no message", -2),
        (g("14", framed(allowed)), "grpc-status 14", -2),
        (g("none", framed(allowed)), "no grpc-status", -2),
        (g("x", framed(allowed)), "grpc-status not a number", -2),
        ("/grpc-only/0", "trailers-only OK, no message", -2),
        ("/grpc-only/7", "trailers-only PERMISSION_DENIED", -2),
        ("/status/503", "HTTP 503, no grpc-status", -2),
        ("/reset", "stream reset", -1),
    ]


def test_grpc_answers_are_read_as_envoy_reads_them(mod: ModuleType, h2server: Callable[..., int]) -> None:
    port = h2server()
    cases = _cases()
    items = [grpc_item(path.encode()) for path, _, _ in cases]
    order = list(range(len(cases))) * 3
    load = mod.Load("127.0.0.1", port, items, order, grpc=True, authority="x", connections=2, streams=4)
    run_in_thread(load, 30)
    got = list(load.outcomes())
    for k, i in enumerate(order):
        assert got[k] == cases[i][2], cases[i][1]


def test_the_pure_reader_agrees_with_protobuf() -> None:
    for status, code in [(200, 0), (401, 16), (403, 7), (429, 8)]:
        resp = encode(decision(status))
        assert resp.status.code == code
        assert check_response_status(resp.SerializeToString()) == status


def test_hostile_answers_stay_bounded(mod: ModuleType, h2server: Callable[..., int]) -> None:
    port = h2server()
    ok = f"/grpc/0/{framed(b'').hex()}".encode()
    items = [grpc_item(b"/huge-body"), grpc_item(b"/huge-trailers/100"), grpc_item(ok)]
    order = [0, 1, 2] * 8
    load = mod.Load("127.0.0.1", port, items, order, grpc=True, authority="x", connections=1, streams=16)
    run_in_thread(load, 30)
    out = load.outcomes()
    assert Counter(out[k] for k in range(0, len(order), 3)) == {-2: 8}  # over 64 KiB of message: refused
    assert Counter(out[k] for k in range(1, len(order), 3)) == {-2: 8}  # over 64 KiB of header fields
    assert Counter(out[k] for k in range(2, len(order), 3)) == {200: 8}  # the connection lives on


def test_a_header_flood_fails_its_connection_only(mod: ModuleType, h2server: Callable[..., int]) -> None:
    # 400 KiB of trailers in 25 CONTINUATION frames: libnghttp2 ends the connection (its CONTINUATION-flood
    # limit), h2 takes the block and our cap refuses the stream. Either way: bounded, counted, the run ends.
    port = h2server()
    load = mod.Load("127.0.0.1", port, [grpc_item(b"/huge-trailers/400")], [0] * 40, grpc=True, authority="x",
                    connections=2, streams=4, duration_s=5)  # fmt: skip
    run_in_thread(load, 30)
    assert set(load.outcomes()) <= {-1, -2, 0} and load.completed > 0


MEMORY_PROBE = """
import importlib, resource, sys
mod = importlib.import_module(sys.argv[1])
load = mod.Load("127.0.0.1", int(sys.argv[2]), [(b"POST", b"/huge-body", [], b"")], [0] * 64, grpc=True,
                authority="x", connections=1, streams=32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load.run()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(set(load.outcomes()), (after - before) // 1024)
"""


def test_huge_bodies_are_not_buffered(mod: ModuleType, h2server: Callable[..., int]) -> None:
    # 64 answers of 4 MiB each, 32 at a time: buffered, that would be 128 MiB; the generator keeps 64 KiB a stream.
    port = h2server()
    got = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, mod.__name__, str(port)], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout.split("}")  # fmt: skip
    assert got[0] == "{-2"
    assert int(got[1]) < 24, f"max RSS grew by {got[1]} MiB"


def test_closed_connections_fail_their_requests_and_the_run_ends(mod: ModuleType, h2server: Callable[..., int]) -> None:
    port = h2server()
    items = [get(b"/"), get(b"/close")]
    order = [0] * 9 + [1]
    load = mod.Load("127.0.0.1", port, items, order * 500, grpc=False, authority="x", duration_s=1.0, streams=4)
    run_in_thread(load, 15)
    count = Counter(load.outcomes())
    assert count[-1] > 0 and count[200] > 0  # failed with their connection; reconnected and answered again
    assert set(count) <= {200, -1, 0}


def test_a_server_that_only_closes_ends_the_run(mod: ModuleType, h2server: Callable[..., int]) -> None:
    port = h2server()
    load = mod.Load("127.0.0.1", port, [get(b"/close")], [0] * 10000, grpc=False, authority="x", duration_s=1.0)
    started = time.monotonic()
    run_in_thread(load, 15)
    assert time.monotonic() - started < 8  # duration + the drain of what is in flight: bounded
    count = Counter(load.outcomes())
    assert count[-1] == load.completed > 0 and set(count) <= {-1, 0}


def test_a_graceful_goaway_lets_its_streams_finish(mod: ModuleType, h2server: Callable[..., int]) -> None:
    # The server says "no stream after this one" and then answers it: it is a 200, and the next requests go out
    # on a new connection (h2 alone would drop every frame after the GOAWAY).
    port = h2server()
    order = [0, 1, 0, 0, 1, 0]
    load = mod.Load("127.0.0.1", port, [get(b"/"), get(b"/goaway")], order, grpc=False, authority="x",
                    connections=1, streams=1)  # fmt: skip
    run_in_thread(load, 15)
    assert list(load.outcomes()) == [200] * 6


def test_a_server_that_refuses_every_stream_is_backed_off(mod: ModuleType, h2server: Callable[..., int]) -> None:
    # GOAWAY at once on every connection: each one answers nothing, so it counts as a failed connect (back-off,
    # at most MAX_FAILS of them), not as a graceful end to reconnect from at once, thousands of times a second.
    port = h2server("--goaway-at-once")
    load = mod.Load("127.0.0.1", port, [get(b"/")], [0] * 100_000, grpc=False, authority="x", duration_s=1.0)
    started = time.monotonic()
    run_in_thread(load, 15)
    assert time.monotonic() - started < 8
    assert set(load.outcomes()) <= {-1, 0}
    assert 0 < load.completed <= 4 * 16 * mod.MAX_FAILS


def test_connect_refused_raises(mod: ModuleType) -> None:
    port = free_port()
    load = mod.Load("127.0.0.1", port, [get(b"/")], [0], grpc=False, authority="x")
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        load.run()


def test_stop_from_another_thread_and_progress_while_running(mod: ModuleType, h2server: Callable[..., int]) -> None:
    port = h2server()
    load = mod.Load("127.0.0.1", port, [get(b"/")], [0] * 10_000_000, grpc=False, authority="x", duration_s=60)
    t = threading.Thread(target=load.run, daemon=True)
    t.start()
    until(lambda: load.completed > 100, "requests complete while run() runs")
    seen = load.sent
    until(lambda: load.sent > seen, "`sent` keeps growing during the run")
    assert t.is_alive()
    asked = time.monotonic()
    load.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - asked < 2
    out = load.outcomes()
    assert load.completed == sum(1 for x in out if x == 200)
    assert load.sent == load.completed + sum(1 for x in out if x == -3)
    assert load.elapsed_ns < 30e9


def test_stop_before_run_sends_nothing(mod: ModuleType, nghttpd: int) -> None:
    load = mod.Load("127.0.0.1", nghttpd, [get(b"/")], [0] * 10, grpc=False, authority="x", duration_s=60)
    load.stop()
    run_in_thread(load, 10)
    assert load.sent == 0 and set(load.outcomes()) == {0}


def test_runs_once(mod: ModuleType, nghttpd: int) -> None:
    load = mod.Load("127.0.0.1", nghttpd, [get(b"/index.html")], [0], grpc=False, authority="x")
    load.run()
    assert list(load.outcomes()) == [200]
    with pytest.raises(RuntimeError):
        load.run()


def test_request_bodies_and_headers_go_out(mod: ModuleType, h2server: Callable[..., int]) -> None:
    # A body bigger than the default 64 KiB window needs flow control; upper-case header names are lower-cased.
    port = h2server()
    items = [(b"POST", b"/status/201", [(b"X-Big", b"1")], b"b" * 200_000), (b"PUT", b"/status/202", [], b"x")]
    load = mod.Load("127.0.0.1", port, items, [0, 1] * 20, grpc=False, authority="x", connections=1, streams=4)
    run_in_thread(load, 30)
    assert list(load.outcomes()) == [201, 202] * 20


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"connections": 0}, ValueError),
        ({"streams": 0}, ValueError),
        ({"rate": -1.0}, ValueError),
        ({"rate": float("nan")}, ValueError),
        ({"duration_s": float("inf")}, ValueError),
        ({"order": [1]}, ValueError),
        ({"items": []}, ValueError),
        ({"items": [(b"GET", b"/", [], "text")]}, TypeError),
        ({"items": [(b"GET", b"/", [(b":path", b"/x")], b"")]}, TypeError),
        ({"items": [(b"", b"/", [], b"")]}, TypeError),
        ({"port": 0}, ValueError),
    ],
)
def test_bad_arguments_are_refused_alike(mod: ModuleType, kwargs: dict[str, Any], error: type[Exception]) -> None:
    args: dict[str, Any] = {"host": "127.0.0.1", "port": 9, "items": [get(b"/")], "order": [0]}
    args.update(kwargs)
    with pytest.raises(error):
        mod.Load(args.pop("host"), args.pop("port"), args.pop("items"), args.pop("order"), grpc=False, authority="x",
                 **args)  # fmt: skip


def test_the_chooser_serves_the_built_twin() -> None:
    import os

    from agent import _loadgen

    if os.environ.get("AGENT_NO_EXTENSIONS"):
        assert _loadgen.Load.__module__ == "agent._loadgen_py" and not _loadgen.NATIVE
    else:
        assert _loadgen.Load.__module__ == "agent._loadgen_c" and _loadgen.NATIVE
