"""Declares the Cython extensions only; all other metadata is in pyproject.toml."""

import os

from setuptools import Extension, setup

# Each native/_x.pyx is built as agent._x_c beside its pure twin agent/_x_py.py. AGENT_NO_EXTENSIONS=1 at
# build time skips them (the twins serve), as multidict and yarl do.
NAMES = ["_wire", "_h2", "_b64", "_jsonobj", "_bucket"]
LIBRARIES = {"_h2": ["nghttp2"]}


def extensions() -> list[Extension]:
    if os.environ.get("AGENT_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    names = [n for n in NAMES if n != "_h2" or os.path.exists("/usr/include/nghttp2/nghttp2.h")]
    exts = [
        Extension(f"agent.{name}_c", [f"native/{name}.pyx"], libraries=LIBRARIES.get(name, []),
                  extra_compile_args=["-O2"])
        for name in names
    ]
    return cythonize(exts, language_level=3, include_path=["native"], compiler_directives={"embedsignature": True})


setup(ext_modules=extensions())
