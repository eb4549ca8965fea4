"""Assemble and run one agent: policy, engine, key refreshers, gRPC transport, admin port, audit writer."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from aiohttp import web

from agent.audit.alerts import AlertMonitor
from agent.audit.sinks import SinkSet
from agent.audit.stats import DecisionStats
from agent.audit.webhook import WebhookSender
from agent.audit.writer import JsonLinesAudit
from agent.authn.jwks import KeyStore
from agent.authn.replay import ReplayCache
from agent.authn.revocation import RevocationSet
from agent.config import load_policy
from agent.config.model import Policy, SharedStateConfig
from agent.controlplane.bundle import Revocations
from agent.controlplane.tls import ClientTlsFiles
from agent.engine import Engine
from agent.errors import ConfigErrors
from agent.ratelimit.shared import SharedState
from agent.server.admin import admin_app, start_admin
from agent.server.grpc_transport import GrpcTransport
from agent.server.limits import TransportLimits
from agent.server.native_transport import NativeTransport

if TYPE_CHECKING:
    from agent.authn.introspection import Introspector
    from agent.decision import DecisionListener
    from agent.tracing import Endpoint, Tracer

log = logging.getLogger("agent")


@dataclass(frozen=True)
class StandInIdentity:
    """Key stores and an introspection endpoint to use instead of the identity providers' own: `authz-agent bench`
    serves as `run` does, but with the throwaway keys and the answers its tokens were minted with. None in `run`."""

    stores: Callable[[Policy], dict[str, KeyStore]]
    introspector: Callable[[Introspector], Introspector]


class AgentServer:
    """One agent. The engine is swapped whole on reload; in-flight checks finish on the engine they began with."""

    def __init__(
        self,
        policy: Policy | None,
        listen: str,
        admin: str | None,
        audit_log: str | None,
        policy_path: str | None = None,
        reload_wait_s: float = 10.0,
        transport: str = "grpcio",
        token_cache_entries: int = 10_000,
        audit_format: str = "json",
        limits: TransportLimits | None = None,
        tracer: Tracer | None = None,
        audit_sinks: list[str] | None = None,
        audit_spool_dir: str | None = None,
        identity: StandInIdentity | None = None,
    ) -> None:
        self.identity = identity
        self.sinks = build_sinks(audit_sinks or [], audit_log, audit_spool_dir)
        self.audit = JsonLinesAudit(audit_log, encoding=audit_format, sinks=self.sinks)
        self.tracer = tracer  # spans per decision (--otlp-endpoint); None: no listener, nothing paid
        # Without a policy yet (a control plane not reached, no last good bundle) every check is refused
        # with 503 policy_unavailable and the agent is not ready.
        self.policy_loaded = policy is not None
        if policy is None:
            policy = Policy(service="", identity_providers=(), routes=(), version="")
        self.revocations = RevocationSet()
        self.stats = DecisionStats()
        self._alert_monitor: AlertMonitor | None = None
        self.webhook: WebhookSender | None = None
        self.status_sources: list[Callable[[], dict[str, object]]] = []
        self.token_cache_entries = token_cache_entries
        # Shared by every engine this server builds, so a reload never forgets a DPoP jti or a signature nonce.
        self.replay = ReplayCache(policy.dpop.replay_cache_entries)
        self.shared: SharedState | None = None
        self._shared_config: SharedStateConfig | None = None
        self._old_shared: list[SharedState] = []
        self.engine = self._stand_in(
            Engine.for_policy(
                policy,
                self.audit,
                token_cache_entries=token_cache_entries,
                replay=self.replay,
                shared=self._shared_for(policy),
                revocations=self.revocations,
                listeners=self._listeners_for(policy),
                wire_recall=transport == "native",
                stores=identity.stores(policy) if identity is not None else None,
            )
        )
        self.listen = listen
        self.admin_listen = admin
        self.policy_path = policy_path
        self.reload_wait_s = reload_wait_s
        self.policy_error: str | None = None  # why the file on disk is not the policy enforced, if it is not
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._refreshers: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self._admin: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()
        self.transport: GrpcTransport | NativeTransport
        if transport == "native":
            self.transport = NativeTransport(lambda: self.engine, listen, limits=limits)
        else:
            self.transport = GrpcTransport(lambda: self.engine, listen, limits=limits)

    def _stand_in(self, engine: Engine) -> Engine:
        """The engine with the stand-in introspection endpoint, when the server has one (`identity`)."""
        if self.identity is not None and engine.introspector is not None:
            engine.introspector = self.identity.introspector(engine.introspector)
        return engine

    def _listeners_for(self, policy: Policy) -> tuple[DecisionListener, ...]:
        """Who watches an engine's decisions: the counts, the alerts, and the spans when tracing is on."""
        listeners: tuple[DecisionListener, ...] = (self.stats, self._alerts_for(policy))
        if self.tracer is not None:
            listeners += (self.tracer.listener(policy),)
        return listeners

    def _alerts_for(self, policy: Policy) -> AlertMonitor:
        """The alert monitor for the policy's thresholds; its windows carry over reloads that keep them. Called
        after _shared_for, so it remembers networks in the Redis the policy names (if any)."""
        if self.sinks is not None:
            self.sinks.alert_cooldown_s = policy.alerts.cooldown_s
        if self._alert_monitor is None or self._alert_monitor.settings != policy.alerts:
            if self._alert_monitor is not None:
                self._alert_monitor.retire()
            self._alert_monitor = AlertMonitor(policy.alerts, self.raise_alert, self.shared)
        self._alert_monitor.shared = self.shared
        webhook = policy.alerts.webhook
        if webhook is None:
            self.webhook = None
        elif self.webhook is None or self.webhook.url != webhook:
            self.webhook = WebhookSender(webhook, policy.alerts.webhook_timeout_s)
        return self._alert_monitor

    def raise_alert(self, kind: str, detail: dict[str, object]) -> None:
        """An alert: a record in the audit chain, a metric, and a POST to the webhook when one is set."""
        self.stats.alerts[kind] += 1
        self.audit.alert(kind, detail)
        log.warning("alert %s: %s", kind, detail)
        if self.webhook is not None:
            self.webhook.submit({"alert": kind, "service": self.engine_service, **detail})

    @property
    def engine_service(self) -> str:
        return self.engine.policy.service if hasattr(self, "engine") else ""

    def _shared_for(self, policy: Policy) -> SharedState | None:
        """The Redis client for the policy's shared_state, kept across reloads unless the setting changes."""
        config = policy.shared_state
        if config != self._shared_config:
            if self.shared is not None:
                self._old_shared.append(self.shared)
            self.shared = None
            if config is not None:
                url = config.redis
                if config.password:
                    scheme, _, rest = url.partition("://")
                    url = f"{scheme}://:{quote(config.password, safe='')}@{rest}"
                self.shared = SharedState(url, config.timeout_s, f"authz:{policy.service}:", alert=self.raise_alert)
            self._shared_config = config
        return self.shared

    @property
    def port(self) -> int:
        return int(self.transport.port)

    def _start_refresher(self, store: KeyStore) -> None:
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(store.run(stop))
        self._refreshers[id(store)] = (stop, task)

    async def _stop_refresher(self, store: KeyStore) -> None:
        stop, task = self._refreshers.pop(id(store))
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()

    def _sink_dropped(self, loop: asyncio.AbstractEventLoop, detail: dict[str, object]) -> None:
        """(The audit writer thread.) A sink's spool was full: the alert is raised on the loop's thread."""
        with suppress(RuntimeError):  # the loop closed: the drop is still logged and counted
            loop.call_soon_threadsafe(self.raise_alert, "audit_sink_dropped", detail)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sinks is not None:
            self.sinks.on_drop = partial(self._sink_dropped, loop)
        for store in self.engine.stores.values():
            self._start_refresher(store)
        if self.tracer is not None:
            self.tracer.start()
        await self.transport.start()
        if self.admin_listen:
            from agent.server.metrics import metrics_text

            app = admin_app(
                lambda: self.engine,
                lambda: self.policy_error,
                lambda: self.ready,
                self.extra_status,
                lambda: metrics_text(lambda: self),
            )
            self._admin = await start_admin(app, self.admin_listen)
        self._tasks.append(loop.create_task(self._watch_ready()))
        self._tasks.append(loop.create_task(self._sweep_limits()))
        if self.policy_path:
            self._tasks.append(loop.create_task(self._watch_file()))
        log.info("serving ext_authz on %s (admin %s), policy %s", self.listen, self.admin_listen,
                 self.engine.policy.version)  # fmt: skip
        for warning in self.engine.policy.warning_lines():
            log.warning("%s", warning)

    async def reload(self) -> bool:
        """Load the policy file again; swap only when it is valid and its keys are loaded, else keep the old."""
        if self.policy_path is None:
            return False
        try:
            policy = await asyncio.to_thread(load_policy, self.policy_path)
        except ConfigErrors as e:
            self.policy_error = str(e)
            log.error("policy %s refused; still enforcing %s:\n%s", self.policy_path, self.engine.policy.version, e)
            return False
        return await self.install(policy, self.policy_path) is None

    async def install(self, policy: Policy, source: str) -> str | None:
        """Enforce a validated policy once its identity providers' keys are loaded; in-flight checks finish on
        the engine they began with. Returns why it was refused (the running policy then stays), else None."""
        async with self._reload_lock:
            old = self.engine
            if policy.version == old.policy.version and self.policy_loaded:
                self.policy_error = None
                return None
            # Identity providers configured exactly as before keep their keys and refresher.
            kept = {s.idp: s for s in old.stores.values()}
            stores: dict[str, KeyStore] = {}
            fresh: list[KeyStore] = []
            standing = self.identity.stores(policy) if self.identity is not None else {}
            for idp in policy.identity_providers:
                if not (idp.jwks_uri or idp.jwks_file or idp.discovery):
                    continue
                store = kept.get(idp)
                if store is None:
                    store = standing.get(idp.name) or KeyStore(idp)
                    fresh.append(store)
                stores[idp.name] = store
            new = Engine(
                policy,
                stores,
                self.audit,
                token_cache_entries=self.token_cache_entries,
                replay=self.replay,
                shared=self._shared_for(policy),
                revocations=self.revocations,
                listeners=self._listeners_for(policy),
                wire_recall=isinstance(self.transport, NativeTransport),
            )
            self._stand_in(new)
            await asyncio.gather(*(s.refresh() for s in fresh))
            deadline = asyncio.get_running_loop().time() + self.reload_wait_s
            while not all(s.ready for s in fresh) and asyncio.get_running_loop().time() < deadline:
                await asyncio.gather(*(s.refresh() for s in fresh if not s.ready))
                await asyncio.sleep(0.2)
            if not all(s.ready for s in fresh):
                why = "; ".join(f"{s.idp.name}: {s.last_error}" for s in fresh if not s.ready)
                self.policy_error = f"{source}: keys of new identity providers not loaded ({why})"
                log.error("policy %s refused; still enforcing %s: %s", source, old.policy.version, why)
                for s in fresh:
                    await s.close()
                return self.policy_error
            for s in fresh:
                self._start_refresher(s)
            new.adopt_limits(old)
            self.engine = new
            old.retire()  # its remembered allows answer nothing more, and what they answered is counted
            if isinstance(self.transport, NativeTransport):
                self.transport.engine_changed()
            self.policy_error = None
            retired = [s for s in old.stores.values() if s not in stores.values()]
            self._tasks.append(asyncio.get_running_loop().create_task(self._retire(retired, old)))
            self.policy_loaded = True
            log.info("policy %s now enforced (was %s)", policy.version, old.policy.version)
            for warning in policy.warning_lines():
                log.warning("%s", warning)
            return None

    async def _retire(self, stores: list[KeyStore], old: Engine, grace_s: float = 5.0) -> None:
        """Close what only the old engine used, once checks that began on it have had time to finish."""
        for s in stores:
            stop, _ = self._refreshers[id(s)]
            stop.set()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), grace_s)
        for s in stores:
            await self._stop_refresher(s)
        if old.introspector is not None:
            await old.introspector.close()

    async def _watch_file(self) -> None:
        assert self.policy_path is not None
        path = Path(self.policy_path)
        loop = asyncio.get_running_loop()
        hup = asyncio.Event()
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, hup.set)
        last = _stamp(path)
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(hup.wait(), 1.0)
            now = _stamp(path)
            if hup.is_set() or now != last:
                hup.clear()
                last = now
                await self.reload()

    @property
    def ready(self) -> bool:
        return self.policy_loaded and self.engine.ready

    def extra_status(self) -> dict[str, object]:
        """More for /readyz: the revocations in force, and what `status_sources` add (the control plane)."""
        out: dict[str, object] = {"revocations_sequence": self.revocations.sequence}
        if self.sinks is not None:
            out["audit_sinks"] = self.sinks.status()
        for source in self.status_sources:
            out.update(source())
        return out

    def apply_revocations(self, r: Revocations) -> None:
        self.revocations.replace(r.sequence, r.jti, r.by_subject(), frozenset(r.clients))
        log.info("revocations %d in force: %d tokens, %d subjects, %d clients", r.sequence, len(r.jti),
                 len(r.subjects), len(r.clients))  # fmt: skip

    async def _watch_ready(self) -> None:
        serving: bool | None = None
        while not self._stop.is_set():
            ready = self.ready
            if ready != serving:
                await self.transport.set_serving(ready)
                if ready:
                    log.info("ready: every identity provider's keys are loaded")
                serving = ready
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.1)

    async def _sweep_limits(self, every_s: float = 5.0) -> None:
        """Idle eviction: buckets that have refilled are dropped, so memory follows the active keys."""
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every_s)
            self.engine.sweep_limits()

    async def wait_ready(self, timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.ready:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        await self.transport.stop(grace)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for store in list(self.engine.stores.values()):
            if id(store) in self._refreshers:
                await self._stop_refresher(store)
        if self._admin is not None:
            await self._admin.cleanup()
        await self.engine.close()
        if self._alert_monitor is not None:
            await self._alert_monitor.close()
        for shared in [*self._old_shared, *([self.shared] if self.shared else [])]:
            await shared.close()
        if self.webhook is not None:
            await self.webhook.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.close, 5.0)  # the last spans flushed, bounded
        await asyncio.to_thread(self.audit.close)


def build_sinks(urls: list[str], audit_log: str | None, spool_dir: str | None) -> SinkSet | None:
    """The audit sinks and their spools: under spool_dir, else beside the audit log (`<audit-log>.spool/`).
    ValueError says what is wrong with a URL or where the spools would go."""
    if not urls:
        return None
    root = spool_root(audit_log, spool_dir)
    return SinkSet.build(urls, root)


def spool_root(audit_log: str | None, spool_dir: str | None) -> Path:
    if spool_dir:
        return Path(spool_dir)
    if not audit_log:
        raise ValueError("--audit-sink with the audit log on stdout needs --audit-spool-dir DIR for the spools")
    if os.path.exists(audit_log) and not os.path.isfile(audit_log):
        raise ValueError(f"--audit-log {audit_log} is not a regular file: give --audit-spool-dir DIR for the spools")
    return Path(audit_log + ".spool")


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


@dataclass(frozen=True)
class ControlPlaneOptions:
    address: str
    service: str
    state_dir: Path
    bundle_key: Path
    tls: ClientTlsFiles | None = None  # None: plain text (--insecure, loopback only)


def settle_heap() -> None:
    """What start-up made (modules, the compiled policy, protobuf descriptors: ~70k objects) lives as long as the
    agent: out of the collector's sight. Else every full collection walks it all, a pause of ~20 ms in the middle of
    some request's decision, and every middle one a fraction of a millisecond (the latency tail at low load)."""
    gc.collect()
    gc.freeze()


async def serve(
    policy: Policy | None,
    listen: str,
    admin: str | None,
    audit_log: str | None,
    policy_path: str | None,
    transport: str,
    token_cache_entries: int = 10_000,
    control: ControlPlaneOptions | None = None,
    audit_format: str = "json",
    limits: TransportLimits | None = None,
    tracing: tuple[Endpoint, float, float] | None = None,
    audit_sinks: list[str] | None = None,
    audit_spool_dir: str | None = None,
    identity: StandInIdentity | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight checks and stop. `identity`: see StandInIdentity."""
    tracer = None
    if tracing is not None:
        from agent.tracing import Tracer

        endpoint, ratio, max_rate = tracing
        tracer = Tracer(endpoint, ratio, max_rate=max_rate)
        log.info("tracing: spans to %s (OTLP/%s), new traces sampled at %g, at most %g spans a second", endpoint.url,
                 "gRPC" if endpoint.transport == "grpc" else "HTTP", ratio, max_rate)  # fmt: skip
    server = AgentServer(
        policy,
        listen,
        admin,
        audit_log,
        policy_path,
        transport=transport,
        token_cache_entries=token_cache_entries,
        audit_format=audit_format,
        limits=limits,
        tracer=tracer,
        audit_sinks=audit_sinks,
        audit_spool_dir=audit_spool_dir,
        identity=identity,
    )
    # Signals first: a SIGTERM that comes while the port is already open must drain, not kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    client_task: asyncio.Task[None] | None = None
    shared_task: asyncio.Task[None] | None = None
    tls_task: asyncio.Task[None] | None = None
    if control is not None:
        from agent.controlplane.bundle import load_verify_keys
        from agent.controlplane.client import PolicyClient
        from agent.controlplane.denials import DenialTally

        client = PolicyClient(
            control.address,
            control.service,
            control.state_dir,
            load_verify_keys(control.bundle_key),
            server.install,
            server.apply_revocations,
            lambda: server.shared,
            control.tls,
            DenialTally(lambda: server.stats.decisions),
        )
        server.status_sources.append(client.status)
        if await client.load_last_good():
            log.info("serving the last good bundle %s until the control plane answers", client.version)
        client_task = asyncio.get_running_loop().create_task(client.run(stop))
        shared_task = asyncio.get_running_loop().create_task(client.watch_shared(stop))
        tls_task = asyncio.get_running_loop().create_task(client.watch_tls(stop))
    settle_heap()
    await stop.wait()
    log.info("stopping: draining in-flight checks")
    await asyncio.gather(*(t for t in (client_task, shared_task, tls_task) if t is not None), return_exceptions=True)
    await server.stop()
