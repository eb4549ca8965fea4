"""Whether the OpenTelemetry protobuf modules are opentelemetry-proto's own.

xds-protos (Envoy's API as Python modules) ships an older copy of `opentelemetry/proto/` into the same
directory, and whichever wheel pip unpacks last wins. The agent no longer depends on it (agent/_xds/ is generated
at build time), but an environment may still hold it. With the old copy, the OTLP exporters fail at import (no
`InstrumentationScope`): `--otlp-endpoint` and `--audit-sink otlp://` check first and say how to repair the
install instead. `python -m agent.otelproto` checks it (the Makefile and the image recipe do, after installing)."""

from __future__ import annotations

import sys

REPAIR = (
    "the OpenTelemetry protobuf modules are xds-protos' older copy, not opentelemetry-proto's: repair with "
    "`pip install --no-deps --force-reinstall opentelemetry-proto==VERSION` (the version installed)"
)


def problem() -> str | None:
    """None when the modules are opentelemetry-proto's; else what is wrong and how to repair it."""
    try:
        from opentelemetry.proto.common.v1 import common_pb2
    except ImportError as e:
        return f"opentelemetry-proto is not importable ({e}); install it"
    if not hasattr(common_pb2, "InstrumentationScope"):
        return REPAIR
    return None


def main() -> int:
    found = problem()
    if found is not None:
        print(f"agent.otelproto: {found}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
