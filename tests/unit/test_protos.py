"""The generated protobuf modules and the declared protobuf runtime agree: protoc stamps each module with the
runtime version it needs, and pyproject's `protobuf` floor must not be below it (else a plain install could pick
a protobuf that refuses the agent's own modules at import)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAMP = re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),")


def declared_floor() -> tuple[int, int]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"protobuf\b", d))
    m = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert m, f"no protobuf floor in {spec!r}"
    return int(m[1]), int(m[2])


def generated() -> list[Path]:
    files = [
        *(ROOT / "agent" / "_xds").rglob("*_pb2.py"),
        *(ROOT / "agent" / "controlplane" / "_proto").rglob("*_pb2.py"),
    ]
    assert len(files) > 10, "the generated modules are missing: run make build"
    return files


def test_protobuf_floor_covers_every_generated_module() -> None:
    floor = declared_floor()
    for f in generated():
        m = STAMP.search(f.read_text())
        assert m, f"{f}: no runtime version stamp"
        needs = (int(m[1]), int(m[2]))
        assert needs <= floor, f"{f.relative_to(ROOT)} needs protobuf {needs}, pyproject's floor is {floor}"
        assert needs[0] == floor[0], f"{f.relative_to(ROOT)}: gencode major {needs[0]} vs floor major {floor[0]}"


def test_build_pins_the_generator_that_made_them() -> None:
    """grpcio-tools is held to one minor release in [build-system]; its protoc is what stamps the modules."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    tools = next(r for r in requires if r.startswith("grpcio-tools"))
    assert re.fullmatch(r"grpcio-tools>=1\.(\d+),<1\.(\d+)", tools) and int(tools.split("<1.")[1]) == int(
        tools.split(">=1.")[1].split(",")[0]) + 1, tools  # fmt: skip
    assert any(r.startswith("xds-protos") for r in requires)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if d.startswith("xds-protos")], "xds-protos must stay a build requirement only"


def test_generated_modules_keep_envoys_wire_names() -> None:
    """Relocated files, same proto packages: Envoy calls /envoy.service.auth.v3.Authorization/Check."""
    from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext

    assert ext.DESCRIPTOR.services_by_name["Authorization"].full_name == "envoy.service.auth.v3.Authorization"
    assert ext.CheckRequest.DESCRIPTOR.full_name == "envoy.service.auth.v3.CheckRequest"
