"""The baseline: an ext_authz server as people write it by hand, grpcio + PyJWT, one scope check.

Run: python -m benchmarks.baselines.grpcio_pyjwt --listen 127.0.0.1:9300 --jwks jwks.json --issuer I --audience A
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import grpc
import jwt

from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent._xds.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc


class Servicer(ext_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, jwks: dict[str, Any], issuer: str, audience: str, scope: str) -> None:
        self.keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
        self.issuer, self.audience, self.scope = issuer, audience, scope

    def deny(self, status: int) -> Any:
        resp = ext.CheckResponse()
        resp.status.code = 16 if status == 401 else 7
        resp.denied_response.status.code = status
        return resp

    async def Check(self, request: Any, context: Any) -> Any:
        auth = request.attributes.request.http.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return self.deny(401)
        token = auth[7:]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.keys[kid]
            claims = jwt.decode(token, key, algorithms=["RS256", "ES256"], audience=self.audience, issuer=self.issuer)
        except (jwt.PyJWTError, KeyError):
            return self.deny(401)
        if self.scope not in str(claims.get("scope", "")).split():
            return self.deny(403)
        resp = ext.CheckResponse()
        resp.status.code = 0
        opt = resp.ok_response.headers.add()
        opt.header.key = "x-authz-subject"
        opt.header.value = str(claims.get("sub", ""))
        return resp


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--jwks", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--audience", required=True)
    p.add_argument("--scope", default="orders:read")
    a = p.parse_args()
    with open(a.jwks) as f:
        jwks = json.load(f)
    server = grpc.aio.server()
    ext_grpc.add_AuthorizationServicer_to_server(Servicer(jwks, a.issuer, a.audience, a.scope), server)
    server.add_insecure_port(a.listen)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
