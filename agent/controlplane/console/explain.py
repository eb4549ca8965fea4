"""The Explain page (/ui/explain): "why was this denied", a request decided against a service's current policy.

The form takes a request (method, path, host, the caller's address, headers one per line) and a token in a
password field; the answer is exactly what `authz-agent check` prints for it (agent.controlplane.explainer). What
was pasted is never stored or logged and never sent back: the headers and token fields come back empty, the token
is cut out of the answer, and every console response is no-store. Explanations are rate limited per user.
"""

from __future__ import annotations

import json

from aiohttp import web

from agent.controlplane.console.app import CONSOLE, NAV, NavItem, current_user, render, requires
from agent.controlplane.explainer import PER_MINUTE, Explainer, ExplainRefused, ExplainResult, RateLimited

EXPLAINER = web.AppKey("explainer", Explainer)
# A step that refused or failed, and one that let the request through: shown in colour.
_FAILED = ("failed", "refused", "keys not loaded", "no route matches", "not an upper-case", "not in normal form",
           "double-encoded", "internal error")  # fmt: skip


def step_class(line: str) -> str:
    if line.startswith("deny rule") and line.endswith("holds"):
        return "fail"
    if any(word in line for word in _FAILED):
        return "fail"
    if line.endswith("holds") or "satisfied" in line or "is public" in line:
        return "pass"
    return ""


def _form(values: dict[str, str] | None = None) -> dict[str, str]:
    """What the form shows again: never the headers or the token."""
    v = values or {}
    return {
        "service": v.get("service", ""),
        "method": v.get("method", "GET") or "GET",
        "path": v.get("path", "/"),
        "host": v.get("host", ""),
        "source": v.get("source", "127.0.0.1") or "127.0.0.1",
    }


def _page(request: web.Request, status: int = 200, result: ExplainResult | None = None, error: str | None = None,
          values: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    explainer = request.app[EXPLAINER]
    services = explainer.services()
    form = _form(values)
    if not form["service"] and services:
        form["service"] = services[0]
    texts = [line.removeprefix("- ") for line in result.lines] if result is not None else []
    steps = [(text, step_class(text)) for text in texts]
    summary = json.dumps(result.summary, indent=2) if result is not None else ""
    return render(request, "explain.html", status=status, title="Explain", services=services, form=form,
                  result=result, steps=steps, summary=summary, error=error, per_minute=PER_MINUTE)  # fmt: skip


@requires("viewer")
async def explain_form(request: web.Request) -> web.Response:
    return _page(request, values={"service": request.query.get("service", "")})


@requires("viewer")
async def explain_post(request: web.Request) -> web.Response:
    """(CSRF and origin checked by the console's guard before this runs.)"""
    form = await request.post()
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    shown = {k: values.get(k, "") for k in ("service", "method", "path", "host", "source")}
    explainer = request.app[EXPLAINER]
    try:
        explainer.admit(current_user(request).subject)
        result = await explainer.explain(
            values.get("service", ""),
            values.get("method", "GET"),
            values.get("path", ""),
            values.get("headers", ""),
            values.get("token", ""),
            values.get("host", ""),
            values.get("source", "127.0.0.1") or "127.0.0.1",
        )
    except RateLimited as e:
        return _page(request, 429, error=str(e), values=shown)
    except ExplainRefused as e:
        return _page(request, 400, error=str(e), values=shown)
    return _page(request, result=result, values=shown)


def setup(app: web.Application) -> None:
    app.router.add_get("/explain", explain_form)
    app.router.add_post("/explain", explain_post)
    app[NAV].append(NavItem("/ui/explain", "Explain"))
    app[EXPLAINER] = Explainer(app[CONSOLE].cp.publisher)

    async def close(app: web.Application) -> None:
        await app[EXPLAINER].close()

    app.on_cleanup.append(close)
