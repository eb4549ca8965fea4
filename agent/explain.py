"""One request decided with its trace: what `authz-agent check` prints and the console's Explain page shows.

Both go through here so that the page is exactly the command: the keys loaded as the agent loads them (a
provider whose keys did not load is said first), every step the engine took, then the decision's summary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.authn.jwks import KeyStore
from agent.decision import Decision, RequestView
from agent.engine import Engine


@dataclass(frozen=True)
class Explanation:
    key_problems: list[str]  # "identity provider corp: keys not loaded: ...", before any step
    steps: list[str]  # the engine's trace, in order
    decision: Decision
    summary: dict[str, object]  # what `check` prints as JSON

    def lines(self) -> list[str]:
        """The steps as `check` prints them."""
        return [*self.key_problems, *(f"- {step}" for step in self.steps)]


def parse_headers(lines: Iterable[str]) -> dict[str, str]:
    """'name: value' lines -> lower-case names; ValueError names a line without a colon (a blank line is skipped)."""
    headers: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"{line[:60]!r}: write it as 'name: value'")
        headers[name.strip().lower()] = value.strip()
    return headers


async def load_keys(stores: Mapping[str, KeyStore]) -> list[str]:
    """Fetch every provider's keys (joining a fetch under way); a line for each provider whose keys are not loaded."""
    problems = []
    for store in stores.values():
        await store.refresh()
        if not store.ready:
            problems.append(f"identity provider {store.idp.name}: keys not loaded: {store.last_error}")
    return problems


def summary(d: Decision) -> dict[str, object]:
    out: dict[str, object] = {"decision": d.outcome, "status": d.status, "reason": d.reason, "route": d.route}
    if d.allow_index is not None:
        out["allow_index"] = d.allow_index
    if d.deny_rule is not None:
        out["deny_rule"] = d.deny_rule
    if d.allowed:
        out["upstream_headers"] = dict(d.upstream_headers)
        out["removed_headers"] = d.remove_headers
    else:
        out["response_headers"] = dict(d.response_headers)
    return out


async def explain(engine: Engine, view: RequestView, key_problems: list[str] | None = None) -> Explanation:
    """Decide `view` with a trace; `key_problems` from load_keys (loaded here when not given)."""
    if key_problems is None:
        key_problems = await load_keys(engine.stores)
    trace: list[str] = []
    decision = await engine.check(view, trace)
    return Explanation(key_problems, trace, decision, summary(decision))
