"""atheris target: the Cython CheckRequest decoder never crashes and agrees with xds-protos when both parse.

python tests/fuzz/fuzz_wire.py [libFuzzer flags] [corpus dir]; `make fuzz` runs it long, `make test` short.
"""

from __future__ import annotations

from typing import Any

import atheris
from native_coverage import run

from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext

with atheris.instrument_imports(include=["agent"]):
    from agent.errors import WireError
    from agent.server.envoy_wire import decode

decode_check_request: Any = None


def test_one(data: bytes) -> None:
    try:
        got = decode_check_request(data)
    except WireError:
        got = None
    ref = ext.CheckRequest()
    try:
        ref.ParseFromString(data)
    except Exception:
        return
    if got is not None:
        expected = decode(ref)
        if got != expected:
            raise AssertionError(f"decoders disagree: {got!r} != {expected!r}")


def seeds() -> list[bytes]:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/v1/orders", "h"
    http.headers["authorization"] = "Bearer a.b.c"
    req.attributes.source.address.socket_address.address = "10.0.0.1"
    hv = http.header_map.headers.add()
    hv.key, hv.raw_value = "x", b"y"
    return [req.SerializeToString()]


def load() -> None:
    global decode_check_request
    from agent._wire_c import decode_check_request as decoder

    decode_check_request = decoder


if __name__ == "__main__":
    run(test_one, seeds, load)
