"""What one refused hostile DPoP proof costs the engine (issue 11, items 4 and 5); prints one JSON line.

Run: `PYTHONPATH=. python -m benchmarks.dpop_refusal [N]`. Each case decides N requests in process
(`engine.decide`, one CPU, no I/O) with proofs made before the clock starts, and reports the median
microseconds per decision and the reasons given. The API it uses (a policy file, `Engine.decide`) is the
same before and after the fix, so the same script measures both (run it from another tree with PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from agent.config import load_policy
from agent.decision import RequestView
from agent.engine import Engine
from tests.keys import b64, claims, dpop_proof, jkt, jwks, make_key, mint

HOST = "api.example.test"
POLICY = """\
version: 1
service: bench
identity_providers:
  corp:
    issuer: https://idp.example.test
    jwks_file: jwks.json
    audiences: [orders-api]
    algorithms: [ES256]
dpop: {algorithms: [ES256, RS256]}
routes:
  - name: orders
    match: {methods: [GET], path: /v1/orders}
    authn: [jwt]
    allow: {}
default: deny
"""


def hostile_rsa_jwk() -> dict[str, str]:
    """An RSA-3072 public key with a ~3,060-bit odd public exponent: every signature check is a long modexp."""
    n = rsa.generate_private_key(65537, 3072).public_key().public_numbers().n
    e = secrets.randbits(3060) | (1 << 3059) | 1
    return {"kty": "RSA", "n": b64(n.to_bytes(384, "big")), "e": b64(e.to_bytes((e.bit_length() + 7) // 8, "big"))}


def hostile_proof(jwk: dict[str, str], token: str, vary_header: bool) -> str:
    """A proof with the hostile key in its header and a signature below n that does not verify."""
    header: dict[str, Any] = {"typ": "dpop+jwt", "alg": "RS256", "jwk": dict(jwk)}
    if vary_header:  # a new header text each time: no cache of parsed headers helps
        header["jwk"]["kid"] = secrets.token_hex(8)
    body = {
        "jti": secrets.token_hex(8),
        "htm": "GET",
        "htu": f"https://{HOST}/v1/orders",
        "iat": int(time.time()),
        "ath": b64(hashlib.sha256(token.encode()).digest()),
    }
    si = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    signature = bytes(1) + secrets.token_bytes(383)  # below n, so the check runs the whole modexp
    return f"{si}.{b64(signature)}"


def run(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        idp, client, thief = make_key("ES256", "idp"), make_key("ES256", "client"), make_key("ES256", "thief")
        (Path(d) / "jwks.json").write_text(json.dumps(jwks(idp)))
        (Path(d) / "policy.yaml").write_text(POLICY)
        engine = Engine.for_policy(load_policy(Path(d) / "policy.yaml"))
        for s in engine.stores.values():
            assert asyncio.run(_fetched(s))
        hostile = hostile_rsa_jwk()
        bound_to_client = mint(idp, claims(cnf={"jkt": jkt(client)}))
        bound_to_hostile = mint(idp, claims(cnf={"jkt": _thumb(hostile)}))
        url = f"https://{HOST}/v1/orders"
        makers: dict[str, tuple[str, Callable[[str], str]]] = {
            "valid proof (allowed)": (bound_to_client, lambda t: dpop_proof(client, "GET", url, t)),
            "ordinary bad proof: another ES256 key": (bound_to_client, lambda t: dpop_proof(thief, "GET", url, t)),
            "hostile RSA key, token bound to another key": (
                bound_to_client,
                lambda t: hostile_proof(hostile, t, False),
            ),
            "hostile RSA key, new header each time": (bound_to_client, lambda t: hostile_proof(hostile, t, True)),
            "hostile RSA key, token bound to it": (bound_to_hostile, lambda t: hostile_proof(hostile, t, False)),
        }
        out: dict[str, Any] = {}
        for name, (token, make) in makers.items():
            views = [
                RequestView(
                    "GET", "/v1/orders", HOST, {"authorization": f"DPoP {token}", "dpop": make(token)}, scheme="https"
                )
                for _ in range(n)
            ]
            reasons = set()
            took: list[int] = []
            for view in views:
                start = time.perf_counter_ns()
                decision = engine.decide(view)
                took.append(time.perf_counter_ns() - start)
                reasons.add(getattr(decision, "reason", "?"))
            took.sort()
            # The median: other work on the machine inflates the mean, not the middle.
            out[name] = {"median_us": round(took[n // 2] / 1000, 1), "reasons": sorted(reasons)}
        return out


async def _fetched(store: Any) -> bool:
    return bool(await store.refresh())


def _thumb(jwk: dict[str, str]) -> str:
    canonical = json.dumps({k: jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"), sort_keys=True)
    return b64(hashlib.sha256(canonical.encode()).digest())


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200)))
