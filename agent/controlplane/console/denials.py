"""The Denials page (/ui/denials): what the agents refused in the last hour, per service, route and reason.

Read from the control plane's DenialWindow (agent.controlplane.denials), fed by the agents' status reports. The
chart is drawn on the server by matplotlib as SVG and shown as a data: image (the CSP allows img-src data:, and an
SVG shown as an image runs nothing and needs no inline style in the page). Route and reason strings come from
agents: escaped when received, again by the template; the chart shows reasons only (reason codes by then).
"""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from agent.controlplane.console.app import NAV, NavItem, control_plane, render, requires
from agent.controlplane.denials import MINUTES, OTHER, Entry

TOP_REASONS = 6  # reasons drawn one by one in the chart; the rest are one "other reasons" band
# Colour-blind-safe (Okabe-Ito), then a grey for the rest.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#999999")


@dataclass
class ServiceDenials:
    name: str
    total: int
    rows: list[Entry]  # (route, reason, count), the largest first
    chart: str | None  # a data: URI of the SVG, None when there is nothing to draw
    published: bool


def chart_svg(minutes: list[int], series: dict[str, list[int]], title: str) -> bytes:
    """Denials per minute over the hour as stacked bars, the top reasons each in its colour."""
    from matplotlib.figure import Figure  # the console extra; no pyplot: no global state, safe in a thread
    from matplotlib.ticker import MaxNLocator

    ranked = sorted(series, key=lambda r: (-sum(series[r]), r))
    shown = ranked[:TOP_REASONS]
    rest = [sum(series[r][i] for r in ranked[TOP_REASONS:]) for i in range(len(minutes))]
    fig = Figure(figsize=(11.5, 3.0), dpi=100)
    ax = fig.add_subplot()
    x = list(range(len(minutes)))
    bottom = [0] * len(minutes)
    bands = [(r, series[r]) for r in shown] + ([("other reasons", rest)] if any(rest) else [])
    for i, (label, values) in enumerate(bands):
        colour = COLOURS[i] if label != "other reasons" else COLOURS[-1]
        ax.bar(x, values, bottom=bottom, width=0.85, label=label, color=colour, linewidth=0)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ticks = list(range(len(minutes) - 1, -1, -10))[::-1]
    ax.set_xticks(ticks, [datetime.fromtimestamp(minutes[i] * 60, UTC).strftime("%H:%M") for i in ticks])
    ax.set_xlim(-0.6, len(minutes) - 0.4)
    ax.set_ylabel("denials / minute")
    ax.set_xlabel("minute (UTC)")
    # Plain text: a service name is any printable text an agent sent, and matplotlib would read "$...$" in it as
    # mathtext (a bad one raises, a deep one recurses: the whole page would fail for everyone).
    ax.set_title(title, loc="left", fontsize=11, parse_math=False)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", color="#d9dee6", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.80, top=0.88, bottom=0.18)
    out = io.BytesIO()
    fig.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()


def _data_uri(svg: bytes) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode()


# Charts drawn on one page: the services with the most denials. A hostile agent on a plain-text channel can name up
# to MAX_SERVICES services, and each chart costs matplotlib tens of milliseconds; the rest link to `?service=`.
MAX_CHARTS = 12


def service_denials(name: str, totals: list[Entry], minutes: list[int], series: dict[str, list[int]],
                    published: bool, draw: bool = True) -> ServiceDenials:  # fmt: skip
    total = sum(n for _, _, n in totals)
    chart = None
    if total and draw:
        chart = _data_uri(chart_svg(minutes, series, f"{name}: denials per minute, last hour"))
    return ServiceDenials(name, total, totals, chart, published)


@requires("viewer")
async def denials(request: web.Request) -> web.Response:
    cp = control_plane(request)
    window = cp.publisher.denials
    published = set(cp.publisher.published)
    names = sorted(published | set(window.services()))
    wanted = request.query.get("service")
    if wanted in names:
        names = [wanted]
    inputs = [(n, window.totals(n), *window.per_minute(n), n in published) for n in names]
    inputs.sort(key=lambda i: (-sum(c for _, _, c in i[1]), i[0]))
    # matplotlib takes tens of milliseconds per chart: off the event loop that serves the agents, and only for the
    # MAX_CHARTS services with the most denials.
    services = await asyncio.to_thread(lambda: [service_denials(*i, draw=k < MAX_CHARTS) for k, i in enumerate(inputs)])
    status = window.status()
    return render(request, "denials.html", title="Denials", services=services, minutes=MINUTES, other=OTHER,
                  rejected=status["rejected_entries"], wanted=wanted if wanted in names else None,
                  max_charts=MAX_CHARTS)  # fmt: skip


def setup(app: web.Application) -> None:
    app.router.add_get("/denials", denials)
    app[NAV].append(NavItem("/ui/denials", "Denials"))
