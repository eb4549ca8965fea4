"""The hash-chained audit log: every decision recorded, no token text, and any edit, removal or reordering named."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from agent.audit.chain import Chain, verify
from agent.audit.writer import JsonLinesAudit
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.keys import SigningKey, claims, mint


def write_log(path: Path, n: int, **kw: int | str) -> None:
    audit = JsonLinesAudit(str(path), flush_interval_s=0.01, **kw)
    for i in range(n):
        audit.alert("test", {"i": i})
    audit.close()


def audit_verify(*files: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "agent", "audit", "verify", *map(str, files)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_a_clean_log_verifies_and_each_tampering_is_named(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_log(log, 50)
    ok = audit_verify(log)
    assert ok.returncode == 0 and "ok: 50 records chained" in ok.stdout
    lines = log.read_bytes().split(b"\n")[:-1]

    def tampered(name: str, new: list[bytes]) -> str:
        p = tmp_path / name
        p.write_bytes(b"\n".join(new) + b"\n")
        r = audit_verify(p)
        assert r.returncode == 1, name
        return r.stderr.splitlines()[0]

    edited = lines.copy()
    edited[9] = edited[9].replace(b'"i":9', b'"i":90')
    assert tampered("edited.log", edited).endswith(
        "edited.log:11 (seq 11): the record before (seq 10) was edited: its hash is not the one this record names"
    )
    removed = lines[:20] + lines[21:]
    assert tampered("removed.log", removed).endswith("removed.log:21 (seq 22): expected seq 21: records removed")
    reordered = lines.copy()
    reordered[30], reordered[31] = reordered[31], reordered[30]
    assert "reordered.log:31 (seq 32): expected seq 31" in tampered("reordered.log", reordered)
    garbage = lines.copy()
    garbage[5] = b'{"seq": 6, "prev": "nonsense"'
    assert "garbage.log:6: not a readable record (edited)" in tampered("garbage.log", garbage)


def test_rotation_and_restarts_continue_the_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_log(log, 300, max_bytes=8_000, keep=10)
    write_log(log, 100, max_bytes=8_000, keep=10)  # a restart appends and goes on from the last record
    files = [*sorted(tmp_path.glob("audit.log.*"), key=lambda p: -int(p.suffix[1:])), log]
    assert len(files) > 3
    verdict = verify(files)
    assert verdict.problem is None and verdict.records == 400 and verdict.first_seq == 1
    assert audit_verify(*files).returncode == 0
    alone = audit_verify(log)  # the newest file alone: verified from where it starts
    assert alone.returncode == 0 and "earlier files not given" in alone.stdout
    swapped = audit_verify(*files[:-2], files[-1], files[-2])
    assert swapped.returncode == 1


def test_a_truncated_tail_is_named_and_the_chain_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_log(log, 10)
    log.write_bytes(log.read_bytes()[:-25])  # a crash mid-write
    assert "truncated record" in audit_verify(log).stderr or "not a readable record" in audit_verify(log).stderr
    write_log(log, 5)
    text = log.read_text()
    assert '"alert":"audit_tail_truncated"' in text
    chain, partial = Chain.resume(log)
    assert not partial and chain.seq == 15  # 9 complete + the alert + 5 new


def test_drops_are_counted_and_alerted(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    # The writer wakes on its timer only (a minute): the 40 arrive before any drain, whatever the machine's load.
    audit = JsonLinesAudit(str(log), max_queue=10, flush_interval_s=60.0)
    for i in range(40):
        audit.alert("burst", {"i": i})
    audit.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    dropped = [r for r in records if r.get("alert") == "audit_records_dropped"]
    assert audit.dropped == 30 and dropped and sum(r["count"] for r in dropped) == 30
    assert verify([log]).problem is None


@pytest.mark.timeout(300)
async def test_100k_decisions_make_100k_chained_records_and_no_token_text(
    write_policy: Callable[..., Path], keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    log = tmp_path / "audit.log"
    audit = JsonLinesAudit(str(log), max_queue=200_000)
    engine = Engine.for_policy(load_policy(write_policy()), audit)
    for s in engine.stores.values():
        assert await s.refresh()
    tokens = [mint(keys["ES256"], claims(jti=f"j{i}", sub=f"user-{i}")) for i in range(20)]
    for i in range(100_000):
        token = tokens[i % 20] if i % 7 else tokens[i % 20] + "x"  # some refused, each with a reason
        d = engine.decide(RequestView("GET", f"/v1/orders?q={i}", headers={"authorization": f"Bearer {token}"}))
        assert isinstance(d, Decision)
    audit.close(timeout=60)
    data = log.read_bytes()
    records = data.split(b"\n")[:-1]
    assert len(records) == 100_000 and audit.dropped == 0
    assert verify([log]).problem is None
    for t in tokens:
        for part in t.split("."):
            assert part.encode() not in data
    assert {orjson.loads(r)["decision"] for r in records[:50]} == {"allow", "deny"}


def test_the_msgpack_encoding_chains_rotates_and_names_tampering_too(tmp_path: Path) -> None:
    log = tmp_path / "audit.mp"
    write_log(log, 200, encoding="msgpack", max_bytes=4_000, keep=20)
    write_log(log, 10, encoding="msgpack", max_bytes=4_000, keep=20)  # restart: the chain goes on
    files = [*sorted(tmp_path.glob("audit.mp.*"), key=lambda p: -int(p.suffix[1:])), log]
    assert len(files) > 2
    verdict = verify(files)
    assert verdict.problem is None and verdict.records == 210
    shown = subprocess.run([sys.executable, "-m", "agent", "audit", "cat", str(files[0])], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    first = json.loads(shown.stdout.splitlines()[0])
    assert first["seq"] == 1 and first["alert"] == "test" and first["i"] == 0
    data = bytearray(files[0].read_bytes())
    data[data.index(b"test") + 1] ^= 1  # one bit of one record
    files[0].write_bytes(bytes(data))
    r = audit_verify(*files)
    assert r.returncode == 1 and "(seq 2): the record before (seq 1) was edited" in r.stderr


def test_audit_cat_says_a_file_is_missing_as_verify_does(tmp_path: Path) -> None:
    for args in (["cat", str(tmp_path / "missing.log")], ["verify", str(tmp_path / "missing.log")]):
        run = subprocess.run([sys.executable, "-m", "agent", "audit", *args], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert run.returncode == 2 and run.stderr == f"{tmp_path / 'missing.log'}: no such file\n", run.stderr
    run = subprocess.run([sys.executable, "-m", "agent", "audit", "cat", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "cannot read" in run.stderr and "Traceback" not in run.stderr
