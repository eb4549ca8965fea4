"""Fan-out of one policy change from the control plane to N agent streams (prints one JSON line).

Simulated agents: N PolicySync streams (Hello, then a Status per bundle, as the real client sends) over
a few channels, on one core beside the control plane. Measures the time from a policy file change to
the last agent receiving the new bundle, and the control plane's RSS per connected agent.
Usage: python -m benchmarks.fanout N
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.controlplane.server import SYNC_METHOD, ControlPlane
from benchmarks.memory import rss_mb

POLICY = """version: 1
service: orders
routes:
  - {{name: health, match: {{path: /healthz}}, public: true}}
  - {{name: r{n}, match: {{path: /r{n}}}, public: true}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(n: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="authz-fanout-"))
    (work / "orders.yaml").write_text(POLICY.format(n=0))
    cp = ControlPlane(work, Ed25519PrivateKey.generate(), f"127.0.0.1:{free_port()}", None, poll_s=0.1)
    await cp.start()
    base_rss = rss_mb()
    # A server allows ~100 concurrent streams per connection; real agents each have their own.
    opts = [("grpc.use_local_subchannel_pool", 1)]  # separate connections, not one shared subchannel
    channels = [grpc.aio.insecure_channel(cp.listen, options=opts) for _ in range(max(1, -(-n // 90)))]
    received: list[float] = []
    want = {"version": ""}
    bundle_bytes = 0

    async def agent(i: int) -> None:
        nonlocal bundle_bytes
        outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        outbox.put_nowait(pb.AgentMessage(hello=pb.Hello(service="orders", agent_id=f"sim-{i}")))

        async def requests():  # type: ignore[no-untyped-def]
            while True:
                yield await outbox.get()

        call = channels[i % len(channels)].stream_stream(
            SYNC_METHOD,
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.ControlMessage.FromString,
        )(requests())
        async for msg in call:
            if msg.WhichOneof("kind") != "bundle":
                continue
            payload = pb.BundlePayload.FromString(msg.bundle.payload)
            bundle_bytes = msg.ByteSize()
            if payload.version == want["version"]:
                received.append(time.monotonic())
            outbox.put_nowait(pb.AgentMessage(status=pb.Status(version=payload.version)))

    tasks = [asyncio.get_running_loop().create_task(agent(i)) for i in range(n)]
    deadline = time.monotonic() + 120
    while sum(1 for a in cp.publisher.agents.values() if a.connected and a.version) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("agents did not all connect")
        await asyncio.sleep(0.1)
    rss_connected = rss_mb()
    (work / "orders.yaml").write_text(POLICY.format(n=1))
    changed = time.monotonic()
    await cp.publisher.scan()
    want["version"] = cp.publisher.published["orders"].version
    while len(received) < n:
        if time.monotonic() - changed > 120:
            raise TimeoutError("fan-out did not finish")
        await asyncio.sleep(0.01)
    last = max(received) - changed
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    await cp.stop()
    return {
        "agents": n,
        "fanout_s": round(last, 3),
        "bundle_bytes": bundle_bytes,
        "rss_per_agent_kb": round((rss_connected - base_rss) * 1024 / n, 1),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
