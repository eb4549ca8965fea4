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


def test_the_cel_runtime_is_loaded_only_for_a_policy_with_a_when() -> None:
    code = (
        "import sys\n"
        "from agent.config import load_policy_text\n"
        "import agent.engine, agent.server.run\n"
        "head = 'version: 1\\nservice: s\\nroutes:\\n  - name: h\\n    match: {path: /h}\\n    public: true\\n'\n"
        "load_policy_text(head)\n"
        "before = 'cel_expr_python' in sys.modules\n"
        'load_policy_text(head + "    deny: [{name: d, when: \'request.method == \\"PUT\\"\'}]\\n")\n'
        "print(before, 'cel_expr_python' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_the_variables_a_when_reads_are_the_ones_cel_declares() -> None:
    from agent.policy import cel, conditions

    assert set(conditions.VARIABLES) == cel.VARIABLES
