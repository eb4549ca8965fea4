"""The demo upstream: answers with what it was asked and which x-authz-* headers Envoy passed to it."""

from __future__ import annotations

from aiohttp import web


async def _echo(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "app": "orders (demo upstream)",
            "method": request.method,
            "path": request.path,
            "from_agent": {k: v for k, v in request.headers.items() if k.lower().startswith("x-authz-")},
            "authorization_reached_app": "authorization" in request.headers,
        }
    )


def demo_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def start_site(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    return runner, server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
