"""What `policy test` shows: one line per case on the terminal, and JUnit XML for CI systems."""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from agent.policytest.runner import CaseResult, FileResult

INDENT = "      "
# What a terminal would act on, XML 1.0 cannot hold or UTF-8 cannot encode: control characters (but tab), lone
# surrogates, U+FFFE/U+FFFF. Case names, paths and values come from the test file and are written as escapes.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def printable(text: str) -> str:
    """`text` on one line, with every character of _UNPRINTABLE as a Python-style escape (\\x1b, \\ud800)."""
    return _UNPRINTABLE.sub(lambda m: repr(m[0])[1:-1], text)


def case_lines(c: CaseResult, verbose: bool = False) -> Iterator[str]:
    return map(printable, _case_lines(c, verbose))


def _case_lines(c: CaseResult, verbose: bool) -> Iterator[str]:
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
    return map(printable, _text_lines(result, verbose))


def _text_lines(result: FileResult, verbose: bool) -> Iterator[str]:
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


def _lines(text: str) -> str:
    return "\n".join(map(printable, text.split("\n")))


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
    for element in root.iter():  # names, paths and messages from the test file: XML 1.0 cannot hold every character
        element.attrib = {k: printable(v) for k, v in element.attrib.items()}
        if element.text:
            element.text = _lines(element.text)
    ET.indent(root)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml + b"\n"
