"""Run the demo: local IdP, demo app, the agent and a real Envoy in front; print curl lines that work."""

from __future__ import annotations

import asyncio
import base64
import secrets
import signal
import tempfile
import time
from importlib import resources
from pathlib import Path

import aiohttp

from agent.config import load_policy_text
from agent.demo.app import demo_app, start_site
from agent.demo.client import DpopKey, sign_request
from agent.demo.idp import LocalIdP
from agent.envoyconf import EnvoyProcess, bootstrap
from agent.server.run import AgentServer

DEMO_ISSUER = "http://127.0.0.1:9400"  # what agent/demo/policy.yaml names; the local IdP's actual address replaces it


def demo_policy_text(issuer: str) -> str:
    text = resources.files("agent.demo").joinpath("policy.yaml").read_text()
    return text.replace(f"issuer: {DEMO_ISSUER}", f"issuer: {issuer}", 1)


async def run_demo(port: int = 10000, self_test: bool = False, workdir: str | None = None) -> int:
    """The demo on this loop; the CLI runs it under uvloop when the native transport is built."""
    work = Path(workdir or tempfile.mkdtemp(prefix="authz-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    idp = LocalIdP()
    await idp.start()
    app_runner, app_port = await start_site(demo_app())
    hmac_key = secrets.token_bytes(32)
    (work / "billing-batch.key").write_text(base64.b64encode(hmac_key).decode() + "\n")
    policy = load_policy_text(demo_policy_text(idp.issuer), "agent/demo/policy.yaml", work)
    from agent.server.native_transport import available

    transport = "native" if available() else "grpcio"
    agent = AgentServer(policy, "127.0.0.1:0", None, str(work / "audit.log"), transport=transport)
    envoy: EnvoyProcess | None = None
    try:
        await agent.start()
        if not await agent.wait_ready(10):
            print("the agent did not become ready (identity provider keys not loaded)")
            return 1
        cfg = bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{app_port}", f"127.0.0.1:{agent.port}", request_body=True)
        envoy = EnvoyProcess(cfg, work)
        await asyncio.to_thread(envoy.start)
        now = int(time.time())
        reader = idp.mint(sub="alice", tenant_id="acme", scope="orders:read", iat=now, exp=now + 3600)
        no_scope = idp.mint(sub="bob", tenant_id="acme", scope="profile", iat=now, exp=now + 3600)
        base = f"http://127.0.0.1:{port}"
        cases = [
            ("allowed (200): alice may list orders", "GET", "/v1/orders", reader, 200),
            ("401: no token", "GET", "/v1/orders", None, 401),
            ("403: bob's token lacks orders:read", "GET", "/v1/orders", no_scope, 403),
            ("403: alice is tenant acme, not globex", "GET", "/v1/tenants/globex/orders/7", reader, 403),
            (
                "allowed (200): alice reads her own tenant's order",
                "GET",
                "/v1/tenants/acme/orders/7",
                reader,
                200,
            ),
        ]
        print(f"\nauthz-agent demo: Envoy on {base}, agent ({transport}) on 127.0.0.1:{agent.port}, IdP {idp.issuer}")
        print(f"policy: agent/demo/policy.yaml   audit log: {work / 'audit.log'}   (tokens valid 1 h)")
        print("its tests: authz-agent policy test agent/demo/policy.test.yaml\n")
        for title, method, path, token, _ in cases:
            auth = f" -H 'authorization: Bearer {token}'" if token else ""
            print(f"# {title}\ncurl -i -X {method} {base}{path}{auth}\n")
        pop_failed = await _proof_of_possession(base, idp, hmac_key)
        if self_test:
            return await _self_test(base, cases) or pop_failed
        print("Ctrl-C to stop.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        await agent.stop(grace=0.5)
        await app_runner.cleanup()
        await idp.stop()


async def _proof_of_possession(base: str, idp: LocalIdP, hmac_key: bytes) -> int:
    """A DPoP call and a signed call, made here (each needs a fresh proof or signature, so no curl line)."""
    now = int(time.time())
    client = DpopKey()
    bound = idp.mint(sub="carol", roles=["writer"], cnf={"jkt": client.jkt}, iat=now, exp=now + 3600)
    url = base + "/v1/orders"
    dpop_headers = {"authorization": f"DPoP {bound}", "dpop": client.proof("POST", url, bound)}
    body = b'{"period": "2026-11"}'
    signed = sign_request("POST", base + "/v1/billing/runs", body, hmac_key, "billing-batch")
    calls: list[tuple[str, str, str, dict[str, str], bytes, int]] = [
        ("DPoP: carol's key-bound token with a fresh proof", "POST", "/v1/orders", dpop_headers, b"", 200),
        ("DPoP: the same proof replayed", "POST", "/v1/orders", dpop_headers, b"", 401),
        (
            "DPoP: the bound token stolen and sent as Bearer",
            "POST",
            "/v1/orders",
            {"authorization": f"Bearer {bound}"},
            b"",
            401,
        ),
        (
            "RFC 9421: billing-batch signs a request (HMAC, Content-Digest)",
            "POST",
            "/v1/billing/runs",
            signed,
            body,
            200,
        ),
        ("RFC 9421: the body changed after signing", "POST", "/v1/billing/runs", signed, b'{"period": "x"}', 401),
    ]
    print("# proof of possession and signed requests (made by the demo: each needs a fresh proof or signature)")
    failed = 0
    async with aiohttp.ClientSession() as http:
        for title, method, path, headers, data, expected in calls:
            async with http.request(method, base + path, headers=headers, data=data or None) as resp:
                reason = (await resp.json()).get("reason", "") if resp.status >= 400 else ""
                ok = resp.status == expected
                failed += not ok
                print(f"{'ok ' if ok else 'BAD'} {resp.status} {title}" + (f" -> {reason}" if reason else ""))
    print()
    return 1 if failed else 0


async def _self_test(base: str, cases: list[tuple[str, str, str, str | None, int]]) -> int:
    failed = 0
    async with aiohttp.ClientSession() as http:
        for title, method, path, token, expected in cases:
            headers = {"authorization": f"Bearer {token}"} if token else {}
            async with http.request(method, base + path, headers=headers) as resp:
                ok = resp.status == expected
                failed += not ok
                print(f"{'ok ' if ok else 'BAD'} {resp.status} {title}")
    print(f"{len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0
