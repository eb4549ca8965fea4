"""Declares the Cython extensions and generates the project's protobuf code; all other metadata is in
pyproject.toml."""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# Each native/_x.pyx is built as agent._x_c beside its pure twin agent/_x_py.py. AGENT_NO_EXTENSIONS=1 at
# build time skips them (the twins serve), as multidict and yarl do.
NAMES = ["_wire", "_h2", "_b64", "_jsonobj", "_bucket", "_claims", "_auditq", "_recall"]
LIBRARIES = {"_h2": ["nghttp2"], "_auditq": ["crypto"], "_recall": ["crypto"]}
HEADERS = {  # else the twin serves
    "_h2": "/usr/include/nghttp2/nghttp2.h",
    "_auditq": "/usr/include/openssl/evp.h",
    "_recall": "/usr/include/openssl/sha.h",
}


def extensions() -> list[Extension]:
    if os.environ.get("AGENT_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    names = [n for n in NAMES if n not in HEADERS or os.path.exists(HEADERS[n])]
    exts = [
        Extension(f"agent.{name}_c", [f"native/{name}.pyx"], libraries=LIBRARIES.get(name, []),
                  include_dirs=["native/includes"], extra_compile_args=["-O2"])
        for name in names
    ]
    return cythonize(exts, language_level=3, include_path=["native"], compiler_directives={"embedsignature": True})


PROTOS = ["authz/controlplane/v1/policy_sync.proto"]
PROTO_OUT = Path("agent/controlplane/_proto")


def generate_protos() -> None:
    """proto/*.proto -> agent/controlplane/_proto (messages and type stubs), with grpcio-tools' protoc.

    The gRPC service is registered with generic handlers in agent/controlplane, so no generated gRPC
    module (whose absolute imports would not resolve inside the package) is needed.
    """
    from grpc_tools import protoc

    PROTO_OUT.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        src, out = Path("proto") / proto, PROTO_OUT / proto.replace(".proto", "_pb2.py")
        if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
            continue
        rc = protoc.main(["protoc", "-Iproto", f"--python_out={PROTO_OUT}", f"--pyi_out={PROTO_OUT}", proto])
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto}")


class BuildExt(build_ext):
    def run(self) -> None:
        generate_protos()
        super().run()


class BuildPy(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
