"""The console's aiohttp application (mounted at /ui on the control plane's admin port) and what pages share.

Pages are modules of this package with `setup(app)`: each adds its routes (relative to /ui) and appends its
entry to `app[NAV]`. Every response carries the console's security headers (a CSP without inline script or
style, no-store, no referrer to other origins); every POST must come from the console's own origin and carry
its session's CSRF token; a handler says who may call it with `@requires("viewer")` or `@requires("admin")`.
Templates are Jinja2 with autoescape on: what a page shows from agents, policies or users is escaped.
"""

from __future__ import annotations

import importlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web
from markupsafe import Markup

from agent.controlplane.console import ConsoleConfig
from agent.controlplane.console.auth import (
    ABSOLUTE_S,
    LOGIN_COOKIE,
    STATE_TTL_S,
    LoginError,
    LoginFlow,
    Session,
    Sessions,
    User,
    session_cookie,
)

if TYPE_CHECKING:
    from agent.controlplane.server import ControlPlane

log = logging.getLogger("agent.console")

PREFIX = "/ui"
HERE = Path(__file__).parent
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    # Not no-referrer: under it a browser sends `Origin: null` with a same-origin form POST, and the Origin
    # check below could not tell the console's own forms from a sandboxed attacker's. same-origin sends nothing
    # to any other origin (the IdP, a link out) and the true Origin to the console itself.
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
ROLES = ("viewer", "admin")  # each may do what the ones before it may
# The page modules, in nav order; one not (yet) in the package is skipped (REVOKE and DENIALS add theirs).
PAGES = ("fleet", "policies", "revocations", "denials", "explain")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class NavItem:
    path: str  # absolute, e.g. /ui/policies
    label: str
    role: str = "viewer"  # shown to users with this role


class Console:
    """The console's state: the control plane it shows, its settings, sessions and the OIDC login."""

    def __init__(self, cp: ControlPlane, config: ConsoleConfig) -> None:
        self.cp = cp
        self.config = config
        self.sessions = Sessions()
        self.flow = LoginFlow(config, lambda: self.base_url + PREFIX + "/callback")
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["when"] = _when
        self.env.filters["ago"] = _ago

    @property
    def base_url(self) -> str:
        """The console's external base URL (no trailing slash): --console-url, else the admin address."""
        if self.config.url:
            return self.config.url.rstrip("/")
        scheme = "https" if self.cp.channel is not None else "http"
        host = (self.cp.admin_listen or "127.0.0.1:0").rpartition(":")[0] or "127.0.0.1"
        return f"{scheme}://{host}:{self.cp.admin_port}"

    @property
    def origin(self) -> str:
        u = urlsplit(self.base_url)
        return f"{u.scheme}://{u.netloc}"

    @property
    def secure_cookies(self) -> bool:
        """Secure cookies, except on a plain-http loopback console (browsers would not send them there)."""
        return urlsplit(self.base_url).scheme != "http"


CONSOLE = web.AppKey("console", Console)
NAV = web.AppKey("nav", list[NavItem])


@dataclass(frozen=True)
class _Signed:
    """The request's session (found by the guard from its cookie), its id, and who it is."""

    sid: str
    session: Session


# aiohttp 3.13+ wants typed request keys (a str key warns); older ones take a str.
_SIGNED: Any = web.RequestKey("console.signed", _Signed) if hasattr(web, "RequestKey") else "console.signed"


def _signed(request: web.Request) -> _Signed | None:
    found = request.get(_SIGNED)
    return found if isinstance(found, _Signed) else None


def build_console(cp: ControlPlane, config: ConsoleConfig) -> web.Application:
    """The /ui application: login, logout, static files, and every page module present."""
    app = web.Application(middlewares=[_guard], client_max_size=256 * 1024)
    console = Console(cp, config)
    app[CONSOLE] = console
    app[NAV] = []
    app.router.add_get("/login", _login_page)
    app.router.add_get("/login/start", _login_start)
    app.router.add_get("/callback", _callback)
    app.router.add_post("/logout", _logout)
    app.router.add_static("/static", HERE / "static", append_version=False)

    async def close(_: web.Application) -> None:
        await console.flow.close()

    app.on_cleanup.append(close)
    for name in PAGES:
        module = f"{__package__}.{name}"
        try:
            page = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        page.setup(app)
    return app


# -- what pages use -----------------------------------------------------------------------------------------


def console_of(request: web.Request) -> Console:
    return request.app[CONSOLE]


def control_plane(request: web.Request) -> ControlPlane:
    return request.app[CONSOLE].cp


def maybe_user(request: web.Request) -> User | None:
    signed = _signed(request)
    return signed.session.user if signed is not None else None


def current_user(request: web.Request) -> User:
    """The logged-in user (a handler behind @requires always has one)."""
    user = maybe_user(request)
    if user is None:
        raise web.HTTPForbidden(text="not logged in")
    return user


def csrf_token(request: web.Request) -> str:
    signed = _signed(request)
    return signed.session.csrf if signed is not None else ""


def csrf_field(request: web.Request) -> Markup:
    """The hidden input every form of the console carries (its session's CSRF token)."""
    return Markup('<input type="hidden" name="csrf" value="{}">').format(csrf_token(request))


def requires(role: str) -> Callable[[Handler], Handler]:
    """A handler for users with `role` ("viewer" or "admin"): anyone else is sent to log in (a GET) or refused."""
    if role not in ROLES:
        raise ValueError(f"unknown console role {role!r}")

    def wrap(handler: Handler) -> Handler:
        @wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            user = maybe_user(request)
            if user is None:
                if request.method in ("GET", "HEAD"):
                    raise web.HTTPFound(PREFIX + "/login/start")
                return render(request, "error.html", status=403, title="Not logged in",
                              message="Your session has ended: sign in again.")  # fmt: skip
            if not user.has(role):
                return render(request, "error.html", status=403, title="Not allowed",
                              message=f"This needs the console's {role} role; you are a {user.role}.")  # fmt: skip
            return await handler(request)

        checked.console_role = role  # type: ignore[attr-defined]
        return checked

    return wrap


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    """A page from templates/ (autoescaped) with what base.html needs: the user, the nav, the CSRF field."""
    console = console_of(request)
    user = maybe_user(request)
    nav = [item for item in request.app[NAV] if user is not None and user.has(item.role)]
    page = console.env.get_template(template).render(
        request=request,
        user=user,
        nav=nav,
        csrf=csrf_field(request),
        path=request.path,
        **ctx,
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


def _when(ts: float | None) -> str:
    """A unix time as UTC to the second, e.g. 2026-11-23 00:57:02 UTC."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "never"


def _ago(ts: float | None) -> str:
    """How long ago a unix time was, in the largest whole unit: 4 s, 12 min, 3 h, 2 d."""
    if not ts:
        return "never"
    age = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if age >= size:
            return f"{int(age // size)} {unit} ago"
    return f"{int(age)} s ago"


# -- the guard on every /ui request -------------------------------------------------------------------------


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as e:
        e.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    console = console_of(request)
    if not console.cp.console_peer_ok(request):
        return web.Response(status=403, text="connect through the console's TLS port")
    sid = request.cookies.get(session_cookie(console.secure_cookies)[0])
    session = console.sessions.get(sid)
    if session is not None:
        assert sid is not None
        request[_SIGNED] = _Signed(sid, session)
    if request.method not in ("GET", "HEAD"):
        problem = await _write_refusal(request, console, session)
        if problem is not None:
            log.warning("console: %s %s refused: %s", request.method, request.path, problem)
            return render(request, "error.html", status=403, title="Refused", message=problem)
    return await handler(request)


async def _write_refusal(request: web.Request, console: Console, session: Session | None) -> str | None:
    """Why a write may not go on (another origin, no session, a missing or wrong CSRF token), or None."""
    origin = request.headers.get("Origin")
    if origin is not None:
        if origin != console.origin:
            return "the form was sent from another site"
    else:
        referer = request.headers.get("Referer", "")
        if not referer.startswith(console.origin + "/"):
            return "the form was sent from another site (or without Origin and Referer)"
    if session is None:
        return "no session: sign in again"
    if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return "not a form"
    form = await request.post()
    token = form.get("csrf")
    if not isinstance(token, str) or not secrets.compare_digest(token.encode(), session.csrf.encode()):
        return "the form's CSRF token is missing or not this session's: reload the page and try again"
    return None


# -- login and logout ---------------------------------------------------------------------------------------


def _sid(request: web.Request) -> str | None:
    signed = _signed(request)
    return signed.sid if signed is not None else None


async def _login_page(request: web.Request) -> web.Response:
    """Where a signed-out user lands: one button to the identity provider."""
    if maybe_user(request) is not None:
        raise web.HTTPFound(PREFIX + "/")
    signed_out = "signed_out" in request.query
    return render(
        request, "login.html", title="Sign in", signed_out=signed_out, issuer=console_of(request).config.issuer
    )


async def _login_start(request: web.Request) -> web.Response:
    """Redirect to the IdP. A GET any page can make (a link, an image, a redirect), so it changes no session: a
    signed-in user goes to the console (signing out is the CSRF-checked POST), and no session cookie is cleared
    (a cross-site page must not sign anyone out). The callback always opens a new session id (no fixation)."""
    console = console_of(request)
    if maybe_user(request) is not None:
        raise web.HTTPFound(PREFIX + "/")
    try:
        url, binding = await console.flow.begin(console.cp.console_source(request))
    except LoginError as e:
        return render(request, "error.html", status=e.status, title="Sign-in unavailable", message=e.message)
    response = web.HTTPFound(url)
    response.set_cookie(LOGIN_COOKIE, binding, max_age=int(STATE_TTL_S), path=PREFIX + "/callback", httponly=True,
                        secure=console.secure_cookies, samesite="Lax")  # fmt: skip
    raise response


async def _callback(request: web.Request) -> web.Response:
    """The IdP sends the browser back here (a cross-site navigation: only the Lax login cookie comes with it).
    On success the session cookie is set and a small same-site page moves on to /ui/, which the browser then
    requests with the SameSite=Strict cookie (a redirect from here would still count as cross-site)."""
    console = console_of(request)
    if "error" in request.query:
        error = request.query.get("error", "")[:64]
        return _clear_login(render(request, "error.html", status=400, title="Sign-in failed",
                                   message=f"The identity provider answered: {error}", retry=True))  # fmt: skip
    try:
        user = await console.flow.finish(request.query.get("state", ""), request.query.get("code", ""),
                                         request.cookies.get(LOGIN_COOKIE))  # fmt: skip
    except LoginError as e:
        return _clear_login(render(request, "error.html", status=e.status, title="Sign-in failed",
                                   message=e.message, retry=True))  # fmt: skip
    if not user.roles:
        log.warning("console: %s signed in without a console role: refused", user.subject)
        return _clear_login(render(request, "error.html", status=403, title="No console role",
                                   message=f"{user.name} has neither the {console.config.admin_role} nor the "
                                           f"{console.config.viewer_role} role at the identity provider.",
                                   retry=False))  # fmt: skip
    sid, _ = console.sessions.create(user)
    log.info("console: %s signed in as %s", user.subject, user.role)
    response = render(request, "callback.html", title="Signed in", next=PREFIX + "/")
    name, path = session_cookie(console.secure_cookies)
    response.set_cookie(name, sid, path=path, httponly=True, secure=console.secure_cookies,
                        samesite="Strict", max_age=int(ABSOLUTE_S))  # fmt: skip
    return _clear_login(response)


def _clear_login(response: web.Response) -> web.Response:
    response.del_cookie(LOGIN_COOKIE, path=PREFIX + "/callback")
    return response


@requires("viewer")
async def _logout(request: web.Request) -> web.Response:
    console = console_of(request)
    user = current_user(request)
    console.sessions.delete(_sid(request))
    log.info("console: %s signed out", user.subject)
    response = web.HTTPSeeOther(PREFIX + "/login?signed_out=1")
    name, path = session_cookie(console.secure_cookies)
    response.del_cookie(name, path=path)
    raise response
