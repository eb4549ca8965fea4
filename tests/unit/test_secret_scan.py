"""The secret scan `make lint` runs: it passes on the repository and fails on a committed key or token."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

ROOT = Path(__file__).parent.parent.parent
HOOK = Path(sys.executable).parent / "detect-secrets-hook"


def scan(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HOOK), *map(str, files)], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_repository_has_no_unmarked_secrets() -> None:
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    r = scan(*(ROOT / f for f in files))
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_committed_private_key_or_token_fails_the_scan(tmp_path: Path) -> None:
    key = tmp_path / "leak.py"
    pem = trustme.CA().issue_cert("x.example").private_key_pem.bytes().decode()
    key.write_text(f'SIGNING_KEY = """{pem}"""\n')
    r = scan(key)
    assert r.returncode != 0 and "Private Key" in r.stdout
    token = tmp_path / "config.py"
    # pragma: allowlist nextline secret (test fixture: made-up tokens the scan must catch)
    token.write_text('AWS_SECRET = "AKIAIOSFODNN7EXAMPLQ"\nslack = "xoxb-263594206564-FGqddMF8t08v8N7Oq4i57vs1"\n')
    assert scan(token).returncode != 0
    marked = tmp_path / "fixture.py"
    marked.write_text(f'# pragma: allowlist nextline secret (test fixture)\nKEY = """{pem}"""\n')
    assert scan(marked).returncode == 0  # marked as a fixture, in plain sight of a reviewer
