"""`run` says at start which transport serves and why; a build without the native one warns instead of serving
slower unnoticed. Each case starts a real `run` and reads its stderr until the line appears (a deadline, no sleep)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.wait import stderr_line

ROOT = Path(__file__).parent.parent.parent
NATIVE_BUILT = importlib.util.find_spec("agent._h2_c") is not None
# `python -m agent` with the package found only where the process starts: an editable install's import hook (the
# one `make` sets up) would otherwise find a module missing from a copy of the package in the checkout instead.
ONLY_CWD = ["-c", "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in str(f)]; "
            "from agent.cli import main; sys.exit(main())"]  # fmt: skip
SLOWER = "expect a fraction of the native throughput; see docs/packaging.md"


def _env(no_extensions: bool, pythonpath: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AGENT_NO_EXTENSIONS"}
    env["PYTHONPATH"] = str(pythonpath)
    if no_extensions:
        env["AGENT_NO_EXTENSIONS"] = "1"
    return env


@pytest.fixture
def run_agent(write_policy: Callable[..., Path], tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """`authz-agent run` on free ports with stderr piped; stopped (SIGTERM) after the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(env: dict[str, str], *flags: str, cwd: Path = ROOT) -> subprocess.Popen[str]:
        args = [sys.executable, *(ONLY_CWD if cwd != ROOT else ["-m", "agent"]), "run", "--policy", str(write_policy())]
        args += ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--audit-log", str(tmp_path / "audit.log")]
        args += flags
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=cwd))  # fmt: skip
        return procs[-1]

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.skipif(not NATIVE_BUILT, reason="the native transport is not built here")
def test_native_says_so_with_the_libnghttp2_it_runs_with(
    run_agent: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    proc = run_agent(_env(no_extensions=False))
    line = stderr_line(proc, "transport: ")
    assert " INFO " in line
    assert line.rstrip().endswith("transport: native (libnghttp2 " + _libnghttp2() + ", the default where it is built)")


def _libnghttp2() -> str:
    from agent._h2_c import libnghttp2_version

    version = libnghttp2_version()
    assert version.count(".") == 2 and all(p.isdigit() for p in version.split("."))
    return version


def test_grpcio_asked_for_is_said_plainly(run_agent: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    proc = run_agent(_env(no_extensions=False), "--transport", "grpcio")
    line = stderr_line(proc, "transport: ")
    assert " INFO " in line and line.rstrip().endswith("transport: grpcio (requested with --transport grpcio)")


def test_the_pure_path_warns_that_it_is_slower(run_agent: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    proc = run_agent(_env(no_extensions=True))
    line = stderr_line(proc, "transport: ")
    assert " WARNING " in line
    assert line.rstrip().endswith(
        "transport: grpcio: this build has no native transport (AGENT_NO_EXTENSIONS=1: the pure-Python path); " + SLOWER
    )


def test_a_build_without_libnghttp2_headers_warns_and_says_why(
    run_agent: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    """What setup.py makes where nghttp2.h is missing: every extension but agent._h2_c (a copy of the package)."""
    if importlib.util.find_spec("agent._wire_c") is None:
        pytest.skip("the Cython extensions are not built here")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "agent", tree / "agent", ignore=shutil.ignore_patterns("_h2_c*.so", "__pycache__"))
    proc = run_agent(_env(False, tree), cwd=tree)
    line = stderr_line(proc, "transport: ")
    assert " WARNING " in line
    assert line.rstrip().endswith(
        "transport: grpcio: this build has no native transport (agent._h2_c missing: built without libnghttp2 "
        "headers); " + SLOWER
    )


def test_native_asked_for_where_it_is_not_built_is_refused(write_policy: Callable[..., Path], tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--policy", str(write_policy()), "--transport", "native"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(no_extensions=True),
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "--transport native: this build has no native transport (AGENT_NO_EXTENSIONS=1: the pure-Python path); "
        "use --transport grpcio, or see docs/packaging.md"
    )
