"""The admin HTTP port: /healthz (alive) and /readyz (policy compiled and every issuer's keys loaded)."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from agent.engine import Engine


def admin_app(
    engine: Callable[[], Engine],
    policy_error: Callable[[], str | None],
    ready: Callable[[], bool] | None = None,
    extra: Callable[[], dict[str, object]] | None = None,
    metrics: Callable[[], bytes] | None = None,
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        e = engine()
        is_ready = ready() if ready is not None else e.ready
        body: dict[str, object] = {
            "ready": is_ready,
            "policy_version": e.policy.version,
            "policy_error": policy_error(),
            "identity_providers": {name: s.status() for name, s in e.stores.items()},
        }
        if e.shared is not None:
            # Redis away degrades shared limits and replay caches to local ones; the agent still decides, so
            # it is reported here rather than failing the readiness probe.
            body["shared_state"] = {"up": e.shared.up, "errors": e.shared.errors, "fallbacks": e.shared.fallbacks}
        if extra is not None:
            body.update(extra())
        return web.Response(
            status=200 if is_ready else 503, text=json.dumps(body) + "\n", content_type="application/json"
        )

    async def metrics_page(_: web.Request) -> web.Response:
        assert metrics is not None
        return web.Response(body=metrics(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics is not None:
        app.router.add_get("/metrics", metrics_page)
    return app


async def start_admin(app: web.Application, listen: str) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port))
    await site.start()
    return runner
