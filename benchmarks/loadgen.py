"""`PYTHONPATH=. python -m benchmarks.loadgen [REQUESTS] [ROUNDS]`: is the bench's load generator (agent._loadgen)
the bottleneck? Its closed-loop rate beside h2load's on the same servers, both 4 connections x 16 streams: nghttpd
serving a file, and the native agent answering a repeated allowed Check. Servers on CPU 0, generators on CPU 1,
REQUESTS per run (default 200000), the best of ROUNDS (default 3) kept, as noise from other work only slows. Also
each generator's own CPU time per request (user + system, median of the rounds): on a shared machine the rate
moves with the neighbours, the cost per request hardly does."""

from __future__ import annotations

import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.run import CHECK_PATH, LOAD_CPU, ROOT, Fixture, agent_cmd, free_port, server

PROBE = """
import importlib, resource, sys
from collections import Counter
mod = importlib.import_module(sys.argv[1])
port, n, grpc = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "grpc"
item = (b"POST", sys.argv[5].encode(), [], open(sys.argv[6], "rb").read()[5:]) if grpc else (
    b"GET", sys.argv[5].encode(), [], b"")
load = mod.Load("127.0.0.1", port, [item], [0] * n, grpc=grpc, authority="bench", connections=4, streams=16,
                duration_s=600)
before = resource.getrusage(resource.RUSAGE_SELF)
load.run()
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(load.completed / (load.elapsed_ns / 1e9), cpu / n * 1e6, dict(Counter(load.outcomes())))
"""


def ours(module: str, port: int, n: int, path: str, body: Path | None) -> tuple[float, float, str]:
    """(requests/s, CPU us per request, outcome counts) of one closed-loop run on CPU 1."""
    args = [module, str(port), str(n), "grpc" if body else "http", path, str(body or "")]
    cmd = ["taskset", "-c", LOAD_CPU, sys.executable, "-c", PROBE, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True, cwd=ROOT).stdout.split(" ", 2)
    return float(out[0]), float(out[1]), out[2].strip()


def h2load(port: int, n: int, path: str, body: Path | None) -> tuple[float, float]:
    """(requests/s, CPU us per request) of one h2load run on CPU 1."""
    cmd = ["taskset", "-c", LOAD_CPU, "h2load", "-c4", "-m16", "-n", str(n)]
    if body:
        cmd += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    url = f"http://127.0.0.1:{port}{path}"
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600, check=False).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    done = re.search(r"(\d+) succeeded", out)
    assert m and done and int(done.group(1)) == n, out
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return float(m.group(1)), cpu / n * 1e6


def compare(label: str, port: int, n: int, rounds: int, path: str, body: Path | None) -> None:
    theirs, mine = [], []
    for _ in range(rounds):  # interleaved, so both see the same neighbours
        theirs.append(h2load(port, n, path, body))
        mine.append(ours("agent._loadgen_c", port, n, path, body))
    pure = ours("agent._loadgen_py", port, min(n, 20_000), path, body)
    h_rate, h_cpu = max(r for r, _ in theirs), statistics.median(c for _, c in theirs)
    c_rate, c_cpu = max(r for r, _, _ in mine), statistics.median(c for _, c, _ in mine)
    print(f"{label}: outcomes {mine[0][2]} (pure {pure[2]})")
    print(f"  {'h2load':<12} {h_rate:>9.0f}/s  {h_cpu:5.2f} us CPU/request")
    print(f"  {'_loadgen_c':<12} {c_rate:>9.0f}/s  {c_cpu:5.2f} us CPU/request  ({c_rate / h_rate:.2f}x h2load's rate)")
    print(f"  {'_loadgen_py':<12} {pure[0]:>9.0f}/s  {pure[1]:5.2f} us CPU/request", flush=True)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "docroot").mkdir()
        (work / "docroot" / "index.html").write_text("hello\n")
        port = free_port()
        with server(["nghttpd", "--no-tls", "-d", str(work / "docroot"), str(port)], port, work / "nghttpd.log"):
            compare("nghttpd GET /index.html", port, n, rounds, "/index.html", None)
        fx = Fixture(work)
        port, admin = free_port(), free_port()
        ready = f"http://127.0.0.1:{admin}/readyz"
        with server(agent_cmd(fx, "native", port, admin), port, work / "agent.log", ready):
            compare("agent native, repeated allow", port, n, rounds, CHECK_PATH, fx.allow_body)


if __name__ == "__main__":
    main()
