"""The Policies page (/ui/policies): per service the published policy, its lint warnings, its tests' results and
the history of published versions; /ui/policies/SERVICE/diff?a=SEQ&b=SEQ diffs any two kept versions.

Read from the publisher (what is published now, the last test run, a refusal) and its History (every version
published, on disk under --state-dir, else in memory since start). Policy text is shown escaped in <pre>.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.controlplane.console.app import NAV, NavItem, control_plane, render, requires
from agent.controlplane.history import Version

MAX_DIFF_LINES = 20_000  # a diff longer than this is cut (a policy is at most 8 MiB)


@dataclass
class ServicePolicy:
    name: str
    version: str | None  # None: nothing published
    sequence: int
    published_at: float
    text: str
    warnings: tuple[str, ...]
    tests: dict[str, Any] | None  # the published version's run (every case), None when untested
    error: str | None  # why the newest change was not published
    last_run: dict[str, Any] | None  # the last run, when it was of another (refused) version
    history: list[Version]  # newest first


def _text_of(bundle: pb.SignedBundle) -> str:
    return str(pb.BundlePayload.FromString(bundle.payload).policy_yaml)


def _services(request: web.Request) -> list[ServicePolicy]:
    pub = control_plane(request).publisher
    names = sorted(set(pub.published) | set(pub.errors) | set(pub.history.services()))
    out = []
    for name in names:
        p = pub.published.get(name)
        kept = pub.history.get(name, p.sequence) if p is not None else None
        report = pub.tests.get(name)
        tests = kept.tests if kept is not None else None
        if tests is None and p is not None and report is not None and report.version == p.version:
            tests = report.summary()
        last_run = report.summary() if report is not None and (p is None or report.version != p.version) else None
        out.append(
            ServicePolicy(
                name=name,
                version=p.version if p is not None else None,
                sequence=p.sequence if p is not None else 0,
                published_at=p.published_at if p is not None else 0.0,
                text=_text_of(p.bundle) if p is not None else "",
                warnings=p.warnings if p is not None else (),
                tests=tests,
                error=pub.errors.get(name),
                last_run=last_run,
                history=list(reversed(pub.history.versions(name))),
            )
        )
    return out


@requires("viewer")
async def policies(request: web.Request) -> web.Response:
    pub = control_plane(request).publisher
    return render(request, "policies.html", title="Policies", services=_services(request),
                  persistent=pub.history.persistent, validating=sorted(pub.status()["validating"]))  # fmt: skip


@dataclass
class Row:
    """One line of a side-by-side diff: line numbers and text of each side (None: no line there)."""

    kind: str  # same, changed, added, removed
    left_no: int | None
    left: str | None
    right_no: int | None
    right: str | None


def side_by_side(a: list[str], b: list[str]) -> list[Row]:
    rows: list[Row] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            rows.extend(Row("same", i1 + k + 1, a[i1 + k], j1 + k + 1, b[j1 + k]) for k in range(i2 - i1))
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            left = i1 + k if i1 + k < i2 else None
            right = j1 + k if j1 + k < j2 else None
            kind = "changed" if left is not None and right is not None else "removed" if left is not None else "added"
            rows.append(Row(kind, None if left is None else left + 1, None if left is None else a[left],
                            None if right is None else right + 1, None if right is None else b[right]))  # fmt: skip
    return rows


def _sequence(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and len(value) <= 19 else None


@requires("viewer")
async def diff(request: web.Request) -> web.Response:
    pub = control_plane(request).publisher
    service = request.match_info["service"]
    versions = pub.history.versions(service)
    if not versions:
        return render(request, "error.html", status=404, title="No such service",
                      message="No version of that service is kept.")  # fmt: skip
    a = _sequence(request.query.get("a")) or (versions[-2].sequence if len(versions) > 1 else versions[-1].sequence)
    b = _sequence(request.query.get("b")) or versions[-1].sequence
    view = "side" if request.query.get("view") == "side" else "unified"
    texts = {seq: pub.history.text(service, seq) for seq in (a, b)}
    missing = [seq for seq, text in texts.items() if text is None]
    if missing:
        return render(request, "error.html", status=404, title="No such version",
                      message=f"Sequence {missing[0]} of {service} is not kept (the newest 100 are).")  # fmt: skip
    left, right = (texts[a] or "").splitlines(), (texts[b] or "").splitlines()
    va, vb = pub.history.get(service, a), pub.history.get(service, b)
    assert va is not None and vb is not None
    unified = list(difflib.unified_diff(left, right, f"{service} #{a} ({va.version})", f"{service} #{b} ({vb.version})",
                                        lineterm="", n=3))  # fmt: skip
    lines = [(_kind(line), line) for line in unified[:MAX_DIFF_LINES]]
    rows = side_by_side(left, right)[:MAX_DIFF_LINES] if view == "side" else []
    return render(request, "policy_diff.html", title=f"{service}: diff", service=service, a=va, b=vb, view=view,
                  lines=lines, rows=rows, versions=list(reversed(versions)),
                  cut=len(unified) > MAX_DIFF_LINES)  # fmt: skip


def _kind(line: str) -> str:
    if line.startswith(("+++", "---")):
        return "file"
    if line.startswith("@@"):
        return "hunk"
    return {"+": "added", "-": "removed"}.get(line[:1], "same")


def setup(app: web.Application) -> None:
    app.router.add_get("/policies", policies)
    app.router.add_get("/policies/{service}/diff", diff)
    app[NAV].append(NavItem("/ui/policies", "Policies"))
