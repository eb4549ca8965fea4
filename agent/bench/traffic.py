"""The bench's traffic: each `policy test` case is a request class, its credentials made as `policy test` makes
them (agent.policytest: tokens minted once with the throwaway keys at the real time; a fresh DPoP proof or RFC 9421
signature per request where the case needs one), mixed in proportion to the cases' `weight:`.

Requests that need a fresh proof or signature are all made before the clock starts, in the order they will be
sent: making them must not be measured, and each is single-use (the agent keeps replay caches).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.config.model import Policy
from agent.decision import RequestView
from agent.engine import Engine
from agent.policytest.cases import Case, TestFile
from agent.policytest.runner import ClientRequest, Minted, Run

Item = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]  # agent._loadgen's: method, path, headers, body
CHECK_PATH = b"/envoy.service.auth.v3.Authorization/Check"
GRPC_HEADERS = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
ENVOY_PEER = "127.0.0.1"  # the address Envoy sees the generator's connections come from
BLOCK = 10_000  # positions of one shuffled block of the mix; longer orders repeat it


@dataclass
class RequestClass:
    """One case of the file as traffic: its share, the status every answer must have, and how its requests are
    made (one request sent again and again, or a new one each time)."""

    case: Case
    index: int
    expect_status: int
    fresh: bool  # a fresh DPoP proof or signature for every request
    minted: Minted | None
    static: Item | None = None  # the one request, when not fresh
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.case.name


@dataclass
class Made:
    """The requests of one phase: what the generator sends (`items`, `order`) and each position's class."""

    items: list[Item]
    order: list[int]
    classes: list[int]  # per position
    ran_out: str | None = None  # which class's pre-made requests ran out (the order ends there), and why


def secrets_of(policy: Policy) -> dict[str, Any]:
    """What the agent the bench starts must share with the bench: every HMAC client's keys (a stand-in's too) and
    the DPoP nonce secret. Handed over a pipe, never on a command line, in a file or in a log."""
    nonce = policy.dpop.nonce_secret
    return {
        "hmac": {c.name: [base64.b64encode(k).decode("ascii") for k in c.keys] for c in policy.hmac_clients},
        "nonce_secret": base64.b64encode(nonce).decode("ascii") if nonce is not None else None,
    }


def with_secrets(policy: Policy, secrets: dict[str, Any]) -> Policy:
    """The policy with the bench's HMAC keys and DPoP nonce secret (see secrets_of)."""
    hmac: dict[str, list[str]] = secrets.get("hmac") or {}
    clients = tuple(
        dataclasses.replace(c, keys=tuple(base64.b64decode(k) for k in hmac[c.name])) if c.name in hmac else c
        for c in policy.hmac_clients
    )
    dpop = policy.dpop
    if secrets.get("nonce_secret"):
        dpop = dataclasses.replace(dpop, nonce_secret=base64.b64decode(secrets["nonce_secret"]))
    return dataclasses.replace(policy, hmac_clients=clients, dpop=dpop)


def check_request(view: RequestView) -> bytes:
    """The CheckRequest Envoy sends for `view`, as agent.server.envoy_wire reads it."""
    from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext

    req = ext.CheckRequest()
    attributes = req.attributes
    attributes.source.address.socket_address.address = view.source
    attributes.source.address.socket_address.port_value = 40000
    if view.certificate:
        attributes.source.certificate = view.certificate
    attributes.destination.address.socket_address.address = "127.0.0.1"
    attributes.destination.address.socket_address.port_value = 10000
    http = attributes.request.http
    http.id = str(uuid.uuid4().int % (1 << 63))
    http.method, http.path, http.host, http.scheme, http.protocol = (
        view.method, view.path, view.host, view.scheme, "HTTP/2"
    )  # fmt: skip
    for name, value in view.headers.items():
        http.headers[name] = value
    if view.body:
        http.raw_body = view.body  # envoy-config sends bodies packed as bytes
        http.size = len(view.body)
    return bytes(req.SerializeToString())  # the generator frames it (gRPC length prefix)


def envoy_item(request: ClientRequest) -> Item:
    """The client's request as sent to Envoy (h2c; the generator sends :scheme http and one :authority)."""
    headers = [(k.encode(), v.encode()) for k, v in request.headers.items() if k != "content-length"]
    return (request.method.encode(), request.path.encode(), headers, request.body)


def mix(weights: Sequence[float], n: int, rng: random.Random) -> list[int]:
    """`n` class indices in proportion to `weights` (exactly, by largest remainder, within each block of BLOCK
    positions), shuffled; orders longer than a block repeat it."""
    size = min(n, BLOCK)
    total = sum(weights)
    exact = [w / total * size for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    block = [i for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(block)
    reps = -(-n // size) if size else 0
    return (block * reps)[:n]


class Traffic:
    """The cases of one run as request classes, for the agent directly (gRPC CheckRequests) or through Envoy
    (the clients' HTTP requests). Tokens are minted once, here, at the real current time."""

    def __init__(self, tests: TestFile, policy: Policy, through_envoy: bool) -> None:
        self.tests = tests
        self.policy = policy
        self.through_envoy = through_envoy
        self.run = Run(policy)
        # Issues DPoP nonces as the agent's engine does: the two share the nonce secret (secrets_of).
        self.engine = Engine(policy, {})
        self.answers: dict[str, dict[str, Any]] = {}  # opaque tokens' introspection answers
        self.notes: list[str] = []
        self.classes: list[RequestClass] = []
        self.left_out: list[RequestClass] = []  # through Envoy: cases whose answer depends on their source address
        # Every key, token, proof and signature made or shared with the agent: tests grep every output for them.
        shared = secrets_of(policy)
        self.secret_values: set[str] = {k for keys in shared["hmac"].values() for k in keys}
        if shared["nonce_secret"]:
            self.secret_values.add(shared["nonce_secret"])
        # Through Envoy the generator sends every request over h2c (:scheme http) with one :authority, from
        # ENVOY_PEER: the cases' own host (the most common one), scheme and source are what Envoy passes on.
        hosts = Counter(c.host or policy.service for c in tests.cases)
        self.authority = hosts.most_common(1)[0][0] if hosts else policy.service

    def jwks(self) -> dict[str, dict[str, Any]]:
        """The public keys each provider's stand-in key store holds in the agent."""
        return {
            idp.name: self.run.keys.jwks(idp.algorithms)
            for idp in self.policy.identity_providers
            if idp.jwks_uri or idp.jwks_file or idp.discovery
        }

    def prepare(self) -> None:
        """Decide every case once before the run, in this process, at the file's time and at the real time (and
        from Envoy's peer address when through Envoy), to say what will show as mismatches and why; then mint."""
        asyncio.run(self._preflight())
        now = time.time()
        for cls in self.classes:
            if cls.case.token is not None:
                cls.minted = self.run.mint(cls.case.token, now, self.answers)
                self.secret_values.add(cls.minted[0])
            if not cls.fresh:
                cls.static = self.item(cls, now)

    async def _preflight(self) -> None:
        tests = self.tests
        for i, case in enumerate(tests.cases):
            at = case.at or tests.at
            now = await self.run.case(case, None)
            status = case.expect.status
            notes = []
            if status is None:
                status = now.status
                notes.append(f"case {case.name!r} (line {case.line}) expects no status: under load its answers are "
                             f"checked against the status the engine gave it before the run, {now.status}")  # fmt: skip
            if case.repeat > 1:
                notes.append(f"case {case.name!r} (line {case.line}) has repeat: {case.repeat}: under load every one "
                             f"of its requests is held to the status its last one expects, {status}")  # fmt: skip
            if at is not None:
                then = await self.run.case(case, at)
                if then.status != now.status:
                    notes.append(
                        f"case {case.name!r} (line {case.line}) depends on the time: at the file's at: "
                        f"({at.isoformat()}) the engine answers {then.status}, at the real time {now.status}; the "
                        "bench makes credentials at the real time, so it shows as mismatches"
                    )
            fresh = bool(case.token is not None and case.token.dpop) or case.signed_by is not None
            cls = RequestClass(case, i, status, fresh, None, notes=notes)
            if self.through_envoy:
                sent = dataclasses.replace(case, source=ENVOY_PEER, scheme="http", host=self.authority)
                changed = [f"{what} {theirs} instead of {ours}" for what, ours, theirs in (
                    ("from", case.source, ENVOY_PEER), ("over", case.scheme, "http"),
                    ("to host", case.host or self.policy.service, self.authority)) if ours != theirs]  # fmt: skip
                there = await self.run.case(sent, None) if changed else now
                if there.status != now.status:
                    self.notes.append(
                        f"case {case.name!r} (line {case.line}) is answered {there.status}, not {now.status}, as the "
                        f"bench sends it to Envoy ({', '.join(changed)}); left out of the --through-envoy run"
                    )
                    self.left_out.append(cls)
                    continue
                cls.case = sent
            self.notes.extend(notes)
            self.classes.append(cls)

    def item(self, cls: RequestClass, now: float) -> Item:
        """One request of the class, its proof or signature made for the time `now`."""
        request = self.run.client_request(cls.case, self.engine, now, cls.minted)
        for name in ("dpop", "signature"):
            if name in request.headers:
                self.secret_values.add(request.headers[name])
        if self.through_envoy:
            return envoy_item(request)
        return (b"POST", CHECK_PATH, list(GRPC_HEADERS), check_request(request.delivered(self.run.bodies)))

    def make(
        self,
        n: int,
        seed: int,
        when: Callable[[int], float] | None = None,
        budget: tuple[int, float] | None = None,
        envoy_alone: bool = False,
    ) -> Made:
        """The requests of a phase of at most `n` positions, mixed by weight. `when(k)`: the time position k's
        proof or signature is made for (default: when it is made). `budget` (count, seconds) bounds the fresh ones
        made: the order then ends before the first position whose request was not made."""
        rng = random.Random(seed)  # noqa: S311 - the order of the mix, not a secret
        classes = self.classes
        kinds = mix([c.case.weight for c in classes], n, rng)
        items: list[Item] = []
        static_index: dict[int, int] = {}
        for ci, c in enumerate(classes):
            if not c.fresh or envoy_alone:
                assert c.static is not None or envoy_alone
                static_index[ci] = len(items)
                items.append(c.static if c.static is not None else self.item(c, time.time()))
        order: list[int] = []
        started = time.monotonic()
        ran_out = None
        limit_n, limit_s = budget if budget is not None else (n, math.inf)
        made = 0
        for k, ci in enumerate(kinds):
            where = static_index.get(ci)
            if where is None:
                if made >= limit_n or (made % 256 == 0 and time.monotonic() - started > limit_s):
                    why = f"{made} requests" if made >= limit_n else f"{limit_s:g} s of making"
                    ran_out = f"{classes[ci].name!r} ran out of pre-made proofs/signatures ({why})"
                    kinds = kinds[:k]
                    break
                where = len(items)
                items.append(self.item(classes[ci], when(k) if when is not None else time.time()))
                made += 1
            order.append(where)
        return Made(items, order, kinds[: len(order)], ran_out)
