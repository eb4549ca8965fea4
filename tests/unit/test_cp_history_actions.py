"""The control plane's history of published versions, the console's revocations (revocations.yaml rewritten and
published at once) and its hash-chained action log, with and without --state-dir."""

from __future__ import annotations

import stat
import textwrap
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit.chain import verify
from agent.config.yamlsrc import load_yaml
from agent.controlplane import history as history_mod
from agent.controlplane.actions import ACTIONS_FILE, ActionLog, Actor
from agent.controlplane.bundle import parse_revocations
from agent.controlplane.revocations import parse_revocations as parse_file
from agent.controlplane.server import REVOCATIONS_FILE, Publisher
from tests.integration.test_controlplane import CASES, TESTED, replace

ADMIN = Actor("sub-admin-1", "Ada Admin")


def write(policies: Path, scope: str = "orders:read", tests: bool = True) -> None:
    replace(policies / "orders.yaml", TESTED.format(scope=scope))
    if tests:
        replace(policies / "orders.test.yaml", CASES.format(policy="orders.yaml", scope=scope))


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    return d


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_every_published_version_is_kept_with_its_tests_and_goes_on_after_a_restart(
    policies: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    key = Ed25519PrivateKey.generate()
    pub = Publisher(policies, key, state_dir=state)
    write(policies)
    await pub.scan()
    write(policies, "orders:list")
    await pub.scan()
    versions = pub.history.versions("orders")
    assert [v.sequence for v in versions] == [1, 2]
    assert versions[1].version == pub.published["orders"].version
    tests = versions[0].tests
    assert tests is not None and (tests["passed"], tests["failed"]) == (3, 0)
    assert [c["name"] for c in tests["cases"]] == ["a orders:read token lists orders", "no token", "health is public"]
    assert all(c["ok"] for c in tests["cases"]) and isinstance(tests["uncovered"], list)
    assert "orders:read" in (pub.history.text("orders", 1) or "") and "orders:list" in (
        pub.history.text("orders", 2) or ""
    )
    assert (mode(state), mode(state / "history"), mode(state / "history" / "orders")) == (0o700, 0o700, 0o700)
    assert mode(state / "history" / "orders" / "1.json") == 0o600
    await pub.close()
    # A restart with the same file: the same version and sequence, no new entry; a change goes on at 3.
    again = Publisher(policies, key, state_dir=state)
    await again.scan()
    assert again.published["orders"].sequence == 2 and len(again.history.versions("orders")) == 2
    write(policies, "orders:all", tests=False)
    (policies / "orders.test.yaml").unlink()
    await again.scan()
    assert [v.sequence for v in again.history.versions("orders")] == [1, 2, 3]
    assert again.history.versions("orders")[2].tests is None  # published untested
    await again.close()


async def test_history_in_memory_without_a_state_dir_and_bounded(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_mod, "KEEP", 3)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    assert not pub.history.persistent and not pub.actions.persistent
    for i in range(5):
        write(policies, f"orders:v{i}", tests=False)
        await pub.scan()
    assert [v.sequence for v in pub.history.versions("orders")] == [3, 4, 5]
    assert pub.history.text("orders", 1) is None and "orders:v4" in (pub.history.text("orders", 5) or "")
    await pub.close()


async def test_bounded_on_disk_too(policies: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_mod, "KEEP", 2)
    pub = Publisher(policies, Ed25519PrivateKey.generate(), state_dir=tmp_path / "state")
    for i in range(4):
        write(policies, f"orders:v{i}", tests=False)
        await pub.scan()
    assert sorted(p.name for p in (tmp_path / "state" / "history" / "orders").iterdir()) == ["3.json", "4.json"]
    await pub.close()


async def test_console_revocations_rewrite_the_file_publish_at_once_and_are_logged(
    policies: Path, tmp_path: Path
) -> None:
    (policies / REVOCATIONS_FILE).write_text("# an operator's comment\njti: [by-hand]\n")
    (policies / REVOCATIONS_FILE).chmod(0o640)
    state = tmp_path / "state"
    pub = Publisher(policies, Ed25519PrivateKey.generate(), state_dir=state)
    await pub.scan()
    assert pub.revocations.sequence == 1
    pushed = pub.subscribe("orders")
    pub.revoke(ADMIN, "jti", {"jti": "stolen-1"}, "leaked in a ticket")
    assert pub.revocations.sequence == 2 and pub.revocations.jti == {"by-hand", "stolen-1"}
    assert parse_revocations(pushed.get_nowait().revocations.payload).jti == {"by-hand", "stolen-1"}  # at once
    pub.revoke(ADMIN, "subject", {"issuer": "https://idp.example.test", "subject": "mallory"})
    pub.revoke(ADMIN, "client", {"client_id": "batch-exporter"}, "incident 4711")
    pub.revoke(ADMIN, "client", {"client_id": "partner-x", "issuer": "https://idp.example.test"})
    r = pub.revocations
    assert r.sequence == 5 and [(i, s) for i, s, _ in r.subjects] == [("https://idp.example.test", "mallory")]
    assert r.clients == (("", "batch-exporter"), ("https://idp.example.test", "partner-x"))
    path = policies / REVOCATIONS_FILE
    text = path.read_text()
    assert text.startswith("# Written by the authz-agent console") and "an operator's comment" not in text
    assert mode(path) == 0o640  # the operator's file keeps its permissions
    entries = parse_file(load_yaml(text, str(path)), path)
    assert (entries.jti, entries.clients) == (r.jti, r.clients)
    # The action log: who, what, when, why; a hash chain `audit verify` checks; 0600.
    log = state / ACTIONS_FILE
    assert mode(log) == 0o600
    verdict = verify([log])
    assert verdict.problem is None and verdict.records == 4
    first = orjson.loads(log.read_bytes().splitlines()[0])
    assert first["actor"] == {"subject": "sub-admin-1", "name": "Ada Admin"} and first["action"] == "revoke_jti"
    assert first["target"] == {"jti": "stolen-1"} and first["reason"] == "leaked in a ticket"
    assert first["revocations_sequence"] == 2 and first["time"].endswith("+00:00")
    await pub.close()
    # After a restart the log goes on in the same chain, and who revoked each entry is still known.
    again = Publisher(policies, Ed25519PrivateKey.generate(), state_dir=state)
    assert again.actions.by_target["client\0\0batch-exporter"]["reason"] == "incident 4711"
    again.revoke(ADMIN, "jti", {"jti": "stolen-2"})
    assert verify([log]).problem is None and verify([log]).records == 5
    await again.close()


@pytest.mark.parametrize(
    ("kind", "target", "reason", "message"),
    [
        ("jti", {"jti": ""}, "", "jti is required"),
        ("jti", {"jti": "x" * 257}, "", "jti is longer than 256"),
        ("jti", {"jti": "a\nb"}, "", "jti holds a control character"),
        ("subject", {"issuer": "https://i", "subject": " bob"}, "", "subject starts or ends with a space"),
        ("subject", {"subject": "bob"}, "", "issuer is required"),
        ("client", {"client_id": "c\x1b[31m"}, "", "client id holds a control character"),
        ("client", {"client_id": "c"}, "r" * 501, "reason is longer than 500"),
        ("everything", {}, "", "unknown revocation kind"),
    ],
)
async def test_bad_values_are_refused_and_nothing_is_written(
    policies: Path, kind: str, target: dict[str, str], reason: str, message: str
) -> None:
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    with pytest.raises(ValueError, match=message):
        pub.revoke(ADMIN, kind, target, reason)
    assert not (policies / REVOCATIONS_FILE).exists() and not pub.actions.recent
    await pub.close()


async def test_a_revocations_file_that_does_not_load_is_never_rewritten(policies: Path) -> None:
    broken = "jti: [a]\njti: [b]\n"
    (policies / REVOCATIONS_FILE).write_text(broken)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    with pytest.raises(ValueError, match="does not load, so it is not rewritten"):
        pub.revoke(ADMIN, "jti", {"jti": "c"})
    assert (policies / REVOCATIONS_FILE).read_text() == broken and not pub.actions.recent
    await pub.close()


def test_the_file_format_takes_clients_as_names_or_mappings(tmp_path: Path) -> None:
    path = tmp_path / REVOCATIONS_FILE
    text = textwrap.dedent("""\
        clients:
          - batch-exporter
          - {client_id: partner-x, issuer: "https://idp"}
        """)
    assert parse_file(load_yaml(text, str(path)), path).clients == (
        ("", "batch-exporter"),
        ("https://idp", "partner-x"),
    )
    for bad in ("clients: [{issuer: x}]\n", "clients: [{client_id: a, extra: 1}]\n", "clients: a\n", "clients: [1]\n"):
        with pytest.raises(ValueError, match=r"revocations.yaml:\d+: clients"):
            parse_file(load_yaml(bad, str(path)), path)


def test_the_in_memory_action_log_is_chained_too() -> None:
    log = ActionLog(None)
    a = log.record(ADMIN, "revoke_jti", {"jti": "x"}, "")
    b = log.record(ADMIN, "revoke_jti", {"jti": "y"}, "")
    assert (a["seq"], b["seq"]) == (1, 2) and b["prev"] != a["prev"]
    assert [r["target"]["jti"] for r in log.newest()] == ["y", "x"]
