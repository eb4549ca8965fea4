"""The bench's Envoy: the bootstrap `envoy-config --policy` writes (agent.envoyconf), plus a second listener that is
the same Envoy without the ext_authz filter ("Envoy alone"), and the upstream as a third listener answering 200
itself (direct_response). An upstream inside Envoy adds the least noise: no other process, no Python, and the same
cost on both paths, so "added by the agent" is the difference between the two listeners.

The upstream reads each request whole before it answers (the buffer filter), as an application does: a direct
response sent while a body is still arriving makes Envoy close that HTTP/1.1 upstream connection, so every request
with a body cost a new TCP connection (and a TIME_WAIT socket), and "Envoy alone" measured that churn, not Envoy."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.config.model import Policy
from agent.envoyconf import MAX_BODY_BYTES, EnvoyProcess, bootstrap, decision_wait_ms, ext_authz_timeout_ms, needs

HCM = "envoy.filters.network.http_connection_manager"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
ROUTER = "envoy.filters.http.router"
BUFFER = "envoy.filters.http.buffer"
TYPES = "type.googleapis.com/envoy.extensions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _upstream_listener(port: int) -> dict[str, Any]:
    routes = [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]
    host = {"name": "upstream", "domains": ["*"], "routes": routes}
    hcm = {
        "@type": f"{TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {"name": "upstream", "virtual_hosts": [host]},
        "http_filters": [
            # The whole request before the answer (see the module docstring); the bound is envoy-config's own.
            {
                "name": BUFFER,
                "typed_config": {
                    "@type": f"{TYPES}.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": MAX_BODY_BYTES,
                },
            },
            {"name": ROUTER, "typed_config": {"@type": f"{TYPES}.filters.http.router.v3.Router"}},
        ],
    }
    return {
        "name": "upstream",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
    }


def bench_bootstrap(policy: Policy, agent_port: int) -> tuple[dict[str, Any], int, int]:
    """(the bootstrap, the port of the listener with the agent, the port of Envoy alone)."""
    with_agent, alone, upstream = free_port(), free_port(), free_port()
    request_body, _ = needs(policy)
    config = bootstrap(
        f"127.0.0.1:{with_agent}",
        f"127.0.0.1:{upstream}",
        f"127.0.0.1:{agent_port}",
        timeout_ms=ext_authz_timeout_ms(decision_wait_ms(policy)),
        request_body=request_body,
    )
    listeners = config["static_resources"]["listeners"]
    second = copy.deepcopy(listeners[0])
    second["name"] = "alone"
    second["address"]["socket_address"]["port_value"] = alone
    for f in second["filter_chains"][0]["filters"]:
        if f["name"] == HCM:
            f["typed_config"]["stat_prefix"] = "alone"
            f["typed_config"]["http_filters"] = [h for h in f["typed_config"]["http_filters"] if h["name"] != EXT_AUTHZ]
    listeners += [second, _upstream_listener(upstream)]
    return config, with_agent, alone


def wait_agent_healthy(envoy: EnvoyProcess, deadline_s: float) -> bool:
    """Whether Envoy's active health check marks the agent's cluster healthy before the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            url = f"http://{envoy.admin_address}/clusters?format=json"
            with urllib.request.urlopen(url, timeout=1.0) as r:
                doc = json.loads(r.read())
        except (OSError, ValueError):
            doc = {}
        for cluster in doc.get("cluster_statuses", []):
            if cluster.get("name") == "authz_agent":
                health = [h.get("health_status", {}) for h in cluster.get("host_statuses", [])]
                if health and not any(h.get("failed_active_health_check") for h in health):
                    return True
        time.sleep(0.05)
    return False


def start_envoy(config: dict[str, Any], workdir: Path) -> EnvoyProcess:
    envoy = EnvoyProcess(config, workdir)
    envoy.start()
    return envoy


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process onto `cpus` (sched_setaffinity of a pid moves only its main thread)."""
    try:
        tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tasks = [pid]
    for tid in tasks:
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.sched_setaffinity(tid, cpus)
