"""Run the demo: local IdP, demo app, a control plane with its web console, the agent (taking its policy from
that control plane) and a real Envoy in front; print curl lines that work, the console's URL and its logins."""

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
from agent.controlplane.bundle import load_signing_key, load_verify_keys, write_keypair
from agent.controlplane.client import PolicyClient
from agent.controlplane.console import CONSOLE_MODULES, ConsoleConfig
from agent.controlplane.server import ControlPlane
from agent.demo.app import demo_app, start_site
from agent.demo.client import DpopKey, sign_request
from agent.demo.idp import LocalIdP
from agent.envoyconf import EnvoyProcess, bootstrap
from agent.server.run import AgentServer

DEMO_ISSUER = "http://127.0.0.1:9400"  # what agent/demo/policy.yaml names; the local IdP's actual address replaces it
DEMO_SERVICE = "orders"  # agent/demo/policy.yaml's service
CONSOLE_CLIENT_ID = "authz-console"  # the console's client at the demo IdP


def demo_policy_text(issuer: str) -> str:
    text = resources.files("agent.demo").joinpath("policy.yaml").read_text()
    return text.replace(f"issuer: {DEMO_ISSUER}", f"issuer: {issuer}", 1)


async def run_demo(port: int = 10000, self_test: bool = False, workdir: str | None = None,
                   console_port: int = 0) -> int:  # fmt: skip
    """The demo on this loop; the CLI runs it under uvloop when the native transport is built."""
    work = Path(workdir or tempfile.mkdtemp(prefix="authz-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    idp = LocalIdP()
    await idp.start()
    app_runner, app_port = await start_site(demo_app())
    hmac_key = secrets.token_bytes(32)
    # The policy goes through the control plane: validated, signed, pushed to the agent, shown in the console.
    policies, state = work / "policies", work / "agent-state"
    for d in (policies, state):
        d.mkdir(exist_ok=True)
        (d / "billing-batch.key").write_text(base64.b64encode(hmac_key).decode() + "\n")  # the bundle names it
    text = demo_policy_text(idp.issuer)
    load_policy_text(text, "agent/demo/policy.yaml", policies)  # a broken demo policy fails here, said plainly
    (policies / f"{DEMO_SERVICE}.yaml").write_text(text)
    # Its test cases beside it, as a service owner keeps them: the control plane runs them before it publishes,
    # and the console's Policies page shows their results.
    tests_text = resources.files("agent.demo").joinpath("policy.test.yaml").read_text()
    tests_text = tests_text.replace("\npolicy: policy.yaml\n", f"\npolicy: {DEMO_SERVICE}.yaml\n")
    (policies / f"{DEMO_SERVICE}.test.yaml").write_text(tests_text)
    write_keypair(work / "bundle-signing.pem", work / "bundle-verify.pem")
    console = ConsoleConfig(idp.issuer, CONSOLE_CLIENT_ID) if console_available() else None
    cp = ControlPlane(policies, load_signing_key(str(work / "bundle-signing.pem")), "127.0.0.1:0",
                      f"127.0.0.1:{console_port}", console=console, state_dir=work / "control-plane")  # fmt: skip
    from agent.server.native_transport import available

    transport = "native" if available() else "grpcio"
    agent = AgentServer(None, "127.0.0.1:0", None, str(work / "audit.log"), transport=transport)
    client = PolicyClient("127.0.0.1:0", DEMO_SERVICE, state, load_verify_keys(work / "bundle-verify.pem"),
                          agent.install, agent.apply_revocations, lambda: agent.shared)  # fmt: skip
    stop_client = asyncio.Event()
    client_task: asyncio.Task[None] | None = None
    envoy: EnvoyProcess | None = None
    try:
        await cp.start()
        users = idp.demo_users()
        idp.register_client(CONSOLE_CLIENT_ID, [f"http://127.0.0.1:{cp.admin_port}/ui/callback"])
        await agent.start()
        client.address = f"127.0.0.1:{cp.port}"
        client_task = asyncio.get_running_loop().create_task(client.run(stop_client))
        if not await agent.wait_ready(20):
            print("the agent did not become ready (no policy from the control plane, or identity provider keys "
                  f"not loaded): {client.last_error or cp.publisher.errors.get(DEMO_SERVICE) or ''}")  # fmt: skip
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
        print(f"policy: agent/demo/policy.yaml (from the control plane on 127.0.0.1:{cp.port})   "
              f"audit log: {work / 'audit.log'}   (tokens valid 1 h)")  # fmt: skip
        print("its tests: authz-agent policy test agent/demo/policy.test.yaml\n")
        if console is not None:
            print(f"console: http://127.0.0.1:{cp.admin_port}/ui/   sign in as ada (admin), password "
                  f"{users['ada']}; or vic (viewer), password {users['vic']}\n")  # fmt: skip
        else:
            print("console: off (it needs the console extra: pip install '.[console]')\n")
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
        stop_client.set()
        if client_task is not None:
            await asyncio.gather(client_task, return_exceptions=True)
        await agent.stop(grace=0.5)
        await cp.stop()
        await app_runner.cleanup()
        await idp.stop()


def console_available() -> bool:
    """Whether the console extra is installed (the demo runs without its console otherwise)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in CONSOLE_MODULES)


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
