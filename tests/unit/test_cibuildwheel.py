"""[tool.cibuildwheel] as cibuildwheel itself reads it: the wheels a release job would build for other Pythons and
architectures. Building them needs containers (and QEMU for aarch64), which these machines lack; what cibuildwheel
can check without them, the options and the build selection, is checked here."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cibuildwheel() -> str:
    exe = shutil.which("cibuildwheel", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("cibuildwheel is not installed (it is in the [dev] extra)")
    return exe


def test_the_release_build_selection() -> None:
    run = subprocess.run([cibuildwheel(), "--print-build-identifiers", "--platform", "linux"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    built = set(run.stdout.split())
    assert built == {f"cp3{m}-manylinux_{a}" for m in (11, 12, 13) for a in ("x86_64", "aarch64")}, built


def test_an_unknown_option_would_be_refused(tmp_path: Path) -> None:
    """The check above can fail: cibuildwheel refuses a misspelt option in the same section."""
    text = (ROOT / "pyproject.toml").read_text().replace("\nskip = ", "\nskipp = ", 1)
    (tmp_path / "pyproject.toml").write_text(text)
    run = subprocess.run([cibuildwheel(), "--print-build-identifiers", "--platform", "linux"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode != 0 and "skipp" in run.stderr
