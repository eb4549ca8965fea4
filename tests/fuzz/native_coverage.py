"""Load coverage-instrumented builds of the Cython extensions for the fuzz targets, when `make fuzz` made them.

`make fuzz` builds agent._wire_c and agent._h2_c with clang's -fsanitize-coverage into build/fuzz-ext,
linked (with an rpath) against atheris' bundled libFuzzer core, which provides the coverage hooks; the
dynamic linker loads that same file atheris later imports, so there is one libFuzzer. Call this after
atheris.Setup() and before importing the extensions: libFuzzer then sees the native code's edges and
comparisons, not just the Python around it.
"""

from __future__ import annotations

import os


def use_instrumented_extensions() -> bool:
    ext_dir = os.environ.get("AGENT_FUZZ_EXT")
    if not ext_dir:
        return False
    import agent

    agent.__path__.insert(0, os.path.abspath(ext_dir))
    return True
