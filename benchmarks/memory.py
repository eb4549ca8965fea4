"""RSS growth of one agent engine after N distinct tokens (prints one JSON line). Run by benchmarks/run.py."""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import multiprocessing.pool
import os
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as S
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.audit.alerts import AlertMonitor
from agent.audit.stats import DecisionStats
from agent.audit.writer import JsonLinesAudit
from agent.config import load_policy
from agent.decision import RequestView
from agent.engine import Engine


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


ISSUER = "https://idp.mem.test"
_KEY: ec.EllipticCurvePrivateKey | None = None
_PREFIX = ""
_HEADER = ""


def _init(pem: bytes, prefix: str, header: str) -> None:
    global _KEY, _PREFIX, _HEADER
    os.sched_setaffinity(0, {1})  # the minting runs on the load CPU, the engine on the server CPU
    key = S.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    _KEY, _PREFIX, _HEADER = key, prefix, header


def _mint(batch: tuple[int, int]) -> list[str]:
    assert _KEY is not None
    out = []
    for i in range(batch[0], batch[0] + batch[1]):
        payload = _PREFIX + f', "sub": "user-{i}", "jti": "j{i}"}}'
        si = f"{_HEADER}.{b64(payload.encode())}"
        r, s = decode_dss_signature(_KEY.sign(si.encode(), ec.ECDSA(hashes.SHA256())))
        out.append(f"{si}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
    return out


async def main(n: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="authz-mem-"))
    key = ec.generate_private_key(ec.SECP256R1())
    nums = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "kid": "m",
        "x": b64(nums.x.to_bytes(32, "big")),
        "y": b64(nums.y.to_bytes(32, "big")),
    }
    (work / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (work / "policy.yaml").write_text(f"""version: 1
service: orders
identity_providers:
  m: {{issuer: "{ISSUER}", jwks_file: jwks.json, audiences: [orders-api], algorithms: [ES256]}}
routes:
  - name: list-orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
""")
    audit = JsonLinesAudit("/dev/null")
    policy = load_policy(work / "policy.yaml")
    # As `run --transport native` builds it: decision stats, the alert monitor, and the table that answers
    # remembered allows from wire bytes (every allow below is remembered there too, up to its bound).
    listeners = (DecisionStats(), AlertMonitor(policy.alerts, lambda kind, detail: None))
    engine = Engine.for_policy(policy, audit, listeners=listeners, wire_recall=True)
    for st in engine.stores.values():
        await st.refresh()
    header = b64(json.dumps({"alg": "ES256", "kid": "m", "typ": "at+jwt"}).encode())
    now = int(time.time())
    prefix = json.dumps({"iss": ISSUER, "aud": "orders-api", "iat": now, "exp": now + 3000, "scope": "orders:read"})[
        :-1
    ]
    pem = key.private_bytes(S.Encoding.PEM, S.PrivateFormat.PKCS8, S.NoEncryption())
    batch = 5000
    ctx = multiprocessing.get_context("fork")

    def run(pool: multiprocessing.pool.Pool, start: int, count: int) -> None:
        batches = [(i, min(batch, start + count - i)) for i in range(start, start + count, batch)]
        for tokens in pool.imap(_mint, batches):
            for token in tokens:
                d = engine.decide(RequestView("GET", "/v1/orders", headers={"authorization": f"Bearer {token}"}))
                assert d is not None and d.allowed, d and d.reason

    with ctx.Pool(1, _init, (pem, prefix, header)) as pool:
        run(pool, 0, 20_000)  # warm up: caches, allocator arenas, the audit writer
        time.sleep(0.2)
        before = rss_mb()
        t = time.perf_counter()
        run(pool, 20_000, n)
        seconds = time.perf_counter() - t
    time.sleep(0.2)
    after = rss_mb()
    audit.close()
    print(
        json.dumps(
            {
                "tokens": n,
                "rss_before_mb": round(before, 1),
                "rss_after_mb": round(after, 1),
                "rss_growth_mb": round(after - before, 1),
                "seconds": round(seconds, 1),
                "cache_entries": len(engine.jwt._cache),
                "recall_entries": len(engine.recall) if engine.recall is not None else 0,
                "audit_dropped": audit.dropped,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
