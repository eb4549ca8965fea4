"""What `policy test` shows: one line per case on the terminal, and JUnit XML for CI systems."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from agent.policytest.runner import CaseResult, FileResult

INDENT = "      "


def case_lines(c: CaseResult, verbose: bool = False) -> Iterator[str]:
    yield f"{'ok  ' if c.ok else 'FAIL'}  {c.name}" + ("" if c.ok else f"  (line {c.line})")
    for p in c.problems:
        yield f"{INDENT}{p}"
    if not c.ok or verbose:
        if c.trace:
            yield f"{INDENT}decision: {c.status} {c.reason}" + (f", route {c.route}" if c.route else "")
        for step in c.trace:
            yield f"{INDENT}- {step}"


def text_lines(result: FileResult, verbose: bool = False) -> Iterator[str]:
    """The report of one file, as the terminal shows it."""
    version = f" ({result.policy_version})" if result.policy_version else ""
    yield f"{result.path}{version}"
    for err in result.errors:
        yield f"error: {err}"
    for c in result.cases:
        yield from case_lines(c, verbose)
    for note in result.notes:
        yield f"note: {note}"
    for gap in result.uncovered:
        yield f"not covered: {gap}"
    if result.require_coverage and result.uncovered:
        yield f"--require-coverage: {len(result.uncovered)} gap(s) fail the run"
    yield result.summary()


def junit(results: list[FileResult]) -> bytes:
    """JUnit XML (the Ant/Jenkins schema CI systems read): one testsuite per file, one testcase per case.

    A file that could not be run is one testcase with an <error>; coverage gaps are a `coverage` testcase that
    fails only under --require-coverage (else they are listed in the suite's system-out)."""
    root = ET.Element("testsuites", name="authz-agent policy test")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    stamp = datetime.now(UTC).replace(microsecond=0, tzinfo=None).isoformat()
    host = socket.gethostname()
    for r in results:
        suite = ET.SubElement(root, "testsuite", name=r.path, timestamp=stamp, hostname=host)
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="policy", value=r.policy_version or "")
        classname = Path(r.path).name.removesuffix(".yaml")
        tests = failures = errors = 0
        seconds = 0.0
        if r.errors:
            tests, errors = 1, 1
            tc = ET.SubElement(suite, "testcase", classname=classname, name="(test file)", file=r.path)
            err = ET.SubElement(tc, "error", message=r.errors[0], type="InvalidTestFile")
            err.text = "\n".join(r.errors)
        for c in r.cases:
            tests += 1
            seconds += c.seconds
            tc = ET.SubElement(suite, "testcase", classname=classname, name=c.name, file=r.path, line=str(c.line),
                               time=f"{c.seconds:.6f}")  # fmt: skip
            if not c.ok:
                failures += 1
                f = ET.SubElement(tc, "failure", message="; ".join(c.problems), type="ExpectationFailed")
                f.text = "\n".join(case_lines(c))
        if r.uncovered and r.require_coverage:
            tests += 1
            failures += 1
            tc = ET.SubElement(suite, "testcase", classname=classname, name="coverage", file=r.path)
            f = ET.SubElement(tc, "failure", message=f"{len(r.uncovered)} not covered", type="CoverageGap")
            f.text = "\n".join(f"not covered: {g}" for g in r.uncovered)
        out = [f"note: {n}" for n in r.notes] + [f"not covered: {g}" for g in r.uncovered]
        if out:
            ET.SubElement(suite, "system-out").text = "\n".join(out)
        suite.set("tests", str(tests))
        suite.set("failures", str(failures))
        suite.set("errors", str(errors))
        suite.set("skipped", "0")
        suite.set("time", f"{seconds:.6f}")
        totals["tests"] += tests
        totals["failures"] += failures
        totals["errors"] += errors
    for k, v in totals.items():
        root.set(k, str(v))
    ET.indent(root)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml + b"\n"
