"""xds-protos' older copy of opentelemetry/proto/ over opentelemetry-proto's: refused clearly, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def old_copy(tmp_path: Path) -> dict[str, str]:
    """An environment whose opentelemetry.proto is a copy without InstrumentationScope (as xds-protos ships)."""
    v1 = tmp_path / "opentelemetry" / "proto" / "common" / "v1"
    v1.mkdir(parents=True)
    for d in (v1.parent.parent, v1.parent, v1):
        (d / "__init__.py").write_text("")
    # opentelemetry itself: this copy's proto/ first, the installed rest (sdk, trace) after, as one directory holds
    # both once xds-protos' wheel has overwritten opentelemetry-proto's files.
    (tmp_path / "opentelemetry" / "__init__.py").write_text(
        "import os, sysconfig\n"
        "__path__ = [os.path.dirname(__file__), os.path.join(sysconfig.get_paths()['purelib'], 'opentelemetry')]\n"
    )
    (v1 / "common_pb2.py").write_text("class InstrumentationLibrary: ...\nclass AnyValue: ...\n")
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}


def test_the_installed_modules_are_opentelemetry_protos_own() -> None:
    from agent.otelproto import problem

    assert problem() is None  # what make installs: the Makefile writes opentelemetry-proto's files last


def test_the_old_copy_is_named_with_its_repair(old_copy: dict[str, str]) -> None:
    run = subprocess.run([sys.executable, "-m", "agent.otelproto"], env=old_copy, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 1 and "xds-protos' older copy" in run.stderr and "--force-reinstall" in run.stderr


def test_run_refuses_otlp_with_the_old_copy(old_copy: dict[str, str], write_policy: Callable[..., Path]) -> None:
    policy = str(write_policy())
    for flags in (["--otlp-endpoint", "grpc://127.0.0.1:4317"], ["--audit-sink", "otlp://127.0.0.1:4317"]):
        run = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--policy", policy, "--audit-log", f"{policy}.audit.log", *flags],
            env=old_copy, capture_output=True, text=True, timeout=60,  # refused at once; serving would time out
        )  # fmt: skip
        assert run.returncode == 2 and "xds-protos' older copy" in run.stderr and "Traceback" not in run.stderr
