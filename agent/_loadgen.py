"""The load generator of `authz-agent bench`: the Cython one when built (libnghttp2, its loop without the GIL),
else the pure twin (h2, from the [bench] extra; AGENT_NO_EXTENSIONS=1 forces it). NATIVE says which serves.

Load(host, port, items, order, grpc=..., authority=..., connections, streams, rate, duration_s, timeout_s).run()
sends items[order[k]] as request k over h2c. An item is (method, path, headers, body), header names without
pseudo-headers; with grpc=True the body is the bare CheckRequest (the generator adds the gRPC prefix,
content-type and te). rate > 0: open loop, request k due at t0 + k/rate, latency from its due time; rate 0: closed
loop, latency from the send. latencies_ns(), outcomes(), intended_ns() hold one entry per position in `order`
(outcomes: HTTP status, Envoy's reading of a CheckResponse, -1 reset/connection lost, -2 malformed or oversized
answer, -3 not finished in time or due but never sent, 0 never due). native/_loadgen.pyx says the rest."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agent._loadgen_py import MAX_HEADERS, MAX_MESSAGE, Item

if TYPE_CHECKING:  # the twins have one API; the pure one is the type
    from agent._loadgen_py import Load

    NATIVE: bool
elif not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._loadgen_c import Load

        NATIVE = True
    except ImportError:  # not built here: the pure twin serves
        from agent._loadgen_py import Load

        NATIVE = False
else:
    from agent._loadgen_py import Load

    NATIVE = False

__all__ = ["MAX_HEADERS", "MAX_MESSAGE", "NATIVE", "Item", "Load"]
