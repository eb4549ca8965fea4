"""CheckRequest -> RequestView and Decision -> CheckResponse with Envoy's generated messages (the reference codec)."""

from __future__ import annotations

from typing import Any

from agent._xds.envoy.config.core.v3 import base_pb2
from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent.decision import Decision, RequestView
from agent.response import RPC_CODE, RPC_PERMISSION_DENIED

_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


def decode(req: Any) -> RequestView:
    http = req.attributes.request.http
    headers: dict[str, str] = dict(http.headers)
    if not headers and len(http.header_map.headers):
        # Envoy with encode_raw_headers sends header_map; repeated fields are joined like Envoy joins them.
        for h in http.header_map.headers:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            key = h.key.lower()
            headers[key] = f"{headers[key]},{value}" if key in headers else value
    source = req.attributes.source
    return RequestView(
        method=http.method,
        path=http.path,
        host=http.host,
        headers=headers,
        source=source.address.socket_address.address,
        scheme=http.scheme,
        # with_request_body sends `raw_body` when pack_as_bytes is set, `body` (UTF-8 text) otherwise.
        body=http.raw_body or http.body.encode("utf-8"),
        certificate=source.certificate,
    )


def encode(d: Decision) -> Any:
    resp = ext.CheckResponse()
    meta = resp.dynamic_metadata
    meta["decision_id"] = d.decision_id
    meta["decision"] = d.outcome
    meta["reason"] = d.reason
    if d.route is not None:
        meta["route"] = d.route
    if d.allowed:
        resp.status.code = 0
        ok = resp.ok_response
        for key, value in d.upstream_headers:
            opt = ok.headers.add()
            opt.header.key = key
            opt.header.value = value
            opt.append_action = _OVERWRITE
        ok.headers_to_remove.extend(d.remove_headers)
        for key, value in d.response_headers:  # to the client with the upstream's response (e.g. RateLimit)
            opt = ok.response_headers_to_add.add()
            opt.header.key = key
            opt.header.value = value
            opt.append_action = _OVERWRITE
        return resp
    resp.status.code = RPC_CODE.get(d.status, RPC_PERMISSION_DENIED)
    denied = resp.denied_response
    denied.status.code = d.status  # envoy.type.v3.StatusCode uses the HTTP numbers
    for key, value in d.response_headers:
        opt = denied.headers.add()
        opt.header.key = key
        opt.header.value = value
        opt.append_action = _OVERWRITE
    denied.body = d.body.decode("utf-8")
    return resp
