"""Run `authz-agent bench --through-envoy` as a child subreaper would (PR_SET_CHILD_SUBREAPER): SIGKILL the bench
once its fixed-rate phase runs, then report (JSON on stdout) which of its children were still alive after a deadline.
As the subreaper, this process inherits the orphans, so what stops them is the bench's own doing, not whatever
init does with orphans on the machine; whatever is left is killed before it exits.

python -m tests.integration.bench_killed POLICY CASES"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

DEADLINE_S = 20.0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs; reaps it when it has ended (it is our child now)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1) == 0  # PR_SET_CHILD_SUBREAPER
    policy, cases = sys.argv[1:3]
    bench = subprocess.Popen(
        [sys.executable, "-m", "agent", "bench", "--policy", policy, "--cases", cases, "--through-envoy",
         "--duration", "60", "--no-saturation"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert bench.stderr is not None
    end = time.monotonic() + 60
    seen = ""
    while "fixed rate" not in seen:  # the phase has started: the agent and Envoy serve
        assert time.monotonic() < end and bench.poll() is None, seen
        if select.select([bench.stderr], [], [], 1.0)[0]:
            seen += bench.stderr.readline()
    kids = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in children(bench.pid)}
    bench.kill()
    bench.wait()
    end = time.monotonic() + DEADLINE_S
    while any(alive(pid) for pid in kids) and time.monotonic() < end:
        time.sleep(0.05)
    left = {kids[pid]: pid for pid in kids if alive(pid)}
    for pid in left.values():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print(json.dumps({"children": sorted(kids.values()), "left": sorted(left)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
