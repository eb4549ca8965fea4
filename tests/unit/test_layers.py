"""The layers DESIGN draws: the engine, the rules and the verifiers import no transport, no grpc and no audit."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_engine_imports_neither_transports_nor_grpc_nor_audit() -> None:
    code = (
        "import json, sys\n"
        "import agent.engine, agent.policy.rules, agent.policy.cel, agent.config\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'"
        " or m.startswith(('agent.audit', 'agent.server', 'agent.controlplane')))\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
