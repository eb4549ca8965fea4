"""Audit records as OpenTelemetry log records (OTLP/gRPC, or OTLP/HTTP protobuf): a batch is delivered when the
collector's Export call succeeded, which is OTLP's acknowledgement.

Each record: body = the chained JSON line as a string (byte for byte what the local file holds, so the chain
can be checked from the collector's copy), attributes authz.seq, authz.type, authz.decision_id,
authz.service (and authz.alert for alerts), severity INFO for decisions and WARN for alerts, the record's
time as time_unix_nano and its trace_id as the log's trace id.
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
import time
from datetime import datetime
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as svc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as svc_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_INFO,
    SEVERITY_NUMBER_WARN,
    LogRecord,
    ResourceLogs,
    ScopeLogs,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from agent.audit.syslog import record_fields

EXPORT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0


class ExportFailed(ConnectionError):
    """The collector did not accept the batch (unavailable, refused, timed out): it is sent again."""


def _attr(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _nanos(stamp: object) -> int:
    if isinstance(stamp, str):
        with contextlib.suppress(ValueError):
            t = datetime.fromisoformat(stamp)
            return int(t.replace(microsecond=0).timestamp()) * 1_000_000_000 + t.microsecond * 1000
    return 0


def log_record(line: bytes, observed_ns: int) -> LogRecord:
    """The OTLP log record of one chained audit line."""
    record = record_fields(line)
    alert = record.get("type") == "alert"
    attrs = []
    for key in ("seq", "type", "decision_id", "service", "alert"):
        value = record.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            attrs.append(_attr(f"authz.{key}", value))
    out = LogRecord(
        time_unix_nano=_nanos(record.get("time")),
        observed_time_unix_nano=observed_ns,
        severity_number=SEVERITY_NUMBER_WARN if alert else SEVERITY_NUMBER_INFO,
        severity_text="WARN" if alert else "INFO",
        body=AnyValue(string_value=line.decode("utf-8", "replace")),
        attributes=attrs,
    )
    trace_id = record.get("trace_id")
    if isinstance(trace_id, str) and len(trace_id) == 32:
        with contextlib.suppress(ValueError):
            out.trace_id = bytes.fromhex(trace_id)
    return out


def export_request(lines: list[bytes], hostname: str) -> svc.ExportLogsServiceRequest:
    now = time.time_ns()
    resource = Resource(attributes=[_attr("service.name", "authz-agent"), _attr("host.name", hostname)])
    records = [log_record(line, now) for line in lines]
    scope = ScopeLogs(scope=InstrumentationScope(name="authz-agent.audit"), log_records=records)
    return svc.ExportLogsServiceRequest(resource_logs=[ResourceLogs(resource=resource, scope_logs=[scope])])


class _Acknowledged:
    """A connection whose every call answers for itself (no delivery to judge between calls, unlike syslog's)."""

    settle_s = 0.0
    rejected = 0  # records a collector said it rejected (partial success): not sent again, it would refuse again

    def check(self) -> None:
        """Nothing to watch between calls: each answers for itself."""

    def finish(self, timeout_s: float = 2.0) -> bool:
        self.close()
        return True

    def close(self) -> None:
        raise NotImplementedError


class OtlpGrpcConnection(_Acknowledged):
    """A gRPC channel to an OTLP collector's LogsService. Export's success is the acknowledgement."""

    def __init__(self, target: str, hostname: str, credentials: grpc.ChannelCredentials | None) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.enable_http_proxy", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = svc_grpc.LogsServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.hostname = hostname
        try:  # connected (and TLS agreed) before the sink counts as up
            grpc.channel_ready_future(self.channel).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise ExportFailed("the OTLP collector cannot be reached") from None

    def send(self, lines: list[bytes]) -> None:
        try:
            reply = self.stub.Export(export_request(lines, self.hostname), timeout=EXPORT_TIMEOUT_S)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            raise ExportFailed(f"OTLP Export: {code.name if code is not None else 'failed'}") from None
        self.rejected += int(reply.partial_success.rejected_log_records)

    def close(self) -> None:
        self.channel.close()


class OtlpHttpConnection(_Acknowledged):
    """OTLP/HTTP with protobuf bodies (POST /v1/logs): a 2xx answer is the acknowledgement."""

    def __init__(self, host: str, port: int, path: str, hostname: str, tls: ssl.SSLContext | None) -> None:
        if tls is None:
            self.http: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=EXPORT_TIMEOUT_S)
        else:
            self.http = http.client.HTTPSConnection(host, port, timeout=EXPORT_TIMEOUT_S, context=tls)
        self.path = path
        self.hostname = hostname
        self.http.connect()  # connected (and TLS agreed) before the sink counts as up

    def send(self, lines: list[bytes]) -> None:
        body = export_request(lines, self.hostname).SerializeToString()
        self.http.request("POST", self.path, body, {"Content-Type": "application/x-protobuf"})
        resp = self.http.getresponse()
        data = resp.read()
        if not 200 <= resp.status < 300:
            raise ExportFailed(f"OTLP/HTTP: status {resp.status}")
        reply = svc.ExportLogsServiceResponse()
        with contextlib.suppress(Exception):
            reply.ParseFromString(data)
        self.rejected += int(reply.partial_success.rejected_log_records)

    def close(self) -> None:
        self.http.close()
