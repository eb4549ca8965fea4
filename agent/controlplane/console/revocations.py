"""The Revocations page (/ui/revocations): what is revoked now (tokens by jti, subjects, clients), who revoked each
and when, and the console's action log; admins get the forms that revoke a token, a subject or a client.

A revocation goes through Publisher.revoke: the values are checked (bounded, printable), revocations.yaml is
rewritten atomically, the new list is pushed to every connected agent at once, and the action is recorded with
the signed-in user's subject and name in the hash-chained action log. Viewers read; any POST of theirs is 403
(the @requires guard), whatever form they forge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from agent.controlplane.actions import Actor, target_key
from agent.controlplane.console.app import NAV, NavItem, control_plane, current_user, render, requires
from agent.controlplane.revocations import MAX_CLIENT_ID, MAX_ISSUER, MAX_JTI, MAX_REASON, MAX_SUBJECT

log = logging.getLogger("agent.console")

KINDS = {"jti": "token", "subject": "subject", "client": "client"}
DONE = {
    kind: f"The {what} is revoked and the new list was sent to every connected agent." for kind, what in KINDS.items()
}
FIELDS = {"jti": ("jti",), "subject": ("issuer", "subject"), "client": ("client_id", "issuer")}
LIMITS = {
    "jti": MAX_JTI,
    "issuer": MAX_ISSUER,
    "subject": MAX_SUBJECT,
    "client_id": MAX_CLIENT_ID,
    "reason": MAX_REASON,
}
SHOWN_ACTIONS = 100


@dataclass
class Entry:
    """One thing revoked now, with the console action that revoked it (None: written into the file by hand)."""

    kind: str
    fields: dict[str, str]
    when: float | None  # subjects: tokens issued before this time
    action: dict[str, Any] | None


def _shown(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A record as the page shows it: its ISO time also as unix seconds (the console's `when` filter)."""
    if record is None:
        return None
    try:
        at = datetime.fromisoformat(str(record.get("time"))).timestamp()
    except ValueError:
        at = None
    return {**record, "at": at}


def _entries(request: web.Request) -> list[Entry]:
    pub = control_plane(request).publisher
    r = pub.revocations
    by = {key: _shown(record) for key, record in pub.actions.by_target.items()}
    out = [Entry("jti", {"jti": j}, None, by.get(target_key("revoke_jti", {"jti": j}))) for j in sorted(r.jti)]
    for issuer, subject, before in r.subjects:
        target = {"issuer": issuer, "subject": subject}
        out.append(Entry("subject", target, float(before), by.get(target_key("revoke_subject", target))))
    for issuer, client_id in r.clients:
        target = {"client_id": client_id, "issuer": issuer}
        out.append(Entry("client", target, None, by.get(target_key("revoke_client", target))))
    return out


def _page(request: web.Request, status: int = 200, error: str | None = None,
          form: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    pub = control_plane(request).publisher
    done = DONE.get(request.query.get("done", ""))
    return render(request, "revocations.html", status=status, title="Revocations", entries=_entries(request),
                  sequence=pub.revocations.sequence, file_error=pub.revocations_error or None,
                  actions=[_shown(a) for a in pub.actions.newest(SHOWN_ACTIONS)],
                  persistent=pub.actions.persistent, limits=LIMITS, done=done, error=error, form=form or {},
                  kinds=KINDS)  # fmt: skip


@requires("viewer")
async def revocations(request: web.Request) -> web.Response:
    return _page(request)


@requires("admin")
async def revoke(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    if kind not in KINDS:
        raise web.HTTPNotFound()
    form = await request.post()
    values = {name: str(form.get(name, "")).strip() for name in (*FIELDS[kind], "reason")}
    reason = values.pop("reason")
    user = current_user(request)
    try:
        control_plane(request).publisher.revoke(Actor(user.subject, user.name), kind, values, reason)
    except (ValueError, OSError) as e:
        log.warning("console: %s could not revoke a %s: %s", user.subject, KINDS[kind], e)
        return _page(request, 400, f"Not revoked: {e}", {**values, "kind": kind, "reason": reason})
    raise web.HTTPSeeOther(f"/ui/revocations?done={kind}")


def setup(app: web.Application) -> None:
    app.router.add_get("/revocations", revocations)
    app.router.add_post("/revocations/{kind}", revoke)
    app[NAV].append(NavItem("/ui/revocations", "Revocations"))
