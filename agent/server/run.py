"""Assemble and run one agent: policy, engine, key refreshers, gRPC transport, admin port, audit writer."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import suppress

from aiohttp import web

from agent.audit.writer import JsonLinesAudit
from agent.config.model import Policy
from agent.engine import Engine
from agent.server.admin import admin_app, start_admin
from agent.server.grpc_transport import GrpcTransport

log = logging.getLogger("agent")


class AgentServer:
    def __init__(self, policy: Policy, listen: str, admin: str | None, audit_log: str | None) -> None:
        self.audit = JsonLinesAudit(audit_log)
        self.engine = Engine.for_policy(policy, self.audit)
        self.listen = listen
        self.admin_listen = admin
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._admin: web.AppRunner | None = None
        self.transport = GrpcTransport(lambda: self.engine, listen)

    @property
    def port(self) -> int:
        return int(self.transport.port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for store in self.engine.stores.values():
            self._tasks.append(loop.create_task(store.run(self._stop)))
        await self.transport.start()
        if self.admin_listen:
            self._admin = await start_admin(admin_app(lambda: self.engine), self.admin_listen)
        self._tasks.append(loop.create_task(self._watch_ready()))
        log.info(
            "serving %s on %s (admin %s), policy %s",
            "ext_authz",
            self.listen,
            self.admin_listen,
            self.engine.policy.version,
        )

    async def _watch_ready(self) -> None:
        serving: bool | None = None
        while not self._stop.is_set():
            ready = self.engine.ready
            if ready != serving:
                await self.transport.set_serving(ready)
                if ready:
                    log.info("ready: every identity provider's keys are loaded")
                serving = ready
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.1)

    async def wait_ready(self, timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.engine.ready:
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
        if self._admin is not None:
            await self._admin.cleanup()
        await self.engine.close()
        await asyncio.to_thread(self.audit.close)


async def serve(policy: Policy, listen: str, admin: str | None, audit_log: str | None) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight checks and stop."""
    server = AgentServer(policy, listen, admin, audit_log)
    await server.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    log.info("stopping: draining in-flight checks")
    await server.stop()
