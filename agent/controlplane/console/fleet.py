"""The Fleet page (/ui/): every service, the version published for it, and each of its agents as it reported.

Read from the control plane's own state (what /status shows): nothing here is fetched from an agent. An agent's
id, version and error are what the agent sent (escaped once when received, and again by the template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.controlplane.console.app import NAV, NavItem, control_plane, render, requires


@dataclass
class AgentRow:
    agent_id: str
    identity: str
    peer: str
    connected: bool
    version: str
    on_version: bool  # enforces what is published for its service now
    last_seen: float
    error: str
    revocations_sequence: int
    revocations_current: bool


@dataclass
class ServiceRow:
    name: str
    version: str | None = None  # published; None: nothing published yet
    sequence: int = 0
    published_at: float | None = None
    error: str | None = None  # why the newest file is not published
    warnings: list[str] = field(default_factory=list)
    tests: dict[str, Any] | None = None
    agents: list[AgentRow] = field(default_factory=list)

    @property
    def connected(self) -> int:
        return sum(a.connected for a in self.agents)

    @property
    def current(self) -> int:
        return sum(a.connected and a.on_version for a in self.agents)

    @property
    def reporting_errors(self) -> int:
        return sum(bool(a.error) for a in self.agents)


def fleet_rows(status: dict[str, Any]) -> list[ServiceRow]:
    """The control plane's status as one row per service with its agents (connected first, then by id)."""
    services: dict[str, ServiceRow] = {}
    for name, s in status.get("services", {}).items():
        services[name] = ServiceRow(name, s["version"], s["sequence"], s["published_at"], s.get("error"),
                                    list(s.get("warnings") or []), s.get("tests"))  # fmt: skip
    for name, s in status.get("refused", {}).items():
        services.setdefault(name, ServiceRow(name, error=s.get("error"), tests=s.get("tests")))
    revocations = int(status.get("revocations", {}).get("sequence", 0))
    for a in status.get("agents", []):
        row = services.setdefault(a["service"], ServiceRow(a["service"]))
        row.agents.append(AgentRow(
            agent_id=a["agent_id"], identity=a.get("identity") or "", peer=a.get("peer", ""),
            connected=bool(a["connected"]), version=a.get("version", ""),
            on_version=row.version is not None and a.get("version") == row.version,
            last_seen=float(a.get("last_seen", 0.0)), error=a.get("error", ""),
            revocations_sequence=int(a.get("revocations_sequence", 0)),
            revocations_current=int(a.get("revocations_sequence", 0)) >= revocations,
        ))  # fmt: skip
    for row in services.values():
        row.agents.sort(key=lambda r: (not r.connected, r.agent_id))
    return [services[name] for name in sorted(services)]


@requires("viewer")
async def fleet(request: web.Request) -> web.Response:
    status = control_plane(request).status()
    rows = fleet_rows(status)
    agents = [a for r in rows for a in r.agents]
    summary = {
        "services": len(rows),
        "connected": sum(a.connected for a in agents),
        "current": sum(a.connected and a.on_version for a in agents),
        "errors": sum(bool(a.error) for a in agents),
        "revocations": status.get("revocations", {}).get("sequence", 0),
        "revocations_error": status.get("revocations", {}).get("error"),
    }
    return render(request, "fleet.html", title="Fleet", services=rows, summary=summary,
                  validating=status.get("validating", []), secure=not status["channel"]["insecure"])  # fmt: skip


def setup(app: web.Application) -> None:
    app.router.add_get("/", fleet)
    app[NAV].append(NavItem("/ui/", "Fleet"))
