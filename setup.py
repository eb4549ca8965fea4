"""Declares the Cython extensions and generates the project's protobuf code; all other metadata is in
pyproject.toml."""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# Each native/_x.pyx is built as agent._x_c beside its pure twin agent/_x_py.py. AGENT_NO_EXTENSIONS=1 at
# build time skips them (the twins serve), as multidict and yarl do.
NAMES = ["_wire", "_h2", "_b64", "_jsonobj", "_bucket", "_claims", "_auditq", "_recall", "_loadgen"]
LIBRARIES = {"_h2": ["nghttp2"], "_loadgen": ["nghttp2"], "_auditq": ["crypto"], "_recall": ["crypto"]}
HEADERS = {  # else the twin serves
    "_h2": "nghttp2/nghttp2.h",
    "_loadgen": "nghttp2/nghttp2.h",
    "_auditq": "openssl/evp.h",
    "_recall": "openssl/sha.h",
}
# The packages holding them: Debian/Ubuntu, then RHEL/manylinux (cibuildwheel's before-all).
NGHTTP2, OPENSSL = "libnghttp2-dev (RHEL: libnghttp2-devel)", "libssl-dev (RHEL: openssl-devel)"
PACKAGES = {"_h2": NGHTTP2, "_loadgen": NGHTTP2, "_auditq": OPENSSL, "_recall": OPENSSL}
JOBS = int(os.environ.get("AUTHZ_AGENT_BUILD_JOBS") or os.cpu_count() or 1)  # parallel cythonize and compile
# Set by `make dist` (and cibuildwheel): a wheel without the native transport would quietly serve on grpcio at a
# fraction of the speed, so a build asked for the native parts fails instead of skipping them.
REQUIRE_NATIVE = os.environ.get("AUTHZ_AGENT_REQUIRE_NATIVE", "") not in ("", "0")


def find_header(rel: str) -> str | None:
    """The header in the compiler's usual places (plus CPATH/C_INCLUDE_PATH), or None."""
    extra = os.pathsep.join(os.environ.get(v, "") for v in ("CPATH", "C_INCLUDE_PATH")).split(os.pathsep)
    for d in [*filter(None, extra), "/usr/local/include", "/usr/include"]:
        if os.path.exists(os.path.join(d, rel)):
            return os.path.join(d, rel)
    return None


def missing_headers() -> dict[str, str]:
    """{extension name: header} for the extensions whose system headers are not installed."""
    return {n: h for n, h in HEADERS.items() if find_header(h) is None}


def extensions() -> list[Extension]:
    if os.environ.get("AGENT_NO_EXTENSIONS"):
        if REQUIRE_NATIVE:
            raise SystemExit("AUTHZ_AGENT_REQUIRE_NATIVE=1 and AGENT_NO_EXTENSIONS=1 contradict each other")
        return []
    from Cython.Build import cythonize

    missing = missing_headers()
    if missing:
        wanted = sorted({PACKAGES[n] for n in missing})
        lines = [f"  {n}: {h} not found" for n, h in sorted(missing.items())]
        text = "\n".join([*lines, f"  install: {'; '.join(wanted)}"])
        if REQUIRE_NATIVE:
            raise SystemExit(f"authz-agent: AUTHZ_AGENT_REQUIRE_NATIVE=1 but native headers are missing:\n{text}")
        bar = "!" * 78
        print(f"{bar}\nWARNING authz-agent: building WITHOUT these native parts (their pure-Python twins serve;"
              f" without _h2 the agent runs on grpcio at a fraction of the native throughput):\n{text}\n{bar}",
              file=sys.stderr)  # fmt: skip
    names = [n for n in NAMES if n not in missing]
    exts = [
        Extension(f"agent.{name}_c", [f"native/{name}.pyx"], libraries=LIBRARIES.get(name, []),
                  include_dirs=["native/includes"], extra_compile_args=["-O2"])
        for name in names
    ]
    return cythonize(exts, language_level=3, include_path=["native"], compiler_directives={"embedsignature": True},
                     nthreads=JOBS if JOBS > 1 else 0)


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


# Envoy's ext_authz API, generated into agent/_xds/ at build time from the descriptors xds-protos carries (a build
# requirement only). xds-protos is not a runtime dependency: its wheel also ships an old copy of
# opentelemetry/proto/ into the directory opentelemetry-proto installs to, and whichever pip unpacks last wins, so
# a plain `pip install` of the agent could break OTLP export. The files keep their proto packages (the gRPC method
# is /envoy.service.auth.v3.Authorization/Check on the wire) but are named agent/_xds/..., so their Python modules
# live inside the agent and import each other there. google/protobuf and google/rpc stay where protobuf and
# googleapis-common-protos install them (other libraries import those; a second copy would clash).
# cel/expr (CEL's checked AST, which agent/policy/cel.py walks) comes from xds-protos too.
XDS_SERVICE = "envoy/service/auth/v3/external_auth.proto"
XDS_ROOTS = [XDS_SERVICE, "cel/expr/checked.proto", "cel/expr/syntax.proto"]
XDS_OUT = Path("agent/_xds")
XDS_MOVED = ("envoy/", "udpa/", "validate/", "xds/", "cel/")
XDS_STAMP = XDS_OUT / "GENERATED"
XDS_LOCAL = Path("build/xds-protos")


def generate_xds() -> None:
    """agent/_xds/ from xds-protos' file descriptors (the closure of XDS_ROOTS), with protoc."""
    import importlib.metadata

    if XDS_LOCAL.is_dir() and str(XDS_LOCAL) not in sys.path:  # make's copy, outside the venv (Makefile)
        sys.path.append(str(XDS_LOCAL))
    try:
        from grpc_tools import protoc

        tools = importlib.metadata.version("grpcio-tools")
        source = importlib.metadata.version("xds-protos")
    except (ImportError, importlib.metadata.PackageNotFoundError):
        if XDS_STAMP.exists() and XDS_STAMP.read_text().endswith(f": {', '.join(XDS_ROOTS)}\n"):
            return  # generated by an earlier build (pip's isolated build env had xds-protos)
        raise SystemExit("authz-agent: generating agent/_xds needs the build requirements grpcio-tools and "
                         "xds-protos (pyproject.toml [build-system]); build with pip or `python -m build`") from None
    stamp = f"xds-protos {source}, grpcio-tools {tools}: {', '.join(XDS_ROOTS)}\n"
    if XDS_STAMP.exists() and XDS_STAMP.read_text() == stamp:
        return
    import importlib
    import shutil
    import tempfile

    from google.protobuf import descriptor_pb2

    def moved(name: str) -> str:
        return f"{XDS_OUT.as_posix()}/{name}" if name.startswith(XDS_MOVED) else name

    files: dict[str, bytes] = {}

    def visit(fd: "object") -> None:
        if fd.name in files:  # type: ignore[attr-defined]
            return
        for dep in fd.dependencies:  # type: ignore[attr-defined]
            visit(dep)
        files[fd.name] = fd.serialized_pb  # type: ignore[attr-defined]  # dependencies first, as protoc wants

    for root in XDS_ROOTS:
        visit(importlib.import_module(root.replace("/", ".").replace(".proto", "_pb2")).DESCRIPTOR)
    fds = descriptor_pb2.FileDescriptorSet()
    for data in files.values():
        f = fds.file.add()
        f.ParseFromString(data)
        f.name = moved(f.name)
        deps = [moved(d) for d in f.dependency]
        del f.dependency[:]
        f.dependency.extend(deps)
    shutil.rmtree(XDS_OUT, ignore_errors=True)
    XDS_OUT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        desc = Path(tmp) / "xds.pb"
        desc.write_bytes(fds.SerializeToString())
        targets = [moved(n) for n in files if n.startswith(XDS_MOVED)]
        for args in (["--python_out=.", *targets], ["--grpc_python_out=.", moved(XDS_SERVICE)]):
            if protoc.main(["protoc", f"--descriptor_set_in={desc}", *args]) != 0:
                raise SystemExit(f"protoc failed generating {XDS_OUT}")
    for d in [XDS_OUT, *(p for p in XDS_OUT.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    XDS_STAMP.write_text(stamp)


class BuildExt(build_ext):
    def finalize_options(self) -> None:
        """Compile the extensions in parallel (AUTHZ_AGENT_BUILD_JOBS, default: every CPU) unless -j was given."""
        super().finalize_options()
        if not self.parallel and JOBS > 1:
            self.parallel = JOBS

    def run(self) -> None:
        generate_protos()
        generate_xds()
        super().run()


class BuildPy(build_py):
    def finalize_options(self) -> None:
        """The generated modules' type stubs go into the wheel beside them (agent/py.typed promises types)."""
        super().finalize_options()
        for pkg in self.packages or []:
            if pkg.startswith("agent.controlplane._proto"):
                self.package_data.setdefault(pkg, []).append("*.pyi")

    def run(self) -> None:
        generate_protos()
        generate_xds()
        super().run()


# Generated before setup() runs, so that the package discovery in pyproject.toml (run inside setup()) finds
# agent/controlplane/_proto/... in a fresh sdist, where it does not exist yet: else the wheel lacks it.
generate_protos()
generate_xds()
setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
