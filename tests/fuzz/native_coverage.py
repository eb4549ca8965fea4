"""Load coverage-instrumented builds of the Cython extensions for the fuzz targets, when `make fuzz` made them.

`make fuzz` builds agent._wire_c and agent._h2_c with clang's -fsanitize-coverage into build/fuzz-ext,
linked (with an rpath) against atheris' bundled libFuzzer core, which provides the coverage hooks; the
dynamic linker loads that same file atheris later imports, so there is one libFuzzer. Call this after
atheris.Setup() and before importing the extensions: libFuzzer then sees the native code's edges and
comparisons, not just the Python around it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import atheris


def use_instrumented_extensions() -> bool:
    ext_dir = os.environ.get("AGENT_FUZZ_EXT")
    if not ext_dir:
        return False
    import agent

    agent.__path__.insert(0, os.path.abspath(ext_dir))
    return True


def run(test_one: Callable[[bytes], None], seeds: Callable[[], list[bytes]], load: Callable[[], None]) -> None:
    """A fuzz target's main: `--seeds DIR` writes its seed corpus; otherwise set up, import the native
    module under test (`load`, instrumented when built so), and fuzz."""
    if len(sys.argv) == 3 and sys.argv[1] == "--seeds":
        for i, seed in enumerate(seeds()):
            Path(sys.argv[2], f"seed-{i}").write_bytes(seed)
        return
    atheris.Setup(sys.argv, test_one)
    use_instrumented_extensions()  # after Setup: atheris' libFuzzer is loaded for them to link against
    with atheris.instrument_imports(include=["agent"]):
        load()
    atheris.Fuzz()
