"""The control plane: one policy file per service from a directory, validated, signed and streamed to agents.

`DIR/SERVICE.yaml` is the policy of SERVICE (its `service:` must say so); `DIR/SERVICE.test.yaml`, when
present, holds its tests (`authz-agent policy test`); `DIR/revocations.yaml` lists revoked tokens for every
service. The directory is re-read every `poll_s`: a policy that fails validation or its tests is never
published (the last good bundle stays, the error is shown in /status and logged), a valid change is signed
and pushed to every agent of that service at once. /status shows which agent enforces which version, what
it reported, and what each service's tests said.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import load_policy_text
from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.controlplane.bundle import Revocations, policy_payload, revocations_payload, sign
from agent.errors import ConfigErrors
from agent.policytest import FileResult, run_file

log = logging.getLogger("agent.controlplane")

SYNC_METHOD = "/authz.controlplane.v1.PolicySync/Sync"
REVOCATIONS_FILE = "revocations.yaml"
TEST_SUFFIX = ".test.yaml"  # SERVICE.test.yaml: the tests of SERVICE.yaml, never a policy of its own
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

    @classmethod
    def of(cls, test_path: Path, version: str, result: FileResult) -> PolicyTestReport:
        failures = tuple((c.name, c.line, tuple(map(_scrub, c.problems))) for c in result.cases if not c.ok)
        errors, notes = tuple(map(_scrub, result.errors)), tuple(map(_scrub, result.notes))
        return cls(str(test_path), version, result.passed, result.failed, failures, errors, notes)

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


def _scrub(line: str) -> str:
    return _CREDENTIAL.sub("[redacted]", line)


@dataclass
class AgentInfo:
    agent_id: str
    service: str
    peer: str
    connected: bool = True
    version: str = ""
    error: str = ""
    revocations_sequence: int = 0
    last_seen: float = field(default_factory=time.time)


class Publisher:
    """What is published, per service, and who listens."""

    def __init__(self, directory: Path, key: Ed25519PrivateKey) -> None:
        self.directory = directory
        self.key = key
        self.published: dict[str, Published] = {}
        self.errors: dict[str, str] = {}
        self.revocations: Revocations = Revocations()
        self.revocations_bundle: pb.SignedBundle | None = None
        self.revocations_error = ""
        self.tests: dict[str, PolicyTestReport] = {}  # the last run of each service's test file
        self._stamps: dict[Path, tuple[int, int, int]] = {}
        self._scanning = asyncio.Lock()
        self._queues: dict[str, set[asyncio.Queue[pb.ControlMessage]]] = {}
        self.agents: dict[str, AgentInfo] = {}

    # -- reading the directory ----------------------------------------------------------------------

    async def scan(self) -> None:
        """Read what changed; publish what is valid and passes its tests; keep the last good of what is not."""
        async with self._scanning:  # one scan at a time: a slow test run must not interleave with the next poll
            changed: set[str] = set()
            seen: set[Path] = set()
            for path in sorted(self.directory.glob("*.yaml")):
                seen.add(path)
                try:
                    st = path.stat()
                except OSError:
                    continue
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)  # the inode: a file replaced within one clock tick
                if self._stamps.get(path) == stamp:
                    continue
                self._stamps[path] = stamp
                if path.name == REVOCATIONS_FILE:
                    self._read_revocations(path)
                else:
                    changed.add(_service_of(path))
            for gone in sorted(set(self._stamps) - seen):
                # A deleted file unpublishes nothing: agents keep enforcing the last bundle (fail closed).
                del self._stamps[gone]
                service = _service_of(gone)
                if gone.name.endswith(TEST_SUFFIX):
                    log.warning("%s was removed: %s publishes without tests from now on", gone, service)
                    changed.add(service)
                else:
                    log.warning("%s was removed; its last bundle stays published", gone)
                    if self._test_path(service).exists():
                        changed.add(service)  # its test file is left without a policy: shown in /status
            for service in sorted(changed):
                await self._validate(service)

    def _test_path(self, service: str) -> Path:
        return self.directory / f"{service}{TEST_SUFFIX}"

    async def _validate(self, service: str) -> None:
        """Load SERVICE.yaml, run SERVICE.test.yaml against it (in a worker thread), publish only if both pass."""
        path, test_path = self.directory / f"{service}.yaml", self._test_path(service)
        if not test_path.exists():
            self.tests.pop(service, None)
        if path.name == REVOCATIONS_FILE or not path.exists():
            if test_path.exists():
                self._refuse(service, f"{test_path}: there is no policy {path.name} beside it to test")
            else:
                self.errors.pop(service, None)
            return
        try:
            text = path.read_text(encoding="utf-8")
            policy = load_policy_text(text, str(path), self.directory)
            if policy.service != service:
                raise ValueError(f"{path}:1: the file of service {service!r} says service: {policy.service!r}")
        except (ConfigErrors, ValueError, OSError) as e:
            self.errors[service] = str(e)
            log.error("not published (the last good bundle of %s stays):\n%s", service, e)
            return
        if test_path.exists():
            try:
                result = await asyncio.to_thread(run_file, test_path, policy)
            except Exception as e:  # a bug in the runner blocks the publish, like a failing test
                log.exception("running %s", test_path)
                result = FileResult(str(test_path), errors=[f"{test_path}: the tests could not be run: {e!r}"])
            report = PolicyTestReport.of(test_path, policy.version, result)
            self.tests[service] = report
            if not report.ok:
                self._refuse(service, f"{self._held(service, policy.version)}: {report.describe()}")
                return
            log.info("%s: %d tests passed against %s", test_path.name, report.passed, policy.version)
        self.errors.pop(service, None)
        current = self.published.get(service)
        if current is not None and current.version == policy.version:
            return
        sequence = current.sequence + 1 if current is not None else 1
        bundle = sign(policy_payload(service, policy.version, text, sequence), self.key)
        self.published[service] = Published(
            policy.version, sequence, bundle, time.time(), tuple(policy.warning_lines())
        )
        log.info("published %s (sequence %d)", policy.version, sequence)
        for warning in policy.warning_lines():
            log.warning("%s", warning)
        self._push(service, pb.ControlMessage(bundle=bundle))

    def _held(self, service: str, version: str) -> str:
        current = self.published.get(service)
        if current is None:
            return f"{version} not published (no version of {service} was published yet)"
        if current.version == version:
            return f"{version} is published and now fails its tests (nothing new is published)"
        return f"{version} not published, the last good bundle stays ({current.version})"

    def _refuse(self, service: str, error: str) -> None:
        self.errors[service] = error
        log.error("%s", error)

    def _read_revocations(self, path: Path) -> None:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            jti, subjects = _parse_revocations(doc, path)
        except (ValueError, OSError, yaml.YAMLError) as e:
            self.revocations_error = str(e)
            log.error("revocations not published (the last list stays): %s", e)
            return
        self.revocations_error = ""
        if (jti, subjects) == (self.revocations.jti, self.revocations.subjects):
            return
        self.revocations = Revocations(self.revocations.sequence + 1, jti, subjects)
        self.revocations_bundle = sign(revocations_payload(self.revocations), self.key)
        log.info("published revocations (sequence %d)", self.revocations.sequence)
        for service in list(self._queues):
            self._push(service, pb.ControlMessage(revocations=self.revocations_bundle))

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
            "agents": [vars(a) for a in self.agents.values()],
        }

    def _tests_status(self, service: str) -> dict[str, Any] | None:
        report = self.tests.get(service)
        return report.as_status() if report is not None else None


def _service_of(path: Path) -> str:
    """`orders.yaml` and `orders.test.yaml` are both about service orders."""
    name = path.name
    return name[: -len(TEST_SUFFIX)] if name.endswith(TEST_SUFFIX) else path.stem


def _parse_revocations(doc: Any, path: Path) -> tuple[frozenset[str], tuple[tuple[str, str, int], ...]]:
    if not isinstance(doc, dict) or set(doc) - {"jti", "subjects"}:
        raise ValueError(f"{path}: expected 'jti: [...]' and/or 'subjects: [{{issuer, subject, issued_before}}]'")
    jti = doc.get("jti") or []
    if not isinstance(jti, list) or not all(isinstance(j, str) and j for j in jti):
        raise ValueError(f"{path}: jti must be a list of strings")
    subjects = []
    for i, s in enumerate(doc.get("subjects") or []):
        if not isinstance(s, dict) or set(s) != {"issuer", "subject", "issued_before"}:
            raise ValueError(f"{path}: subjects[{i}] needs issuer, subject and issued_before")
        before = s["issued_before"]
        if isinstance(before, str):
            before = datetime.fromisoformat(before)
        if isinstance(before, datetime):
            if before.tzinfo is None:
                raise ValueError(f"{path}: subjects[{i}].issued_before needs a time zone")
            before = int(before.timestamp())
        if not isinstance(before, int) or isinstance(before, bool):
            raise ValueError(f"{path}: subjects[{i}].issued_before must be a time or unix seconds")
        subjects.append((str(s["issuer"]), str(s["subject"]), before))
    return frozenset(jti), tuple(sorted(subjects))


class ControlPlane:
    def __init__(self, directory: Path, key: Ed25519PrivateKey, listen: str, admin: str | None, poll_s: float = 0.5):
        self.publisher = Publisher(directory, key)
        self.listen = listen
        self.admin_listen = admin
        self.poll_s = poll_s
        self.port = 0
        self._server: Any = None
        self._admin: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _sync(self, requests: AsyncIterator[pb.AgentMessage], context: Any) -> AsyncIterator[pb.ControlMessage]:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("kind") != "hello" or not first.hello.service:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello with a service")
            return
        hello = first.hello
        pub = self.publisher
        info = AgentInfo(hello.agent_id or context.peer(), hello.service, context.peer(), version=hello.version,
                         revocations_sequence=hello.revocations_seq)  # fmt: skip
        pub.agents[info.agent_id] = info
        queue = pub.subscribe(hello.service)
        log.info("agent %s (%s) connected, holding %r", info.agent_id, hello.service, hello.version or None)

        async def read_status() -> None:
            async for msg in requests:
                if msg.WhichOneof("kind") == "status":
                    info.version, info.error = msg.status.version, msg.status.error
                    info.revocations_sequence = msg.status.revocations_seq
                    info.last_seen = time.time()
                    if info.error:
                        log.error("agent %s refused a bundle: %s", info.agent_id, info.error)

        reader = asyncio.get_running_loop().create_task(read_status())
        try:
            current = pub.published.get(hello.service)
            if current is not None and current.version != hello.version:
                yield pb.ControlMessage(bundle=current.bundle)
            if pub.revocations_bundle is not None and pub.revocations.sequence != hello.revocations_seq:
                yield pb.ControlMessage(revocations=pub.revocations_bundle)
            while not self._stop.is_set():
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break  # the agent went away
                yield get.result()
        finally:
            reader.cancel()
            pub.unsubscribe(hello.service, queue)
            info.connected = False
            log.info("agent %s disconnected", info.agent_id)

    async def start(self) -> None:
        await self.publisher.scan()
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
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port(self.listen)
        await self._server.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._poll()))
        if self.admin_listen:
            from agent.server.admin import start_admin

            app = web.Application()
            app.router.add_get("/status", self._status)
            self._admin = await start_admin(app, self.admin_listen)
        log.info("control plane serving %s on %s", self.publisher.directory, self.listen)

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.publisher.status())

    async def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.poll_s)
            except TimeoutError:
                await self.publisher.scan()

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        if self._server is not None:
            await self._server.stop(0.5)
        if self._admin is not None:
            await self._admin.cleanup()
