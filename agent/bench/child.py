"""The agent `authz-agent bench` measures, in its own process (so it gets its own core): `run`'s serve(), with
the same transport, token cache, audit chain and limits, but whose identity providers' key stores hold the
bench's throwaway public keys and whose introspection endpoint answers the bench's opaque tokens.

`python -m agent.bench.child` reads its settings and the shared secrets as one JSON document on stdin (a pipe
from the bench, never a command line, a file or a log), then serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from agent.authn.introspection import Introspector
from agent.authn.jwk import parse_jwks
from agent.authn.jwks import KeyStore
from agent.config import load_policy
from agent.config.model import Policy
from agent.errors import ConfigErrors
from agent.policytest.runner import AnsweringIntrospector, FixedKeys
from agent.server.run import StandInIdentity, serve

MAX_SETTINGS_BYTES = 64 << 20  # the answers for every opaque token minted, bounded


def identity(jwks: dict[str, dict[str, Any]], answers: dict[str, dict[str, Any]]) -> StandInIdentity:
    """Key stores with the bench's public keys, and an introspection endpoint answering its opaque tokens."""

    def stores(policy: Policy) -> dict[str, KeyStore]:
        out: dict[str, KeyStore] = {}
        for idp in policy.identity_providers:
            if idp.name in jwks:
                keys, _ = parse_jwks(jwks[idp.name])
                out[idp.name] = FixedKeys(idp, keys)
        return out

    def introspector(real: Introspector) -> Introspector:
        return AnsweringIntrospector(real.idp, time.time, answers)

    return StandInIdentity(stores, introspector)


def orphan_watch(every_s: float = 1.0) -> None:
    """Stop (SIGTERM: drain, as `run` stops) when the bench that started this agent is gone, killed before it could
    stop it: an agent left serving would hold its port and a core."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bench-orphan-watch", daemon=True).start()


def main() -> int:
    from agent.bench.traffic import with_secrets
    from agent.server.native_transport import transport_line

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = json.loads(sys.stdin.buffer.read(MAX_SETTINGS_BYTES))
    sys.stdin.close()
    try:
        policy = load_policy(settings["policy"], stand_ins=True)
    except ConfigErrors as e:
        print(e, file=sys.stderr)
        return 2
    policy = with_secrets(policy, settings["secrets"])
    orphan_watch()
    transport, level, line = transport_line(settings["transport"])
    logging.getLogger("agent").log(level, "%s", line)
    run = serve(
        policy,
        settings["listen"],
        settings["admin"],
        settings["audit_log"],
        None,  # the file is not watched: a reload would drop the bench's stand-ins
        transport,
        settings["token_cache_entries"],
        identity=identity(settings["jwks"], settings["answers"]),
    )
    if transport == "native":
        import uvloop

        uvloop.run(run)
    else:
        asyncio.run(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
