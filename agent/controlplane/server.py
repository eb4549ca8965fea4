"""The control plane: one policy file per service from a directory, validated, signed and streamed to agents.

`DIR/SERVICE.yaml` is the policy of SERVICE (its `service:` must say so); `DIR/SERVICE.test.yaml`, when
present, holds its tests (`authz-agent policy test`); `DIR/revocations.yaml` lists revoked tokens for every
service. The directory is re-read every `poll_s`: a policy that fails validation or its tests is never
published (the last good bundle stays, the error is shown in /status and logged), a valid change is signed
and pushed to every agent of that service at once. /status shows which agent enforces which version, what
it reported, and what each service's tests said.

Revocations never wait: they are read on every poll in the event loop, while policies are validated and
their tests run in worker threads, one run per service at a time and each within a time budget, so a slow
or hostile file holds up only its own publish. Nothing a file holds ends the polling.
"""

from __future__ import annotations

import asyncio
import logging
import re
import stat
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import Policy, load_policy_text
from agent.config.loader import MAX_POLICY_BYTES, read_bounded
from agent.config.yamlsrc import load_yaml
from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.controlplane.actions import ActionLog, Actor
from agent.controlplane.agents import PeerIdentity
from agent.controlplane.bundle import Revocations, policy_payload, revocations_payload, sign
from agent.controlplane.console import ConsoleConfig
from agent.controlplane.denials import DenialWindow
from agent.controlplane.history import History, Version
from agent.controlplane.revocations import (
    MAX_CLIENT_ID,
    MAX_ISSUER,
    MAX_JTI,
    MAX_REASON,
    MAX_SUBJECT,
    RevocationEntries,
    checked,
    parse_revocations,
    render,
    with_entry,
)
from agent.controlplane.tls import (
    BAD_HELLO,
    CERTIFICATE_EXPIRED,
    CERTIFICATE_INVALID,
    IDENTITY_UNKNOWN,
    NO_CERTIFICATE,
    NOT_ADMIN,
    SERVICE_NOT_ALLOWED,
    TOO_MANY_CONNECTIONS,
    Forwarded,
    ServerChannel,
    TlsFront,
    _printable,
    front_limits,
    host_of,
    source_of,
)
from agent.errors import ConfigErrors
from agent.files import write_atomically
from agent.policytest import FileResult, run_file
from agent.policytest.report import printable

log = logging.getLogger("agent.controlplane")

SYNC_METHOD = "/authz.controlplane.v1.PolicySync/Sync"
REVOCATIONS_FILE = "revocations.yaml"
TEST_SUFFIX = ".test.yaml"  # SERVICE.test.yaml: the tests of SERVICE.yaml, never a policy of its own
DEFAULT_TEST_BUDGET_S = 60.0  # a test file not done within it blocks its own publish (`--test-budget`)
VALIDATION_WORKERS = 4  # threads loading policies and running their tests: a slow service holds one of them
MAX_AGENT_ID = 128  # a longer Hello.agent_id is refused (bad_hello): ids are host:pid:time, far shorter
MAX_VERSION_SHOWN = 256  # a version an agent reports, as logged and shown (escaped)
MAX_ERROR_SHOWN = 1024  # an agent's Status.error, as logged and shown (escaped)
HELLO_TIMEOUT_S = 10.0  # a stream that sends no first message within this is refused (bad_hello)
AGENT_TTL_S = 3600.0  # a disconnected agent stays in /status this long after it was last seen
AGENTS_PER_IDENTITY = 256  # entries of one identity in the agents table: the oldest disconnected go first
# The internal gRPC server: a connection with no stream open is closed (an agent's Sync stream is an open call, so
# agents are never idle), a peer that stops answering keepalive pings is dropped, few streams per connection.
GRPC_SERVER_OPTIONS = [
    ("grpc.max_connection_idle_ms", 30_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_concurrent_streams", 8),
    ("grpc.server_handshake_timeout_ms", 10_000),
]
# orders.test.yml, orders.tests.yaml, orders_test.yaml: probably meant as orders.test.yaml
_TESTS_NAME = re.compile(r"(?P<service>.+?)[._-]tests?\.ya?ml")
# What a test's problem line could carry of a credential (a forwarded header's value): never shown.
_CREDENTIAL = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*|\b(?i:bearer|dpop|basic)\s+[\w.~+/=-]{16,}")


@dataclass
class Published:
    version: str
    sequence: int
    bundle: pb.SignedBundle
    published_at: float
    warnings: tuple[str, ...] = ()  # what `policy lint` warns of (an ended grant): published, and shown in /status


@dataclass(frozen=True)
class PolicyTestReport:
    """The last run of SERVICE.test.yaml: against which candidate version, and what failed (no credentials)."""

    file: str
    version: str
    passed: int
    failed: int
    failures: tuple[tuple[str, int, tuple[str, ...]], ...]  # (case name, line, problem lines)
    errors: tuple[str, ...]  # "file:line: message": the file could not be run
    notes: tuple[str, ...] = ()  # stand-ins the runner used (a throwaway key for an unreadable key file)
    cases: tuple[tuple[str, int, bool], ...] = ()  # every case: (name, line, passed)
    uncovered: tuple[str, ...] = ()  # what no case reaches ("route billing-webhook alternative 1")

    @classmethod
    def of(cls, test_path: Path, version: str, result: FileResult) -> PolicyTestReport:
        """What the run found, on one line each: a case name or value from the file with a line break (or any
        control character) is escaped, as `policy test` prints it, so it cannot forge a line of the log."""
        failures = tuple((printable(c.name), c.line, tuple(map(_scrub, c.problems))) for c in result.cases if not c.ok)
        errors, notes = tuple(map(_scrub, result.errors)), tuple(map(_scrub, result.notes))
        cases = tuple((printable(c.name), c.line, c.ok) for c in result.cases)
        uncovered = tuple(map(printable, result.uncovered))
        return cls(str(test_path), version, result.passed, result.failed, failures, errors, notes, cases, uncovered)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failed

    def describe(self) -> str:
        """Why a publish was blocked, as an operator reads it: the failing cases with their problems, or the errors."""
        name = Path(self.file).name
        if self.errors:
            return "\n".join([f"{name} could not be run:", *(f"  {e}" for e in self.errors)])
        cases = ", ".join(repr(n) for n, _, _ in self.failures)
        lines = [f"{name}: {self.failed} of {self.passed + self.failed} tests failed: {cases}"]
        for case, line, problems in self.failures:
            lines.append(f"  {case} ({name}:{line}):")
            lines.extend(f"    {p}" for p in problems)
        return "\n".join(lines)

    def as_status(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "version": self.version,
            "passed": self.passed,
            "failed": self.failed,
            "failures": [{"name": n, "line": line, "problems": list(p)} for n, line, p in self.failures],
            "errors": list(self.errors),
            "notes": list(self.notes),
        }

    def summary(self) -> dict[str, Any]:
        """What the history keeps of a run: every case with its outcome, and the uncovered routes."""
        return {
            **self.as_status(),
            "cases": [{"name": n, "line": line, "ok": ok} for n, line, ok in self.cases],
            "uncovered": list(self.uncovered),
        }


def _scrub(line: str) -> str:
    return printable(_CREDENTIAL.sub("[redacted]", line))


@dataclass
class AgentInfo:
    agent_id: str
    service: str
    peer: str
    identity: str | None = None  # the client certificate's URI (or DNS) SAN; None on a plain-text channel
    cert_serial: str | None = None
    cert_fingerprint: str | None = None  # SHA-256 of the certificate: shows which one a rotated agent uses
    connected: bool = True
    version: str = ""
    error: str = ""
    revocations_sequence: int = 0
    last_seen: float = field(default_factory=time.time)


class Publisher:
    """What is published, per service, and who listens.

    `poll()` never waits: it reads revocations at once and starts a validation for each service whose files
    changed (in a worker thread, one run per service at a time; a change made meanwhile is taken by the first
    poll after that run). `scan()` polls and waits for those validations (tests, tools)."""

    def __init__(
        self,
        directory: Path,
        key: Ed25519PrivateKey,
        *,
        require_tests: bool = False,
        test_budget_s: float = DEFAULT_TEST_BUDGET_S,
        state_dir: Path | None = None,
    ) -> None:
        self.directory = directory
        self.key = key
        self.require_tests = require_tests  # a policy without SERVICE.test.yaml is not published
        self.test_budget_s = test_budget_s
        self.published: dict[str, Published] = {}
        self.errors: dict[str, str] = {}
        self.revocations: Revocations = Revocations()
        self.revocations_bundle: pb.SignedBundle | None = None
        self.revocations_error = ""
        self.tests: dict[str, PolicyTestReport] = {}  # the last run of each service's test file
        self.misnamed: dict[str, str] = {}  # a file the scan does not take as it was probably meant -> that name
        self._stamps: dict[Path, tuple[int, int, int]] = {}
        self._revocations_stamp: tuple[int, int, int] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}  # the validation of each service being validated
        self._workers = ThreadPoolExecutor(VALIDATION_WORKERS, thread_name_prefix="policy-validation")
        self._stopping = threading.Event()  # tells a running test file to stop before its next case
        self._queues: dict[str, set[asyncio.Queue[pb.ControlMessage]]] = {}
        self.agents: dict[str, AgentInfo] = {}
        # Every version published (per service) and the console's actions: on disk under state_dir, else in memory.
        self.state_dir = state_dir
        if state_dir is not None:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.history = History(state_dir)
        self.actions = ActionLog(state_dir)
        self.denials = DenialWindow()  # what the agents refused, per service per minute, the last hour

    # -- reading the directory ----------------------------------------------------------------------

    def poll(self) -> None:
        """Publish changed revocations now; start validating every other service whose files changed."""
        self._poll_revocations()
        self._note_misnamed()
        changed: set[str] = set()
        seen: set[Path] = set()
        for path in sorted(self.directory.glob("*.yaml")):
            seen.add(path)
            service = _service_of(path)
            if path.name == REVOCATIONS_FILE or service in self._running:
                continue  # a service being validated: its change is taken by the poll after that run
            stamp = _stamp(path)
            if stamp is None or self._stamps.get(path) == stamp:
                continue
            self._stamps[path] = stamp
            changed.add(service)
        for gone in sorted(set(self._stamps) - seen):
            # A deleted file unpublishes nothing: agents keep enforcing the last bundle (fail closed).
            service = _service_of(gone)
            if service in self._running:
                continue
            del self._stamps[gone]
            if gone.name.endswith(TEST_SUFFIX):
                without = "is not published" if self.require_tests else "publishes without tests"
                log.warning("%s was removed: %s %s from now on", gone, service, without)
                changed.add(service)
            else:
                log.warning("%s was removed; its last bundle stays published", gone)
                if self._test_path(service).exists():
                    changed.add(service)  # its test file is left without a policy: shown in /status
        loop = asyncio.get_running_loop()
        for service in sorted(changed):
            self._running[service] = loop.create_task(self._validate_guarded(service))

    async def scan(self) -> None:
        """Poll and wait until what changed is validated (the control plane's own poll never waits). Twice: a
        change to a service whose validation was running when the first poll came is taken by the second."""
        for _ in range(2):
            self.poll()
            await self.settled()

    async def settled(self) -> None:
        """Wait for the validations running now (not for any started later)."""
        running = list(self._running.values())
        if running:
            await asyncio.wait(running)

    async def close(self) -> None:
        """Stop validating. A running test file stops before its next case: the one being run is finished first,
        which is bounded (a case sends at most 1,000 requests), as is the policy being loaded."""
        self._stopping.set()
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await asyncio.to_thread(self._workers.shutdown, wait=True, cancel_futures=True)

    def _test_path(self, service: str) -> Path:
        return self.directory / f"{service}{TEST_SUFFIX}"

    async def _validate_guarded(self, service: str) -> None:
        try:
            await self._validate(service)
        except Exception as e:  # a file no check foresaw, or a bug: refused like a broken file, the poll goes on
            log.exception("validating %s failed", service)
            self._refuse(service, f"{self.directory / service}.yaml: not published, the last good bundle stays: "
                                  f"it could not be validated ({type(e).__name__}: {e})")  # fmt: skip
        finally:
            self._running.pop(service, None)

    async def _validate(self, service: str) -> None:
        """Load SERVICE.yaml, run SERVICE.test.yaml against it (in a worker thread), publish only if both pass."""
        path, test_path = self.directory / f"{service}.yaml", self._test_path(service)
        tested = test_path.exists()
        if not tested:
            self.tests.pop(service, None)
        if path.name == REVOCATIONS_FILE or not path.exists():
            if tested:
                self._refuse(service, f"{test_path}: there is no policy {path.name} beside it to test")
            else:
                self.errors.pop(service, None)
            return
        loop = asyncio.get_running_loop()
        try:
            text, policy, result = await loop.run_in_executor(
                self._workers, self._check, service, path, test_path if tested else None
            )
        except (ConfigErrors, ValueError, OSError) as e:
            self._refuse(service, str(e), f"not published (the last good bundle of {service} stays):\n")
            return
        if result is None and self.require_tests:
            self._refuse(service, f"{self._held(service, policy.version, failing=False)}: {self._no_tests(test_path)}")
            return
        if result is not None:
            report = PolicyTestReport.of(test_path, policy.version, result)
            self.tests[service] = report
            if not report.ok:
                self._refuse(service, f"{self._held(service, policy.version)}: {report.describe()}")
                return
            log.info("%s: %d tests passed against %s", test_path.name, report.passed, policy.version)
        self.errors.pop(service, None)
        self._publish(service, text, policy)

    def _check(self, service: str, path: Path, test_path: Path | None) -> tuple[str, Policy, FileResult | None]:
        """In a worker thread: the policy (raises what `policy lint` reports), then its tests, if it has them."""
        text = _read(path, "policy")
        policy = load_policy_text(text, str(path), self.directory)
        if policy.service != service:
            raise ValueError(f"{path}:1: the file of service {service!r} says service: {policy.service!r}")
        if test_path is None:
            return text, policy, None
        try:
            result = run_file(test_path, policy, budget_s=self.test_budget_s, stop=self._stopping)
        except Exception as e:  # a bug in the runner blocks the publish, like a failing test
            log.exception("running %s", test_path)
            result = FileResult(str(test_path), errors=[f"{test_path}: the tests could not be run: {e!r}"])
        return text, policy, result

    def _publish(self, service: str, text: str, policy: Policy) -> None:
        current = self.published.get(service)
        if current is not None and current.version == policy.version:
            return
        last = self.history.last(service) if current is None else None
        if last is not None and last.version == policy.version:
            sequence = last.sequence  # the version published before a restart: the same, not a new one
        else:
            before = current or last
            sequence = before.sequence + 1 if before is not None else 1
        bundle = sign(policy_payload(service, policy.version, text, sequence), self.key)
        published = Published(policy.version, sequence, bundle, time.time(), tuple(policy.warning_lines()))
        self.published[service] = published
        if last is None or last.sequence != sequence:
            report = self.tests.get(service)
            tests = report.summary() if report is not None and report.version == policy.version else None
            entry = Version(service, sequence, policy.version, published.published_at, published.warnings, tests)
            try:
                self.history.add(entry, text)
            except (OSError, ValueError) as e:  # the agents still get it: history is for reading, not enforcing
                log.error("%s sequence %d is published but not kept in the history: %s", service, sequence, e)
        log.info("published %s (sequence %d)", policy.version, sequence)
        for warning in policy.warning_lines():
            log.warning("%s", warning)
        self._push(service, pb.ControlMessage(bundle=bundle))

    def _held(self, service: str, version: str, failing: bool = True) -> str:
        """What stays published, for an error about `version`: failing its tests, or (not failing) untested."""
        current = self.published.get(service)
        if current is None:
            return f"{version} not published (no version of {service} was published yet)"
        if current.version == version:
            state = "now fails its tests" if failing else "no longer tested"
            return f"{version} is published and {state} (nothing new is published)"
        return f"{version} not published, the last good bundle stays ({current.version})"

    def _no_tests(self, test_path: Path) -> str:
        text = f"no tests: with --require-tests a policy is published only with {test_path.name} beside it"
        lookalikes = sorted(name for name, meant in self.misnamed.items() if meant == test_path.name)
        if lookalikes:
            text += f" ({', '.join(lookalikes)} is not read as its tests: rename it {test_path.name})"
        return text

    def _refuse(self, service: str, error: str, log_prefix: str = "") -> None:
        meant = _probably_meant(f"{service}.yaml")
        if meant is not None:
            error += (f"\n{service}.yaml was read as the policy of service {service!r}: "
                      f"if it holds the tests of {meant.removesuffix(TEST_SUFFIX)}, name it {meant}")  # fmt: skip
        self.errors[service] = error
        log.error("%s%s", log_prefix, error)

    def _note_misnamed(self) -> None:
        """Files named like tests (or policies) the scan does not read as such: logged once, listed in /status."""
        found: dict[str, str] = {}
        for path in self.directory.glob("*.y*ml"):
            meant = _probably_meant(path.name)
            if meant is not None:
                found[path.name] = meant
        for name in sorted(found.keys() - self.misnamed.keys()):
            if name.endswith(".yml"):  # never read; a *.yaml lookalike is read as a policy, and told if refused
                log.warning("%s is not read (the control plane reads *.yaml): probably meant %s", name, found[name])
        self.misnamed = found

    def _poll_revocations(self) -> None:
        path = self.directory / REVOCATIONS_FILE
        stamp = _stamp(path)
        if stamp == self._revocations_stamp:
            return
        if stamp is None:
            log.warning("%s was removed; the last revocation list stays published", path)
        else:
            self._read_revocations(path)
        self._revocations_stamp = stamp

    def _read_revocations(self, path: Path) -> None:
        try:
            doc = load_yaml(_read(path, "revocations"), str(path), allow_empty=True) or {}
            entries = parse_revocations(doc, path)
        except (ValueError, OSError) as e:  # a ConfigError (a ValueError) says file:line
            self._refuse_revocations(str(e))
            return
        except Exception as e:  # never the end of the poll: a fixed file must still get through
            log.exception("reading %s failed", path)
            self._refuse_revocations(f"{path}: could not be read ({type(e).__name__}: {e})")
            return
        self.revocations_error = ""
        r = self.revocations
        if (entries.jti, entries.subjects, entries.clients) == (r.jti, r.subjects, r.clients):
            return
        self.revocations = Revocations(r.sequence + 1, entries.jti, entries.subjects, entries.clients)
        self.revocations_bundle = sign(revocations_payload(self.revocations), self.key)
        log.info("published revocations (sequence %d)", self.revocations.sequence)
        for service in list(self._queues):
            self._push(service, pb.ControlMessage(revocations=self.revocations_bundle))

    def _refuse_revocations(self, error: str) -> None:
        self.revocations_error = error
        log.error("revocations not published (the last list stays): %s", error)

    def revoke(self, actor: Actor, kind: str, target: dict[str, str], reason: str = "") -> dict[str, Any]:
        """The console's revocation: checked, added to revocations.yaml (rewritten atomically), published at once
        to every connected agent, and recorded in the action log (who, when, what, why). Raises ValueError with
        what is wrong (a bad value, a revocations file that does not load: nothing is written then)."""
        target = _checked_target(kind, target)
        reason = checked(reason, "reason", MAX_REASON, required=False)
        path = self.directory / REVOCATIONS_FILE
        if path.exists():
            try:
                doc = load_yaml(_read(path, "revocations"), str(path), allow_empty=True) or {}
                entries = parse_revocations(doc, path)
            except ValueError as e:
                raise ValueError(f"{path.name} does not load, so it is not rewritten (fix it first): {e}") from None
        else:
            entries = RevocationEntries()
        now = int(time.time())
        write_atomically(path, render(with_entry(entries, kind, target, now)).encode())
        self._poll_revocations()  # published now, not at the next poll
        if self.revocations_error:
            raise ValueError(f"written, but not published: {self.revocations_error}")
        extra: dict[str, Any] = {"revocations_sequence": self.revocations.sequence}
        if kind == "subject":
            extra["issued_before"] = now
        record = self.actions.record(actor, f"revoke_{kind}", target, reason, **extra)
        log.info("console: %s revoked %s (revocations sequence %d)", printable(actor.subject), kind,
                 self.revocations.sequence)  # fmt: skip
        return record

    # -- agents -------------------------------------------------------------------------------------

    def _push(self, service: str, message: pb.ControlMessage) -> None:
        for q in self._queues.get(service, ()):
            q.put_nowait(message)

    def subscribe(self, service: str) -> asyncio.Queue[pb.ControlMessage]:
        q: asyncio.Queue[pb.ControlMessage] = asyncio.Queue()
        self._queues.setdefault(service, set()).add(q)
        return q

    def unsubscribe(self, service: str, q: asyncio.Queue[pb.ControlMessage]) -> None:
        self._queues.get(service, set()).discard(q)

    def add_agent(self, key: str, info: AgentInfo) -> bool:
        """Take an agent into the table, keeping at most AGENTS_PER_IDENTITY entries per identity (the oldest
        disconnected out first); False when that many of its identity are connected (the Hello is refused)."""
        if key not in self.agents:
            mine = [(k, a) for k, a in self.agents.items() if a.identity == info.identity]
            if len(mine) >= AGENTS_PER_IDENTITY:
                gone = [(a.last_seen, k) for k, a in mine if not a.connected]
                if not gone:
                    return False
                del self.agents[min(gone)[1]]
        self.agents[key] = info
        return True

    def prune_agents(self, now: float) -> None:
        """Forget agents disconnected more than AGENT_TTL_S ago."""
        for key in [k for k, a in self.agents.items() if not a.connected and now - a.last_seen > AGENT_TTL_S]:
            del self.agents[key]

    def status(self) -> dict[str, Any]:
        return {
            "services": {
                name: {
                    "version": p.version,
                    "sequence": p.sequence,
                    "published_at": p.published_at,
                    "error": self.errors.get(name),
                    "warnings": list(p.warnings),
                    "tests": self._tests_status(name),
                    "agents": sum(1 for a in self.agents.values() if a.service == name and a.connected),
                    "agents_on_version": sum(
                        1 for a in self.agents.values() if a.service == name and a.connected and a.version == p.version
                    ),
                }
                for name, p in self.published.items()
            },
            "refused": {
                name: {"error": err, "tests": self._tests_status(name)}
                for name, err in self.errors.items()
                if name not in self.published
            },
            "revocations": {"sequence": self.revocations.sequence, "error": self.revocations_error or None},
            "validating": sorted(self._running),  # policies being loaded and tested now
            "misnamed": {
                name: f"not read (the control plane reads *.yaml): probably meant {meant}"
                if name.endswith(".yml")
                else f"read as a policy and refused: probably meant {meant}"
                for name, meant in sorted(self.misnamed.items())
                if name.endswith(".yml") or _service_of(Path(name)) in self.errors
            },
            "settings": {"require_tests": self.require_tests, "test_budget_s": self.test_budget_s},
            "agents": [vars(a) for a in self.agents.values()],
            "denials": self.denials.status(),
        }

    def _tests_status(self, service: str) -> dict[str, Any] | None:
        report = self.tests.get(service)
        return report.as_status() if report is not None else None


def _service_of(path: Path) -> str:
    """`orders.yaml` and `orders.test.yaml` are both about service orders."""
    name = path.name
    return name[: -len(TEST_SUFFIX)] if name.endswith(TEST_SUFFIX) else path.stem


def _read(path: Path, what: str) -> str:
    """A file's text within the bound `policy lint` and `run` hold a policy to (a file replaced by a FIFO or a
    huge one between the poll's look and this read is refused, not read into memory)."""
    try:
        return read_bounded(path, MAX_POLICY_BYTES)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the {what}: {e}") from None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a change (the inode too: a file replaced within one clock tick); None when there is no regular
    file (a FIFO would hold its reader for ever)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _probably_meant(name: str) -> str | None:
    """`orders.test.yml`, `orders.tests.yaml`, `orders_test.yaml` -> orders.test.yaml; `orders.yml` -> orders.yaml."""
    m = _TESTS_NAME.fullmatch(name)
    if m is not None and name != m["service"] + TEST_SUFFIX:
        return m["service"] + TEST_SUFFIX
    return name.removesuffix(".yml") + ".yaml" if name.endswith(".yml") else None


def _checked_target(kind: str, target: dict[str, str]) -> dict[str, str]:
    """The fields of one revocation, each bounded and printable (ValueError names the field, never its value)."""
    if kind == "jti":
        return {"jti": checked(target.get("jti", ""), "jti", MAX_JTI)}
    if kind == "subject":
        return {
            "issuer": checked(target.get("issuer", ""), "issuer", MAX_ISSUER),
            "subject": checked(target.get("subject", ""), "subject", MAX_SUBJECT),
        }
    if kind == "client":
        out = {"client_id": checked(target.get("client_id", ""), "client id", MAX_CLIENT_ID)}
        issuer = checked(target.get("issuer", ""), "issuer", MAX_ISSUER, required=False)
        return {**out, "issuer": issuer} if issuer else out
    raise ValueError(f"unknown revocation kind {kind!r}")


@dataclass(eq=False)  # each stream is its own, kept in a set
class _Stream:
    """An open Sync stream on an authenticated channel: ended when agents.yaml no longer grants its service."""

    peer: Forwarded
    service: str
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class ControlPlane:
    """PolicySync and /status. With a `channel` (TLS, client certificates, agents.yaml) both ports are behind a TLS
    front and every peer is checked; without one they are plain text (the CLI allows that on loopback only)."""

    def __init__(
        self,
        directory: Path,
        key: Ed25519PrivateKey,
        listen: str,
        admin: str | None,
        poll_s: float = 0.5,
        *,
        require_tests: bool = False,
        test_budget_s: float = DEFAULT_TEST_BUDGET_S,
        channel: ServerChannel | None = None,
        console: ConsoleConfig | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.console = console  # the web console at /ui on the admin port (None: off)
        self.publisher = Publisher(
            directory, key, require_tests=require_tests, test_budget_s=test_budget_s, state_dir=state_dir
        )
        self.listen = listen
        self.admin_listen = admin
        self.poll_s = poll_s
        self.port = 0
        self.admin_port = 0
        self.channel = channel
        self._front: TlsFront | None = None
        self._admin_front: TlsFront | None = None
        self._streams: set[_Stream] = set()
        self._server: Any = None
        self._admin: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ca_generation = channel.ca_generation if channel is not None else 0

    def _refusal(self, peer: Forwarded, service: str) -> tuple[str, str] | None:
        """Why `peer` may not fetch or report for `service` (reason, detail), or None when it may."""
        assert self.channel is not None
        granted = self.channel.agents.services_of(peer.identity)
        if granted is None:
            names = ", ".join([*peer.identity.uris, *peer.identity.dns]) or "a certificate without SANs"
            return IDENTITY_UNKNOWN, f"no entry in the agents file for {names}"
        if service not in granted:
            return SERVICE_NOT_ALLOWED, f"{peer.identity.name} may fetch {', '.join(sorted(granted))}, not {service}"
        return None

    async def _sync(self, requests: AsyncIterator[pb.AgentMessage], context: Any) -> AsyncIterator[pb.ControlMessage]:
        forwarded: Forwarded | None = None
        if self._front is not None:
            forwarded = self._front.peer_of(context.peer())
            if forwarded is None:  # on the internal port, not through the TLS front
                self._front.refuse(NO_CERTIFICATE, context.peer(), None, None, "not connected through TLS")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "connect with TLS and a client certificate")
                return
        try:
            first = await asyncio.wait_for(anext(aiter(requests), None), HELLO_TIMEOUT_S)
        except TimeoutError:
            first, late = None, f"no Hello within {HELLO_TIMEOUT_S:g} s"
        else:
            late = "the first message must be Hello with a service"
        if first is None or first.WhichOneof("kind") != "hello" or not first.hello.service:
            self._bad_hello(forwarded, None, late)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, late)
            return
        hello = first.hello
        if len(hello.agent_id) > MAX_AGENT_ID:
            detail = f"agent_id longer than {MAX_AGENT_ID} characters"
            self._bad_hello(forwarded, hello.service, detail)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)
            return
        stream: _Stream | None = None
        if forwarded is not None:
            assert self._front is not None
            refusal = self._refusal(forwarded, hello.service)
            if refusal is not None:
                self._front.refuse(refusal[0], forwarded.address, forwarded.identity.name, hello.service, refusal[1])
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{refusal[0]}: {refusal[1]}")
                return
            stream = _Stream(forwarded, hello.service)
            self._streams.add(stream)
        pub = self.publisher
        # The peer's text, escaped once here: the log and /status show it on one line and bounded.
        agent_id = _printable(hello.agent_id or context.peer(), MAX_AGENT_ID)
        info = AgentInfo(agent_id, hello.service, forwarded.address if forwarded else context.peer(),
                         version=_printable(hello.version, MAX_VERSION_SHOWN),
                         revocations_sequence=hello.revocations_seq)  # fmt: skip
        if forwarded is not None:
            info.identity = forwarded.identity.name
            info.cert_serial, info.cert_fingerprint = forwarded.identity.serial, forwarded.identity.fingerprint
        # Keyed by service too: an agent's Hello cannot overwrite what an agent of another service reported.
        if not pub.add_agent(f"{hello.service}/{agent_id}", info):
            detail = f"{AGENTS_PER_IDENTITY} agents of this identity are connected"
            if self._front is not None and forwarded is not None:
                self._front.refuse(TOO_MANY_CONNECTIONS, forwarded.address, forwarded.identity.name, hello.service,
                                   detail)  # fmt: skip
            else:
                log.warning("agent %s (%s) refused: %s", agent_id, hello.service, detail)
            if stream is not None:
                self._streams.discard(stream)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, detail)
            return
        queue = pub.subscribe(hello.service)
        log.info("agent %s (%s%s) connected, holding %r", info.agent_id, hello.service,
                 f", {info.identity}" if info.identity else "", info.version or None)  # fmt: skip

        async def read_status() -> None:
            async for msg in requests:
                if msg.WhichOneof("kind") == "status":
                    info.version = _printable(msg.status.version, MAX_VERSION_SHOWN)
                    error, info.error = info.error, _printable(msg.status.error, MAX_ERROR_SHOWN)
                    info.revocations_sequence = msg.status.revocations_seq
                    info.last_seen = time.time()
                    if msg.status.denials:
                        who = info.identity or f"(no certificate) {info.agent_id}"
                        pub.denials.record(hello.service, who, msg.status.denials, info.last_seen)
                    if info.error and info.error != error:  # the periodic reports repeat it: logged once
                        log.error("agent %s refused a bundle: %s", info.agent_id, info.error)

        loop = asyncio.get_running_loop()
        reader = loop.create_task(read_status())
        ended = loop.create_task(stream.ended.wait()) if stream is not None else loop.create_future()
        try:
            current = pub.published.get(hello.service)
            if current is not None and current.version != hello.version:
                yield pb.ControlMessage(bundle=current.bundle)
            if pub.revocations_bundle is not None and pub.revocations.sequence != hello.revocations_seq:
                yield pb.ControlMessage(revocations=pub.revocations_bundle)
            while not self._stop.is_set():
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, reader, ended}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if ended in done:
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                            "the agents file no longer allows this service")  # fmt: skip
                    break  # the agent went away
                yield get.result()
        finally:
            reader.cancel()
            ended.cancel()
            if stream is not None:
                self._streams.discard(stream)
            pub.unsubscribe(hello.service, queue)
            info.connected = False
            info.last_seen = time.time()
            log.info("agent %s disconnected", info.agent_id)

    def _bad_hello(self, forwarded: Forwarded | None, service: str | None, detail: str) -> None:
        if self._front is not None and forwarded is not None:
            self._front.refuse(BAD_HELLO, forwarded.address, forwarded.identity.name, service, detail)

    def _admit(self, identity: PeerIdentity) -> tuple[str, str] | None:
        """Who the TLS fronts forward at all: an identity the agents file lists (under agents or admins)."""
        assert self.channel is not None
        agents = self.channel.agents
        if agents.services_of(identity) is not None or agents.is_admin(identity):
            return None
        names = ", ".join([*identity.uris, *identity.dns]) or "a certificate without SANs"
        return IDENTITY_UNKNOWN, f"no entry in the agents file for {names}"

    def _admit_admin(self, identity: PeerIdentity) -> tuple[str, str] | None:
        """The admin port: as `_admit`, and with the console on also a peer without a certificate (a browser):
        /status refuses it (no_certificate, as the handshake did before), /ui wants an OIDC session."""
        if self.console is not None and not identity.fingerprint:
            return None
        return self._admit(identity)

    def console_peer_ok(self, request: web.Request) -> bool:
        """Whether a /ui request came through the admin port's TLS front (or there is none: plain text on
        loopback); someone on this host connecting to the internal port directly is refused."""
        if self._admin_front is None:
            return True
        peername = request.transport.get_extra_info("peername") if request.transport is not None else None
        return self._admin_front.peer_of(peername) is not None

    def console_source(self, request: web.Request) -> str:
        """Where a /ui request comes from, for per-source limits: the browser's address as the TLS front saw it
        (every forwarded connection reaches aiohttp from 127.0.0.1), an IPv6 address as its /64."""
        if self._admin_front is not None:
            peername = request.transport.get_extra_info("peername") if request.transport is not None else None
            forwarded = self._admin_front.peer_of(peername)
            return source_of(host_of(forwarded.address)) if forwarded is not None else "?"
        return source_of(request.remote or "?")

    def _check_certificates(self) -> None:
        """End every forwarded connection whose certificate expired, or (after a client CA change) no longer
        verifies against the new CA; a stream on it ends with it, and its reconnect meets the handshake's check."""
        assert self.channel is not None
        now = time.time()
        generation = self.channel.ca_generation
        reverify, self._ca_generation = generation != self._ca_generation, generation
        for front in (self._front, self._admin_front):
            if front is None:
                continue
            for peer in front.open_peers():
                if peer.not_after <= now:
                    reason = CERTIFICATE_EXPIRED
                    when = datetime.fromtimestamp(peer.not_after).astimezone().isoformat(timespec="seconds")
                    detail = f"open connection ended: the certificate expired at {when}"
                elif reverify and peer.der and not self.channel.verifies(peer.der, now):
                    reason, detail = CERTIFICATE_INVALID, "open connection ended: client CA replaced"
                else:
                    continue
                service = next((s.service for s in self._streams if s.peer is peer), None)
                front.refuse(reason, peer.address, peer.identity.name, service, detail)
                front.end(peer)

    def _recheck_streams(self) -> None:
        """agents.yaml changed: end every open stream whose identity no longer has its service."""
        for stream in list(self._streams):
            refusal = self._refusal(stream.peer, stream.service)
            if refusal is not None and not stream.ended.is_set() and self._front is not None:
                self._front.refuse(refusal[0], stream.peer.address, stream.peer.identity.name, stream.service,
                                   f"open stream ended: {refusal[1]}")  # fmt: skip
                stream.ended.set()

    async def start(self) -> None:
        """Serve at once: revocations are read before the first agent can connect; each policy is published when
        its validation ends (an agent that connected earlier is sent it then)."""
        self._poll_once()
        handler = grpc.method_handlers_generic_handler(
            "authz.controlplane.v1.PolicySync",
            {
                "Sync": grpc.stream_stream_rpc_method_handler(
                    self._sync,
                    request_deserializer=pb.AgentMessage.FromString,
                    response_serializer=pb.ControlMessage.SerializeToString,
                )
            },
        )
        self._server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        self._server.add_generic_rpc_handlers((handler,))
        channel = self.channel
        if channel is None:
            self.port = self._server.add_insecure_port(self.listen)
            await self._server.start()
        else:
            internal = self._server.add_insecure_port("127.0.0.1:0")
            await self._server.start()
            fronts = 2 if self.admin_listen else 1
            self._front = TlsFront(self.listen, lambda: channel.grpc_context, channel.refusals, "sync", self._admit,
                                   front_limits(fronts))  # fmt: skip
            await self._front.start(internal)
            self.port = self._front.port
        self._tasks.append(asyncio.get_running_loop().create_task(self._poll()))
        if self.admin_listen:
            from agent.server.admin import start_admin

            app = web.Application()
            app.router.add_get("/status", self._status)
            if self.console is not None:
                from agent.controlplane.console.app import PREFIX, build_console

                app.add_subapp(PREFIX, build_console(self, self.console))
                app.router.add_get(PREFIX, _to_console)
            if channel is None:
                self._admin = await start_admin(app, self.admin_listen)
                self.admin_port = _bound_port(self._admin)
            else:
                self._admin = await start_admin(app, "127.0.0.1:0")
                self._admin_front = TlsFront(self.admin_listen, lambda: channel.admin_context, channel.refusals,
                                             "admin", self._admit_admin, front_limits(2))  # fmt: skip
                await self._admin_front.start(_bound_port(self._admin))
                self.admin_port = self._admin_front.port
        secured = "TLS 1.3 with client certificates" if channel is not None else "plain text (--insecure)"
        log.info("control plane serving %s on %s (%s)", self.publisher.directory, self.listen, secured)

    async def _status(self, request: web.Request) -> web.Response:
        if self._admin_front is not None and self.channel is not None:
            peername = request.transport.get_extra_info("peername") if request.transport is not None else None
            forwarded = self._admin_front.peer_of(peername)
            if forwarded is None:
                self._admin_front.refuse(NO_CERTIFICATE, str(peername), None, None, "not connected through TLS")
                return _closing(web.json_response({"error": "connect with TLS and a client certificate"}, status=403))
            if not forwarded.identity.fingerprint:  # with the console on, a browser comes without a certificate
                self._admin_front.refuse(NO_CERTIFICATE, forwarded.address, None, None,
                                         "the peer sent no client certificate")  # fmt: skip
                return _closing(web.json_response({"error": "connect with TLS and a client certificate"}, status=403))
            if not self.channel.agents.is_admin(forwarded.identity):
                self._admin_front.refuse(NOT_ADMIN, forwarded.address, forwarded.identity.name, None,
                                         "not listed under admins in the agents file")  # fmt: skip
                # The connection is closed after this answer: a non-admin cannot hold the admin port open.
                return _closing(web.json_response({"error": "this certificate's identity is not an admin"}, status=403))
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        out = self.publisher.status()
        if self.channel is None:
            out["channel"] = {"insecure": True}
        else:
            out["channel"] = {"insecure": False, **self.channel.status()}
            out["channel"]["fronts"] = {f.port_name: {**f.counts(), "limits": vars(f.limits)}
                                        for f in (self._front, self._admin_front) if f is not None}  # fmt: skip
            out["refusals"] = self.channel.refusals.status()
        return out

    async def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.poll_s)
            except TimeoutError:
                self._poll_once()

    def _poll_once(self) -> None:
        try:
            self.publisher.poll()
        except Exception:  # nothing in the directory may end the polling (no revocation would get out again)
            log.exception("reading %s failed; the next poll tries again", self.publisher.directory)
        self.publisher.prune_agents(time.time())
        if self.channel is not None:
            try:
                if self.channel.poll():
                    self._recheck_streams()
            except Exception:  # a file no check foresaw: the last good certificates and mapping stay
                log.exception("reading the TLS files or the agents file failed; the next poll tries again")
            self._check_certificates()

    async def stop(self) -> None:
        """Stop serving; a running test file is stopped after the case it is running (see Publisher.close)."""
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for front in (self._front, self._admin_front):
            if front is not None:
                await front.stop()
        if self._server is not None:
            await self._server.stop(0.5)
        if self._admin is not None:
            await self._admin.cleanup()
        await self.publisher.close()


async def _to_console(_: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


def _closing(response: web.Response) -> web.Response:
    response.force_close()
    return response


def _bound_port(runner: web.AppRunner) -> int:
    """The port an admin site listens on (the internal one is chosen by the system)."""
    address = runner.addresses[0]
    return int(address[1])
