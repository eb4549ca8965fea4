"""Short atheris runs of the fuzz targets on every `make test` (long runs: `make fuzz`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import native_module

FUZZ = Path(__file__).parent.parent / "fuzz"
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed here"),
    pytest.mark.skipif(native_module("_wire") is None, reason="fuzzes the native extensions"),
]


@pytest.mark.parametrize("target", ["fuzz_wire", "fuzz_h2"])
def test_short_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    script = str(FUZZ / f"{target}.py")
    subprocess.run([sys.executable, script, "--seeds", str(tmp_path)], check=True, timeout=60)
    run = subprocess.run(
        [sys.executable, script, "-runs=20000", "-max_len=2048", f"-artifact_prefix={tmp_path}/", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done 20000 runs" in run.stderr
